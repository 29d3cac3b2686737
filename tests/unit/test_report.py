"""`jaxdistill report` from hand-made run workdirs (no training): the Pareto front, the table,
report.json, the PNGs' sizes and contents, and the one-line errors of bad input."""

import json
import math
import random
import struct

import numpy as np
import pytest

from jaxdistill.cli import commands as cli
from jaxdistill.config import default_config
from jaxdistill.report import plots as report_plots
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


def _student(quality: float, vision: bool) -> dict:
  if vision:
    return {"accuracy": quality, "top5_accuracy": min(1.0, quality + 0.05), "agreement": 0.9,
            "kl_to_teacher": 0.2, "ece": 0.03, "images": 1000}  # fmt: skip
  return {"val_loss": quality, "val_ppl": math.exp(quality), "accuracy": 0.3, "agreement": 0.8,
          "kl_to_teacher": 0.25, "tokens": 4096}  # fmt: skip


def _latency(ms_1, ms_32):
  med = lambda ms: {"median_s": ms / 1e3, "p90_s": 1.1 * ms / 1e3, "repeats": 10}
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
  **cfg_kw,
):
  """A finished run's files. latency: (ms at batch 1, ms at 32) or None; teacher: (quality,
  params, latency) of its eval JSON's teacher entry, or None."""
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
    "models": {"student": _student(quality, vision)},
    "size": {"student": {"params": params, "bytes": 4 * params}},
    "device": "cpu",
    "device_kind": "cpu",
  }
  if latency:
    ev["latency"] = {"batch_sizes": [1, 32], "student": _latency(*latency)}
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


def test_text_report_table_pareto_and_files(text_runs, tmp_path):
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
  assert cells["nolat"]["ms b=32"] == "—" and cells["teacher"]["agree"] == "—"
  assert cells["kd"]["params"] == "200.00k" and cells["teacher"]["params"] == "1.00M"
  assert "A verdict paragraph." in md
  for png in ("training_curves.png", "validation.png", "quality_latency.png"):
    assert f"]({png})" in md
  # The validation caption names both measurements' batches.
  assert "first 4 validation batches" in rep["captions"]["validation"]
  assert "the whole split" in rep["captions"]["validation"]
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
