"""Does distillation pay on the built-in digits? KD vs CE-only students over several seeds.

  python benchmarks/vision_kd_seeds.py --seeds 3 --steps 300 --output /tmp/kd_seeds.json

Trains (or reuses from the cache) the vision quickstart's teacher (configs/cnn_digits.py), then
for each seed the KD student (KL at the recipe's temperature + CE) and the CE-only student for
the same steps, evaluates every model on the whole test split (1,000 digits) and prints the mean
and spread (min..max) of test accuracy, agreement with the teacher and KL, plus the median
step time of each kind (KD runs the teacher forward too). Runs alternate KD / CE per seed so
machine drift hits both alike. ``--temperature`` / ``--kd_weight`` override the recipe.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdistill import quickstart
from jaxdistill.train import loop  # noqa: E402


def _student(kd: bool, seed: int, args, teacher_dir: str):
  cfg = quickstart.student_config("full", kd=kd, teacher_path=teacher_dir, task="vision")
  cfg.seed = seed
  cfg.cache_dir = args.cache_dir
  cfg.log.progress = False
  cfg.eval.every = 0
  cfg.optim.steps = args.steps
  cfg.optim.warmup_steps = max(1, args.steps // 20)
  if kd and args.temperature:
    cfg.distill.temperature = args.temperature
  if kd and args.kd_weight is not None:
    cfg.distill.logit.weight = args.kd_weight
    cfg.distill.ce.weight = 1.0 - args.kd_weight
  return cfg


def _spread(values: list[float]) -> dict:
  return {"mean": statistics.mean(values), "min": min(values), "max": max(values), "all": values}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = the recipe's")
  p.add_argument("--kd_weight", type=float, default=None, help="default: the recipe's")
  p.add_argument("--cache_dir", default="", help="where the teacher is cached (default: usual)")
  p.add_argument("--output", default="", help="JSON results")
  args = p.parse_args()
  t_cfg = quickstart.teacher_config("full", "vision")
  t_cfg.cache_dir = args.cache_dir
  teacher_dir, _ = quickstart.get_teacher(t_cfg)
  rows = {"kd": [], "ce": []}
  with tempfile.TemporaryDirectory() as tmp:
    for seed in range(args.seeds):
      for kind in ("kd", "ce"):
        cfg = _student(kind == "kd", seed, args, teacher_dir)
        workdir = os.path.join(tmp, f"{kind}_{seed}")
        summary = loop.train(cfg, workdir)
        result = quickstart.evaluate_runs({kind: workdir}, teacher_dir, cfg, 0)
        rows[kind].append(dict(result[kind], step_s=summary["median_step_s"]))
        teacher = result["teacher"]
  out = {"steps": args.steps, "seeds": args.seeds, "teacher_accuracy": teacher["accuracy"]}
  for kind, runs in rows.items():
    out[kind] = {
      k: _spread([r[k] for r in runs])
      for k in ("accuracy", "agreement", "kl_to_teacher", "ece", "step_s")
    }
  gain = [k["accuracy"] - c["accuracy"] for k, c in zip(rows["kd"], rows["ce"])]
  out["kd_minus_ce"] = _spread(gain)
  acc = 100 * teacher["accuracy"]
  print(f"teacher test accuracy {acc:.1f}%; {args.steps} steps, {args.seeds} seeds")
  print("| student | test acc (mean, min..max) | agree | KL(T‖S) | ECE | median step |")
  print("|---|---|---|---|---|---|")
  for kind in ("kd", "ce"):
    m = out[kind]
    a = m["accuracy"]
    print(
      f"| {kind} | {100 * a['mean']:.2f}% ({100 * a['min']:.1f}..{100 * a['max']:.1f}) | "
      f"{m['agreement']['mean']:.3f} | {m['kl_to_teacher']['mean']:.3f} | {m['ece']['mean']:.3f} | "
      f"{1e3 * m['step_s']['mean']:.1f} ms |"
    )
  g = out["kd_minus_ce"]
  print(
    f"KD - CE: {100 * g['mean']:+.2f} points "
    f"(per seed {', '.join(f'{100 * x:+.1f}' for x in g['all'])}); "
    f"a KD step costs {out['kd']['step_s']['mean'] / out['ce']['step_s']['mean']:.2f}x a CE step"
  )
  if args.output:
    with open(args.output, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
