"""Paths of workdirs, checkpoints and caches: local or remote (``gs://``, ``s3://``), one API.

Every file operation on a workdir, a precompute cache or an evaluation / report output goes
through ``etils.epath`` (``path``), so ``--workdir gs://bucket/run`` works like a local
directory: epath reads and writes ``gs://`` through ``gcsfs`` (``pip install gcsfs``, or
TensorFlow's ``gfile`` when TensorFlow is installed), and Orbax writes the checkpoints' arrays
through TensorStore's own GCS driver. Local paths behave exactly as with ``os``.

Object stores differ from a disk in three ways the callers handle here:

  - no append: ``metrics.JsonlWriter`` rewrites a remote metrics.jsonl whole (``write_text``);
  - no atomic rename: an object appears only once its upload completes, so ``write_text``
    writes a remote file in place, a local one through ``NAME.tmp`` + rename (as before);
  - no directories: ``makedirs`` is harmless, and a "directory" exists once it holds a file.

Libraries that open files themselves (ArrayRecord's C++ writer and reader, matplotlib,
safetensors' memory-mapped reader) get a local file: ``download`` fetches a remote one,
``copytree`` sends a local directory up (or fetches a remote one). What they write as bytes
(``safetensors.numpy.save``) goes through ``write_bytes``. A directory written aside and then
renamed into place (``move_tree``) is copied remotely, then its source deleted.
"""

import hashlib
import importlib.util
import os
import shutil

from etils import epath

from jaxdistill.errors import JaxdistillError

# The URL schemes epath reads and writes itself; anything else is a local path.
REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")


def is_remote(p: "str | os.PathLike") -> bool:
  """Whether ``p`` is a URL of an object store (``gs://...``), not a local path."""
  return os.fspath(p).startswith(REMOTE_SCHEMES)


def path(p: "str | os.PathLike") -> epath.Path:
  """``p`` as an ``epath.Path`` (a local path stays relative to the cwd, as given).

  Raises:
    JaxdistillError: a URL whose file system is not installed (``gs://`` without gcsfs).
  """
  if is_remote(p):
    _check_backend(os.fspath(p).split("://", 1)[0])
  return epath.Path(p)


def _check_backend(scheme: str) -> None:
  """epath reads a URL through TensorFlow's gfile when installed, else through fsspec."""
  if scheme in _CHECKED or importlib.util.find_spec("tensorflow") is not None:
    return
  import fsspec

  try:
    fsspec.get_filesystem_class("gcs" if scheme == "gs" else scheme)
  except ImportError:
    package = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}[scheme]
    raise JaxdistillError(
      f"{scheme}:// paths need the {package} package: pip install {package}"
      + (" (or pip install -e '.[gcs]')" if scheme == "gs" else "")
    ) from None
  _CHECKED.add(scheme)


_CHECKED: set[str] = set()


def abspath(p: "str | os.PathLike") -> str:
  """A local path made absolute (``os.path.abspath``); a URL unchanged."""
  return os.fspath(p) if is_remote(p) else os.path.abspath(p)


def join(base: "str | os.PathLike", *parts: str) -> str:
  """``os.path.join`` for local paths; ``base/part/...`` for a URL (keeps ``gs://``)."""
  return str(epath.Path(base).joinpath(*parts)) if is_remote(base) else os.path.join(base, *parts)


def exists(p) -> bool:
  return path(p).exists()


def isdir(p) -> bool:
  return path(p).is_dir()


def isfile(p) -> bool:
  q = path(p)
  return q.exists() and not q.is_dir()


def listdir(p) -> list[str]:
  """The names in directory ``p`` (sorted)."""
  return sorted(q.name for q in path(p).iterdir())


def makedirs(p) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def rmtree(p, missing_ok: bool = False) -> None:
  """Deletes directory ``p`` and everything under it; ``missing_ok``: no error when absent."""
  if is_remote(p):
    path(p).rmtree(missing_ok=missing_ok)
  elif not missing_ok or os.path.lexists(p):
    shutil.rmtree(p)


def realpath(p) -> str:
  """``os.path.realpath`` of a local path (to compare two names of one directory); a URL
  without its trailing ``/`` (an object store has no links)."""
  return os.fspath(p).rstrip("/") if is_remote(p) else os.path.realpath(p)


def read_text(p) -> str:
  return path(p).read_text(encoding="utf-8")


def read_bytes(p) -> bytes:
  return path(p).read_bytes()


def write_text(p, text: str) -> None:
  """Writes ``text`` to ``p`` whole: a local file through ``p.tmp`` + rename (never half
  written); a remote one in place (an object appears only once its upload completes)."""
  write_bytes(p, text.encode("utf-8"))


def write_bytes(p, data: bytes) -> None:
  """``write_text`` for bytes (e.g. ``safetensors.numpy.save``'s, which a library would
  otherwise write to a local file itself)."""
  if is_remote(p):
    path(p).write_bytes(data)
    return
  with open(f"{p}.tmp", "wb") as f:
    f.write(data)
  os.replace(f"{p}.tmp", p)


def replace(src, dst) -> None:
  """Renames ``src`` to ``dst`` (replacing it): atomic locally, copy + delete remotely (a local
  file moved to a URL is uploaded, then deleted)."""
  if is_remote(src) and is_remote(dst):
    path(src).replace(path(dst))
  elif is_remote(dst):
    copy(src, dst)
    os.remove(src)
  elif is_remote(src):
    raise ValueError(f"cannot move {src} to the local {dst}")
  else:
    os.replace(src, dst)


def copy(src, dst) -> None:
  """Copies file ``src`` to ``dst`` (either may be remote), replacing ``dst``."""
  if not is_remote(src) and not is_remote(dst):
    shutil.copyfile(src, dst)
    return
  # Streamed, each side through its own backend (epath's copy uses the source's for both).
  with path(src).open("rb") as r, path(dst).open("wb") as w:
    shutil.copyfileobj(r, w, 1 << 20)


def nearest_existing(p) -> str:
  """``p`` if it exists, else its nearest existing ancestor (where it would be made); for a
  URL at most its bucket (which may not exist: writing there then fails, naming it)."""
  existing = abspath(p)
  while not exists(existing):
    parent = str(path(existing).parent)
    if parent == existing or parent.endswith("://"):  # "/" or a bucket: nothing above
      break
    existing = parent
  return existing


def _directories(p) -> list[tuple[str, list[str]]]:
  """(directory, its file names) for ``p`` and every directory under it."""
  if not is_remote(p):
    return [(root, files) for root, _, files in os.walk(p)]
  out, todo = [], [os.fspath(p)]
  while todo:
    root, files = todo.pop(), []
    for q in path(root).iterdir():
      if q.is_dir():
        todo.append(str(q))
      else:
        files.append(q.name)
    out.append((root, files))
  return out


def _relative(full: str, base) -> str:
  """``full`` (a file under directory ``base``) relative to ``base``, "/"-separated remotely."""
  if is_remote(base):
    return full[len(os.fspath(base).rstrip("/")) + 1 :]
  return os.path.relpath(full, base)


def content_hash(p) -> str:
  """sha256 over the relative names and bytes of every file under directory ``p``."""
  digest = hashlib.sha256()
  for root, files in sorted(_directories(p)):
    for name in sorted(files):
      full = join(root, name)
      rel = _relative(full, p)
      digest.update(rel.encode())
      with path(full).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
  return digest.hexdigest()


def copytree(src, dst) -> None:
  """Copies every file under directory ``src`` to directory ``dst`` (either may be remote:
  an upload, a download or a copy between buckets), replacing files of the same names."""
  for root, files in _directories(src):
    for name in files:
      full = join(root, name)
      target = join(dst, *_relative(full, src).replace(os.sep, "/").split("/"))
      makedirs(path(target).parent)
      copy(full, target)


def move_tree(src, dst) -> None:
  """Moves directory ``src`` to ``dst`` (new, empty, or an earlier move's incomplete copy).

  Locally a rename (atomic). An object store has no rename of a directory: ``dst`` is
  cleared, every file copied, then ``src`` deleted; while ``src`` exists ``dst`` may be
  incomplete, so a caller that resumes treats ``dst`` as done only once ``src`` is gone.
  """
  if not is_remote(src) and not is_remote(dst):
    os.replace(src, dst)
    return
  if exists(dst):
    rmtree(dst)
  copytree(src, dst)
  rmtree(src)


def size(p) -> int:
  """The size of file ``p`` in bytes."""
  return os.path.getsize(p) if not is_remote(p) else path(p).stat().length


def download(p, local_dir: str) -> str:
  """A local copy of remote file ``p`` in ``local_dir`` (kept: a second call reuses it); a
  local ``p`` is returned as is. For readers that open files themselves (ArrayRecord)."""
  if not is_remote(p):
    return os.fspath(p)
  local = os.path.join(local_dir, path(p).name)
  if not os.path.exists(local):
    os.makedirs(local_dir, exist_ok=True)
    partial = f"{local}.{os.getpid()}.partial"  # processes of one host may race: rename wins
    copy(p, partial)
    os.replace(partial, local)
  return local
