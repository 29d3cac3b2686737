"""Students trained from precomputed teacher targets vs the online teacher and CE alone.

  python benchmarks/cache_quality.py [--cache-dir DIR] [--work DIR] [--json PATH]
      [--quickstart-workdir DIR] [--rows N] [--steps N]

On the quickstart's corpus, tokenizer, teacher and student (``jaxdistill.quickstart``):

1. the teacher: the quickstart's cached one (``--cache-dir``; trained there once if missing);
2. ``jaxdistill precompute`` over the training split (``--rows``, 0 = all of it) with
   top-k (k = 32, bf16 log-probs) and sampled (n = 16 draws) targets in one cache;
3. students, all with the same init, batch size and schedule, ``--steps`` steps each, the
   logit loss 0.9 x (KL or its sparse estimate) + 0.1 CE and nothing else (a cache holds
   logit targets only, so the online student here has no attention / hidden-state terms
   either):

   * ``online_kl``: the teacher runs in the step (dense KL at T = 1);
   * ``cache_topk_renorm`` / ``cache_topk_tail`` / ``cache_sampled``: no teacher in the step,
     targets streamed from the cache (``distill.logit.kind``, jaxdistill/distill/sparse.py);
   * ``ce_student``: CE alone, same steps;
   * ``ce_equal_time``: CE alone for the training time of ``cache_topk_tail`` (its step time
     over the CE step time, measured here, times ``--steps``);

4. all evaluated together on the first ``--eval-batches`` validation batches (validation CE,
   top-1 agreement with and KL from the teacher).

With ``--quickstart-workdir`` the quickstart's own students (full KD recipe, CE, CE at KD's
wall time) are evaluated in the same table. Prints a Markdown table, writes the JSON (list
of rows: ``run``, ``steps``, ``val_loss``, ``agreement``, ``kl_to_teacher``, ``step_s``,
``train_s``) and the precompute's tokens/s and bytes per token.
"""

import argparse
import json
import os
import time

from jaxdistill import data as data_lib
from jaxdistill import quickstart
from jaxdistill.config import validate
from jaxdistill.precompute import text as precompute

CACHE_KINDS = ("topk_renorm", "topk_tail", "sampled")


def logit_only(cfg) -> None:
  """The distillation terms a cache can feed: 0.9 x logit loss + 0.1 CE, nothing else."""
  cfg.distill.attention.update(weight=0.0, value_weight=0.0)
  cfg.distill.hidden.weight = 0.0


def student(args, teacher_path: str, kind: str):
  """A student config: kind = online | ce | one of CACHE_KINDS."""
  cfg = quickstart.student_config(args.size, kd=kind != "ce", teacher_path=teacher_path)
  cfg.cache_dir = args.cache_dir
  cfg.eval.every = 0
  cfg.log.progress = False
  if args.steps:
    cfg.optim.update(steps=args.steps, warmup_steps=max(1, int(0.15 * args.steps)))
  if kind == "ce":
    return cfg
  logit_only(cfg)
  if kind in CACHE_KINDS:
    cfg.teacher.update(source="cache", path=os.path.join(args.work, "targets"))
    cfg.distill.logit.kind = kind
  return cfg


def precompute_targets(args, teacher_path: str) -> dict:
  cfg = student(args, teacher_path, "online")
  cfg.precompute.update(targets="both", k=32, samples=16, rows=args.rows)
  validate.validate(cfg)
  output = os.path.join(args.work, "targets")
  if os.path.exists(os.path.join(output, "manifest.json")):
    print(f"Reusing the targets in {output}")
    return {}
  print(f"Precomputing teacher targets into {output}")
  out = precompute.run(cfg, output)
  shards = [n for n in os.listdir(output) if n.endswith(".arrayrecord")]
  disk = sum(os.path.getsize(os.path.join(output, n)) for n in shards)
  return {
    "rows": out["rows"],
    "tokens": out["tokens"],
    "seconds": out["seconds"],
    "tokens_per_s": out["tokens"] / out["seconds"],
    "bytes_per_token": disk / out["tokens"],
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cache-dir", default="", help="the quickstart cache (teacher, corpus)")
  p.add_argument("--work", default="workdirs/cache_quality", help="targets and students go here")
  p.add_argument("--quickstart-workdir", default="", help="also evaluate its students")
  p.add_argument("--size", default="full", choices=sorted(quickstart.SIZES))
  p.add_argument("--rows", type=int, default=0, help="rows to precompute (0 = whole split)")
  p.add_argument("--steps", type=int, default=0, help="student steps (0 = the quickstart's)")
  p.add_argument("--eval-batches", type=int, default=48)
  p.add_argument("--json", default="")
  args = p.parse_args()
  start = time.perf_counter()

  t_cfg = quickstart.teacher_config(args.size)
  t_cfg.cache_dir = args.cache_dir
  data_lib.check(t_cfg)
  teacher_path = quickstart.get_teacher(t_cfg)[0]
  pre = precompute_targets(args, teacher_path)

  runs, summaries = {}, {}
  for name, kind in [("online_kl", "online"), ("ce_student", "ce")] + [
    (f"cache_{k}", k) for k in CACHE_KINDS
  ]:
    cfg = student(args, teacher_path, kind)
    runs[name] = os.path.join(args.work, name)
    summaries[name] = quickstart.train_stage(cfg, runs[name], name, print)
  ce = summaries["ce_student"]
  ratio = summaries["cache_topk_tail"]["train_s"] / ce["train_s"]
  eq = student(args, teacher_path, "ce")
  eq.optim.steps = max(1, round(eq.optim.steps * ratio))
  eq.optim.warmup_steps = max(1, int(0.15 * eq.optim.steps))
  runs["ce_equal_time"] = os.path.join(args.work, "ce_equal_time")
  summaries["ce_equal_time"] = quickstart.train_stage(
    eq, runs["ce_equal_time"], "ce_equal_time", print
  )
  if args.quickstart_workdir:
    for name in ("kd_student", "ce_student", "ce_student_equal_time"):
      runs[f"quickstart_{name}"] = os.path.join(args.quickstart_workdir, name)
      with open(os.path.join(runs[f"quickstart_{name}"], "summary.json"), encoding="utf-8") as f:
        summaries[f"quickstart_{name}"] = json.load(f)
        summaries[f"quickstart_{name}"]["train_s"] = None

  print("Evaluating")
  results = quickstart.evaluate_runs(
    runs, teacher_path, student(args, teacher_path, "online"), args.eval_batches
  )
  rows = []
  for name in runs:
    s, r = summaries[name], results[name]
    rows.append(
      {
        "run": name,
        "steps": s["steps"],
        "val_loss": r["val_loss"],
        "agreement": r["agreement"],
        "kl_to_teacher": r["kl_to_teacher"],
        "step_s": s["median_step_s"],
        "train_s": s["train_s"],
      }
    )
  teacher_loss = results["teacher"]["val_loss"]
  lines = [
    f"teacher val CE {teacher_loss:.3f}; precompute {json.dumps(pre)}",
    "| run | steps | val CE | agree | KL(T‖S) | step ms | train s |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    train = f"{r['train_s']:.0f}" if r["train_s"] else "-"
    lines.append(
      f"| {r['run']} | {r['steps']} | {r['val_loss']:.3f} | {r['agreement']:.3f} "
      f"| {r['kl_to_teacher']:.3f} | {1000 * r['step_s']:.0f} | {train} |"
    )
  print("\n".join(lines))
  print(f"wall {time.perf_counter() - start:.0f} s")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"teacher_val_loss": teacher_loss, "precompute": pre, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
