"""The package's shape: no import cycles, layers that import only downwards, size budgets.

Read from the source with ``ast`` (nothing is imported), so the tests see every import,
including those inside functions (which run late, so a cycle can hide behind them) and those
under ``if TYPE_CHECKING:`` (a type one module borrows from another is a dependency too).

The layers, bottom to top (docs/architecture.md draws them); a module imports only from its own
layer or below (``LAYERS``: a package covers its submodules unless a submodule has a line of
its own):

  0  errors, paths (local or gs:// files), progress (bars on a terminal, log lines elsewhere)
  1  parallel/ (mesh + rules, distributed, placement, precision); the pure functions of
     distill/ (losses, vision_losses, ensemble, schedules, layer_maps, closed_form);
     train.metrics, train.throughput, evaluation.classify, generate.sampling
  2  models/ (closed: with layer 0-1, the bottom), data/, config (the ConfigDict schema)
  3  distill/ heads and objective (+ fused, sparse, chunking), config.validate (+ checks/),
     compress.stages, generate/ (cache, decode, sampler, speculative, timing)
  4  train.step (+ state, optim, ema, codistill, lwf), train.teacher, train.checkpoint,
     train.on_policy, evaluation.evaluate, evaluation.latency, evaluation.task_accuracy
  5  train.run, train.workdir, train.loop     build a run, its workdir, the step loop;
     train.continual (a continual run's teacher refreshes and per-window evaluation)
  6  jobs: quickstart, task_quickstart, precompute/, evaluation.job, evaluation.embed,
     compress/, report/, generate.job, generate.load, preflight/
  7  cli/
"""

import ast
import pathlib
import sys

import pytest
from conftest import ROOT

PACKAGE = "jaxdistill"
SRC = ROOT / PACKAGE

# Module (short name; a package covers its submodules unless one has its own line) -> layer.
LAYERS = {
  **dict.fromkeys(("errors", "paths", "progress"), 0),
  "parallel": 1,
  **dict.fromkeys(("distill.losses", "distill.vision_losses", "distill.ensemble"), 1),
  **dict.fromkeys(("distill.schedules", "distill.layer_maps", "distill.closed_form"), 1),
  **dict.fromkeys(("train.metrics", "train.throughput", "evaluation.classify"), 1),
  "generate.sampling": 1,
  **dict.fromkeys(("models", "data", "config"), 2),
  **dict.fromkeys(("distill", "config.validate", "config.checks", "compress.stages"), 3),
  "generate": 3,
  **dict.fromkeys(("train.step", "train.teacher", "train.checkpoint", "train.on_policy"), 4),
  **dict.fromkeys(("train.optim", "train.ema", "train.codistill", "train.lwf"), 4),
  "train.state": 4,
  **dict.fromkeys(("evaluation.evaluate", "evaluation.latency", "evaluation.task_accuracy"), 4),
  **dict.fromkeys(("train.run", "train.workdir", "train.loop", "train.continual"), 5),
  **dict.fromkeys(("quickstart", "precompute", "evaluation", "compress", "report"), 6),
  **dict.fromkeys(("task_quickstart", "preflight"), 6),
  **dict.fromkeys(("generate.job", "generate.load"), 6),
  "train": 5,
  "cli": 7,
}
# The closed bottom: models and the pure layers under them import nothing else of the package
# (in particular nothing of train, loop, objective, config, validate, the jobs or the CLI).
BOTTOM = ("models", "distill.losses", "distill.layer_maps", "distill.schedules", "parallel")
BOTTOM += ("errors", "distill.vision_losses", "evaluation.classify", "distill.ensemble")
BOTTOM += ("paths",)  # layer 0: models read and write local or gs:// files through it
JOBS = ("quickstart", "task_quickstart", "precompute", "evaluation.job", "evaluation.embed")
JOBS += ("report", "compress")
JOBS += ("generate.job", "generate.load", "preflight")
# The command line.
CLI = ("cli",)

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# Functions that only build a config (data, not logic) are exempt from the function budget.
CONFIG_BUILDERS = {
  "jaxdistill/config/defaults.py": {"default_config", "model_fields"},
  "jaxdistill/config/sections.py": {"data_section", "precompute_section"},
}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every module of the package (packages included)."""
  return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(target: str, modules) -> str | None:
  """The package module an imported name lives in: the longest known prefix of ``target``."""
  parts = target.split(".")
  while parts:
    name = ".".join(parts)
    if name in modules:
      return name
    parts.pop()
  return None


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
  """The package modules ``name`` imports anywhere in its file (functions included).

  ``from jaxdistill import x`` counts as importing ``jaxdistill.x`` when x is a module and
  ``jaxdistill`` (the package's ``__init__``) otherwise; ``from jaxdistill.x import y`` as
  ``jaxdistill.x.y`` when y is a submodule, else ``jaxdistill.x``; relative imports resolve
  against the importing module's package.
  """
  is_package = path.name == "__init__.py"
  here = name if is_package else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: from . import x / from ..y import z
        base = here.split(".")
        base = base[: len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
      else:
        stem = node.module or ""
      targets = [f"{stem}.{alias.name}" for alias in node.names] + [stem]
      # `from pkg import name`: the submodule if name is one, else pkg itself.
      targets = [t for t in targets[:-1] if t in modules] or [targets[-1]]
    else:
      continue
    for target in targets:
      if target == PACKAGE or target.startswith(PACKAGE + "."):
        resolved = _resolve(target, modules)
        if resolved and resolved != name:
          found.add(resolved)
  return found


def import_graph() -> dict[str, set[str]]:
  """Module -> the package modules it imports (edges of the intra-package import graph)."""
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def _find_cycle(graph) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
  WHITE, GREY, BLACK = 0, 1, 2
  color = {n: WHITE for n in graph}
  for root in sorted(graph):
    if color[root] != WHITE:
      continue
    stack = [(root, iter(sorted(graph[root])))]
    color[root] = GREY
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        color[node] = BLACK
        stack.pop()
      elif color.get(child, BLACK) == GREY:
        path = [n for n, _ in stack]
        return path[path.index(child) :] + [child]
      elif color.get(child) == WHITE:
        color[child] = GREY
        stack.append((child, iter(sorted(graph[child]))))
  return None


def _all_cycles(graph) -> list[list[str]]:
  """Every import cycle found by removing one found cycle's closing edge at a time."""
  graph = {n: set(e) for n, e in graph.items()}
  cycles = []
  while (cycle := _find_cycle(graph)) is not None:
    cycles.append(cycle)
    graph[cycle[-2]].discard(cycle[-1])
  return cycles


def _is_in(module: str, names) -> bool:
  """Whether ``module`` is one of ``names`` (short names; a package covers its submodules)."""
  short = module.removeprefix(PACKAGE + ".")
  return any(short == n or short.startswith(n + ".") for n in names)


# --- the graph builder itself -------------------------------------------------------------


def _graph_of(tmp_path, files: dict[str, str], monkeypatch) -> dict[str, set[str]]:
  for rel, text in files.items():
    path = tmp_path / PACKAGE / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / PACKAGE)
  return import_graph()


def test_graph_sees_every_kind_of_import(tmp_path, monkeypatch):
  graph = _graph_of(
    tmp_path,
    {
      "__init__.py": "VERSION = 1\n",
      "a.py": "from jaxdistill import b\nfrom jaxdistill.m.x import f\n",
      "b.py": "def g():\n  from . import c\n  import jaxdistill.m\n",
      "c.py": "from jaxdistill import VERSION\nfrom .m import x\n",
      "m/__init__.py": "from .x import f\n",
      "m/x.py": "def f():\n  from ..c import VERSION\n  import numpy\n",
    },
    monkeypatch,
  )
  assert graph == {
    "jaxdistill": set(),
    "jaxdistill.a": {"jaxdistill.b", "jaxdistill.m.x"},
    "jaxdistill.b": {"jaxdistill.c", "jaxdistill.m"},  # imports inside a function count
    "jaxdistill.c": {"jaxdistill", "jaxdistill.m.x"},
    "jaxdistill.m": {"jaxdistill.m.x"},
    "jaxdistill.m.x": {"jaxdistill.c"},
  }
  assert _find_cycle(graph) == ["jaxdistill.c", "jaxdistill.m.x", "jaxdistill.c"]
  graph["jaxdistill.m.x"] = set()
  assert _find_cycle(graph) is None


# --- the package -------------------------------------------------------------------------


def test_no_import_cycles():
  cycles = _all_cycles(import_graph())
  assert not cycles, "import cycles (a -> b -> ... -> a):\n" + "\n".join(
    " -> ".join(c) for c in cycles
  )


def test_bottom_layer_imports_nothing_above_it():
  graph = import_graph()
  bad = sorted(
    f"{module} imports {dep}"
    for module, deps in graph.items()
    if _is_in(module, BOTTOM)
    for dep in deps
    if dep != PACKAGE and not _is_in(dep, BOTTOM)
  )
  assert not bad, "the bottom layer (models/ and what it stands on) reaches up:\n" + "\n".join(bad)


def _layer(module: str) -> int | None:
  """The layer of the longest ``LAYERS`` name that is ``module`` or a package above it."""
  short = module.removeprefix(PACKAGE + ".")
  names = [n for n in LAYERS if short == n or short.startswith(n + ".")]
  return LAYERS[max(names, key=len)] if names else None


def test_every_module_has_a_layer():
  missing = sorted(m for m in import_graph() if m != PACKAGE and _layer(m) is None)
  assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"


def test_imports_go_down_the_layers():
  graph = import_graph()
  bad = sorted(
    f"{module} (layer {_layer(module)}) imports {dep} (layer {_layer(dep)})"
    for module, deps in graph.items()
    for dep in deps
    if dep != PACKAGE and None not in (_layer(module), _layer(dep)) and _layer(dep) > _layer(module)
  )
  assert not bad, "imports that go up a layer:\n" + "\n".join(bad)


def test_only_the_cli_imports_jobs_and_nothing_imports_the_cli():
  graph = import_graph()
  bad = sorted(
    f"{module} imports {dep}"
    for module, deps in graph.items()
    for dep in deps
    if not _is_in(module, CLI)
    and ((_is_in(dep, JOBS) and not _is_in(module, JOBS)) or _is_in(dep, CLI))
  )
  assert not bad, "\n".join(bad)


def _functions(tree):
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_module_and_function_sizes(path):
  rel = str(path.relative_to(ROOT))
  text = path.read_text(encoding="utf-8")
  problems = []
  lines = len(text.splitlines())
  if lines > MAX_MODULE_LINES:
    problems.append(f"{rel}: {lines} lines (budget {MAX_MODULE_LINES})")
  exempt = CONFIG_BUILDERS.get(rel, set())
  for fn in _functions(ast.parse(text, rel)):
    length = fn.end_lineno - fn.lineno + 1
    if length > MAX_FUNCTION_LINES and fn.name not in exempt:
      problems.append(f"{rel}:{fn.lineno} {fn.name}: {length} lines (budget {MAX_FUNCTION_LINES})")
  assert not problems, "\n".join(problems)


def test_config_builder_allow_list_names_real_functions():
  # The exemption must not outlive the functions it names (nor hide a renamed one).
  for rel, names in CONFIG_BUILDERS.items():
    defined = {fn.name for fn in _functions(ast.parse((ROOT / rel).read_text()))}
    assert names <= defined, (rel, names - defined)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.name)
def test_configs_are_leaves(path):
  # Config files are data: they may build on the config module (and read a model's shape
  # keys), never on the jobs, the loop or the step.
  allowed = ("config", "errors", "models")
  modules = _modules()
  imported = _imports("configs." + path.stem, path, modules)
  bad = sorted(m for m in imported if not _is_in(m, allowed))
  assert not bad, f"{path.name} imports {bad}"
