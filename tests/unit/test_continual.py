"""The continual stream (data/continual.py): its windows, held-out rows, drift order, packing,
a mid-window resume, and the continual section's config errors (one line, naming the key)."""

import json
import pathlib

import numpy as np
import pytest

from jaxdistill.config import load_config, validate
from jaxdistill.data import continual
from jaxdistill.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _cfg(**continual_keys):
  """configs/continual.py at its test size (24 small stdlib files, 4 domains), overridden."""
  cfg = load_config(f"{ROOT}/configs/continual.py:snapshot,test")
  cfg.continual.update(**continual_keys)
  return cfg


# --- the layout: pure index arithmetic ---------------------------------------------------


def test_windows_are_consecutive_blocks_with_evenly_spread_held_out_rows():
  layout = continual.Layout(num_rows=100, window_steps=3, batch_size=4, eval_rows=4)
  assert (layout.block, layout.num_windows, layout.num_steps) == (16, 6, 18)
  np.testing.assert_array_equal(layout.eval_indices(0), [2, 6, 10, 14])
  np.testing.assert_array_equal(layout.eval_indices(2), [34, 38, 42, 46])
  for k in range(layout.num_windows):
    train, held = layout.train_indices(k), layout.eval_indices(k)
    assert len(train) == 12 and not set(train) & set(held)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), np.arange(16) + 16 * k)
  # Steps walk the training rows in stream order, window after window, never a held-out one.
  steps = np.concatenate([layout.step_indices(s) for s in range(layout.num_steps)])
  assert np.all(np.diff(steps) > 0) and len(steps) == 6 * 12
  np.testing.assert_array_equal(layout.step_indices(4), layout.train_indices(1)[4:8])
  with pytest.raises(Exception, match="past its end"):
    layout.step_indices(18)


def test_the_sliding_window_is_the_rows_of_the_last_window_steps():
  layout = continual.Layout(num_rows=100, window_steps=3, batch_size=4, eval_rows=4)
  assert len(layout.recent_indices(0)) == 0
  np.testing.assert_array_equal(layout.recent_indices(2), layout.train_indices(0)[:8])
  # At step 5: steps 2, 3, 4, across the window boundary.
  want = np.concatenate([layout.step_indices(s) for s in (2, 3, 4)])
  np.testing.assert_array_equal(layout.recent_indices(5), want)


def test_pack_restarts_segments_and_positions_per_row_and_document():
  docs = [np.arange(1, 7, dtype=np.int32), np.arange(10, 14, dtype=np.int32)]  # 5 + 3 pairs
  rows = continual._pack(docs, seq_len=3)
  np.testing.assert_array_equal(rows["inputs"], [[1, 2, 3], [4, 5, 10], [11, 12, 0]])
  np.testing.assert_array_equal(rows["targets"], [[2, 3, 4], [5, 6, 11], [12, 13, 0]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1], [1, 1, 2], [1, 1, 0]])
  # Row 2 starts mid-document: its positions restart at 0 (each row is its own sequence).
  np.testing.assert_array_equal(rows["positions"], [[0, 1, 2], [0, 1, 0], [0, 1, 0]])


# --- the stream of the built-in corpus ---------------------------------------------------


def test_the_stream_yields_the_documented_windows_in_order():
  cfg = _cfg()
  stream = continual.stream_of(cfg)
  layout = continual.check(cfg)
  b = cfg.data.batch_size
  assert layout.num_windows == cfg.continual.domains == 4
  # Domains come in file-path order, one after the other, each a contiguous run of rows.
  assert np.all(np.diff(stream.domain) >= 0) and set(stream.domain) == {0, 1, 2, 3}
  firsts = [name.split(" .. ")[0] for name in stream.names]
  assert firsts == sorted(firsts) and stream.names[0].startswith("__future__.py")
  it = continual.ContinualIterator(cfg)
  held = {int(i) for k in range(layout.num_windows) for i in layout.eval_indices(k)}
  seen_domains = []
  for step in range(cfg.optim.steps):
    assert it.window == step // cfg.continual.window_steps
    batch = next(it)
    rows = layout.step_indices(step)
    assert not held & set(rows.tolist())  # held-out rows are never trained on
    for key in continual.KEYS:
      np.testing.assert_array_equal(batch[key], stream.rows[key][rows])
    assert batch["inputs"].shape == (b, cfg.data.seq_len)
    np.testing.assert_array_equal(batch["weights"], batch["segment_ids"] > 0)
    seen_domains.append(stream.domain[rows].max())
  assert seen_domains == sorted(seen_domains) and seen_domains[-1] == 3  # the drift, in order
  window = continual.window_batches(cfg, 2)
  got = np.concatenate([w["inputs"] for w in window])[: cfg.continual.eval_rows]
  np.testing.assert_array_equal(got, stream.rows["inputs"][layout.eval_indices(2)])


def test_the_stream_resumes_mid_window_at_the_same_row():
  cfg = _cfg()
  it = continual.ContinualIterator(cfg)
  for _ in range(cfg.continual.window_steps + 5):  # into window 1
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  expected = [next(it) for _ in range(4)]
  resumed = continual.ContinualIterator(cfg)
  resumed.set_state(state)
  assert resumed.window == 1
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  with pytest.raises(Exception, match="not a continual stream"):
    resumed.set_state({"version": 1, "grain": {}})


def test_refresh_batches_are_deterministic_and_from_the_sliding_window():
  cfg = _cfg()
  stream = continual.stream_of(cfg)
  layout = continual.layout_of(cfg, stream)
  assert continual.recent_batches(cfg, 0, 3) == []
  a, b = continual.recent_batches(cfg, 30, 3), continual.recent_batches(cfg, 30, 3)
  recent = {stream.rows["inputs"][i].tobytes() for i in layout.recent_indices(30)}
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    assert {row.tobytes() for row in x["inputs"]} <= recent


# --- config errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
  "change, key, words",
  [
    (dict(window_steps=200), "continual.window_steps", "larger than the stream"),
    (dict(window_steps=0), "continual.window_steps", ">= 1"),
    (dict(domains=-1), "continual.domains", ">= 0"),
    (dict(snapshot_weight=-1.0), "continual.snapshot_weight", ">= 0"),
    (dict(refresh_every=2, teacher_lr=0.0), "continual.teacher_lr", "> 0"),
  ],
)
def test_bad_continual_settings_name_their_key(change, key, words):
  with pytest.raises(ConfigError) as info:
    validate.validate(_cfg(**change))
  assert str(info.value).startswith(f"{key}: ") and words in str(info.value)


def test_a_refresh_needs_a_teacher_model_and_a_stream_needs_text():
  cfg = _cfg(refresh_every=4)
  cfg.teacher.source = "none"
  with pytest.raises(ConfigError, match="^continual.refresh_every: a refresh fine-tunes"):
    validate.validate(cfg)
  cfg = _cfg()
  cfg.data.source = "synthetic"
  with pytest.raises(ConfigError, match="^continual.domains: "):
    validate.validate(cfg)


def test_a_window_larger_than_the_stream_is_one_error_line_exit_2(tmp_path, capsys):
  # The config is fine on its own (400 steps of 200); the stream's 996 rows hold no window of
  # 200 x 8 + 32 rows: found when the data is opened, before anything is written.
  from jaxdistill.cli import commands as cli

  workdir = tmp_path / "w"
  argv = ["train", "--config", f"{ROOT}/configs/continual.py:plain,test"]
  argv += ["--workdir", str(workdir), "--config.continual.window_steps=200"]
  assert cli.main(argv + ["--config.optim.steps=400"]) == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith("error: continual.window_steps: a window of 200 steps x 8 rows")
  assert "larger than the stream" in line and not workdir.exists()


def test_a_teacher_directory_must_exist_and_its_newest_checkpoint_at_a_step_is_picked(tmp_path):
  from jaxdistill.train import continual as continual_lib

  with pytest.raises(ConfigError, match="^continual.teacher_dir: "):
    validate.validate(_cfg(refresh_every=4, teacher_dir=str(tmp_path / "missing")))
  for name in ("0", "8", "20", "notes", "12x"):
    (tmp_path / name).mkdir()
  validate.validate(_cfg(refresh_every=4, teacher_dir=str(tmp_path), teacher_lr=0.0))
  picked = [continual_lib.pick(str(tmp_path), s) for s in (0, 7, 8, 19, 20, 99)]
  assert [p and pathlib.Path(p).name for p in picked] == ["0", "0", "8", "8", "20", "20"]
  (tmp_path / "0").rmdir()
  assert continual_lib.pick(str(tmp_path), 7) is None


def test_more_steps_than_the_stream_holds_is_an_error():
  cfg = _cfg()
  cfg.optim.steps = 1000
  with pytest.raises(ConfigError, match="^optim.steps: 1000 steps, but the continual stream"):
    continual.check(cfg)


def test_the_continual_config_validates_at_both_sizes_and_variants():
  for arg in ("snapshot", "plain", "snapshot,test", "plain,test"):
    cfg = load_config(f"{ROOT}/configs/continual.py:{arg}")
    validate.validate(cfg)
    assert cfg.continual.domains == 4 and cfg.eval.every == cfg.continual.window_steps
    assert (cfg.continual.snapshot_weight > 0) == arg.startswith("snapshot")
  with pytest.raises(ConfigError, match="^--config: "):
    load_config(f"{ROOT}/configs/continual.py:lwf")
