"""``jaxdistill precompute``: run the teacher once over the training split, store sparse targets.

  jaxdistill precompute --config configs/smoke.py --output DIR [--verify]

Rows come in document order (``pipeline.ordered_rows``; synthetic data: row i of the stream a
training run would read, batch i // B, row i % B, a pure function of the seed), at most
``precompute.rows`` of them (0 = the whole split; for synthetic data the optim.steps x
data.batch_size rows a training run reads). Shard s holds rows [s R, (s + 1) R),
R = ``precompute.rows_per_shard``; the format is in ``data/cached.py``.

Processes work independently: process p computes the shards s with s % process_count == p on
its OWN devices (a mesh over ``jax.local_devices()`` shaped by ``mesh``: the teacher must fit on
one host) and writes them itself, so nothing is gathered to one host and a dead process blocks
nobody. Every process reads the whole row stream (tokenising is cheap next to the teacher) and
computes only its rows. Content depends only on the config and the data, never on the process
count or on interruptions: sampling is keyed by (row, position) (``sparse.teacher_targets``).

Resuming: a shard is written to ``shard-S.arrayrecord.partial``, its sidecar ``shard-S.json``
(count, sha256) is written, then the shard is renamed; a rerun skips shards with both and
redoes the rest. Process 0 writes ``manifest.json`` once every shard exists (the output
directory must be shared by all processes).

Overlap: batch n + 1 is dispatched before batch n's targets are fetched, and a writer thread
encodes and writes records while the device computes.

Several teachers (``teachers``) store their ensemble's targets (``distill.ensemble`` "probs"
or "logits", mixed per token chunk before the top-k and the draws); the manifest records each
teacher's identity, the kind and the weights. A student then trains on them with
``teacher.source='cache'`` and no ``teachers``.

An image classifier (``student.arch`` not "transformer") stores its teacher's whole class
logits per training example instead: ``precompute_images.py``, which ``run`` dispatches to.

Shape legend: B rows per batch (this process), T sequence length, N = B * T tokens.
"""

import collections
import dataclasses
import itertools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import config as config_lib
from jaxdistill import models, progress
from jaxdistill.config import validate
from jaxdistill.data import cache_writer, cached
from jaxdistill.data.cache_writer import verify  # noqa: F401 (`jaxdistill precompute --verify`)
from jaxdistill.data.synthetic import SyntheticData
from jaxdistill.distill import ensemble, sparse
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.parallel import distributed, precision
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.train import teacher as teacher_lib

ROW_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def check_config(cfg: Any) -> None:
  """What precompute needs beyond ``validate.validate``."""
  if cfg.teacher.source not in ("random", "pretrain", "workdir"):
    raise ConfigError(
      "teacher.source",
      f"precompute needs a teacher model (random, pretrain or workdir), not {cfg.teacher.source!r}",
    )
  if cfg.precompute.k > cfg.teacher.vocab_size:
    raise ConfigError(
      "precompute.k", f"{cfg.precompute.k} exceeds teacher.vocab_size={cfg.teacher.vocab_size}"
    )
  for i, section in enumerate(config_lib.teachers_of(cfg)[1:]):
    if section.source not in ("random", "pretrain", "workdir"):
      raise ConfigError(
        f"teachers[{i}].source",
        f"precompute runs random, pretrain or workdir teachers, not {section.source!r}",
      )
  if cfg.teachers and cfg.distill.ensemble == "losses":
    raise ConfigError(
      "distill.ensemble",
      "'losses' has one target per teacher; a cache stores one: precompute 'probs' or 'logits'",
    )


def temperature(cfg: Any) -> float:
  """The generation temperature: ``precompute.temperature``, or distill.temperature if 0."""
  return float(cfg.precompute.temperature or cfg.distill.temperature)


def settings(cfg: Any, teacher_identity: dict) -> dict:
  """The manifest without its shards: everything the content depends on."""
  d, p, layout = cfg.data, cfg.precompute, cached.layout_of(cfg)
  ident = cached.data_identity(cfg)
  name = {"tfds": d.tfds_name, "array_record": d.train_files, "text": d.train_files}
  return {
    "format_version": cached.FORMAT_VERSION,
    "teacher": teacher_identity,
    "tokenizer_hash": ident["tokenizer_hash"],
    "dataset": {
      "source": d.source,
      "name": name.get(d.source, d.source),
      "split": d.train_split if d.source == "tfds" else "train",
      "fingerprint": ident["fingerprint"],
    },
    "seq_len": d.seq_len,
    "packing": ident["packing"],
    "targets": p.targets,
    "k": layout.k,
    "sampling": {"n": layout.samples, "seed": cfg.seed, "key": "fold_in(fold_in(seed, row), pos)"},
    "temperature": temperature(cfg),
    "layout": dataclasses.asdict(layout),
    "dtypes": layout.dtypes(),
    "rows_per_shard": p.rows_per_shard,
    "rows_limit": num_rows(cfg),
  }


def num_rows(cfg: Any) -> int:
  """Rows to precompute, 0 = the whole split. The synthetic stream never ends: there 0 means
  the optim.steps * data.batch_size rows a training run of this config reads."""
  if cfg.precompute.rows > 0 or cfg.data.source != "synthetic":
    return cfg.precompute.rows
  return cfg.optim.steps * cfg.data.batch_size


def row_stream(cfg: Any) -> Iterator[dict[str, np.ndarray]]:
  """The training rows in order ([T] arrays of the batch contract), at most ``num_rows``."""
  d = cfg.data
  if d.source == "synthetic":
    data = SyntheticData(
      cfg.student.vocab_size, d.seq_len, d.batch_size, cfg.seed, d.pad_fraction, d.branching
    )
    batches = (data.global_batch(i) for i in itertools.count())
    rows = ({k: v[r] for k, v in b.items()} for b in batches for r in range(d.batch_size))
  else:
    from jaxdistill.data import text as pipeline

    rows = iter(pipeline.ordered_rows(cfg, pipeline.prepare(cfg)))
  return itertools.islice(rows, num_rows(cfg)) if num_rows(cfg) > 0 else rows


@dataclasses.dataclass
class Teacher:
  """The jitted targets function on this process's mesh: fn(params, batch, rows_B) -> targets."""

  fn: Any
  params: Any
  mesh: jax.sharding.Mesh
  identity: dict


def _load_teachers(
  cfg: Any, mesh, output: str, abstract: bool = False
) -> tuple[list, tuple, tuple, dict]:
  """(models, params, param shardings, identity) of the teacher or of every ensemble member;
  ``abstract``: params as ShapeDtypeStructs in their shardings, nothing loaded or pretrained,
  no identity (``jaxdistill compile --what precompute``)."""
  from jaxdistill.train import loop  # the pretraining stage of a teacher.source="pretrain" teacher

  if not abstract:
    loop.pretrain_teacher(cfg, output, devices=list(mesh.devices.flat))
  found, idents = [], []
  for k in range(1 + len(cfg.teachers)):
    view = teacher_lib.view(cfg, k)
    policy = precision.parse_policy(view.teacher.policy, "teacher.policy")
    model = models.build(view.teacher, policy, "teacher")
    if abstract:
      table = teacher_lib.rules(view, model, mesh)
      shapes = models.abstract_variables(model, mesh, view.data.seq_len, table)["params"]
      found.append((model, shapes, jax.tree.map(lambda a: a.sharding, shapes)))
      idents.append({})
      continue
    variables, var_shardings, path = teacher_lib.load(view, model, mesh, output, k)
    found.append((model, variables["params"], var_shardings["params"]))
    idents.append(teacher_lib.identity(view, variables["params"], path))
  identity = idents[0]
  if cfg.teachers:
    shares = ensemble.normalise([float(t.weight) for t in config_lib.teachers_of(cfg)])
    identity = {"ensemble": cfg.distill.ensemble, "weights": list(shares), "teachers": idents}
  return [f[0] for f in found], tuple(f[1] for f in found), tuple(f[2] for f in found), identity


def build_teacher(cfg: Any, output: str, devices=None, abstract: bool = False) -> Teacher:
  """Loads the teacher (or every teacher of an ensemble) onto a mesh over this process's
  devices and jits its targets function (``abstract``: params are shapes only; lower
  ``teacher.fn`` with them to compile for other devices, e.g. a TPU topology's)."""
  mesh = sharding_lib.make_mesh(cfg.mesh, devices or jax.local_devices())
  validate.check_mesh(cfg, dict(mesh.shape))
  teacher_models, params, param_shardings, identity = _load_teachers(cfg, mesh, output, abstract)
  layout, tau, seed = cached.layout_of(cfg), temperature(cfg), cfg.seed
  mix = None
  if cfg.teachers:
    mix = (cfg.distill.ensemble, tuple(identity["weights"]))

  def targets_fn(params, batch, rows_B):
    outs = [
      models.apply(m, {"params": p}, batch, return_logits=False)
      for m, p in zip(teacher_models, params)
    ]
    b, t = batch["inputs"].shape
    hidden = tuple(o["final_hidden"].reshape(b * t, -1) for o in outs)
    heads = tuple(o["head"] for o in outs)
    tg = sparse.teacher_targets(
      hidden if mix else hidden[0],
      heads if mix else heads[0],
      jnp.repeat(rows_B, t),
      jnp.tile(jnp.arange(t, dtype=jnp.int32), b),
      temperature=tau,
      k=layout.k,
      samples=layout.samples,
      seed=seed,
      token_chunk=cfg.distill.token_chunk,
      mix=mix,
    )
    # Narrow on the device: less to copy to the host.
    narrow = {"topk_logp": layout.lp_dtype, "sample_counts": layout.count_dtype}
    narrow |= {"topk_ids": layout.id_dtype, "sample_ids": layout.id_dtype}
    return {k: v.astype(narrow.get(k, v.dtype)).reshape(b, t, *v.shape[1:]) for k, v in tg.items()}

  rows = sharding_lib.batch_sharding(mesh)
  fn = jax.jit(targets_fn, in_shardings=(param_shardings, rows, rows), out_shardings=rows)
  return Teacher(fn, params, mesh, identity)


def _host_batch(rows: list[dict], b: int) -> dict[str, np.ndarray]:
  """Rows -> [B, T] arrays, padded with empty rows (weights and segment ids 0)."""
  out = {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}
  pad = b - len(rows)
  return {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in out.items()}


def _compute_shards(cfg: Any, teacher: Teacher, output: str, process, writer, bar) -> tuple:
  """Runs the teacher over this process's unfinished shards, batch n + 1 dispatched before
  batch n's targets are fetched, the writer thread encoding behind: (rows seen, rows computed)."""
  r, b, t = cfg.precompute.rows_per_shard, cfg.data.batch_size, cfg.data.seq_len
  p, count = process
  pending, rows_seen, computed = collections.deque(), 0, 0

  def flush_one():
    item = pending.popleft()
    if item[0] == "rows":
      _, s, rows, out = item
      writer.put(("rows", s, rows, {k: v[: len(rows)] for k, v in jax.device_get(out).items()}))
      bar.update(len(rows) * t)
    else:
      writer.put(item)

  stream = row_stream(cfg)
  with sharding_lib.rules_context(teacher.mesh):
    for s in itertools.count():
      shard_rows = list(itertools.islice(stream, r))
      rows_seen += len(shard_rows)
      if not shard_rows:
        break
      if s % count != p or cache_writer.finished(output, s):
        bar.update(len(shard_rows) * t if s % count == p else 0)
        continue
      pending.append(("open", s))
      for lo in range(0, len(shard_rows), b):
        rows = shard_rows[lo : lo + b]
        batch = sharding_lib.shard_batch(_host_batch(rows, b), teacher.mesh)
        index_B = np.arange(s * r + lo, s * r + lo + b, dtype=np.int32)
        index_B = sharding_lib.shard_batch({"i": index_B}, teacher.mesh)["i"]
        pending.append(("rows", s, rows, teacher.fn(teacher.params, batch, index_B)))
        computed += len(rows)
        while sum(item[0] == "rows" for item in pending) > 1:  # keep one batch in flight
          flush_one()
      pending.append(("close", s))
    while pending:
      flush_one()
  return rows_seen, computed


def run(
  cfg: Any,
  output: str,
  devices=None,
  teacher: Teacher | None = None,
  process: tuple[int, int] | None = None,
) -> dict:
  """Precomputes this process's shards into ``output`` (resuming), then the manifest.

  Args:
    cfg: a validated config with a teacher model and a ``precompute`` section.
    output: the cache directory (created; a rerun resumes it).
    devices: this process's devices for the teacher's mesh (default: all local ones).
    teacher: a ``build_teacher(cfg, ...)`` result to reuse (benchmarks: already compiled).
    process: (index, count) of this process among the writers (default: JAX's); tests run
      the processes' shares one after the other in one process.

  Returns:
    {"complete" (all shards exist; process 0 then wrote the manifest), "rows", "shards",
    "computed_rows", "tokens", "seconds"} for this process, and "job_computed_rows": rows
    computed by all of the job's processes together.
  """
  import time

  if cfg.student.arch != "transformer":  # an image classifier: whole class logits
    from jaxdistill.precompute import images as precompute_images

    return precompute_images.run(cfg, output, devices, teacher, process)
  check_config(cfg)
  cache_writer.check_output(output)  # before anything (teacher, settings) is written there
  cached.data_identity(cfg)  # bad data or tokenizer fail here, before the teacher loads
  teacher = teacher or build_teacher(cfg, output, devices)
  current = settings(cfg, teacher.identity)
  cache_writer.start(output, current)
  r, t = cfg.precompute.rows_per_shard, cfg.data.seq_len
  p, count = process or (jax.process_index(), jax.process_count())
  total = num_rows(cfg) * t or None
  show = cfg.log.progress and p == 0
  bar = progress.bar(total, unit="tok", show=show)
  writer = cache_writer.ShardWriter(output, cached.layout_of(cfg))
  start = time.perf_counter()
  rows_seen, computed = _compute_shards(cfg, teacher, output, (p, count), writer, bar)
  writer.join()
  bar.close()
  seconds = time.perf_counter() - start
  if rows_seen == 0:
    raise JaxdistillError("the training split gave no rows: nothing to precompute")
  shards = -(-rows_seen // r)
  distributed.barrier("jaxdistill:precompute-shards-written")
  # Every shard exists unless a process failed (or, in tests, has not run yet).
  complete = all(cache_writer.finished(output, s) for s in range(shards))
  if p == 0 and complete:
    cache_writer.write_manifest(output, current, rows_seen, shards)
  job_computed = computed
  if jax.process_count() > 1:  # so process 0 knows whether a rerun computed anything at all
    from jax.experimental import multihost_utils

    job_computed = int(np.sum(multihost_utils.process_allgather(np.int64(computed))))
  return {
    "complete": complete,
    "rows": rows_seen,
    "shards": shards,
    "computed_rows": computed,
    "job_computed_rows": job_computed,
    "tokens": computed * t,
    "seconds": seconds,
  }
