"""The distillation objective: which losses run, on which layers, with which weights.

``make_objective(cfg)`` turns the ``distill`` section into a static
``Objective`` (loss kinds, layer pairs, weight and temperature schedules);
``compute_loss`` combines the pure losses of ``losses.py`` on the models'
outputs. A new loss is a function in ``losses.py`` plus a term here, never a
new trainer.

Layer pairs use hidden-state indices (0 = embeddings, i = output of block i,
1..L). Attention terms use the attention of the block that produced that
hidden state, i.e. block i-1 (0-based) for pair index i.

Every term is a sum over valid tokens divided by the GLOBAL valid-token count
``denom``, so terms (and their gradients) add up exactly over micro-batches.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdistill import fused as fused_lib
from jaxdistill import losses, schedules, sparse
from jaxdistill.errors import ConfigError

Schedule = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  """Static description of the loss; weights are None when a term is off."""

  uses_teacher: bool
  temperature: Schedule
  ce_weight: Schedule | None
  logit_kind: str = "kl"
  logit_weight: Schedule | None = None
  beta: float = 0.5
  attn_pairs: tuple[tuple[int, int], ...] = ()
  attn_weight: Schedule | None = None
  value_weight: Schedule | None = None
  hidden_pairs: tuple[tuple[int, int], ...] = ()
  hidden_kind: str = "mse"
  hidden_weight: Schedule | None = None
  projected: bool = False  # hidden widths differ: learned [Ds, Dt] maps
  embed_weight: Schedule | None = None  # encoders: 1 - cos of pooled sentence embeddings
  # CE and the logit loss through fused.py from final hidden states and heads (no logits).
  fused: bool = True
  token_chunk: int = 256
  vocab_chunk: int = 0
  # Sparse kinds (sparse.SPARSE_KINDS): targets come from the batch (teacher.source='cache',
  # uses_teacher False) or are made from the online teacher's head, top-k of this size.
  sparse_k: int = 0

  @property
  def sparse(self) -> bool:
    """The logit term is a sparse-target one (jaxdistill/sparse.py)."""
    return bool(self.logit_weight) and self.logit_kind in sparse.SPARSE_KINDS

  @property
  def fused_head(self) -> bool:
    """The models return (final hidden, head) instead of logits: a fused term needs them."""
    return (self.fused or self.sparse) and bool(self.ce_weight or self.logit_weight)

  def student_request(self) -> dict:
    """Keyword arguments asking the student model for what the losses need."""
    return self._request(0)

  def teacher_request(self) -> dict:
    """Keyword arguments asking the teacher model for what the losses need."""
    return self._request(1)

  def _request(self, side: int) -> dict:
    return dict(
      hidden_layers=tuple(sorted({p[side] for p in self.hidden_pairs})),
      attn_layers=tuple(sorted({p[side] - 1 for p in self.attn_pairs})) if self.attn_weight else (),
      qkv_layers=tuple(sorted({p[side] - 1 for p in self.attn_pairs})) if self.value_weight else (),
      return_logits=not self.fused_head,
    )


def _weight(section: Any, key: str, total_steps: int) -> Schedule | None:
  if section.weight == 0 and section.schedule == "constant":
    return None
  if section.weight < 0:
    raise ConfigError(f"{key}.weight", f"must be >= 0, got {section.weight}")
  try:
    return schedules.parse_schedule(section.schedule, section.weight, total_steps)
  except ValueError as e:
    raise ConfigError(f"{key}.schedule", str(e)) from None


def _pairs(spec: str, key: str, ls: int, lt: int, allow_embeddings: bool):
  try:
    pairs = losses.layer_map(spec, ls, lt)
  except ValueError as e:
    raise ConfigError(f"{key}.layer_map", str(e)) from None
  if not allow_embeddings and any(0 in p for p in pairs):
    raise ConfigError(
      f"{key}.layer_map",
      f"{spec!r} maps layer 0 (the embeddings), which has no attention; use layers 1..L",
    )
  return pairs


def _fused_fields(d: Any) -> dict:
  # Types are checked by validate._check_fused.
  return dict(fused=d.fused, token_chunk=d.token_chunk, vocab_chunk=d.vocab_chunk)


def make_objective(cfg: Any) -> Objective:
  """Builds the Objective from a validated config (raises ConfigError)."""
  d, steps = cfg.distill, cfg.optim.steps
  if cfg.teacher.source == "none":
    for key in ("logit", "attention", "hidden", "embedding"):
      if d[key].weight != 0:
        raise ConfigError(
          f"distill.{key}.weight",
          "is non-zero but there is no "
          "teacher (teacher.source='none'); set it to 0 or configure a teacher",
        )
    return Objective(
      uses_teacher=False,
      temperature=lambda s: jnp.float32(1.0),
      ce_weight=lambda s: jnp.float32(1.0),
      **_fused_fields(d),
    )
  try:
    temperature = schedules.parse_schedule(d.temperature_schedule, d.temperature, steps)
  except ValueError as e:
    raise ConfigError("distill.temperature_schedule", str(e)) from None
  if d.temperature <= 0:
    raise ConfigError("distill.temperature", f"must be > 0, got {d.temperature}")
  kinds = sorted(losses.LOGIT_DIVERGENCES) + list(sparse.SPARSE_KINDS)
  if d.logit.kind not in kinds:
    raise ConfigError("distill.logit.kind", f"unknown {d.logit.kind!r}; choose from {kinds}")
  if cfg.teacher.source == "cache":
    return _cache_objective(cfg, temperature)
  if d.logit.kind == "sampled" and d.logit.weight:
    raise ConfigError(
      "distill.logit.kind",
      "'sampled' reads sampled targets from a cache: set teacher.source='cache' and "
      "teacher.path to a `jaxdistill precompute` output (or use topk_tail online)",
    )
  if d.logit.kind in sparse.TOPK_KINDS and cfg.precompute.k > cfg.teacher.vocab_size:
    raise ConfigError(
      "precompute.k", f"{cfg.precompute.k} (the online top-k) exceeds teacher.vocab_size"
    )
  if not 0.0 <= d.logit.beta <= 1.0:
    raise ConfigError("distill.logit.beta", f"must be in [0, 1], got {d.logit.beta}")
  if d.hidden.kind not in ("mse", "cosine"):
    raise ConfigError("distill.hidden.kind", f"unknown {d.hidden.kind!r}; choose mse or cosine")
  s, t = cfg.student, cfg.teacher
  attn_w = _weight(d.attention, "distill.attention", steps)
  value_w = (
    None
    if d.attention.value_weight == 0
    else schedules.parse_schedule(d.attention.schedule, d.attention.value_weight, steps)
  )
  attn_pairs = ()
  if attn_w or value_w:
    attn_pairs = _pairs(
      d.attention.layer_map, "distill.attention", s.num_layers, t.num_layers, allow_embeddings=False
    )
    if s.num_heads != t.num_heads:
      raise ConfigError(
        "distill.attention.weight",
        f"MiniLM attention transfer needs "
        f"equal head counts, but student.num_heads={s.num_heads} and "
        f"teacher.num_heads={t.num_heads}",
      )
  hidden_w = _weight(d.hidden, "distill.hidden", steps)
  hidden_pairs, projected = (), False
  if hidden_w:
    hidden_pairs = _pairs(
      d.hidden.layer_map, "distill.hidden", s.num_layers, t.num_layers, allow_embeddings=True
    )
    projected = s.d_model != t.d_model
    if projected and not d.hidden.project:
      raise ConfigError(
        "distill.hidden.project",
        f"student.d_model={s.d_model} and "
        f"teacher.d_model={t.d_model} differ, so the hidden-state loss "
        "needs a learned projection; set it to True",
      )
  logit_w = _weight(d.logit, "distill.logit", steps)
  if logit_w and s.vocab_size != t.vocab_size:
    raise ConfigError(
      "teacher.vocab_size",
      f"{t.vocab_size} differs from "
      f"student.vocab_size={s.vocab_size}; logit losses need one vocabulary",
    )
  return Objective(
    uses_teacher=True,
    temperature=temperature,
    ce_weight=_weight(d.ce, "distill.ce", steps),
    logit_kind=d.logit.kind,
    logit_weight=logit_w,
    beta=float(d.logit.beta),
    attn_pairs=attn_pairs,
    attn_weight=attn_w,
    value_weight=value_w,
    hidden_pairs=hidden_pairs,
    hidden_kind=d.hidden.kind,
    hidden_weight=hidden_w,
    projected=projected,
    embed_weight=_weight(d.embedding, "distill.embedding", steps),
    sparse_k=cfg.precompute.k,
    **_fused_fields(d),
  )


def _cache_objective(cfg: Any, temperature: Schedule) -> Objective:
  """teacher.source='cache': a sparse logit loss (+ CE) from stored targets, no teacher model."""
  d = cfg.distill
  for key in ("attention", "hidden", "embedding"):
    if key in d and (d[key].weight != 0 or (key == "attention" and d.attention.value_weight)):
      raise ConfigError(
        f"distill.{key}.weight",
        "is non-zero, but a cache (teacher.source='cache') stores only logit targets: "
        "there are no teacher attentions, hidden states or embeddings; set it to 0",
      )
  logit_w = _weight(d.logit, "distill.logit", cfg.optim.steps)
  if d.logit.kind not in sparse.SPARSE_KINDS or not logit_w:
    raise ConfigError(
      "distill.logit.kind",
      f"a cache needs a sparse kind {sparse.SPARSE_KINDS} with a non-zero weight, "
      f"not {d.logit.kind!r} (weight {d.logit.weight})",
    )
  return Objective(
    uses_teacher=False,
    temperature=temperature,
    ce_weight=_weight(d.ce, "distill.ce", cfg.optim.steps),
    logit_kind=d.logit.kind,
    logit_weight=logit_w,
    **_fused_fields(d),
  )


def init_projections(
  obj: Objective, rng: jax.Array, d_student: int, d_teacher: int
) -> dict[str, jax.Array]:
  """Learned [Ds, Dt] maps, one per student layer of the hidden-state loss."""
  if not obj.projected:
    return {}
  layers = sorted({s for s, _ in obj.hidden_pairs})
  keys = jax.random.split(rng, len(layers))
  return {
    f"layer_{s}": losses.init_projection(k, d_student, d_teacher) for s, k in zip(layers, keys)
  }


def _mean_over_pairs(pairs, fn):
  total, metrics = 0.0, {}
  for pair in pairs:
    value, m = fn(*pair)
    total += value
    metrics = {k: metrics.get(k, 0.0) + v / len(pairs) for k, v in m.items()}
  return total / len(pairs), metrics


def _fused_head_terms(obj: Objective, step, student_out, teacher_out, batch, denom):
  """CE and the logit divergence, weighted, from final hidden states and heads (fused.py)."""
  flat = lambda x_BxTxD: x_BxTxD.reshape(-1, x_BxTxD.shape[-1])
  teacher = {}
  if obj.logit_weight:
    teacher = dict(
      teacher_hidden_NxDt=flat(teacher_out["final_hidden"]), teacher_head_DtxV=teacher_out["head"]
    )
  out = fused_lib.fused_loss_head(
    flat(student_out["final_hidden"]),
    student_out["head"],
    batch["targets"].reshape(-1),
    batch["weights"].reshape(-1),
    denom,
    **teacher,
    kind=obj.logit_kind,
    temperature=obj.temperature(step),
    beta=obj.beta,
    kl_weight=obj.logit_weight(step) if obj.logit_weight else 0.0,
    ce_weight=obj.ce_weight(step) if obj.ce_weight else 0.0,
    token_chunk=obj.token_chunk,
    vocab_chunk=obj.vocab_chunk,
  )
  metrics = {"task/ce": out.ce} if obj.ce_weight else {}
  if obj.logit_weight:
    metrics[f"distill/{obj.logit_kind}"] = out.divergence
  return out.loss, metrics


def _sparse_terms(obj: Objective, step, student_out, teacher_out, batch, denom):
  """CE and the sparse divergence, weighted: targets from the batch's ``teacher_*`` arrays
  (a cache) or made here from the online teacher's final hidden states and head."""
  flat = lambda x: x.reshape(-1, *x.shape[2:])  # [B, T, ...] -> [N, ...]
  tau = obj.temperature(step)
  if teacher_out is None:
    teacher = {k[len("teacher_") :]: flat(v) for k, v in batch.items() if k.startswith("teacher_")}
  else:
    b, t = batch["targets"].shape
    teacher = sparse.teacher_targets(
      flat(teacher_out["final_hidden"]),
      teacher_out["head"],
      jnp.zeros((b * t,), jnp.int32),
      jnp.zeros((b * t,), jnp.int32),
      temperature=tau,
      k=obj.sparse_k,
      token_chunk=obj.token_chunk,
    )
  out = sparse.sparse_loss_head(
    flat(student_out["final_hidden"]),
    student_out["head"],
    flat(batch["targets"]),
    flat(batch["weights"]),
    denom,
    teacher,
    kind=obj.logit_kind,
    temperature=tau,
    kl_weight=obj.logit_weight(step),
    ce_weight=obj.ce_weight(step) if obj.ce_weight else 0.0,
    token_chunk=obj.token_chunk,
  )
  metrics = {"task/ce": out.ce} if obj.ce_weight else {}
  metrics[f"distill/{obj.logit_kind}"] = out.divergence
  return out.loss, metrics


def compute_loss(
  obj: Objective,
  step: jax.Array,
  proj: dict,
  student_out: dict,
  teacher_out: dict | None,
  batch: dict,
  denom: jax.Array,
):
  """The weighted sum of all active terms for one (micro-)batch.

  Args:
    obj: the Objective.
    step: scalar int, for the schedules.
    proj: projection params from ``init_projections``.
    student_out, teacher_out: model output dicts (teacher_out None without one). With
      "final_hidden" and "head" instead of "logits" (``obj.student_request()`` when
      ``obj.fused_head``), CE and the logit loss go through ``fused.fused_loss_head``.
    batch: has ``targets`` and ``weights`` [B, T].
    denom: global number of valid tokens.

  Returns:
    (loss, metrics): unweighted per-term values under ``distill/*``,
    ``task/ce``, plus ``train/loss``. All are sums over tokens / denom, so
    they add up over micro-batches.
  """
  mask_BxT, metrics, total = batch["weights"], {}, 0.0

  def add(weight, value_and_metrics):
    nonlocal total
    value, m = value_and_metrics
    metrics.update(m)
    total += weight(step) * value

  # Models asked for (final hidden, head) instead of logits (obj.fused_head): fused.py.
  fused_head = "final_hidden" in student_out and "logits" not in student_out
  if obj.sparse:  # CE and the sparse divergence from the student's head (sparse.py)
    value, m = _sparse_terms(obj, step, student_out, teacher_out, batch, denom)
    metrics.update(m)
    total += value
  elif fused_head and (obj.ce_weight or obj.logit_weight):
    value, m = _fused_head_terms(obj, step, student_out, teacher_out, batch, denom)
    metrics.update(m)
    total += value
  if obj.ce_weight and not fused_head and not obj.sparse:
    add(
      obj.ce_weight, losses.cross_entropy(student_out["logits"], batch["targets"], mask_BxT, denom)
    )
  if obj.logit_weight and not fused_head and not obj.sparse:
    add(
      obj.logit_weight,
      losses.logit_loss(
        obj.logit_kind,
        student_out["logits"],
        teacher_out["logits"],
        mask_BxT,
        denom,
        temperature=obj.temperature(step),
        beta=obj.beta,
      ),
    )
  if obj.attn_weight:
    add(
      obj.attn_weight,
      _mean_over_pairs(
        obj.attn_pairs,
        lambda s, t: losses.attention_kl(
          student_out["attn"][s - 1], teacher_out["attn"][t - 1], mask_BxT, denom
        ),
      ),
    )
  if obj.value_weight:
    add(
      obj.value_weight,
      _mean_over_pairs(
        obj.attn_pairs,
        lambda s, t: losses.value_relation(
          student_out["qkv"][s - 1][2], teacher_out["qkv"][t - 1][2], mask_BxT, denom
        ),
      ),
    )
  if obj.hidden_weight:
    add(
      obj.hidden_weight,
      _mean_over_pairs(
        obj.hidden_pairs,
        lambda s, t: losses.hidden_loss(
          obj.hidden_kind,
          student_out["hidden"][s],
          teacher_out["hidden"][t],
          mask_BxT,
          denom,
          projection=proj.get(f"layer_{s}"),
        ),
      ),
    )
  if obj.embed_weight:
    e_s, e_t = student_out["embedding"], teacher_out["embedding"]
    add(obj.embed_weight, losses.embedding_cosine(e_s, e_t, mask_BxT, denom))
  metrics["train/loss"] = total
  return total, metrics


def schedule_metrics(obj: Objective, step: jax.Array) -> dict[str, jax.Array]:
  """Current temperature and loss weights (not additive: report once per step)."""
  out = {}
  if obj.logit_weight:
    out["distill/temperature"] = obj.temperature(step)
  names = {
    "ce": obj.ce_weight,
    "logit": obj.logit_weight,
    "attention": obj.attn_weight,
    "value_relation": obj.value_weight,
    "hidden": obj.hidden_weight,
    "embedding": obj.embed_weight,
  }
  for name, weight in names.items():
    if weight:
      out[f"weight/{name}"] = weight(step)
  return out
