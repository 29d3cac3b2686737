"""Teachers that learn, at equal wall time: CE, KD from the frozen teacher, EMA
self-distillation, two born-again generations, mutual learning, codistillation.

  python benchmarks/moving_teachers.py --budget 150 --out /tmp/moving --json /tmp/moving.json
  python benchmarks/moving_teachers.py --size test --budget 4 --pilot 3   # a smoke run

Every method trains the quickstart's student model (``configs/quickstart.py``; the
quickstart's corpus and tokenizer) for the same wall-clock budget of training steps:

  ce          the student on CE alone
  kd          KD from the quickstart's frozen teacher (trained once, cached, as the
              quickstart does; its training time is not charged)
  ema         self-distillation from an EMA of the student (``configs/self_distill.py``)
  born_again  generation 0 on CE, then two generations each distilled from the previous one
              (same architecture, from scratch): the budget is split in three
  mutual      two students, each on CE + KL to the other's current predictions
              (``configs/codistill.py:mutual``)
  codistill   two students on their own halves of each batch, each seeing the other through
              a copy refreshed every ``--exchange_every`` steps (``configs/codistill.py``)

Equal wall time: a pilot of ``--pilot`` steps measures each method's median step time (its
summary's ``median_step_s``: compilation, the input pipeline's start (filling the shuffle
window), evaluation and checkpoints are not charged), then the run gets ``budget / that``
steps (its own warmup and cosine schedule over them). ``step s`` is the real run's steps x
its median step; ``train s`` its training seconds (goodput input + compute + other, which
includes the input pipeline's start). Held-out CE:
the final evaluation over ``--eval_batches`` validation batches (the same batches for every
run), for the student and, for mutual learning and codistillation, the peer. Prints a
markdown table, writes JSON rows.
"""

import argparse
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxdistill import config as config_lib  # noqa: E402
from jaxdistill import quickstart  # noqa: E402
from jaxdistill.models import MODEL_KEYS  # noqa: E402
from jaxdistill.train import loop  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
METHODS = ("ce", "kd", "ema", "born_again", "mutual", "codistill")


def _load(name: str, size: str):
  return config_lib.load_config(os.path.join(CONFIGS, name) + f":{size}")


def method_configs(method: str, size: str, teacher: str, exchange_every: int) -> list:
  """The configs ``method`` trains in order (born-again: three, each the next's teacher;
  ``teacher.path`` of generations 1 and 2 is filled in when they run)."""
  if method == "ce":
    return [quickstart.student_config(size, kd=False)]
  if method == "kd":
    return [quickstart.student_config(size, kd=True, teacher_path=teacher)]
  if method == "ema":
    return [_load("self_distill.py", size)]
  if method in ("mutual", "codistill"):
    cfg = _load("codistill.py", f"{method},{size}")
    if method == "codistill":
      cfg.codistill.exchange_every = exchange_every
    return [cfg]
  if method == "born_again":
    gen0 = quickstart.student_config(size, kd=False)
    gens = []
    for k in (1, 2):  # the born_again pipeline's generation: output-only KD, same shape
      g = quickstart.student_config(size, kd=True, teacher_path="(previous generation)")
      for key in MODEL_KEYS:
        g.teacher[key] = g.student[key]
      g.distill.attention.update(weight=0.0, value_weight=0.0)
      g.distill.hidden.weight = 0.0
      g.seed = gen0.seed + k
      gens.append(g)
    return [gen0, *gens]
  raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _prepare(cfg, steps: int, eval_batches: int):
  cfg.optim.update(steps=steps, warmup_steps=max(1, steps // 10))
  cfg.eval.update(every=steps, batches=eval_batches)  # one evaluation, at the end
  cfg.ckpt.update(every=0, save_final=True)
  cfg.log.progress = False
  return cfg


def _summary(workdir: str) -> dict:
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    return json.load(f)


def _train_s(workdir: str) -> float:
  """Training seconds of a finished run: input + compute + other (no compile, eval, ckpt)."""
  g = _summary(workdir)["goodput_s"]
  return g["input"] + g["compute"] + g["other"]


def _last_eval(workdir: str) -> dict:
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")]
  return [r for r in rows if "eval/loss" in r][-1]


def run_method(method: str, args, teacher: str) -> dict:
  """Pilot, then the budgeted run(s) of ``method``; its row."""
  cfgs = method_configs(method, args.size, teacher, args.exchange_every)
  budget = args.budget / len(cfgs)  # born-again: each generation a third
  row = {"method": method, "steps": [], "step_ms": [], "train_s": 0.0}
  previous = ""
  for k, cfg in enumerate(cfgs):
    if previous:
      cfg.teacher.path = previous
    pilot_dir = os.path.join(args.out, f"pilot-{method}-{k}")
    loop.train(_prepare(cfg, args.pilot, 1), pilot_dir)
    step_s = float(_summary(pilot_dir)["median_step_s"])
    steps = max(args.pilot, int(budget / step_s))
    workdir = os.path.join(args.out, f"{method}-{k}")
    start = time.perf_counter()
    loop.train(_prepare(cfg, steps, args.eval_batches), workdir)
    row["wall_s"] = row.get("wall_s", 0.0) + time.perf_counter() - start
    row["train_s"] += _train_s(workdir)
    row["step_s"] = row.get("step_s", 0.0) + steps * float(_summary(workdir)["median_step_s"])
    row["steps"].append(steps)
    row["step_ms"].append(1e3 * float(_summary(workdir)["median_step_s"]))
    previous = workdir
  last = _last_eval(previous)
  row["val_loss"], row["accuracy"] = last["eval/loss"], last["eval/accuracy"]
  if "eval/peer_1/loss" in last:
    row["peer_val_loss"] = last["eval/peer_1/loss"]
  if method == "born_again":  # generation 0's and 1's own held-out CE too
    row["generation_val_loss"] = [
      _last_eval(os.path.join(args.out, f"{method}-{k}"))["eval/loss"] for k in range(3)
    ]
  return row


def _table(rows: list[dict]) -> None:
  print("| method | steps | median step ms | held-out CE (student) | peer | accuracy | step s "
        "| train s |")  # fmt: skip
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    steps = " + ".join(str(s) for s in r["steps"])
    ms = " / ".join(f"{m:.0f}" for m in r["step_ms"])
    peer = f"{r['peer_val_loss']:.3f}" if "peer_val_loss" in r else "-"
    print(
      f"| {r['method']} | {steps} | {ms} | {r['val_loss']:.3f} | {peer} | "
      f"{r['accuracy']:.1%} | {r['step_s']:.0f} | {r['train_s']:.0f} |"
    )
  for r in rows:
    if "generation_val_loss" in r:
      print("born-again generations 0, 1, 2:", [round(x, 3) for x in r["generation_val_loss"]])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", choices=("full", "test"), default="full")
  ap.add_argument("--budget", type=float, default=150.0, help="training seconds per method")
  ap.add_argument("--pilot", type=int, default=20, help="steps timing each method first")
  ap.add_argument("--eval_batches", type=int, default=48)
  ap.add_argument("--exchange_every", type=int, default=50)
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--out", default="/tmp/moving_teachers")
  ap.add_argument("--json", default="/tmp/moving_teachers.json")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  t_cfg = quickstart.teacher_config(args.size)
  teacher, cached = quickstart.get_teacher(t_cfg)
  rows = []
  for method in args.methods.split(","):
    rows.append(run_method(method, args, teacher))
    print(json.dumps(rows[-1]), flush=True)
  _table(rows)
  meta = {"budget_s": args.budget, "size": args.size, "teacher": teacher, "cached": cached}
  meta.update(device=jax.devices()[0].device_kind, load=os.getloadavg())
  with open(args.json, "w", encoding="utf-8") as f:
    json.dump({"rows": rows, **meta}, f, indent=2)
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
