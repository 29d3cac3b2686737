"""Compression around distillation (issue 16's targets): int8 QAT vs PTQ, pruned vs random init.

  python benchmarks/compression_bench.py [--size full|test] [--tasks text,vision] [--output PATH]

Int8 (text on the built-in stdlib corpus, and vision on the built-in digits): a float KD
student (the parent, the quickstart recipe's distill run) is
  - QAT:   distilled on for ``qat_steps`` more steps from its weights (``student.init_from``)
           under ``student.policy=p=f32,c=int8`` (static activation scales calibrated on 8
           training batches), and converted to int8 at the end of the run (``W/int8``);
  - float: distilled on for the same steps in float32 (the control: how much of QAT's result is
           just more training);
  - PTQ:   quantised as it is (``quantize.ptq``, 8 calibration batches).
Every int8 model is measured through the real int8 path (``quantize.load_int8`` ->
``evaluate.evaluate``: int8 x int8 -> int32 matmuls) on the same validation batches as the
float models, and timed against the float32 parent by ``latency.model_latency`` (compiled
forward, warm, interleaved round-robin, median of repeats) at batch 1 and a serving batch;
bytes are ``latency.size`` of the variables each one serves with.

Pruning (text): the trained teacher is pruned (``prune_run.prune_workdir``, activation scores:
``--prune_heads`` of its heads and ``--prune_d_ff`` of its MLP width kept) into a smaller
student, which is distilled from the teacher for ``prune_steps`` steps; the same-shape student
from random init is distilled for the same steps with the same recipe and seed.

Sizes: ``full`` is a reduced quickstart that fits about 25 minutes on 2 busy CPU cores (the
quickstart's full-size teacher alone takes longer there): the text models are half the
quickstart's width at sequence length 64; the digits recipe is the vision quickstart's own.
Teachers are trained once through ``quickstart.get_teacher`` and cached (keyed by their
config), so later runs reuse them. ``test`` is the recipes' ``,test`` size (seconds).

(Not named ``compression.py``: run as a script, its folder comes first on ``sys.path`` and a
``compression.py`` there shadows the ``compression`` package that jax imports.)
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from jaxdistill import data as data_lib
from jaxdistill import models, quickstart
from jaxdistill.compress import prune_job as prune_run
from jaxdistill.compress import ptq as quantize  # noqa: E402
from jaxdistill.evaluation import evaluate, latency
from jaxdistill.evaluation import job as eval_run
from jaxdistill.parallel import precision
from jaxdistill.parallel import sharding as sharding_lib  # noqa: E402
from jaxdistill.train import loop  # noqa: E402

F32 = "p=f32,c=f32,o=f32"
# Per size: the text models (overriding the quickstart recipe's), the steps of each stage, the
# validation batches, the latency repeats.
SIZES = {
  "full": dict(
    base="full",
    text=dict(
      seq_len=64,
      teacher=dict(d_model=128, num_layers=4, num_heads=4, d_ff=512),
      teacher_steps=500,
      student=dict(d_model=64, num_layers=2, num_heads=4, d_ff=256),
      student_steps=200,
    ),
    qat_steps=60,
    prune_steps=100,
    text_eval_batches=32,
    repeats=20,
  ),
  "test": dict(
    base="test",
    text=None,
    qat_steps=3,
    prune_steps=3,
    text_eval_batches=2,
    repeats=3,
  ),
}
QAT_LR = {"text": 3e-4, "vision": 1e-4}  # continuing from a trained parent: a small rate


def _quiet(cfg, cache_dir: str):
  cfg.cache_dir = cache_dir
  cfg.log.progress = False
  cfg.eval.every = 0  # every model is evaluated at the end, on the same batches
  return cfg


def _shrink(cfg, text: dict | None, side: str, steps: int) -> None:
  """The reduced text recipe: shorter rows, narrower models, other steps (None: unchanged)."""
  if text is None:
    return
  cfg.data.seq_len = text["seq_len"]
  for section in ("student", "teacher"):
    cfg[section].max_len = text["seq_len"]
  cfg.student.update(text[side])
  cfg.optim.update(steps=steps, warmup_steps=max(1, int(0.15 * steps)))


def teacher_dir(task: str, r: dict, cache_dir: str) -> str:
  """The task's trained teacher (from the cache, or trained into it now)."""
  cfg = _quiet(quickstart.teacher_config(r["base"], task), cache_dir)
  if task == "text":
    _shrink(cfg, r["text"], "teacher", (r["text"] or {}).get("teacher_steps", 0))
  data_lib.check(cfg)
  path, _ = quickstart.get_teacher(cfg, log=lambda m: print(m, flush=True))
  return path


def student_cfg(task: str, r: dict, teacher: str, cache_dir: str):
  """The recipe's KD student distilled from ``teacher`` (the parent of every int8 model)."""
  cfg = quickstart.student_config(r["base"], kd=True, teacher_path=teacher, task=task)
  if task == "text" and r["text"]:
    _shrink(cfg, r["text"], "student", r["text"]["student_steps"])
    cfg.teacher.update(r["text"]["teacher"])
  return _quiet(cfg, cache_dir)


def _train(cfg, workdir: str, walls: dict, name: str) -> str:
  start = time.perf_counter()
  loop.train(cfg, workdir)
  walls[name] = time.perf_counter() - start
  print(f"  {name}: {cfg.optim.steps} steps in {walls[name]:.0f} s", flush=True)
  return workdir


def _continued(cfg, parent: str, steps: int, lr: float, policy: str):
  """``cfg`` distilled on from ``parent``'s weights for ``steps`` more steps under ``policy``."""
  cfg = copy.deepcopy(cfg)
  cfg.student.update(policy=policy, init_from=parent)
  cfg.optim.update(steps=steps, lr=lr, warmup_steps=1)
  return cfg


def _eval_cfg(workdir: str):
  """A run's config for its validation data, text tokenised with the run's own tokenizer."""
  cfg = eval_run.run_config(workdir)
  own = os.path.join(workdir, "tokenizer.json")
  if os.path.isfile(own) and not data_lib.is_image_model(cfg):
    cfg.data.tokenizer = own
  data_lib.check(cfg)
  return cfg


def _float(workdir: str, mesh, seq_len: int) -> tuple:
  """(float32 module, variables) of a finished run's student."""
  cfg = eval_run.run_config(workdir)
  cfg.student.policy = F32
  module = models.build(cfg.student, precision.parse_policy(F32), "student")
  path = os.path.join(workdir, "final_params")
  variables, _ = evaluate.load_variables(module, path, mesh, seq_len)
  return module, variables


def measure(floats: dict, int8s: dict, eval_cfg, limit: int, repeats: int, teacher=None) -> dict:
  """Quality (same validation batches), bytes, and latency of the float32 parent vs the int8s.

  Args:
    floats: name -> float workdir (the first is the parent, the latency reference).
    int8s: name -> int8 directory (``W/int8`` or ``quantize.ptq``'s).
    eval_cfg: the config whose validation split is used.
    limit: validation batches (0: the whole split).
    repeats: latency repeats.
    teacher: a teacher workdir to report too (its own CE / accuracy), or None.
  Returns:
    {"quality": name -> evaluate's metrics, "size": name -> latency.size, "latency":
    model_latency's dict over the parent and the int8 models}.
  """
  mesh = sharding_lib.make_mesh(eval_cfg.mesh)
  seq_len = eval_cfg.data.seq_len
  entries = {name: _float(d, mesh, seq_len) for name, d in floats.items()}
  for name, d in int8s.items():
    module, variables, _ = quantize.load_int8(d, mesh)
    entries[name] = (module, variables)
  rows = {
    name: (m, v["params"], {k: x for k, x in v.items() if k != "params"} or None)
    for name, (m, v) in entries.items()
  }
  t = _float(teacher, mesh, seq_len) if teacher else None
  batches = evaluate.validation_batches(eval_cfg, limit)
  quality = evaluate.evaluate(rows, batches, mesh, teacher=(t[0], t[1]["params"]) if t else None)
  timed = {name: entries[name] for name in [next(iter(floats)), *int8s]}
  parent = entries[next(iter(floats))][0]
  lat = latency.model_latency(
    timed, lambda b: latency.example_batch(parent, b, seq_len), (1, 32), repeats=repeats
  )
  return {
    "quality": quality,
    "size": {name: latency.size(v) for name, (_, v) in timed.items()},
    "latency": lat,
  }


def int8_study(task: str, r: dict, tmp: str, cache_dir: str, walls: dict) -> dict:
  """Parent -> QAT / float control / PTQ, all measured (see the module docstring)."""
  teacher = teacher_dir(task, r, cache_dir)
  cfg = student_cfg(task, r, teacher, cache_dir)
  parent = _train(cfg, os.path.join(tmp, f"{task}_parent"), walls, f"{task}_parent")
  steps, lr = r["qat_steps"], QAT_LR[task]
  qat = _train(
    _continued(cfg, parent, steps, lr, "p=f32,c=int8"),
    os.path.join(tmp, f"{task}_qat"),
    walls,
    f"{task}_qat",
  )
  floats = {"parent": parent}
  if r["control"]:
    floats["float_cont"] = _train(
      _continued(cfg, parent, steps, lr, F32),
      os.path.join(tmp, f"{task}_float_cont"),
      walls,
      f"{task}_float_cont",
    )
  start = time.perf_counter()
  ptq = quantize.ptq(parent, os.path.join(tmp, f"{task}_ptq"), calibration_batches=8)
  walls[f"{task}_ptq"] = time.perf_counter() - start
  limit = r["text_eval_batches"] if task == "text" else 0  # digits: the whole test split
  start = time.perf_counter()
  out = measure(
    floats,
    {"qat_int8": os.path.join(qat, "int8"), "ptq_int8": ptq},
    _eval_cfg(parent),
    limit,
    r["repeats"],
    teacher,
  )
  walls[f"{task}_measure"] = time.perf_counter() - start
  out["steps"] = {"parent": cfg.optim.steps, "qat": steps, "qat_lr": lr}
  key = "val_loss" if task == "text" else "accuracy"
  q = out["quality"]
  ref = q["parent"][key]
  out["summary"] = {
    "metric": key,
    **{f"{n}_{key}": q[n][key] for n in q},
    # Text: relative val CE (target <= 0.02); vision: accuracy points (target >= -1).
    "qat_vs_parent": (q["qat_int8"][key] / ref - 1)
    if task == "text"
    else 100 * (q["qat_int8"][key] - ref),
    "ptq_vs_parent": (q["ptq_int8"][key] / ref - 1)
    if task == "text"
    else 100 * (q["ptq_int8"][key] - ref),
    "qat_beats_ptq": q["qat_int8"][key] < q["ptq_int8"][key]
    if task == "text"
    else q["qat_int8"][key] > q["ptq_int8"][key],
    "bytes_ratio_int8_over_f32": out["size"]["qat_int8"]["bytes"] / out["size"]["parent"]["bytes"],
  }
  for b in out["latency"]["batch_sizes"]:
    f32 = out["latency"]["parent"][f"batch_{b}"]["median_s"]
    for n in ("qat_int8", "ptq_int8"):
      out["summary"][f"{n}_over_f32_latency_b{b}"] = (
        out["latency"][n][f"batch_{b}"]["median_s"] / f32
      )
  return out


def prune_study(r: dict, tmp: str, cache_dir: str, walls: dict, targets: dict) -> dict:
  """The text teacher pruned to ``targets`` and distilled vs the same shape from random init."""
  teacher = teacher_dir("text", r, cache_dir)
  pruned = os.path.join(tmp, "text_pruned")
  start = time.perf_counter()
  record = prune_run.prune_workdir(teacher, pruned, targets, calibration_batches=8)
  walls["text_prune"] = time.perf_counter() - start
  with open(os.path.join(pruned, "config.json"), encoding="utf-8") as f:
    saved = json.load(f)["student"]
  cfg = student_cfg("text", r, teacher, cache_dir)
  cfg.student.update({k: saved[k] for k in models.MODEL_KEYS})
  if cfg.student.num_heads != cfg.teacher.num_heads:
    # MiniLM attention transfer pairs heads one to one: off for both students (same recipe).
    cfg.distill.attention.update(weight=0.0, value_weight=0.0)
  steps = r["prune_steps"]
  cfg.optim.update(steps=steps, warmup_steps=max(1, int(0.15 * steps)))
  runs = {"pruned_step0": pruned}
  for name, init in (("from_pruned", pruned), ("from_random", "")):
    c = copy.deepcopy(cfg)
    c.student.init_from = init
    runs[name] = _train(c, os.path.join(tmp, f"text_{name}"), walls, f"text_{name}")
  eval_cfg = _eval_cfg(runs["from_random"])
  mesh = sharding_lib.make_mesh(eval_cfg.mesh)
  seq_len = eval_cfg.data.seq_len
  rows = {n: _float(d, mesh, seq_len) for n, d in runs.items()}
  t = _float(teacher, mesh, seq_len)
  quality = evaluate.evaluate(
    {n: (m, v["params"]) for n, (m, v) in rows.items()},
    evaluate.validation_batches(eval_cfg, r["text_eval_batches"]),
    mesh,
    teacher=(t[0], t[1]["params"]),
  )
  q = quality
  return {
    "targets": targets,
    "changed": record["changed"],
    "params": {"teacher": record["params_before"], "student": record["params_after"]},
    "steps": steps,
    "quality": quality,
    "summary": {
      "from_pruned_val_loss": q["from_pruned"]["val_loss"],
      "from_random_val_loss": q["from_random"]["val_loss"],
      "pruned_step0_val_loss": q["pruned_step0"]["val_loss"],
      "teacher_val_loss": q["teacher"]["val_loss"],
      "pruned_beats_random": q["from_pruned"]["val_loss"] < q["from_random"]["val_loss"],
    },
  }


def _ms(lat: dict, name: str, b: int) -> str:
  s = lat[name][f"batch_{b}"]
  return f"{1e3 * s['median_s']:.2f} / {1e3 * s['p90_s']:.2f}"


def print_int8(task: str, out: dict) -> None:
  key = out["summary"]["metric"]
  q, lat, size = out["quality"], out["latency"], out["size"]
  ref = q["parent"][key]
  label = "val CE" if key == "val_loss" else "test accuracy"
  print(f"\n{task}: int8 from a float KD parent ({out['steps']})")
  print(
    f"| model | {label} | vs parent | MB | ms b=1 (median / p90) | ms b=32 | vs f32 b=1 | b=32 |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for name in [n for n in ("teacher", "parent", "float_cont", "qat_int8", "ptq_int8") if n in q]:
    v = q[name][key]
    rel = f"{100 * (v / ref - 1):+.2f}%" if key == "val_loss" else f"{100 * (v - ref):+.2f} pt"
    shown = f"{v:.4f}" if key == "val_loss" else f"{100 * v:.2f}%"
    cells = ["", "", "", "", ""]
    if name in size:
      cells = [f"{size[name]['bytes'] / 2**20:.3f}", _ms(lat, name, 1), _ms(lat, name, 32)]
      cells += [
        f"{lat[name][f'batch_{b}']['median_s'] / lat['parent'][f'batch_{b}']['median_s']:.2f}x"
        for b in (1, 32)
      ]
    print(f"| {name} | {shown} | {rel} | " + " | ".join(cells) + " |")
  s = out["summary"]
  print(
    f"QAT beats PTQ: {s['qat_beats_ptq']}; int8 bytes / f32: {s['bytes_ratio_int8_over_f32']:.3f}"
  )


def print_prune(out: dict) -> None:
  q = out["quality"]
  print(f"\ntext: teacher pruned to {out['changed']} ({out['params']}), {out['steps']} steps")
  print("| student | val CE | accuracy | agreement | KL(T||S) |")
  print("|---|---|---|---|---|")
  for name in ("teacher", "pruned_step0", "from_pruned", "from_random"):
    m = q[name]
    extra = f"{m['agreement']:.3f} | {m['kl_to_teacher']:.3f}" if "agreement" in m else "| "
    print(f"| {name} | {m['val_loss']:.4f} | {100 * m['accuracy']:.2f}% | {extra} |")
  print(f"pruned beats random: {out['summary']['pruned_beats_random']}")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", choices=tuple(SIZES), default="full")
  p.add_argument("--tasks", default="text,vision", help="text, vision or both")
  p.add_argument("--studies", default="int8,prune", help="int8, prune (text only) or both")
  p.add_argument("--no_control", action="store_true", help="skip the float continuation")
  p.add_argument("--qat_steps", type=int, default=0, help="0 = the size's")
  p.add_argument("--prune_steps", type=int, default=0, help="0 = the size's")
  p.add_argument("--prune_heads", type=float, default=0.75, help="share of heads kept")
  p.add_argument("--prune_d_ff", type=float, default=0.5, help="share of MLP width kept")
  p.add_argument("--cache_dir", default="", help="where teachers are cached (default: usual)")
  p.add_argument("--workdir", default="", help="keep the runs here (default: a temp dir)")
  p.add_argument("--output", default="/tmp/compression.json")
  args = p.parse_args(argv)
  r = dict(SIZES[args.size])
  r["qat_steps"] = args.qat_steps or r["qat_steps"]
  r["prune_steps"] = args.prune_steps or r["prune_steps"]
  r["control"] = not args.no_control
  studies = args.studies.split(",")
  tasks = [t for t in args.tasks.split(",") if t]
  start = time.perf_counter()
  walls: dict = {}
  result = {"size": args.size, "device": jax.devices()[0].device_kind, "wall_s": walls}
  with tempfile.TemporaryDirectory() as scratch:
    tmp = args.workdir or scratch
    for task in tasks:
      result[task] = {}
      if "int8" in studies:
        result[task]["int8"] = int8_study(task, r, tmp, args.cache_dir, walls)
        print_int8(task, result[task]["int8"])
    if "text" in tasks and "prune" in studies:
      targets = {"num_heads": args.prune_heads, "d_ff": args.prune_d_ff}
      result["text"]["prune"] = prune_study(r, tmp, args.cache_dir, walls, targets)
      print_prune(result["text"]["prune"])
  walls["total"] = time.perf_counter() - start
  print(
    f"\ntotal {walls['total']:.0f} s; stages: "
    + ", ".join(f"{k} {v:.0f}" for k, v in walls.items())
  )
  with open(args.output, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2, default=float)
  print(f"wrote {args.output}")
  return result


if __name__ == "__main__":
  main()
