"""The documentation against the code: README.md, docs/*.md and BENCHMARKS.md.

Every command line of a fenced shell block (``bash``, ``sh``, ``console`` or no language) that
calls ``jaxdistill`` (as ``jaxdistill``, ``.venv/bin/jaxdistill``, or after ``--`` of a
launcher) is parsed by the real parser, ``cli.commands.build_parser``, and its
``--config.KEY=VALUE`` overrides are split as ``main`` splits them (``_split_overrides``) and
applied to the config they would change: nothing runs. Besides: every ``--config FILE`` and
every script a command names exists, every ``make TARGET`` is a Makefile target, the Markdown
links between the pages resolve (anchors included), every repository path a page names in
backticks exists (after the package was regrouped, a module by an old name, ``train.py`` or
``eval_run.py``, fails here), docs/configs.md names every config key, and
docs/architecture.md draws the layers tests/unit/test_layout.py enforces.
"""

import contextlib
import functools
import io
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

from jaxdistill import config as config_lib
from jaxdistill.cli import commands
from jaxdistill.errors import JaxdistillError

PAGES = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")])
SHELL = ("", "bash", "sh", "shell", "console")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
# Commands that refuse overrides (``main`` and ``cli.compress``: "... takes no --config
# overrides"); the others apply them to a run config.
NO_OVERRIDES = ("quickstart", "report", "embed", "export", "prune", "quantize", "generate")
# Top-level directories whose files the pages name by path.
TOP = ("jaxdistill", "tests", "configs", "benchmarks", "examples", "launch", "tpu_scripts", "docs")
REPO_PATH = re.compile(rf"^(?:{'|'.join(TOP)})/[\w./-]*$")
# A module or script named by itself or under its package (`loop.py`, `models/hf.py`); other
# names (`report.md`, `W/config.json`) are mostly what a run writes.
FILE_NAME = re.compile(r"^[\w/]+\.(?:py|sh)$")


def _rel(page) -> str:
  return str(page.relative_to(ROOT))


def shell_lines(text: str):
  """(line number, command line) of every fenced shell block, continuations joined."""
  lang, indent, pending, start = None, 0, "", 0
  for n, raw in enumerate(text.splitlines(), 1):
    fence = FENCE.match(raw)
    if fence:
      lang, indent = (fence[2], len(fence[1])) if lang is None else (None, 0)
      continue
    if lang is None or lang not in SHELL:
      continue
    line = raw[indent:] if raw[:indent].isspace() else raw.lstrip()
    if not pending:
      start = n
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1] + " "
      continue
    yield start, pending + line
    pending = ""


def segments(line: str) -> list[list[str]]:
  """A command line's simple commands (split at ``&&``, ``||``, ``|``, ``;``), redirections
  and comments dropped."""
  lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
  lexer.whitespace_split, lexer.commenters = True, "#"
  out, words, skip = [], [], False
  for word in lexer:
    if word in ("&&", "||", "|", ";", "&"):
      out, words, skip = out + [words], [], False
    elif word and set(word) <= set("<>&"):
      skip = True  # the next word is a redirection's target
    elif skip:
      skip = False
    else:
      words.append(word)
  return [w for w in out + [words] if w]


def jaxdistill_args(words: list[str]) -> list[str] | None:
  """The arguments of the ``jaxdistill`` call in a simple command, or None if it has none."""
  for i, word in enumerate(words):
    if word == "jaxdistill" or word.endswith("/bin/jaxdistill"):
      return words[i + 1 :]
  return None


def check_command(args: list[str]) -> str | None:
  """Why ``jaxdistill ARGS`` is wrong, or None: parsed and its overrides applied, not run."""
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
      parsed, extra = commands.build_parser().parse_known_args(args)
  except SystemExit as e:
    return None if e.code == 0 else err.getvalue().strip() or f"exit {e.code}"
  try:
    overrides = commands._split_overrides(extra)
    if overrides and parsed.command in NO_OVERRIDES:
      return f"{parsed.command} takes no --config overrides"
    path = getattr(parsed, "config", None)
    by_path = bool(path) and ("/" in path or ".py" in path)  # FILE or FILE:ARG, not a name
    if by_path:
      file = path if (ROOT / path).is_file() or ":" not in path else path.rsplit(":", 1)[0]
      if not (ROOT / file).is_file():
        return f"--config {path}: no such file in the repository"
    if path and parsed.command in ("train", "precompute"):
      # Unknown keys, wrong types; a config named otherwise than by path is load_config's to find.
      config_lib.load_config(str(ROOT / path) if by_path else path, overrides)
    else:
      cfg = config_lib.default_config()
      for key, value in overrides:
        config_lib.apply_override(cfg, key, value)
  except JaxdistillError as e:
    return str(e)
  return None


def _commands():
  for page in PAGES:
    for n, line in shell_lines(page.read_text(encoding="utf-8")):
      for words in segments(line):
        args = jaxdistill_args(words)
        if args is not None:
          yield pytest.param(args, id=f"{_rel(page)}:{n}")


def _names_a_file(path: str) -> bool:
  """Whether a path named in a page exists: from the root, inside the package, or (a bare
  file name) anywhere in the repository."""
  if (ROOT / path).exists() or (ROOT / "jaxdistill" / path).exists():
    return True
  return "/" not in path and path in _file_names()


@functools.cache
def _file_names() -> set[str]:
  inside = {p.name for top in TOP if (ROOT / top).is_dir() for p in (ROOT / top).rglob("*")}
  return inside | {p.name for p in ROOT.iterdir()}


def _make_targets() -> set[str]:
  text = (ROOT / "Makefile").read_text(encoding="utf-8")
  return {m[1] for m in re.finditer(r"^([\w.-]+)\s*:(?!=)", text, re.M)}


# --- the checker itself ----------------------------------------------------------------------


def test_shell_lines_join_continuations_and_skip_other_blocks():
  text = "```python\njaxdistill train\n```\n  ```bash\n  jaxdistill a \\\n    --b c  # d\n  ```\n"
  assert list(shell_lines(text)) == [(5, "jaxdistill a    --b c  # d")]
  assert segments("make setup && A=1 jaxdistill eval --workdir W > out.txt  # note") == [
    ["make", "setup"],
    ["A=1", "jaxdistill", "eval", "--workdir", "W"],
  ]
  assert jaxdistill_args(["launch/local.py", "-n", "2", "--", ".venv/bin/jaxdistill", "x"]) == ["x"]


_SMOKE = ["train", "--config", "configs/smoke.py", "--workdir", "W"]


@pytest.mark.parametrize(
  "args, why",
  [
    (["train", "--config", "configs/smoke.py"], "--workdir"),  # a required flag missing
    (["train", "--config", "configs/nope.py", "--workdir", "W"], "no such file"),
    ([*_SMOKE, "[--resume_from", "3]"], "unknown argument '[--resume_from'"),
    ([*_SMOKE, "--config.optim.stepz=3"], "optim.stepz: unknown key"),
    ([*_SMOKE, "--config.optim.steps=many"], "optim.steps: cannot use 'many'"),
    (["eval", "--workdir", "W", "--config.data.batch_size=x"], "data.batch_size"),
    (["report", "W", "--output", "R", "--config.seed=1"], "no --config overrides"),
    (["quantize", "--workdir", "W", "--output", "O", "--act", "int4"], "invalid choice"),
  ],
)
def test_a_bad_command_fails(args, why):
  assert why in (check_command(args) or "")


# --- the pages ---------------------------------------------------------------------------


@pytest.mark.parametrize("args", list(_commands()))
def test_documented_command_parses(args):
  problem = check_command(args)
  assert problem is None, f"jaxdistill {shlex.join(args)}\n  {problem}"


def test_pages_show_commands():
  # The collection above must see the commands (a broken fence parser would pass vacuously).
  seen = {args[0] for args in (p.values[0] for p in _commands()) if args}
  assert {"train", "eval", "precompute", "pipeline", "prune", "quantize", "report"} <= seen


def test_named_scripts_and_make_targets_exist():
  targets, bad = _make_targets(), []
  for page in PAGES:
    for n, line in shell_lines(page.read_text(encoding="utf-8")):
      for words in segments(line):
        where = f"{_rel(page)}:{n}"
        if words[0] == "make":
          bad += [f"{where}: make {t}" for t in words[1:] if "=" not in t and t not in targets]
        for word in words:
          path = word.split(":", 1)[0] if word.startswith("configs/") else word
          if REPO_PATH.match(path) and "*" not in path and not (ROOT / path).exists():
            bad.append(f"{where}: {word}")
  assert targets >= {"quickstart", "test", "test-fast", "smoke", "examples"}
  assert not bad, "missing:\n" + "\n".join(bad)


def test_readme_links_to_docs_resolve():
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  linked = re.findall(r"\]\((docs/[^)#\s]+)", readme)
  assert linked, "README.md links to no docs/ page"
  missing = sorted({p for p in linked if not (ROOT / p).is_file()})
  assert not missing, missing
  # Every page in docs/ is reachable from the README.
  assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} <= set(linked)


def anchors(text: str) -> set[str]:
  """The anchors GitHub gives a page's headings (lower case, punctuation dropped, spaces to
  hyphens; a repeated heading gets -1, -2, ...)."""
  found, fence = set(), False
  for line in text.splitlines():
    fence ^= line.lstrip().startswith("```")
    heading = None if fence else re.match(r"^#{1,6} (.*)", line)
    if heading:
      slug = re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-")
      n = next(i for i in range(100) if (f"{slug}-{i}" if i else slug) not in found)
      found.add(f"{slug}-{n}" if n else slug)
  return found


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_and_named_paths_exist(page):
  text, bad = page.read_text(encoding="utf-8"), []
  for target, anchor in re.findall(r"\]\(([^)#\s:]*)(?:#([^)\s]*))?\)", text):
    linked = page.parent / target if target else page
    if not linked.exists():
      bad.append(f"link {target}")
    elif anchor and anchor not in anchors(linked.read_text(encoding="utf-8")):
      bad.append(f"link {target}#{anchor}: no such heading")
  for quoted in re.findall(r"`([^`\s]+)`", text):
    path = quoted.split(":", 1)[0].rstrip(".,")
    if REPO_PATH.match(path) and "*" not in path and not (ROOT / path).exists():
      bad.append(f"path {quoted}")
    elif not REPO_PATH.match(path) and FILE_NAME.match(path) and not _names_a_file(path):
      bad.append(f"file {quoted}")
  assert not bad, f"{_rel(page)}:\n" + "\n".join(bad)


def _leaf_keys(node, prefix=""):
  for key, value in node.items():
    if hasattr(value, "items"):
      yield from _leaf_keys(value, f"{prefix}{key}.")
    else:
      yield prefix + key


def test_configs_page_names_every_key():
  text = (ROOT / "docs" / "configs.md").read_text(encoding="utf-8")
  text = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.M | re.S)  # code blocks aside
  named = set(re.findall(r"\w+", " ".join(re.findall(r"`([^`\n]+)`", text))))
  missing = [k for k in _leaf_keys(config_lib.default_config()) if k.split(".")[-1] not in named]
  assert not missing, f"docs/configs.md does not name these config keys: {missing}"


def test_architecture_draws_the_enforced_layers():
  doc = (ROOT / "tests" / "unit" / "test_layout.py").read_text(encoding="utf-8")
  layers = re.search(r"^  0  errors.*?^  7  cli/$", doc, re.M | re.S)
  assert layers, "tests/unit/test_layout.py's docstring no longer lists the layers 0..7"
  assert layers[0] in (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


# --- the real command line ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]], ids=" ".join)
def test_cli_help_runs(argv):
  out = subprocess.run(
    [sys.executable, "-m", "jaxdistill.cli", *argv],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr
  assert "usage: jaxdistill" in out.stdout
