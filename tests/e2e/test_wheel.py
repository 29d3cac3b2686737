"""A non-editable install: the wheel ships every subpackage and the configs, and the installed
package runs ``--config NAME`` and the quickstart's recipe from another directory.

The wheel is built offline from a copy of the sources (``pip wheel --no-deps
--no-build-isolation``: the environment's setuptools, no download, nothing written into the
checkout) and unpacked into a directory that alone is put on ``PYTHONPATH``; the commands run
in an empty directory, so neither the checkout's ``configs/`` nor its ``jaxdistill/`` can be
what they find.
"""

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT


def _can_build_wheels() -> bool:
  """setuptools builds wheels itself from 70.1 on, before that through the wheel package."""
  try:
    version = tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
  except importlib.metadata.PackageNotFoundError:  # a venv of Python 3.12+ has none
    return False
  return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _python(args, cwd, site, timeout=600):
  env = dict(os.environ, PYTHONPATH=str(site))  # the unpacked wheel alone, not the checkout
  return subprocess.run(
    [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
  )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """(the wheel's file, the directory it is unpacked into)."""
  if not _can_build_wheels():
    pytest.skip("building a wheel offline needs setuptools and wheel: pip install -e '.[test]'")
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  ignore = shutil.ignore_patterns("__pycache__")
  for name in ("jaxdistill", "configs"):
    shutil.copytree(ROOT / name, src / name, ignore=ignore)
  cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
  env = dict(os.environ, PIP_NO_INDEX="1")  # offline: nothing may be downloaded
  proc = subprocess.run(
    [*cmd, "-w", str(tmp / "dist"), str(src)], env=env, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  (path,) = (tmp / "dist").glob("jaxdistill-*.whl")
  site = tmp / "site"
  with zipfile.ZipFile(path) as z:
    z.extractall(site)
  return path, site


def test_the_wheel_holds_every_subpackage_and_the_configs(wheel):
  path, _ = wheel
  with zipfile.ZipFile(path) as z:
    names = set(z.namelist())
  configs = sorted(p.name for p in (ROOT / "configs").glob("*.py"))
  assert configs and all(f"jaxdistill/configs/{c}" in names for c in configs), configs
  # pyproject.toml lists the packages: a new subpackage must be listed too.
  packages = sorted(
    str(p.parent.relative_to(ROOT)) for p in (ROOT / "jaxdistill").rglob("__init__.py")
  )
  missing = [p for p in packages if f"{p}/__init__.py" not in names]
  assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"


@pytest.mark.slow
def test_the_installed_package_runs_a_shipped_config_by_name_from_elsewhere(wheel, tmp_path):
  """``--config smoke`` (2 steps) and the quickstart's help, in an empty directory (~30 s)."""
  _, site = wheel
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  where = _python(["-c", "import jaxdistill; print(jaxdistill.__file__)"], elsewhere, site)
  assert where.stdout.strip() == str(site / "jaxdistill" / "__init__.py"), where
  names = _python(
    ["-c", "from jaxdistill import config; print(config.configs_dir(), config.names())"],
    elsewhere,
    site,
  )
  assert names.stdout.startswith(str(site / "jaxdistill" / "configs") + " "), names
  assert "'smoke'" in names.stdout and "'quickstart'" in names.stdout
  help_ = _python(["-m", "jaxdistill.cli", "quickstart", "--help"], elsewhere, site)
  assert help_.returncode == 0 and "--task" in help_.stdout, help_.stderr
  recipe = _python(
    ["-c", "from jaxdistill import quickstart; print(quickstart.teacher_config('test').seed)"],
    elsewhere,
    site,
  )
  assert recipe.returncode == 0, recipe.stderr
  args = ["-m", "jaxdistill.cli", "train", "--config", "smoke", "--workdir", "W"]
  # Progress on (the default): stderr is a pipe, so log lines and no carriage-return frames.
  train = _python([*args, "--config.optim.steps=2", "--config.log.every=1"], elsewhere, site)
  assert train.returncode == 0, train.stderr[-3000:]
  assert "done: 2 steps" in train.stdout
  assert "\r" not in train.stderr and "step 2/2 (100%) loss=" in train.stderr, train.stderr
  assert (elsewhere / "W" / "final_params").is_dir()
  unknown = _python([*args[:-4], "--config", "smok", "--workdir", "X"], elsewhere, site)
  lines = unknown.stderr.strip().splitlines()
  assert unknown.returncode == 2 and len(lines) == 1, unknown.stderr
  assert "no config named 'smok'" in lines[0] and "smoke" in lines[0]
  assert not (elsewhere / "X").exists()
