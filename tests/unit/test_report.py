"""`jaxdistill report` from hand-made run workdirs (no training): the Pareto front, the table,
report.json, the PNGs' sizes and contents, and the one-line errors of bad input."""

import json
import math
import pathlib
import random
import struct

import numpy as np
import pytest

from jaxdistill.cli import commands as cli
from jaxdistill.config import default_config
from jaxdistill.report import noise
from jaxdistill.report import plots as report_plots
from jaxdistill.report import quickstart as quickstart_report
from jaxdistill.report import write as report
from jaxdistill.report.table import pareto_front

TEXT_TERMS = {"task/ce": 4.0, "distill/kl": 2.0, "distill/hidden": 1.0}
VISION_TERMS = {"task/ce": 2.0, "distill/kl": 8.0}


# --- the Pareto front ----------------------------------------------------------------------


def test_pareto_front_on_a_hand_made_set():
  nan = float("nan")
  points = [
    (1, 5.0),  # A: cheapest
    (1, 5.0),  # B: A's exact duplicate: neither dominates the other
    (2, 4.0),  # C
    (3, 4.5),  # D: C is cheaper and better
    (3, 4.5),  # E: D's duplicate, dominated as well
    (2, 4.5),  # F: as cheap as C, worse
    (5, 4.0),  # G: as good as C, dearer
    (6, 1.0),  # H: the best, dearest
    (None, 0.5),  # no cost: off the front, dominates nothing
    (nan, 0.5),
    (7, nan),
  ]
  lower = [True, True, True, False, False, False, False, True, False, False, False]
  assert pareto_front(points, higher_is_better=False) == lower
  # Higher is better: A (and its duplicate) is cheapest and best; it dominates every other.
  assert pareto_front(points, higher_is_better=True) == [True, True] + [False] * 9
  assert pareto_front([], higher_is_better=True) == []
  assert report.pareto_front is pareto_front


def test_pareto_front_matches_its_definition_on_random_points():
  # Independent check of the definition: no front point is dominated by any point, and every
  # point off the front is dominated by some point.
  rng = random.Random(0)
  for _ in range(50):
    pts = [(rng.randint(1, 6), rng.randint(1, 6) / 2) for _ in range(rng.randint(1, 12))]
    front = pareto_front(pts, higher_is_better=True)
    dom = lambda a, b: a[0] <= b[0] and a[1] >= b[1] and a != b
    for p, on in zip(pts, front):
      assert on == (not any(dom(q, p) for q in pts)), (pts, p)


def test_a_model_worse_only_within_the_noise_is_not_dominated():
  # (latency ms, accuracy): b is as fast as a and worse by 0.01, within a's and b's noise
  # (0.02 each: 0.028 combined); c is worse by 0.1, beyond it.
  points = [(1.0, 0.90), (1.0, 0.89), (1.0, 0.80)]
  quality_noise = [(None, 0.02)] * 3
  assert pareto_front(points, True) == [True, False, False]  # no noise: the strict front
  assert pareto_front(points, True, quality_noise) == [True, True, False]
  # On the cost axis alike: 2.1 ms is within the noise of 2.0 (0.1 each), 3.0 ms is not.
  points = [(2.0, 0.9), (2.1, 0.9), (3.0, 0.9)]
  assert pareto_front(points, True, [(0.1, None)] * 3) == [True, True, False]
  # Better beyond the noise on one axis is not enough: at least as good on both. d is far
  # better but slower (within the noise) than e, so it does not dominate e.
  assert pareto_front([(2.05, 0.95), (2.0, 0.90)], True, [(0.1, 0.01)] * 2) == [True, True]


def test_noise_only_keeps_more_points_on_the_front():
  # Noise removes dominations, never adds them: the noisy front contains the strict one, and
  # a point is off it only if some point is at least as good on both axes and better
  # beyond the combined noise on one.
  rng = random.Random(1)
  for _ in range(50):
    n = rng.randint(1, 10)
    pts = [(rng.uniform(1, 3), rng.uniform(0, 1)) for _ in range(n)]
    nz = [(rng.uniform(0, 0.3), rng.uniform(0, 0.1)) for _ in range(n)]
    strict, noisy = pareto_front(pts, True), pareto_front(pts, True, nz)
    assert all(b or not a for a, b in zip(strict, noisy)) and any(noisy)

    def dom(j, i):
      (cj, qj), (ci, qi) = pts[j], pts[i]
      far_c = ci - cj > math.hypot(nz[i][0], nz[j][0])
      far_q = qj - qi > math.hypot(nz[i][1], nz[j][1])
      return cj <= ci and qj >= qi and (far_c or far_q)

    for i, on in enumerate(noisy):
      assert on == (not any(dom(j, i) for j in range(n) if j != i)), (pts, nz, i)


def test_standard_error_over_batches():
  # Equal weights: the familiar sd / sqrt(B).
  values = [1.0, 2.0, 4.0, 5.0]
  assert noise.standard_error(values, [10] * 4) == pytest.approx(
    np.std(values, ddof=1) / math.sqrt(4)
  )
  # Unequal weights: the ratio estimator's error, by its formula.
  w = np.array([10.0, 30.0, 20.0])
  v = np.array([1.0, 2.0, 4.0])
  mean = (w * v).sum() / w.sum()
  want = math.sqrt(3 / 2 * ((w * (v - mean)) ** 2).sum()) / w.sum()
  assert noise.standard_error(list(v), list(w)) == pytest.approx(want)
  assert noise.standard_error([1.0], [10]) is None  # one batch: no spread to measure
  # The 95% bound: Student's t for B - 1 degrees of freedom (few batches: a wide bound).
  assert noise.factor(1) == pytest.approx(12.706, abs=1e-3)
  assert noise.factor(3) == pytest.approx(3.182, abs=1e-3)
  assert noise.factor(None) == pytest.approx(1.960, abs=1e-3)
  se = np.std(values, ddof=1) / 2
  assert noise.bound(values, [10] * 4) == pytest.approx(noise.factor(3) * se)
  assert noise.bound([1.0], [10]) is None and noise.bound(None, None) is None


def _model(acc: float, per_batch: list[float] | None, images=1000) -> dict:
  m = {"accuracy": acc, "images": images}
  if per_batch is not None:
    m.update(batch_accuracy=per_batch, batch_weights=[images / len(per_batch)] * len(per_batch))
  return m


def test_a_paired_difference_cancels_the_batches_difficulty():
  # The batches differ a lot in difficulty, but a beats b by 0.02 on every one: paired, the
  # difference's error is 0 and a won; unpaired the batches' spread would swamp it.
  hard = [0.5, 0.9, 0.6, 0.95]
  a = _model(float(np.mean(hard)) + 0.02, [x + 0.02 for x in hard])
  b = _model(float(np.mean(hard)), hard)
  paired = noise.difference(a, b, "accuracy", True)
  assert paired["advantage"] == pytest.approx(0.02) and paired["se"] == pytest.approx(0.0)
  assert "paired over 4 batches" in paired["basis"] and noise.outcome(paired) == "won"
  # Other batches (weights differ): unpaired, sqrt(SE_a^2 + SE_b^2), and a tie.
  c = _model(b["accuracy"], hard, images=800)
  unpaired = noise.difference(a, c, "accuracy", True)
  se = noise.standard_error(hard, c["batch_weights"])
  assert unpaired["se"] == pytest.approx(math.hypot(se, se)) and noise.outcome(unpaired) == "tie"
  # No per-batch records: accuracy's binomial error over the images.
  d = noise.difference(_model(0.93, None), _model(0.90, None), "accuracy", True)
  assert d["se"] == pytest.approx(math.sqrt((0.93 * 0.07 + 0.9 * 0.1) / 1000))
  assert "binomial over 1,000 images" in d["basis"] and noise.outcome(d) == "won"
  # A loss: lower is better, so a lower value is an advantage; unmeasured: exact ties only.
  lo = noise.difference({"val_loss": 3.0}, {"val_loss": 3.1}, "val_loss", False)
  assert lo["advantage"] == pytest.approx(0.1) and lo["se"] is None
  assert noise.outcome(lo) == "won"
  same = noise.difference({"val_loss": 3.0}, {"val_loss": 3.0}, "val_loss", False)
  assert noise.outcome(same) == "tie"


def test_shared_latency_is_the_median_of_one_architecture_with_its_drift():
  values, spreads = noise.share([2.48, 3.08, 2.9, 5.0, None], [0.05, 0.1, 0.2, 0.1, None],
                                ["a", "a", "a", "b", "a"])  # fmt: skip
  # a: the median of 2.48, 3.08, 2.9; its spread the larger of the median spread (0.1) and
  # half the range of the timings (0.3). b alone keeps its own; no timing stays None.
  assert values == [2.9, 2.9, 2.9, 5.0, None]
  assert spreads[:3] == [pytest.approx(0.3)] * 3 and spreads[3] == 0.1


# --- fixture workdirs ----------------------------------------------------------------------


def _config(arch="transformer", teacher_path="", eval_batches=4, eval_every=20):
  cfg = default_config().to_dict()
  cfg["student"]["arch"] = arch
  cfg["teacher"].update(source="workdir" if teacher_path else "none", path=teacher_path)
  cfg["eval"] = {"batches": eval_batches, "every": eval_every}
  return cfg


def _metrics(terms: dict, vision: bool, steps=100, every=10, eval_every=20) -> list[dict]:
  rows = []
  for step in [1, *range(every, steps + 1, every)]:
    decay = math.exp(-step / 50)
    row = {f"{k}": v * decay for k, v in terms.items()}
    row["train/loss"] = sum(row.values())
    row.update({"step": step, "train/lr": 1e-3, "train/grad_norm": 1.0, "train/nonfinite": 0.0})
    row.update({"distill/temperature": 2.0, "weight/ce": 0.5, "perf/step_s": 0.1})
    rows.append(row)
    if step % eval_every == 0:
      loss = 2.0 + decay
      ev = {"step": step, "eval/loss": loss, "eval/accuracy": 1 - decay / 2}
      rows.append(ev if vision else dict(ev, **{"eval/ppl": math.exp(loss)}))
  rows[3]["train/grad_norm"] = "nan"  # a non-finite value is stored as a string
  return rows


def _student(quality: float, vision: bool, per_batch=None) -> dict:
  if per_batch:  # each batch's own quality (equal batches): the standard error's samples
    key = "accuracy" if vision else "val_loss"
    extra = {f"batch_{key}": per_batch, "batch_weights": [64.0] * len(per_batch)}
    return dict(_student(quality, vision), **extra)
  if vision:
    return {"accuracy": quality, "top5_accuracy": min(1.0, quality + 0.05), "agreement": 0.9,
            "kl_to_teacher": 0.2, "ece": 0.03, "images": 1000}  # fmt: skip
  return {"val_loss": quality, "val_ppl": math.exp(quality), "accuracy": 0.3, "agreement": 0.8,
          "kl_to_teacher": 0.25, "tokens": 4096}  # fmt: skip


def _latency(ms_1, ms_32, iqr_ms=None):
  med = lambda ms: {"median_s": ms / 1e3, "p90_s": 1.1 * ms / 1e3, "repeats": 10}
  if iqr_ms is not None:  # the quartiles, iqr_ms apart around the median
    quartiles = lambda ms: {"p25_s": (ms - iqr_ms / 2) / 1e3, "p75_s": (ms + iqr_ms / 2) / 1e3}
    med = lambda ms, plain=med: dict(plain(ms), **quartiles(ms))
  memory = {"temp_bytes": 1, "argument_bytes": 2, "output_bytes": 3, "total_bytes": 3 << 20}
  return {"batch_1": med(ms_1), "batch_32": med(ms_32), "memory": memory}


def make_run(
  root,
  name,
  quality,
  params,
  latency=None,
  teacher=None,
  vision=False,
  terms=None,
  data_batches=0,
  per_batch=None,
  iqr_ms=None,
  **cfg_kw,
):
  """A finished run's files. latency: (ms at batch 1, ms at 32) or None; teacher: (quality,
  params, latency) of its eval JSON's teacher entry, or None; per_batch: the student's quality
  per evaluated batch; iqr_ms: its timings' interquartile range."""
  w = root / name
  (w / "eval").mkdir(parents=True)
  cfg = _config("cnn" if vision else "transformer", **cfg_kw)
  (w / "config.json").write_text(json.dumps(cfg))
  terms = terms or (VISION_TERMS if vision else TEXT_TERMS)
  rows = _metrics(terms, vision)
  (w / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  rate = "images_per_s" if vision else "tokens_per_s"
  summary = {"steps": 100, "last_step": 100, "student_params": params, rate: 1000.0 + params}
  (w / "summary.json").write_text(json.dumps(summary))
  ev = {
    "name": "validation",
    "workdir": str(w),
    "step": 100,
    "params_source": "final_params",
    "task": "vision" if vision else "text",
    "data": {
      "source": "digits" if vision else "stdlib",
      "split": "validation",
      "batches": data_batches,
      "overrides": [],
    },
    "models": {"student": _student(quality, vision, per_batch)},
    "size": {"student": {"params": params, "bytes": 4 * params}},
    "device": "cpu",
    "device_kind": "cpu",
  }
  if latency:
    ev["latency"] = {"batch_sizes": [1, 32], "student": _latency(*latency, iqr_ms)}
  if teacher:
    t_quality, t_params, t_latency = teacher
    t = _student(t_quality, vision)
    ev["models"]["teacher"] = {
      k: v for k, v in t.items() if k not in ("agreement", "kl_to_teacher")
    }
    ev["size"]["teacher"] = {"params": t_params, "bytes": 2 * t_params}
    if t_latency and latency:
      ev["latency"]["teacher"] = _latency(*t_latency)
  (w / "eval" / "validation.json").write_text(json.dumps(ev))
  return str(w)


def png_size(path) -> tuple[int, int]:
  """(width, height) from the PNG's IHDR chunk."""
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
  return struct.unpack(">II", head[16:24])


def assert_real_image(path, size):
  import matplotlib.image

  assert png_size(path) == size
  pixels = matplotlib.image.imread(path)
  assert pixels.shape[:2] == (size[1], size[0])
  colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
  assert len(colours) > 20, f"{path}: {len(colours)} colours: a blank picture"


def table_cells(md: str) -> dict[str, dict[str, str]]:
  """Model name -> column -> cell, from the first Markdown table in ``md``."""
  lines = [line for line in md.splitlines() if line.startswith("|")]
  head = [c.strip() for c in lines[0].strip("|").split("|")]
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
  return {row[0]: dict(zip(head, row)) for row in cells}


TEACHER = (3.0, 1_000_000, (20.0, 40.0))  # the KD runs' teacher: CE 3.0, 1M params


@pytest.fixture
def text_runs(tmp_path):
  """Four students of one teacher (with latency) and one without latency. Latency at the
  serving batch / val CE: teacher 40 / 3.0, kd 10 / 3.5, ce 10 / 3.8 (as fast as kd, worse),
  ce2 = ce (a dominated duplicate), small 5 / 4.2, nolat — / 3.6."""
  tp = str(tmp_path / "teacher_run")
  kw = dict(teacher_path=tp)
  return {
    "kd": make_run(tmp_path, "kd", 3.5, 200_000, (4.0, 10.0), TEACHER, **kw),
    "ce": make_run(tmp_path, "ce", 3.8, 200_000, (4.0, 10.0), TEACHER, **kw),
    "ce2": make_run(tmp_path, "ce2", 3.8, 200_000, (4.0, 10.0), TEACHER, **kw),
    "small": make_run(tmp_path, "small", 4.2, 50_000, (3.0, 5.0), TEACHER, **kw),
    "nolat": make_run(tmp_path, "nolat", 3.6, 200_000, None, TEACHER, **kw),
  }


# --- the report ----------------------------------------------------------------------------


def _generate(ttft_ms, tok_s_1, tok_s_32):
  """An eval JSON's "generate" block (``latency.generation_latency``'s, the fields read)."""
  at = lambda tok_s: dict(decode_tokens_per_s=tok_s, ttft_s=ttft_ms / 1e3, prompt_tokens=16,
                          new_tokens=16)  # fmt: skip
  return {"batch_1": at(tok_s_1), "batch_32": at(tok_s_32), "memory": {"total_bytes": 3 << 20}}


def _add_generate(workdir, side, block):
  path = pathlib.Path(workdir) / "eval" / "validation.json"
  ev = json.loads(path.read_text())
  ev["latency"][side]["generate"] = block
  path.write_text(json.dumps(ev))
  return ev


def test_text_report_table_pareto_and_files(text_runs, tmp_path):
  _add_generate(text_runs["kd"], "student", _generate(2.5, 400.0, 6400.0))
  out = tmp_path / "report"
  rep = report.write(text_runs, str(out), extra_md="A verdict paragraph.")
  rows = {r["name"]: r for r in rep["rows"]}
  assert [r["name"] for r in rep["rows"]] == ["teacher", "kd", "ce", "ce2", "small", "nolat"]
  # The front of (serving latency, val CE), lower both: teacher, kd and small; ce is as fast
  # as kd but worse, ce2 its duplicate; nolat has no latency.
  expected = {"teacher": True, "kd": True, "ce": False, "ce2": False, "small": True, "nolat": None}
  assert {n: r["pareto"] for n, r in rows.items()} == expected
  assert rep["pareto"] == {
    "x": "latency_serve_ms",
    "quality": "val_loss",
    "higher_is_better": False,
  }
  kd = rows["kd"]
  assert kd["latency_small_ms"] == pytest.approx(4.0) and kd["latency_serve_ms"] == 10.0
  assert kd["params"] == 200_000 and kd["bytes"] == 800_000 and kd["train_rate"] == 201_000.0
  assert kd["memory_bytes"] == 3 << 20 and kd["step"] == 100
  t = rows["teacher"]
  assert t["role"] == "teacher" and t["params"] == 1_000_000 and t["latency_serve_ms"] == 40.0
  assert t["agreement"] is None and t["kl_to_teacher"] is None and t["train_rate"] is None

  md = (out / "report.md").read_text()
  cells = table_cells(md)
  pareto = {"yes": True, "no": False, "—": None}
  assert {n: pareto[c["Pareto"]] for n, c in cells.items()} == expected
  assert cells["kd"]["val CE"] == "3.500" and cells["kd"]["ms b=32"] == "10"
  assert cells["kd"]["ms b=1"] == "4" and cells["kd"]["memory"] == "3.00 MiB"
  assert cells["kd"]["TTFT ms b=1"] == "2.5" and cells["kd"]["decode tok/s b=32"] == "6,400"
  assert cells["kd"]["decode tok/s b=1"] == "400" and cells["ce"]["TTFT ms b=1"] == "—"
  assert cells["nolat"]["ms b=32"] == "—" and cells["teacher"]["agree"] == "—"
  assert cells["kd"]["params"] == "200.00k" and cells["teacher"]["params"] == "1.00M"
  assert "A verdict paragraph." in md
  for png in ("training_curves.png", "validation.png", "quality_latency.png"):
    assert f"]({png})" in md
  # The validation caption names both measurements' batches.
  assert "first 4 validation batches" in rep["captions"]["validation"]
  assert "the whole validation split (4,096 tokens)" in rep["captions"]["validation"]
  assert json.loads((out / "report.json").read_text()) == rep

  assert_real_image(out / "training_curves.png", report_plots.training_size(4))
  assert report_plots.training_size(4) == (1200, 600)  # 2 rows of 3 panels, 4 x 3 in at 100 dpi
  assert_real_image(out / "validation.png", (700, 450))
  assert_real_image(out / "quality_latency.png", (1100, 450))  # batch 1 and serving batch


def test_loss_panels_are_the_logged_terms(text_runs):
  runs = report.load_runs(text_runs)
  assert report.loss_keys(runs) == ["train/loss", "task/ce", "distill/hidden", "distill/kl"]


def test_without_latency_params_stand_in_and_a_run_is_the_teacher(tmp_path):
  # "big" is the teacher of the other two (teacher.path), so it is the teacher's row and the
  # evaluations' teacher entry is not added again.
  big = make_run(tmp_path, "big", 3.0, 1_000_000)
  runs = {
    "big": big,
    "kd": make_run(tmp_path, "kd", 3.4, 100_000, teacher=(3.0, 1_000_000, None), teacher_path=big),
    "ce": make_run(tmp_path, "ce", 3.6, 100_000, teacher=(3.0, 1_000_000, None), teacher_path=big),
    "wide": make_run(tmp_path, "wide", 3.5, 300_000),
  }
  rep = report.write(runs, str(tmp_path / "out"))
  rows = {r["name"]: r for r in rep["rows"]}
  assert list(rows) == ["big", "kd", "ce", "wide"]
  assert rows["big"]["role"] == "teacher" and rows["kd"]["role"] == "student"
  assert rep["pareto"]["x"] == "params"
  # (params, CE): big (1M, 3.0) and kd (100k, 3.4) on the front; ce as small as kd, worse;
  # wide bigger than kd and worse.
  assert {n: r["pareto"] for n, r in rows.items()} == dict(big=True, kd=True, ce=False, wide=False)
  assert "no run was evaluated with --latency" in rep["captions"]["scatter"]
  assert_real_image(tmp_path / "out" / "quality_latency.png", (550, 450))  # one panel


def test_vision_report(tmp_path):
  teacher = (0.98, 400_000, (2.0, 8.0))
  tp = str(tmp_path / "t")
  kw = dict(vision=True, teacher_path=tp)
  runs = {
    "kd": make_run(tmp_path, "kd", 0.95, 20_000, (1.0, 3.0), teacher, **kw),
    "ce": make_run(tmp_path, "ce", 0.93, 20_000, (1.0, 3.0), teacher, **kw),
    "tiny": make_run(
      tmp_path, "tiny", 0.90, 5_000, (0.5, 1.0), teacher, terms={"task/ce": 2.0}, **kw
    ),
  }
  rep = report.write(runs, str(tmp_path / "out"))
  assert rep["task"] == "vision" and rep["pareto"]["quality"] == "accuracy"
  assert rep["pareto"]["higher_is_better"] is True
  flags = {r["name"]: r["pareto"] for r in rep["rows"]}
  assert flags == {"teacher": True, "kd": True, "ce": False, "tiny": True}
  cells = table_cells((tmp_path / "out" / "report.md").read_text())
  assert cells["kd"]["acc"] == "95.0%" and cells["kd"]["train img/s"] == "21,000"
  assert "eval/accuracy" in rep["captions"]["validation"]
  # task/ce, distill/kl and the total: 3 panels in one row.
  assert_real_image(tmp_path / "out" / "training_curves.png", (1200, 300))
  assert_real_image(tmp_path / "out" / "validation.png", (700, 450))


def test_one_latency_per_architecture_and_quality_within_noise(tmp_path):
  # a and b: one architecture (the default student, 20k params) timed in two runs at 2.48 and
  # 3.08 ms (the machine's drift), the same accuracy. Before, b was dominated by a on that
  # noise alone; now both get the median of the two and stay on the front.
  kw = dict(vision=True, iqr_ms=0.1)
  runs = {
    "a": make_run(tmp_path, "a", 0.95, 20_000, (1.0, 2.48), **kw),
    "b": make_run(tmp_path, "b", 0.95, 20_000, (1.2, 3.08), **kw),
    # c: another architecture, slower than the pair only within the noise (2.9 ms) and worse
    # only within the noise of its accuracy (0.5 points; SE 0.46 over 4 batches): without the
    # noise a would dominate it.
    "c": make_run(
      tmp_path, "c", 0.945, 30_000, (1.1, 2.9), per_batch=[0.94, 0.95, 0.935, 0.955], **kw
    ),
    # d: a third, slower beyond the noise and no better: dominated.
    "d": make_run(tmp_path, "d", 0.95, 40_000, (2.0, 6.0), **kw),
  }
  rows = {r["name"]: r for r in report.write(runs, str(tmp_path / "out"))["rows"]}
  assert rows["a"]["latency_serve_ms"] == rows["b"]["latency_serve_ms"] == pytest.approx(2.78)
  assert rows["a"]["latency_small_ms"] == rows["b"]["latency_small_ms"] == pytest.approx(1.1)
  assert rows["a"]["latency_serve_measured_ms"] == pytest.approx(2.48)
  assert rows["b"]["latency_shared_with"] == ["a"] and rows["c"]["latency_shared_with"] == []
  # The pair's spread covers their drift: half the range of 2.48 and 3.08.
  assert rows["a"]["latency_serve_spread_ms"] == pytest.approx(0.3)
  assert rows["c"]["accuracy_se"] == pytest.approx(np.std([0.94, 0.95, 0.935, 0.955], ddof=1) / 2)
  assert {n: r["pareto"] for n, r in rows.items()} == dict(a=True, b=True, c=True, d=False)
  cells = table_cells((tmp_path / "out" / "report.md").read_text())
  assert cells["a"]["ms b=32"] == cells["b"]["ms b=32"] == "2.78"
  assert "beyond the noise" in (tmp_path / "out" / "report.md").read_text()


def test_whole_split_is_named_never_first_0_batches(tmp_path):
  # The vision quickstart's setting: the periodic and the final evaluation both read the
  # whole split (eval.batches = 0, eval --batches 0), so they measure the same images.
  runs = {n: make_run(tmp_path, n, 0.9, 1000, vision=True, eval_batches=0) for n in "ab"}
  rep = report.write(runs, str(tmp_path / "out"))
  caption = rep["captions"]["validation"]
  assert "first 0" not in caption and "different batches" not in caption
  assert "on the whole validation split (1,000 images) (config.json" in caption
  assert "Markers (◆): the table's measurement (eval JSON) on the whole validation split" in caption
  md = (tmp_path / "out" / "report.md").read_text()
  assert "first 0" not in md and "the whole split (1,000 images)" in md
  # One run reading part of the split: the curves and the table differ, and say so.
  runs["c"] = make_run(tmp_path, "c", 0.9, 1000, vision=True, eval_batches=2)
  caption = report.write(runs, str(tmp_path / "mixed"))["captions"]["validation"]
  assert "(a: the whole split, b: the whole split, c: 2)" in caption
  assert "different batches" in caption and "first 0" not in caption


def test_captions_say_when_curve_and_table_measure_the_same_batches(tmp_path):
  same = {n: make_run(tmp_path, n, 3.5, 1000, data_batches=4) for n in ("a", "b")}
  rep = report.write(same, str(tmp_path / "same"))
  assert "the first 4 batches" in rep["captions"]["validation"]
  assert "different batches" not in rep["captions"]["validation"] and not rep["data_note"]
  mixed = {"a": same["a"], "c": make_run(tmp_path, "c", 3.4, 1000, data_batches=8)}
  rep = report.write(mixed, str(tmp_path / "mixed"))
  assert "read different data" in (tmp_path / "mixed" / "report.md").read_text()


# --- bad input ------------------------------------------------------------------------------


def _error(capsys, *argv) -> str:
  assert cli.main(["report", *argv]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def test_bad_input_is_one_error_line(text_runs, tmp_path, capsys):
  kd, out = text_runs["kd"], str(tmp_path / "out")
  (tmp_path / "not_a_run").mkdir()
  assert "not a run directory" in _error(capsys, kd, str(tmp_path / "not_a_run"), "--output", out)
  msg = _error(capsys, kd, "--output", out, "--eval_name", "ood")
  assert "eval/ood.json" in msg and "jaxdistill eval --workdir" in msg and "--eval_name" in msg
  vision = make_run(tmp_path / "v", "vis", 0.9, 1000, vision=True)
  assert "different tasks" in _error(capsys, kd, vision, "--output", out)
  (tmp_path / "file").write_text("x")
  assert "is no directory" in _error(capsys, kd, "--output", str(tmp_path / "file"))
  assert "pass one per run" in _error(capsys, kd, text_runs["ce"], "--output", out, "--names", "a")
  assert "named 'kd'" in _error(capsys, kd, kd, "--output", out)
  assert not (tmp_path / "out").exists()  # nothing written by a refused report


def test_existing_report_is_refused_and_kept(text_runs, tmp_path, capsys):
  out = tmp_path / "out"
  assert cli.main(["report", text_runs["kd"], text_runs["small"], "--output", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "| kd |" in printed and "report.md" in printed
  before = (out / "report.md").read_text()
  assert "already holds a report.md" in _error(capsys, text_runs["kd"], "--output", str(out))
  assert (out / "report.md").read_text() == before


def test_output_that_is_a_file_is_refused_by_the_library(text_runs, tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(report.JaxdistillError, match="is a file"):
    report.write(text_runs, str(tmp_path / "f"))


# --- the quickstart's verdict ---------------------------------------------------------------


def _quickstart(task, values, per_batch=None):
  """``quickstart_report.build`` of hand-made results: values and per_batch are name ->
  the headline metric and its per-batch values (4 equal batches of 250 images / 1,024
  tokens)."""
  vision = task == "vision"
  key, unit = ("accuracy", "images") if vision else ("val_loss", "tokens")
  results, summaries = {}, {}
  for name, value in values.items():
    m = {key: value, unit: 1000 if vision else 4096}
    if per_batch:
      m.update({f"batch_{key}": per_batch[name], "batch_weights": [m[unit] / 4] * 4})
    results[name] = m
    rate = "images_per_s" if vision else "tokens_per_s"
    summaries[name] = {"student_params": 100, "steps": 50, rate: 1.0, "train_s": 10.0}
  summaries["kd_student"]["train_s"] = 15.0
  summaries["ce_student_equal_time"]["steps"] = 75
  cfg = default_config()
  return quickstart_report.build(results, summaries, cfg, "/teacher", False, 60.0)


CE = [0.88, 0.92, 0.85, 0.95]  # the CE student's accuracy per batch: the batches differ a lot


def _plus(base, deltas):
  return [b + d for b, d in zip(base, deltas)]


def test_verdict_calls_an_exact_tie_a_tie_and_wins_with_the_numbers():
  # KD beats CE by 5 points on every batch (give or take 1): a win beyond the paired noise.
  # CE given KD's wall time reaches exactly KD's accuracy: a tie, not "lost".
  kd = _plus(CE, [0.04, 0.06, 0.05, 0.05])
  per_batch = {"teacher": _plus(CE, [0.1] * 4), "kd_student": kd, "ce_student": CE,
               "ce_student_equal_time": kd}  # fmt: skip
  values = {name: float(np.mean(v)) for name, v in per_batch.items()}
  rep = _quickstart("vision", values, per_batch)
  s = rep["summary"]
  assert s["kd_vs_ce_same_steps"]["outcome"] == "won" and s["kd_beats_ce_same_steps"]
  assert s["kd_vs_ce_same_time"]["outcome"] == "tie" and not s["kd_beats_ce_same_time"]
  se = np.std([0.04, 0.06, 0.05, 0.05], ddof=1) / 2  # the paired difference's
  assert s["kd_vs_ce_same_steps"]["se"] == pytest.approx(se)
  text = quickstart_report.verdict(rep)
  assert "lost" not in text and "did NOT" not in text
  assert (
    f"the KD student (test accuracy 95.0%) beat the CE student (90.0%) by 5 points, beyond "
    f"the noise (±{100 * 3.182 * se:.3g} points: 3.18 standard errors, paired over 4 batches), "
    "closing 50% of the gap to the teacher (100.0%)"
  ) in text
  assert "It tied with CE given the same wall time in 75 steps (95.0%): the 0 points " in text
  assert "1.5x a CE step" in text


def test_verdict_within_the_noise_is_a_tie_and_beyond_it_a_loss():
  kd = _plus(CE, [0.05] * 4)
  near = _plus(kd, [0.01, -0.01, 0.012, -0.008])  # 0.1 points better on average, noisily
  far = _plus(kd, [0.03, 0.035, 0.025, 0.03])  # 3 points better on every batch
  for eq, outcome, words in ((near, "tie", "tied with"), (far, "lost", "lost to")):
    per_batch = {"teacher": _plus(CE, [0.1] * 4), "kd_student": kd, "ce_student": CE,
                 "ce_student_equal_time": eq}  # fmt: skip
    values = {name: float(np.mean(v)) for name, v in per_batch.items()}
    rep = _quickstart("vision", values, per_batch)
    assert rep["summary"]["kd_vs_ce_same_time"]["outcome"] == outcome
    text = quickstart_report.verdict(rep)
    assert f"It {words} CE given the same wall time in 75 steps" in text
  assert "by 3 points, beyond the noise (±" in text


def test_text_verdict_without_per_batch_records_and_a_teacher_within_noise():
  # No per-batch records: no noise measured, so only an exact equality is a tie.
  values = {"teacher": 3.0, "kd_student": 3.4, "ce_student": 3.5, "ce_student_equal_time": 3.4}
  rep = _quickstart("text", values)
  text = quickstart_report.verdict(rep)
  assert (
    "the KD student (val CE 3.400) beat the CE student (3.500) by 0.1 nats; the noise was "
    "not measured" in text
  )
  assert "It tied exactly with CE given the same wall time in 75 steps (3.400)" in text
  assert "precomputed teacher targets" in text
  # A teacher better than CE only within the noise: nothing to distil.
  per_batch = {name: [v - 0.1, v + 0.1, v - 0.05, v + 0.05] for name, v in values.items()}
  per_batch["teacher"] = [3.6, 3.4, 3.45, 3.51]  # 3.49 on average: 0.01 below CE, noisily
  values["teacher"] = 3.49
  rep = _quickstart("text", values, per_batch)
  assert rep["summary"]["teacher_vs_ce"]["outcome"] == "tie"
  text = quickstart_report.verdict(rep)
  assert text.startswith(
    "The teacher (val CE 3.490) tied with the student trained on CE alone (3.500): the 0.01 "
    "nats difference is within the noise (±"
  )
  assert "so there was nothing to distil" in text


def test_quickstart_generation_table_and_samples():
  summary = {
    "teacher": {"val_ppl": 20.04, "params": 1_000_000},
    "kd_student": {"val_ppl": 33.1, "params": 200_000},
    "ce_student": {"val_ppl": 44.7, "params": 200_000},
    "ce_student_equal_time": {"val_ppl": 40.0, "params": 200_000},  # not a generation row
  }
  timed = {"teacher": _generate(5.0, 100.0, 1600.0), "kd_student": _generate(2.5, 400.0, 6400.0)}
  timed["ce_student"] = _generate(2.4, 410.0, 6300.0)
  samples = {name: [" f(x):", " os\nimport sys"] for name in timed}
  samples["kd_student"] = [" g():", " ```"]  # a fence in the text gets a longer fence
  gen = {"timed": timed, "samples": samples, "new_tokens": dict.fromkeys(timed, 16)}
  out = quickstart_report.generation(summary, gen, ["def", "import"])
  assert list(out["rows"]) == ["teacher", "kd_student", "ce_student"]
  assert out["rows"]["teacher"]["params"] == 1_000_000 and out["new_tokens"] == 16
  assert out["rows"]["kd_student"]["decode_tokens_per_s"] == {1: 400.0, 32: 6400.0}
  assert out["rows"]["kd_student"]["ttft_s"] == 2.5e-3  # batch 1's
  md = quickstart_report.generation_md(json.loads(json.dumps(out)))  # as report.json holds it
  cells = table_cells(md)
  assert list(cells) == ["teacher", "kd_student", "ce_student"]
  assert cells["kd_student"] == {
    "model": "kd_student", "ppl": "33.1", "TTFT ms b=1": "2.5", "decode tok/s b=1": "400",
    "decode tok/s b=32": "6,400", "memory b=32": "3.00 MiB", "params": "200.00k",
  }  # fmt: skip
  assert cells["teacher"]["decode tok/s b=32"] == "1,600" and cells["teacher"]["params"] == "1.00M"
  assert "16-token random prompts and 16 new tokens" in md and "at most 16 new tokens" in md
  assert md.count("  def f(x):") == 2 and md.count("  import os\n  import sys") == 2
  assert "  def g():" in md and "  ````text\n  import ```\n  ````" in md
  assert md.index("Prompt `def`") < md.index("Prompt `import`")
