"""Quiet, shareable libtpu on a host without TPUs (before JAX starts its TPU plugin).

libtpu, installed to compile ahead of time for TPU topologies (``pip install
"jaxdistill[tpu]"``), expects to run on a TPU VM: on any other host it prints a page of
warnings when JAX initialises it (it asks the VM metadata for the accelerator type and the
workers' addresses) and takes a host-wide lock file that makes a second process fail. Where
this host has no TPU device files, ``prepare`` fills the environment variables libtpu would
otherwise look up (only those not already set) and allows several processes at once. On a
TPU VM it changes nothing. The variables are set only while libtpu starts (``prepared``) and
then restored: they are the ones a TPU VM's processes see, so a later ``jax.distributed``
start in the same process, or a child process, would take this host for a TPU worker.
"""

import contextlib
import glob
import os

_DEFAULTS = {
  "TPU_SKIP_MDS_QUERY": "1",  # no metadata server: do not ask it
  "TPU_ACCELERATOR_TYPE": "v5litepod-4",  # any valid name: only the host's own (absent) TPU
  "TPU_WORKER_HOSTNAMES": "localhost",
  "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # compile in several processes (tests run two)
}


def has_tpu() -> bool:
  """Whether this host has TPU chips (their device files: /dev/accel* or /dev/vfio/<n>)."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


@contextlib.contextmanager
def prepared():
  """The defaults above set (on a host without TPUs) while the body runs, then restored.
  Wrap the first TPU topology call of the process: libtpu reads them when it starts."""
  added = {} if has_tpu() else {k: v for k, v in _DEFAULTS.items() if k not in os.environ}
  os.environ.update(added)
  try:
    yield
  finally:
    for key in added:
      os.environ.pop(key, None)


def cpu_only_default() -> None:
  """``JAX_PLATFORMS=cpu`` when unset on a host that can only run JAX on its CPU: libtpu is
  installed (the ``tpu`` and ``test`` extras) but the host has no TPU, and no CUDA plugin is
  installed. Without it JAX would try to start libtpu at its first call and print a page of
  errors before falling back to the CPU. Compiling for a TPU topology still works with it set
  (``compiler.devices_for``). Called by the command line before JAX starts."""
  import importlib.util

  if "JAX_PLATFORMS" in os.environ or has_tpu() or importlib.util.find_spec("libtpu") is None:
    return
  if any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
