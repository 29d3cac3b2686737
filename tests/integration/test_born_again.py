"""Born-again generations (issue 30): a distil stage's ``generations: N`` unrolled into N
distil stages, each taught by the previous one's student (declaration), and the test size of
configs/born_again.py run end to end (each generation reads the previous one's final params)."""

import json

import pytest

from jaxdistill.compress import pipeline
from jaxdistill.compress import stages as pipeline_spec
from jaxdistill.config import default_config
from jaxdistill.errors import ConfigError


def _declare(**distil):
  return {
    "teacher": "t",
    "stages": [
      {"name": "t", "action": "train", "config": default_config()},
      {"name": "ban", "action": "distil", "config": default_config(), **distil},
      {"name": "p", "action": "prune", "targets": {"d_ff": 0.5}},
    ],
  }


def test_generations_unroll_into_a_chain_of_teachers():
  spec = pipeline_spec.check(_declare(generations=3), [("seed", "5")])
  names = [s["name"] for s in spec["stages"]]
  assert names == ["t", "ban-g1", "ban-g2", "ban-g3", "p"]
  by = {s["name"]: s for s in spec["stages"]}
  assert [by[f"ban-g{k}"]["teacher"] for k in (1, 2, 3)] == ["t", "ban-g1", "ban-g2"]
  assert [by[f"ban-g{k}"]["dir"] for k in (1, 2, 3)] == ["01-ban-g1", "02-ban-g2", "03-ban-g3"]
  # Each generation its own seed (after the overrides): the config's seed + k.
  assert [by[f"ban-g{k}"]["config"].seed for k in (1, 2, 3)] == [6, 7, 8]
  assert by["t"]["config"].seed == 5
  assert by["p"]["from"] == "ban-g3"  # "previous" is the last generation
  one = pipeline_spec.check(_declare(generations=1, teacher="t"))
  assert [s["name"] for s in one["stages"]] == ["t", "ban-g1", "p"]


@pytest.mark.parametrize("n", [0, -1, 1.5, "2", True])
def test_generations_below_one_or_not_a_number_are_refused(n):
  with pytest.raises(ConfigError, match=r"stages\[ban\]\.generations") as e:
    pipeline_spec.check(_declare(generations=n))
  assert "\n" not in str(e.value)


def test_generations_refuse_init_and_other_actions():
  with pytest.raises(ConfigError, match=r"stages\[ban\]\.init"):
    pipeline_spec.check(_declare(generations=2, init="t"))
  bad = {"stages": [{"name": "t", "action": "train", "config": default_config(), "generations": 2}]}
  with pytest.raises(ConfigError, match="generations"):
    pipeline_spec.check(bad)


def test_shipped_config_declares_two_generations_after_a_ce_teacher():
  spec = pipeline.load("configs/born_again.py:test")
  got = [(s["name"], s["action"], s.get("teacher")) for s in spec["stages"]]
  assert got == [("teacher", "train", None), ("ban-g1", "distil", "teacher"),
                 ("ban-g2", "distil", "ban-g1")]  # fmt: skip


@pytest.mark.slow
def test_born_again_pipeline_runs_each_generation_from_the_previous_student(tmp_path):
  w = tmp_path / "ban"
  state = pipeline.run("configs/born_again.py:test", str(w), repeats=2, log=lambda *_: None)
  assert state["complete"] and all(s["status"] == "done" for s in state["stages"])
  by = {s["name"]: s for s in state["stages"]}
  assert by["ban-g2"]["teacher"] == "ban-g1" and by["ban-g1"]["teacher"] == "teacher"
  teacher_cfg = json.loads((w / "00-teacher" / "config.json").read_text())
  shape = ("d_model", "num_layers", "num_heads", "d_ff", "vocab_size")
  for gen, parent in (("01-ban-g1", "00-teacher"), ("02-ban-g2", "01-ban-g1")):
    cfg = json.loads((w / gen / "config.json").read_text())
    assert cfg["teacher"]["source"] == "workdir"
    assert cfg["teacher"]["path"] == str(w / parent)
    assert (w / parent / "final_params").exists()
    # Born-again: the teacher's architecture for the student and for the teacher section.
    for key in shape:
      assert cfg["student"][key] == cfg["teacher"][key] == teacher_cfg["student"][key], key
    assert (w / gen / "eval" / "pipeline.json").is_file()
  for s in state["stages"]:  # every generation evaluated and timed, one architecture
    assert s["metrics"]["val_loss"] > 0 and s["size"]["params"] > 0
  assert len({s["size"]["params"] for s in state["stages"]}) == 1
  assert len({s["arch"] for s in state["stages"]}) == 1
  assert all(f"| {n} |" in (w / "report.md").read_text() for n in by)
