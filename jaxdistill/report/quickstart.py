"""The quickstart's report: its summary of what distillation bought and the verdict paragraph,
on top of the general ``jaxdistill report`` (``report.write``: the table, curves, the
accuracy-latency plot and its Pareto front), which draws the periodic evaluation's curve with
the table's measurement marked and says which batches each uses.

The quickstart-specific layer: its rows are the job's four runs (``ROWS``), each holding
``evaluate.evaluate``'s metrics plus the run's params, tokens/s, steps and training time.
The verdict calls each comparison won, tied or lost with the numbers: a difference within its
95% bound (Student's t times its standard error over the validation batches; ``compare``) is a
tie. For the language models, ``generation`` and ``generation_md`` make the generation
section: the classic table (perplexity, time to first token, decode tokens/s at batch 1 and
32, memory, params of the teacher, the KD and the CE student) and their sample
continuations, from what ``quickstart.generation`` measured. Nothing here trains or evaluates.
"""

import json
import os

from jaxdistill.report import noise, table

# The table's rows, in order: the job's four models.
ROWS = ("teacher", "kd_student", "ce_student", "ce_student_equal_time")


# Per task: the headline metric, its direction, and how a value and a difference read.
FORMATS = {
  "text": dict(key="val_loss", higher=False, label="val CE", value=lambda v: f"{v:.3f}",
               diff=lambda d: f"{d:.3g} nats"),
  "vision": dict(key="accuracy", higher=True, label="test accuracy",
                 value=lambda v: f"{100 * v:.1f}%", diff=lambda d: f"{100 * d:.3g} points"),
}  # fmt: skip


def build(results, summaries, cfg, teacher_dir, cached, wall_s) -> dict:
  """The report dict: one row per model plus a "summary" of what distillation bought.

  Args:
    results: name -> ``evaluate.evaluate`` metrics (the students and "teacher").
    summaries: name -> the run's training summary (``loop.train``'s, plus ``train_s``).
    cfg: the KD student's config (for the corpus line).
    teacher_dir: the teacher's run directory.
    cached: whether the teacher came from the cache.
    wall_s: the job's wall time so far.

  Returns:
    name -> row dict, and "summary" -> dict: the gap closed, the three comparisons
    (``compare``'s, each with its "outcome") and the booleans "kd_beats_ce_same_steps",
    "kd_beats_ce_same_time", "teacher_beats_ce" (won beyond the noise), corpus, wall time.
  """
  report, vision = {}, _is_vision(results)
  rate = "images_per_s" if vision else "tokens_per_s"
  for name, m in results.items():
    s = summaries[name]
    row = dict(m, params=s["student_params"], steps=s["steps"], **{rate: s[rate]})
    row.setdefault("agreement", 1.0)  # the teacher against itself
    row.setdefault("kl_to_teacher", 0.0)
    if "train_s" in s:
      row["train_s"] = s["train_s"]
    report[name] = row
  task = "vision" if vision else "text"
  key = FORMATS[task]["key"]
  t, kd, ce = (report[k][key] for k in ("teacher", "kd_student", "ce_student"))
  summary = {
    "teacher_cached": cached,
    "teacher_dir": teacher_dir,
    "gap_closed": (kd - ce) / (t - ce) if ce != t else None,  # share of CE->teacher gap
    **compare(report, task),
    "wall_s": wall_s,
    "jemalloc": "jemalloc" in os.environ.get("LD_PRELOAD", ""),
  }
  if vision:
    summary.update(task="vision", test_images=report["teacher"]["images"])
    summary["corpus"] = "built-in digits (5,000 real MNIST digits: 4,000 train, 1,000 test)"
  else:
    summary.update(validation_tokens=report["teacher"]["tokens"])
    summary["corpus"] = f"python_stdlib ({cfg.data.stdlib_max_files or 'all'} files)"
  report["summary"] = summary
  return report


def compare(report: dict, task: str) -> dict:
  """The verdict's three comparisons of the headline metric, each ``noise.difference``'s dict
  with its "outcome" ("won" / "tie" / "lost" for the first model named).

  The rule: a difference within its 95% bound is a tie; beyond it, won or lost. The bound is
  Student's t quantile (B - 1 degrees of freedom: 2.0 standard errors for 60 batches, 12.7 for
  2) times the standard error of the difference over the B validation batches, paired (both
  models read the same batches, so the batches' own difficulty cancels); see
  ``noise.difference`` for the fallbacks. Only one seed of each model ran, so seed-to-seed
  variation is not in it.

  Args:
    report: ``build``'s rows (name -> metrics).
    task: "text" or "vision".

  Returns:
    {"kd_vs_ce_same_steps", "kd_vs_ce_same_time", "teacher_vs_ce"} -> comparison, and the
    booleans "kd_beats_ce_same_steps", "kd_beats_ce_same_time", "teacher_beats_ce".
  """
  f = FORMATS[task]
  pairs = {
    "kd_vs_ce_same_steps": ("kd_student", "ce_student"),
    "kd_vs_ce_same_time": ("kd_student", "ce_student_equal_time"),
    "teacher_vs_ce": ("teacher", "ce_student"),
  }
  out = {}
  for name, (a, b) in pairs.items():
    diff = noise.difference(report[a], report[b], f["key"], f["higher"])
    out[name] = dict(diff, outcome=noise.outcome(diff))
  out["kd_beats_ce_same_steps"] = out["kd_vs_ce_same_steps"]["outcome"] == "won"
  out["kd_beats_ce_same_time"] = out["kd_vs_ce_same_time"]["outcome"] == "won"
  out["teacher_beats_ce"] = out["teacher_vs_ce"]["outcome"] == "won"
  return out


def _is_vision(results: dict) -> bool:
  return "images" in next(iter(results.values()))


def outcome_phrase(c: dict, other: str, task: str) -> str:
  """``compare``'s comparison in words, with the numbers, e.g. "beat the CE student (3.498) by
  0.086 nats, beyond the noise (±0.021 nats: 2.01 standard errors, paired over 48 batches)"."""
  f = FORMATS[task]
  them, diff = f"{other} ({f['value'](c['b'])})", f["diff"](abs(c["advantage"]))
  if c["bound"] is None:
    why = "the noise was not measured (fewer than two evaluated batches)"
    if c["outcome"] == "tie":
      return f"tied exactly with {them}; {why}"
    return f"{'beat' if c['outcome'] == 'won' else 'lost to'} {them} by {diff}; {why}"
  bound = f"±{f['diff'](c['bound'])}: {c['factor']:.3g} standard errors, {c['basis']}"
  if c["outcome"] == "tie":
    return f"tied with {them}: the {diff} difference is within the noise ({bound})"
  verb = "beat" if c["outcome"] == "won" else "lost to"
  return f"{verb} {them} by {diff}, beyond the noise ({bound})"


def verdict(report: dict) -> str:
  """One honest paragraph on what distillation bought: each comparison is won, tied or lost
  by ``compare``'s rule (a difference within its 95% bound is a tie), with the numbers."""
  s = report["summary"]
  task = s.get("task", "text")
  f = FORMATS[task]
  t, kd, ce = report["teacher"], report["kd_student"], report["ce_student"]
  eq = report["ce_student_equal_time"]
  v = lambda m: f["value"](m[f["key"]])
  if not s["teacher_beats_ce"]:
    teacher = outcome_phrase(s["teacher_vs_ce"], "the student trained on CE alone", task)
    return (
      f"The teacher ({f['label']} {v(t)}) {teacher}, so there was nothing to distil: the KD "
      f"student reached {v(kd)}. Train the teacher longer."
    )
  gap = (
    f", closing {100 * s['gap_closed']:.0f}% of the gap to the teacher ({v(t)})"
    if s["kd_beats_ce_same_steps"]
    else f" (teacher {v(t)})"
  )
  same_steps = outcome_phrase(s["kd_vs_ce_same_steps"], "the CE student", task)
  same_time = outcome_phrase(
    s["kd_vs_ce_same_time"], f"CE given the same wall time in {eq['steps']} steps", task
  )
  cost = f"{kd['train_s'] / ce['train_s']:.1f}x a CE step here"
  tail = (
    f"A KD step runs the teacher forward too, so it costs {cost}; precomputed teacher targets "
    "would remove most of that cost."
    if task == "text"
    else f"A KD step also runs the teacher forward: it costs {cost}."
  )
  return (
    f"At equal steps the KD student ({f['label']} {v(kd)}) {same_steps}{gap}. It "
    f"{same_time}. {tail}"
  )


def write(summary: dict, workdir: str, runs: dict[str, str]) -> dict:
  """The quickstart's report, made by ``jaxdistill report`` (``report.write``) of its three
  student runs (their ``eval/validation.json``, teacher included) with the data line and the
  verdict under the table; report.json holds the general report plus this job's rows
  (``build``'s name -> metrics) and its "summary".

  Args:
    summary: ``build``'s dict.
    workdir: the quickstart's directory (report.md, report.json and the PNGs go there).
    runs: name -> the student runs' directories, in the table's order.

  Returns:
    ``report.write``'s dict (its "table" is what the command prints).
  """
  from jaxdistill.report import write as report

  s = summary["summary"]
  vision = s.get("task") == "vision"
  amount = f"{s['test_images']:,} test images" if vision else f"{s['validation_tokens']:,} tokens"
  intro = (
    f"Quickstart. Data: {s['corpus']}; {amount}. Teacher "
    f"{'loaded from the cache' if s['teacher_cached'] else 'trained in this run'} "
    f"({s['teacher_dir']}). Wall time {s['wall_s'] / 60:.1f} min"
    f"{' (jemalloc)' if s['jemalloc'] else ''}."
  )
  extra = f"{intro}\n\n{verdict(summary)}"
  if "generation" in summary:
    extra += "\n\n" + generation_md(summary["generation"])
  written = report.write(runs, workdir, extra_md=extra)
  with open(written["files"]["json"], encoding="utf-8") as f:
    merged = json.load(f)
  merged.update(summary)
  with open(written["files"]["json"], "w", encoding="utf-8") as f:
    json.dump(merged, f, indent=2, sort_keys=True)
  return written


# --- the LMs' generation: the classic table and samples -------------------------------------

GENERATION_ROWS = ("teacher", "kd_student", "ce_student")
MEMORY_NOTE = (
  "memory: the params' bytes plus the key/value cache of a serving-batch request, counted "
  "from their shapes (not a measured peak)"
)


def generation(summary: dict, gen: dict, prompts) -> dict:
  """The generation section's numbers: per LM its perplexity and parameters (``build``'s
  rows), time to first token, decode tokens/s and memory (``quickstart.generation``'s timing),
  and its continuations of ``prompts``.

  Args:
    summary: ``build``'s dict (rows "teacher", "kd_student", "ce_student").
    gen: ``quickstart.generation``'s {"timed", "samples", "new_tokens"}.
    prompts: the prompts the samples continue.
  Returns:
    {"rows": name -> {"val_ppl", "params", "ttft_s" (batch 1), "decode_tokens_per_s":
    {batch: tok/s}, "memory_bytes", "memory_batch" (the largest batch), "prompt_tokens",
    "new_tokens"}, "prompts", "samples", "new_tokens" (the most a sample got), "memory"}.
  """
  rows = {}
  for name in GENERATION_ROWS:
    timed = gen["timed"].get(name) or {}
    sizes = sorted(int(k.split("_")[1]) for k in timed if k.startswith("batch_"))
    first = timed[f"batch_{sizes[0]}"] if sizes else {}
    rows[name] = {
      "val_ppl": summary[name].get("val_ppl"),
      "params": summary[name]["params"],
      "ttft_s": first.get("ttft_s"),
      "decode_tokens_per_s": {b: timed[f"batch_{b}"]["decode_tokens_per_s"] for b in sizes},
      "memory_bytes": (timed.get("memory") or {}).get("total_bytes"),
      "memory_batch": sizes[-1] if sizes else None,
      "prompt_tokens": first.get("prompt_tokens"),
      "new_tokens": first.get("new_tokens"),
    }
  samples = {name: gen["samples"][name] for name in GENERATION_ROWS if name in gen["samples"]}
  new_tokens = max(gen["new_tokens"].values(), default=0)
  return {"rows": rows, "prompts": list(prompts), "samples": samples, "new_tokens": new_tokens,
          "memory": MEMORY_NOTE}  # fmt: skip


def generation_md(gen: dict) -> str:
  """The generation section: the classic table, then each prompt's continuation by each model."""
  rows = gen["rows"]
  sizes = sorted({int(b) for r in rows.values() for b in r["decode_tokens_per_s"]})
  mem_b = next((r["memory_batch"] for r in rows.values() if r["memory_batch"]), None)
  ttft = f"TTFT ms b={sizes[0]}" if sizes else "TTFT ms"
  cols = ["model", "ppl", ttft, *(f"decode tok/s b={b}" for b in sizes)]
  cols += [f"memory b={mem_b}" if mem_b else "memory", "params"]
  lines = ["### Generation", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  fmt = lambda v, spec: "—" if v is None else format(v, spec)
  for name, r in rows.items():
    rate = {int(b): v for b, v in r["decode_tokens_per_s"].items()}
    cells = [name, fmt(r["val_ppl"], ".1f"), fmt(r["ttft_s"] and 1e3 * r["ttft_s"], ".3g")]
    cells += [fmt(rate.get(b), ",.0f") for b in sizes]
    cells += [table._bytes(r["memory_bytes"]), table._count(r["params"])]  # as the main table
    lines.append("| " + " | ".join(cells) + " |")
  shape = next((r for r in rows.values() if r.get("new_tokens")), None)
  request = (
    f" of {shape['prompt_tokens']}-token random prompts and {shape['new_tokens']} new tokens"
    if shape else ""
  )  # fmt: skip
  lines += ["", f"Greedy requests{request}, warm, one device, the models interleaved (as "
            "`jaxdistill eval --latency`; docs/evaluation.md): TTFT is the time to the first "
            "token of one prompt (prefill + first token); decode tok/s the steady rate after "
            f"it (all rows of the batch); {gen['memory']}.", ""]  # fmt: skip
  lines += [f"Samples: greedy continuations, at most {gen['new_tokens']} new tokens.", ""]
  for i, prompt in enumerate(gen["prompts"]):
    lines.append(f"Prompt `{prompt}`:")
    for name, texts in gen["samples"].items():
      text = prompt + texts[i]
      fence = "````" if "```" in text else "```"
      lines += ["", f"- {name}:", "", f"  {fence}text"]
      lines += ["  " + line for line in text.splitlines()] + [f"  {fence}"]
    lines.append("")
  return "\n".join(lines).rstrip()
