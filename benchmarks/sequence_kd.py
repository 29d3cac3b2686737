"""Which distillation wins on a task with checkable answers: token KD, sequence KD or on-policy.

  python benchmarks/sequence_kd.py --teacher workdirs/arith_teacher [--out DIR] [--json PATH]
  python benchmarks/sequence_kd.py --size test          (minutes: the machinery only)

The task: the built-in arithmetic problems with worked solutions (``data.source=task``); the
teacher and student of ``configs/on_policy.py`` (``--teacher``: a finished teacher run, else
one is trained first). Students, all from the same init, at the same steps:

  ce                  CE on the reference solutions
  token_kd            forward KL to the teacher on the reference solutions (today's KD)
  seq_kd              CE on teacher-written solutions, wrong answers dropped (verifier)
  seq_kd_unverified   CE on teacher-written solutions, all kept
  gkd                 on-policy half the steps (lmbda 0.5), JSD beta 0.5
  sampled_rkl         on-policy every step, sampled-token reverse KL

With ``--warm_start N`` the token-KD student of the equal-steps phase (or ``--warm_from DIR``)
is trained N more steps by each method (``student.init_from``): on-policy distillation as it
is used in practice, on a student that already writes the format (the GKD paper and the
on-policy recipes start from a fine-tuned student; from scratch the student's own samples
are noise for hundreds of steps).

With ``--equal_time`` every student is run again with its steps scaled so that its wall time
matches token_kd's (steps x token_kd's median step time / its own).

Columns (``jaxdistill eval`` on the held-out problems plus the continuations below): held-out
CE of the reference completions, exact match of greedy answers, top-1 agreement with the
teacher, the student's acceptance rate as the teacher's speculative draft, the teacher's NLL
per token of the student's own greedy and sampled (T=1) completions, distinct-2 and the
repetition rate (share of 4-grams seen earlier in the same completion) of the sampled ones,
steps and wall time (training, plus the set's generation for seq_kd).

``--corpus``: the same study on the quickstart corpus (``configs/on_policy_corpus.py``: the
stdlib, 64-token rows whose first 16 tokens are the prompt): students ce, token_kd, seq_kd
(CE on the teacher's continuations of 2 x 2,048 training-row prompts, ``prompts_from=data``;
no verifier: nothing to check), gkd, sampled_rkl. The teacher: ``--teacher``, else the
recipe's teacher trained once into the quickstart's teacher cache. No exact match; the held-out
CE is on ``--eval_batches`` validation batches of the corpus; the continuations are of the
first 16 tokens of validation rows. On-policy rows also carry the step's time split
(``perf/split_*``: sampling, teacher scoring, update; ``distill.on_policy.time_split``).

Equal time uses each run's mean compute time per step (its goodput's compute seconds / steps:
a GKD run alternates sampling and plain steps, so its median is not its mean).

Prints a table; writes JSON (default /tmp/sequence_kd.json).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import config as config_lib
from jaxdistill import quickstart
from jaxdistill.data import tasks
from jaxdistill.data import text as text_data
from jaxdistill.data import tokenizer as tok_lib
from jaxdistill.evaluation import job as eval_job
from jaxdistill.generate import Sampler, SamplingParams
from jaxdistill.generate import prompts as prompts_lib
from jaxdistill.precompute import generated
from jaxdistill.train import loop

STUDENTS = ("ce", "token_kd", "seq_kd", "seq_kd_unverified", "gkd", "sampled_rkl")
CORPUS_STUDENTS = ("ce", "token_kd", "seq_kd", "gkd", "sampled_rkl")
RECIPE = "configs/on_policy.py"
CORPUS = "configs/on_policy_corpus.py"
RECIPES = {False: RECIPE, True: CORPUS}


def config(
  variant: str, size: str, teacher: str, steps: int = 0, data: str = "", init: str = "",
  corpus: bool = False,
):  # fmt: skip
  recipe_variant = "seq_kd" if variant.startswith("seq_kd") else variant
  cfg = config_lib.load_config(f"{RECIPES[corpus]}:{recipe_variant},{size}")
  if cfg.teacher.source != "none":
    cfg.teacher.update(source="workdir", path=teacher)
  if data:
    cfg.data.task_train_files = os.path.join(data, "shard-*.arrayrecord")
  if steps:
    cfg.optim.update(steps=steps, warmup_steps=max(1, steps // 10))
  if init:
    cfg.student.init_from = init
  cfg.eval.every = 0
  cfg.log.progress = False
  return cfg


def teacher_written(
  teacher: str, size: str, out: str, verified: bool, corpus: bool = False
) -> tuple[str, float, dict]:
  """(the set's directory, seconds to write it, its manifest's drops and rows)."""
  name = "data" if verified else "data_unverified"
  recipe = CORPUS if corpus else "configs/seq_kd.py"
  cfg = config_lib.load_config(f"{recipe}:{name},{size}")
  cfg.teacher.path = teacher
  directory = os.path.join(out, name)
  start = time.perf_counter()
  result = generated.run(cfg, directory)
  return directory, time.perf_counter() - start, {"rows": result["rows"], **result["drops"]}


def _summary(workdir: str) -> dict:
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    return json.load(f)


def _median_step_s(workdir: str) -> float:
  return float(_summary(workdir)["median_step_s"])


def _mean_step_s(workdir: str) -> float:
  """Compute seconds per step (the goodput's compute share; no compile, input or eval)."""
  s = _summary(workdir)
  return float(s["goodput_s"]["compute"]) / max(int(s["steps"]), 1)


def _prompts(cfg, count: int) -> tuple[list, int]:
  """(held-out prompts, new tokens each): a task's validation problems, or the first
  ``distill.on_policy.prompt_tokens`` tokens of a corpus's validation rows."""
  if cfg.data.source == "task":
    probs = tasks.problems(cfg.data.task_seed, "validation", count)
    return [p.prompt for p in probs], cfg.data.seq_len - 12
  p = cfg.distill.on_policy.prompt_tokens or 16
  _, ids, _ = prompts_lib.from_data(cfg, count, p, None)
  return ids, cfg.data.seq_len - p


def continuation_metrics(cfg, student_dir: str, teacher_dir: str, count: int) -> dict:
  """The teacher's NLL of the student's own greedy and sampled completions; distinct-2 and
  repetition of the sampled ones (see the module docstring)."""
  tokenizer = text_data.prepare(cfg).tokenizer
  eos = tok_lib.eos_id(tokenizer)
  _, s_module, s_vars = eval_job.load_student(student_dir)
  _, t_module, t_vars = eval_job.load_student(teacher_dir)
  prompts, new_tokens = _prompts(cfg, count)
  out = {}
  for name, sampling in (("greedy", SamplingParams()), ("sampled", SamplingParams(1.0))):
    done = Sampler(s_module, s_vars, tokenizer, batch_size=64).generate(
      prompts, max_new_tokens=new_tokens, sampling=sampling, stop_tokens=[eos]
    )
    out[f"teacher_nll_{name}"] = _teacher_nll(t_module, t_vars, done, cfg.data.seq_len)
    if name == "sampled":
      out.update(_diversity([c.token_ids for c in done]))
  return out


def _teacher_nll(module, variables, done, seq_len: int) -> float:
  """Mean -log p_teacher per completion token of prompt + completion rows."""
  rows = [list(c.prompt_ids) + list(c.token_ids) for c in done]
  t = min(max(len(r) for r in rows), seq_len)
  inputs = np.zeros((len(rows), t), np.int32)
  weights = np.zeros((len(rows), t), np.float32)
  for i, (r, c) in enumerate(zip(rows, done)):
    r = r[: t + 1]
    inputs[i, : len(r) - 1] = r[:-1]
    weights[i, len(c.prompt_ids) - 1 : len(r) - 1] = 1
  targets = np.zeros_like(inputs)
  for i, r in enumerate(rows):
    r = r[: t + 1]
    targets[i, : len(r) - 1] = r[1:]
  logits = module.apply(variables, jnp.asarray(inputs))["logits"]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  token_logp = np.asarray(jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], -1)[..., 0])
  return float(-(token_logp * weights).sum() / max(weights.sum(), 1))


def _diversity(completions: list[list[int]]) -> dict:
  bigrams, total, repeats, grams = set(), 0, 0, 0
  for ids in completions:
    pairs = list(zip(ids, ids[1:]))
    bigrams.update(pairs)
    total += len(pairs)
    seen = set()
    for i in range(len(ids) - 3):
      g = tuple(ids[i : i + 4])
      repeats += g in seen
      seen.add(g)
      grams += 1
  return {"distinct_2": len(bigrams) / max(total, 1), "repetition": repeats / max(grams, 1)}


def evaluate(cfg, workdir: str, teacher: str, count: int, batches: int = 0) -> dict:
  result = eval_job.evaluate_workdir(workdir, teacher_dir=teacher, batches=batches)
  m = result["models"]["student"]
  row = {k: m.get(k) for k in ("val_loss", "exact_match", "agreement", "draft_acceptance")}
  row["teacher_exact_match"] = result["models"].get("teacher", {}).get("exact_match")
  row.update(continuation_metrics(cfg, workdir, teacher, count))
  return row


def _args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--teacher", default="", help="a finished teacher run (default: train one)")
  ap.add_argument("--size", choices=("full", "test"), default="full")
  ap.add_argument("--corpus", action="store_true", help="the quickstart corpus, not the task")
  ap.add_argument("--out", default="/tmp/sequence_kd")
  ap.add_argument("--json", default="/tmp/sequence_kd.json")
  ap.add_argument("--students", default="", help="comma-separated (default: all)")
  ap.add_argument("--equal_time", action="store_true")
  ap.add_argument("--warm_start", type=int, default=0, help="steps from a token-KD student")
  ap.add_argument("--warm_from", default="", help="that student (default: this run's)")
  ap.add_argument("--skip_equal_steps", action="store_true", help="only the later phases")
  ap.add_argument(
    "--times_from", default="", help="equal time: the --out of an earlier equal-steps run"
  )
  ap.add_argument("--continuations", type=int, default=64, help="held-out prompts sampled")
  ap.add_argument("--eval_batches", type=int, default=0, help="0: all (task), 32 (corpus)")
  ap.add_argument("--lr", type=float, default=0.0, help="every student's lr (0: the recipe's)")
  ap.add_argument("--baseline", default="", help="sampled_rkl: distill.on_policy.baseline")
  ap.add_argument("--signal_clip", type=float, default=0.0, help="sampled_rkl: its clip")
  ap.add_argument("--tag", default="", help="appended to each workdir and student name")
  return ap.parse_args()


def _teacher(args) -> str:
  if args.teacher:
    return args.teacher
  if args.corpus:  # trained once into the quickstart's teacher cache, reused afterwards
    return quickstart.get_teacher(config_lib.load_config(f"{CORPUS}:teacher,{args.size}"))[0]
  teacher = os.path.join(args.out, "teacher")
  loop.train(config_lib.load_config(f"{RECIPE}:teacher,{args.size}"), teacher)
  return teacher


def _adjust(cfg, args, variant: str) -> None:
  """The command line's changes to a student's config (lr, the sampled-token signal)."""
  if args.lr:
    cfg.optim.lr = args.lr
  if variant == "sampled_rkl" and args.baseline:
    cfg.distill.on_policy.baseline = args.baseline
  if variant == "sampled_rkl" and args.signal_clip:
    cfg.distill.on_policy.signal_clip = args.signal_clip


def main() -> None:
  args = _args()
  os.makedirs(args.out, exist_ok=True)
  teacher = _teacher(args)
  batches = args.eval_batches or (32 if args.corpus else 0)
  sets = {}
  wanted = (args.students or ",".join(CORPUS_STUDENTS if args.corpus else STUDENTS)).split(",")
  for verified, variant in ((True, "seq_kd"), (False, "seq_kd_unverified")):
    if variant in wanted:
      sets[variant] = teacher_written(teacher, args.size, args.out, verified, args.corpus)
  rows, times = [], {}
  timed = args.times_from or args.out  # where the equal-steps runs are
  if args.times_from:
    times["token_kd"] = _mean_step_s(os.path.join(timed, "equal_steps-token_kd"))
  phases = [] if args.skip_equal_steps else ["equal_steps"]
  phases += ["equal_time"] if args.equal_time else []
  phases += ["warm_start"] if args.warm_start else []
  for phase in phases:
    for variant in wanted:
      if (phase, variant) in (("warm_start", "ce"), ("equal_time", "token_kd")):
        continue  # token KD's equal-steps run is its equal-time run
      init = ""
      if phase == "warm_start":
        init = args.warm_from or os.path.join(args.out, "equal_steps-token_kd")
      base = config(variant, args.size, teacher, corpus=args.corpus).optim.steps
      steps, name = 0, variant + args.tag
      if phase == "equal_time":
        if name not in times:
          times[name] = _mean_step_s(os.path.join(timed, f"equal_steps-{name}"))
        steps = max(1, round(base * times["token_kd"] / times[name]))
      data = sets[variant][0] if variant in sets else ""
      if variant in sets and sets[variant][2]["rows"] == 0:  # the teacher got nothing right
        rows.append({"phase": phase, "student": name, "data": sets[variant][2], "skipped": 1})
        print(f"{variant}: the teacher-written set kept no sample; skipped", flush=True)
        continue
      if phase == "warm_start":
        steps = args.warm_start
      cfg = config(variant, args.size, teacher, steps, data, init, args.corpus)
      _adjust(cfg, args, variant)
      workdir = os.path.join(args.out, f"{phase}-{name}")
      start = time.perf_counter()
      loop.train(cfg, workdir)
      wall = time.perf_counter() - start
      if phase == "equal_steps":
        times[name] = _mean_step_s(workdir)
      row = {"phase": phase, "student": name, "steps": cfg.optim.steps, "train_s": wall}
      row.update(median_step_s=_median_step_s(workdir), mean_step_s=_mean_step_s(workdir))
      row["lr"] = cfg.optim.lr
      if "on_policy_split" in _summary(workdir):
        row["split"] = _summary(workdir)["on_policy_split"]
      if variant in sets:
        row["data_s"], row["data"] = sets[variant][1], sets[variant][2]
      row.update(evaluate(cfg, workdir, teacher, args.continuations, batches))
      rows.append(row)
      print(json.dumps(row), flush=True)
  _table(rows)
  with open(args.json, "w", encoding="utf-8") as f:
    json.dump({"rows": rows, "teacher": teacher, "size": args.size, "corpus": args.corpus,
               "device": jax.devices()[0].device_kind}, f, indent=2)  # fmt: skip
  print(f"wrote {args.json}")


def _table(rows: list[dict]) -> None:
  cols = [("phase", "{}"), ("student", "{}"), ("steps", "{}"), ("val_loss", "{:.3f}"),
          ("exact_match", "{:.1%}"), ("agreement", "{:.3f}"), ("draft_acceptance", "{:.3f}"),
          ("teacher_nll_greedy", "{:.3f}"), ("teacher_nll_sampled", "{:.3f}"),
          ("distinct_2", "{:.3f}"), ("repetition", "{:.3f}"), ("train_s", "{:.0f}")]  # fmt: skip
  print("| " + " | ".join(c for c, _ in cols) + " |")
  print("|" + "---|" * len(cols))
  for r in rows:
    if r.get("skipped"):
      continue
    cells = [f.format(r[c]) if r.get(c) is not None else "—" for c, f in cols]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
