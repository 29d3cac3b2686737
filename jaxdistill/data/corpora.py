"""The built-in corpus: the running interpreter's standard library, as a TFDS dataset.

``python_stdlib`` is a ``tfds.core.GeneratorBasedBuilder`` that builds offline
(nothing is downloaded) from the ``.py`` files of ``sysconfig``'s stdlib
directory: every file gives one ``code`` example (its source) and, when it has
any, one ``docstrings`` example (its module / class / function docstrings, i.e.
English prose). Files are walked in sorted order; a file goes to the
``validation`` split when a stable hash of its relative path says so (about 5%),
so the split never changes between runs or machines and a file's code and
docstrings always land in the same split.

It is written as array_record under ``CACHE/tfds/<fingerprint>/`` and read back
with ``tfds.data_source`` (no TensorFlow needed). The fingerprint hashes the
selected files' paths and contents, so another interpreter gets its own copy.

The cache directory (built corpora, trained tokenizers, cached teachers) is
``cfg.cache_dir``, else ``$JAXDISTILL_CACHE_DIR``, else
``$XDG_CACHE_HOME/jaxdistill``, else ``~/.cache/jaxdistill``.
"""

import ast
import dataclasses
import hashlib
import os
import sysconfig

import tensorflow_datasets as tfds

from jaxdistill.errors import JaxdistillError

CACHE_ENV = "JAXDISTILL_CACHE_DIR"
VALIDATION_PERCENT = 5
# Directories that hold tests, third-party packages or build leftovers, not the library.
_SKIP_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__")


def cache_dir(configured: str = "") -> str:
  """The jaxdistill cache directory (not created here).

  Args:
    configured: ``cfg.cache_dir``; wins when non-empty.
  """
  if configured:
    return os.path.abspath(os.path.expanduser(configured))
  if os.environ.get(CACHE_ENV):
    return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxdistill")


def _split_of(relpath: str) -> str:
  digest = hashlib.sha256(relpath.encode("utf-8")).digest()
  return "validation" if int.from_bytes(digest[:4], "big") % 100 < VALIDATION_PERCENT else "train"


def stdlib_files(
  root: str | None = None, max_files: int = 0, max_file_bytes: int = 0
) -> list[tuple[str, str]]:
  """The stdlib's library ``.py`` files, sorted by relative path.

  Args:
    root: the directory to walk (default: this interpreter's stdlib).
    max_files: 0 for all; else a small deterministic subset of this many files
      (at least one per split: about 1 in 8 from validation), for tests.
    max_file_bytes: 0 for any size; else skip larger files.

  Returns:
    [(relative path with '/', absolute path)].
  """
  root = root or sysconfig.get_paths()["stdlib"]
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(
      d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("config-", "lib-dynload"))
    )
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      if name.endswith(".py") and (not max_file_bytes or os.path.getsize(path) <= max_file_bytes):
        found.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
  found.sort()
  if max_files:
    val = [f for f in found if _split_of(f[0]) == "validation"][: max(1, max_files // 8)]
    train = [f for f in found if _split_of(f[0]) == "train"][: max_files - len(val)]
    found = sorted(train + val)
  return found


def fingerprint(files: list[tuple[str, str]]) -> str:
  """sha256 (hex, 16 chars) of the files' relative paths and contents."""
  h = hashlib.sha256()
  for rel, path in files:
    with open(path, "rb") as f:
      h.update(rel.encode("utf-8") + b"\0" + hashlib.sha256(f.read()).digest())
  return h.hexdigest()[:16]


def docstrings(source: str) -> str:
  """The module, class and function docstrings of ``source``, blank-line separated.

  Returns "" for a file without docstrings or one this interpreter cannot parse.
  """
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return ""
  nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  found = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, nodes)]
  return "\n\n".join(d for d in found if d and d.strip())


@dataclasses.dataclass(eq=False)
class StdlibConfig(tfds.core.BuilderConfig):
  """Which files: ``max_files`` / ``max_file_bytes`` as in ``stdlib_files`` (0 = no limit)."""

  max_files: int = 0
  max_file_bytes: int = 0
  root: str = ""


def config_name(max_files: int = 0, max_file_bytes: int = 0) -> str:
  """The builder config name of a subset: ``full`` or ``files12_bytes20000``."""
  if not max_files and not max_file_bytes:
    return "full"
  return f"files{max_files}_bytes{max_file_bytes}"


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
  """Python standard library sources (code) and docstrings (English), built offline."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Code and docstring examples; 5% validation by path hash."}
  BUILDER_CONFIGS = [StdlibConfig(name="full", description="every library .py file")]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__.split("\n\n")[0],
      features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "path": tfds.features.Text(), "kind": tfds.features.Text()}
      ),
      supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    files = stdlib_files(c.root or None, c.max_files, c.max_file_bytes)
    return {
      split: self._generate_examples([f for f in files if _split_of(f[0]) == split])
      for split in ("train", "validation")
    }

  def _generate_examples(self, files):
    for rel, path in files:
      with open(path, "rb") as f:
        source = f.read().decode("utf-8", errors="replace")
      if source.strip():
        yield f"{rel}:code", {"text": source, "path": rel, "kind": "code"}
      doc = docstrings(source)
      if doc:
        yield f"{rel}:docstrings", {"text": doc, "path": rel, "kind": "docstrings"}


def build_stdlib(cache: str, max_files: int = 0, max_file_bytes: int = 0, root: str = ""):
  """Builds the corpus (once) and returns where it is.

  Args:
    cache: the cache directory (see ``cache_dir``).
    max_files, max_file_bytes: the subset (0 = no limit); tests use a handful of files.
    root: the directory to read instead of the stdlib (tests).

  Returns:
    (data_dir, name, fingerprint): read it with
    ``tfds.data_source(name, split=..., data_dir=data_dir, try_gcs=False)``.

  Raises:
    JaxdistillError: no ``.py`` files under the root.
  """
  files = stdlib_files(root or None, max_files, max_file_bytes)
  if not files:
    raise JaxdistillError(
      f"the built-in corpus found no .py files under {root or sysconfig.get_paths()['stdlib']!r}"
    )
  fp = fingerprint(files)
  name = config_name(max_files, max_file_bytes) + ("_custom" if root else "")
  data_dir = os.path.join(cache, "tfds", fp)
  # "full" is a registered config; a subset is a custom one (TFDS refuses to redefine a name).
  config = (
    "full"
    if name == "full"
    else StdlibConfig(
      name=name,
      max_files=max_files,
      max_file_bytes=max_file_bytes,
      root=root,
      description="a subset of the library .py files",
    )
  )
  builder = PythonStdlib(config=config, data_dir=data_dir, file_format="array_record")
  # TFDS writes into a temporary directory and renames it when done: readers never see a
  # half-written dataset, and an interrupted build is simply redone.
  if not builder.is_prepared():
    print(f"Building the built-in corpus ({len(files)} stdlib files) into {data_dir}", flush=True)
    tfds.display_progress_bar(False)
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
  return data_dir, f"python_stdlib/{name}", fp
