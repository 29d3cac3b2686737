"""The public Python API: short paths from ``jaxdistill``, resolved lazily."""

import subprocess
import sys

import pytest
from conftest import ROOT

import jaxdistill


@pytest.mark.parametrize("name", jaxdistill.__all__)
def test_every_public_name_resolves_to_its_documented_function(name):
  module, attr = jaxdistill._API[name]
  target = getattr(__import__(module, fromlist=[attr]), attr)
  assert getattr(jaxdistill, name) is target
  assert (target.__doc__ or "").strip(), f"{module}.{attr} has no docstring"


def test_public_names_do_not_collide_with_subpackages():
  # A subpackage, once imported, is an attribute of the package and would shadow the function.
  subpackages = {p.name for p in (ROOT / "jaxdistill").iterdir() if (p / "__init__.py").exists()}
  modules = {p.stem for p in (ROOT / "jaxdistill").glob("*.py")}
  assert not set(jaxdistill.__all__) & (subpackages | modules)


def test_importing_the_package_does_not_import_jax():
  code = "import sys, jaxdistill; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert out.stdout.strip() == "False", out.stderr


def test_an_unknown_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    jaxdistill.nope  # noqa: B018
