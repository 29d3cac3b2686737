"""The distillation objective: a list of loss terms, built once from the ``distill`` config.

``make_objective(cfg)`` turns a VALIDATED config (``validate.validate`` checks every key this
module reads) into an ``Objective``: a tuple of ``Term`` records, added up in order by
``compute_loss``. A term is

  name      metrics ``distill/<name>`` (head terms: ``task/ce``, ``distill/<kind>``)
  fn        pure (student_out, teacher_out, batch, denom, step, proj) -> (value, metrics);
            static settings (layer pairs, kinds, chunk sizes) are bound when it is built
  weight    schedule step -> scalar multiplying ``value``; None for head terms, which weigh
            their two parts (CE and the logit loss) themselves
  student,  ``Needs``: the outputs ``fn`` reads from each model. The model requests
  teacher   (``Objective.student_request``) are their union: no unread intermediates
  reports   schedules ``schedule_metrics`` reports (``weight/<name>``, the temperature)

The first term is the ONE head term (at most one; none when CE and the logit loss are both
off), chosen here, never by looking at the models' outputs:

  dense   CE and the logit divergence from full logits (``losses.py``)
  fused   the same from final hidden states and heads, one chunk at a time (``fused.py``)
  sparse  CE and a sparse divergence (``sparse.py``) against top-k / sampled targets that come
          from the batch (a cache, no teacher model) or from the online teacher's head

Feature terms follow, in the order of ``FEATURES`` (attention KL, value relation, hidden
states, embedding cosine). A new feature loss is a pure function and one row there.

Batch, mask and normaliser (the same for token models and, later, image classifiers):

* ``batch["weights"]`` has the shape of the grid of loss EXAMPLES: [B, T] for token models (one
  weight per token, 0 = padding), [B] for a classifier (one per image). ``batch["targets"]``
  has the same shape.
* ``denom`` is the GLOBAL sum of ``weights`` (over devices and micro-batches, at least 1).
  Every term is sum over examples of weight x per-example loss / ``denom``, so terms and their
  gradients add up exactly over micro-batches.
* A model output's leading axes are the weights' shape and index examples ([B, T, V] logits or
  [B, C] class logits; [B, T, D] hidden states or [B, H, W, C] feature maps of one image); the
  rest are that example's features. Head terms flatten the leading ``weights.ndim`` axes into N
  rows. Token-only terms (attention, value relation) read [B, T] weights.

Layer pairs use hidden-state indices (0 = embeddings, i = output of block i, 1..L). Attention
and value terms read the block that produced that hidden state, i.e. block i-1 (0-based).
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdistill import fused as fused_lib
from jaxdistill import layer_maps, losses, schedules, sparse

Schedule = Callable[[jax.Array], jax.Array]
# (student_out, teacher_out, batch, denom, step, proj) -> (value, metrics)
TermFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Needs:
  """The outputs one term reads from one model (the model's request keywords follow).

  Attributes:
    logits: "logits" (dense head).
    head: "final_hidden" and "head" instead of logits (fused and sparse heads).
    hidden: hidden-state indices (0 = embeddings, i = block i's output) of "hidden".
    attn: 0-based block indices of "attn" (attention probabilities).
    qkv: 0-based block indices of "qkv" (queries, keys, values).
  """

  logits: bool = False
  head: bool = False
  hidden: tuple[int, ...] = ()
  attn: tuple[int, ...] = ()
  qkv: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Term:
  """One loss term (see the module docstring)."""

  name: str
  fn: TermFn
  weight: Schedule | None = None
  student: Needs = Needs()
  teacher: Needs = Needs()
  reports: tuple[tuple[str, Schedule], ...] = ()


@dataclasses.dataclass(frozen=True)
class Objective:
  """The terms of the loss, in the order they add up.

  Attributes:
    terms: head term (if any) first, then feature terms.
    uses_teacher: a teacher model runs (False without one and with a cache).
    projections: student layers whose hidden states get a learned [Ds, Dt] map.
  """

  terms: tuple[Term, ...]
  uses_teacher: bool
  projections: tuple[int, ...] = ()

  def student_request(self) -> dict:
    """Keyword arguments asking the student model for what the terms read."""
    return _request([t.student for t in self.terms])

  def teacher_request(self) -> dict:
    """Keyword arguments asking the teacher model for what the terms read."""
    return _request([t.teacher for t in self.terms])


def _request(needs: list[Needs]) -> dict:
  union = lambda field: tuple(sorted({i for n in needs for i in getattr(n, field)}))
  return dict(
    hidden_layers=union("hidden"),
    attn_layers=union("attn"),
    qkv_layers=union("qkv"),
    return_logits=any(n.logits for n in needs),
  )


# --- Head terms ------------------------------------------------------------------------


def _rows(x: jax.Array, lead: int) -> jax.Array:
  """[<weights' shape>, ...] -> [N, ...]: one row per example."""
  return x.reshape(-1, *x.shape[lead:])


def _dense_head(s, t, batch, denom, step, proj, *, ce, logit, kind, temperature, beta):
  """CE and the logit divergence, weighted, from full logits."""
  del proj
  mask, total, metrics = batch["weights"], 0.0, {}
  if ce:
    value, m = losses.cross_entropy(s["logits"], batch["targets"], mask, denom)
    metrics.update(m)
    total += ce(step) * value
  if logit:
    value, m = losses.logit_loss(
      kind, s["logits"], t["logits"], mask, denom, temperature=temperature(step), beta=beta
    )
    metrics.update(m)
    total += logit(step) * value
  return total, metrics


def _fused_head(s, t, batch, denom, step, proj, *, ce, logit, kind, temperature, beta, chunks):
  """CE and the logit divergence, weighted, from final hidden states and heads (fused.py)."""
  del proj
  rows = functools.partial(_rows, lead=batch["weights"].ndim)
  teacher = {}
  if logit:
    teacher = dict(teacher_hidden_NxDt=rows(t["final_hidden"]), teacher_head_DtxV=t["head"])
  out = fused_lib.fused_loss_head(
    rows(s["final_hidden"]),
    s["head"],
    rows(batch["targets"]),
    rows(batch["weights"]),
    denom,
    **teacher,
    kind=kind,
    temperature=temperature(step),
    beta=beta,
    kl_weight=logit(step) if logit else 0.0,
    ce_weight=ce(step) if ce else 0.0,
    token_chunk=chunks[0],
    vocab_chunk=chunks[1],
  )
  metrics = {"task/ce": out.ce} if ce else {}
  if logit:
    metrics[f"distill/{kind}"] = out.divergence
  return out.loss, metrics


def _sparse_head(s, t, batch, denom, step, proj, *, ce, logit, kind, temperature, k, chunk):
  """CE and the sparse divergence, weighted: targets from the batch's ``teacher_*`` arrays
  (a cache; ``t`` is None) or made here from the online teacher's final hidden states and
  head (top-k of size ``k``)."""
  del proj
  rows, tau = functools.partial(_rows, lead=batch["weights"].ndim), temperature(step)
  if t is None:
    teacher = {n[len("teacher_") :]: rows(v) for n, v in batch.items() if n.startswith("teacher_")}
  else:
    hidden = rows(t["final_hidden"])
    teacher = sparse.teacher_targets(hidden, t["head"], temperature=tau, k=k, token_chunk=chunk)
  out = sparse.sparse_loss_head(
    rows(s["final_hidden"]),
    s["head"],
    rows(batch["targets"]),
    rows(batch["weights"]),
    denom,
    teacher,
    kind=kind,
    temperature=tau,
    kl_weight=logit(step),
    ce_weight=ce(step) if ce else 0.0,
    token_chunk=chunk,
  )
  metrics = {"task/ce": out.ce} if ce else {}
  metrics[f"distill/{kind}"] = out.divergence
  return out.loss, metrics


def _head_term(d: Any, ce, logit, temperature, uses_teacher: bool, k: int) -> Term | None:
  """The ONE head term: sparse for a sparse logit kind (it needs a logit weight), else fused or
  dense (``distill.fused``); None when CE and the logit loss are both off."""
  if not (ce or logit):
    return None
  reports = [("distill/temperature", temperature)] if logit else []
  reports = tuple(reports + [(f"weight/{n}", w) for n, w in (("ce", ce), ("logit", logit)) if w])
  common = dict(ce=ce, logit=logit, kind=d.logit.kind, temperature=temperature)
  if logit and d.logit.kind in sparse.SPARSE_KINDS:
    fn = functools.partial(_sparse_head, **common, k=k, chunk=d.token_chunk)
    return Term("sparse", fn, None, Needs(head=True), Needs(head=uses_teacher), reports)
  # Without a logit term the kind is never read; a sparse kind must not reach the dense heads.
  common["kind"] = d.logit.kind if logit else "kl"
  beta = float(d.logit.beta)
  if d.fused:
    fn = functools.partial(_fused_head, **common, beta=beta, chunks=(d.token_chunk, d.vocab_chunk))
    return Term("fused", fn, None, Needs(head=True), Needs(head=bool(logit)), reports)
  fn = functools.partial(_dense_head, **common, beta=beta)
  return Term("dense", fn, None, Needs(logits=True), Needs(logits=bool(logit)), reports)


# --- Feature terms ---------------------------------------------------------------------


def _mean_over_pairs(pairs, fn):
  total, metrics = 0.0, {}
  for pair in pairs:
    value, m = fn(*pair)
    total += value
    metrics = {k: metrics.get(k, 0.0) + v / len(pairs) for k, v in m.items()}
  return total / len(pairs), metrics


def _attention(s, t, batch, denom, step, proj, *, pairs, section):
  """MiniLM attention KL, mean over layer pairs (pair index i reads block i - 1)."""
  w = batch["weights"]
  kl = lambda i, j: losses.attention_kl(s["attn"][i - 1], t["attn"][j - 1], w, denom)
  return _mean_over_pairs(pairs, kl)


def _value_relation(s, t, batch, denom, step, proj, *, pairs, section):
  """MiniLM value-relation KL, mean over layer pairs (qkv[i - 1][2] are block i - 1's values)."""
  w = batch["weights"]
  kl = lambda i, j: losses.value_relation(s["qkv"][i - 1][2], t["qkv"][j - 1][2], w, denom)
  return _mean_over_pairs(pairs, kl)


def _hidden(s, t, batch, denom, step, proj, *, pairs, section):
  """Hidden-state MSE or cosine, through ``proj["layer_<i>"]`` when the widths differ."""
  w, kind = batch["weights"], section["kind"]
  loss = lambda i, j: losses.hidden_loss(
    kind, s["hidden"][i], t["hidden"][j], w, denom, projection=proj.get(f"layer_{i}")
  )
  return _mean_over_pairs(pairs, loss)


def _embedding(s, t, batch, denom, step, proj, *, pairs, section):
  """1 - cosine of the pooled sentence embeddings (encoders always return "embedding")."""
  return losses.embedding_cosine(s["embedding"], t["embedding"], batch["weights"], denom)


@dataclasses.dataclass(frozen=True)
class Feature:
  """One row of ``FEATURES``: how the config turns a feature loss into a ``Term``.

  Attributes:
    name: the term's name (metrics ``distill/<name>``, ``weight/<name>``).
    section: the ``distill.<section>`` holding its weight, ``schedule`` and ``layer_map``.
    weight_key: the key of its weight in that section (0 with a constant schedule = off).
    fn: the pure term function; called with ``pairs`` (layer pairs) and ``section`` (a dict).
    output: the per-layer model output it reads ("attn" and "qkv" per block, "hidden" per
      hidden-state index), or None (no layer pairs).
  """

  name: str
  section: str
  weight_key: str
  fn: Callable
  output: str | None


# Feature terms, in the order their weighted values add to the loss (after the head term).
FEATURES = (
  Feature("attention", "attention", "weight", _attention, "attn"),
  Feature("value_relation", "attention", "value_weight", _value_relation, "qkv"),
  Feature("hidden", "hidden", "weight", _hidden, "hidden"),
  Feature("embedding", "embedding", "weight", _embedding, None),
)


def _weight(section: Any, key: str, total_steps: int) -> Schedule | None:
  """The weight schedule, or None when the term is off: weight 0 under a constant schedule.
  A secondary weight (attention.value_weight) shares the section's schedule: 0 is off."""
  if section[key] == 0 and (key != "weight" or section.schedule == "constant"):
    return None
  return schedules.parse_schedule(section.schedule, section[key], total_steps)


def _feature_term(spec: Feature, cfg: Any) -> Term | None:
  section = cfg.distill[spec.section]
  weight = _weight(section, spec.weight_key, cfg.optim.steps)
  if weight is None:
    return None
  pairs, needs = (), (Needs(), Needs())
  if spec.output is not None:
    pairs = layer_maps.layer_map(section.layer_map, cfg.student.num_layers, cfg.teacher.num_layers)
    offset = 1 if spec.output in ("attn", "qkv") else 0  # blocks are 0-based
    needs = tuple(
      Needs(**{spec.output: tuple(sorted({p[side] - offset for p in pairs}))}) for side in (0, 1)
    )
  fn = functools.partial(spec.fn, pairs=pairs, section=dict(section))
  return Term(spec.name, fn, weight, *needs, ((f"weight/{spec.name}", weight),))


# --- Building and evaluating -----------------------------------------------------------


def make_objective(cfg: Any) -> Objective:
  """Builds the Objective from a config that ``validate.validate`` accepted.

  Args:
    cfg: the full config (``distill``, ``teacher``, ``student``, ``optim``, ``precompute``).

  Returns:
    The Objective. Without a teacher (teacher.source='none') it is CE alone at weight 1; with
    a cache ('cache') the sparse head reads its targets from the batch.
  """
  d, t = cfg.distill, cfg.teacher
  if t.source == "none":
    one = lambda s: jnp.float32(1.0)
    head = _head_term(d, one, None, one, uses_teacher=False, k=0)
    return Objective(terms=(head,), uses_teacher=False)
  steps = cfg.optim.steps
  temperature = schedules.parse_schedule(d.temperature_schedule, d.temperature, steps)
  uses_teacher = t.source != "cache"
  ce, logit = _weight(d.ce, "weight", steps), _weight(d.logit, "weight", steps)
  head = _head_term(d, ce, logit, temperature, uses_teacher, cfg.precompute.k)
  features = [_feature_term(spec, cfg) for spec in FEATURES] if uses_teacher else []
  terms = tuple(term for term in [head, *features] if term is not None)
  projections = ()
  hidden = next((term for term in terms if term.name == "hidden"), None)
  if hidden is not None and cfg.student.d_model != t.d_model:
    projections = hidden.student.hidden
  return Objective(terms=terms, uses_teacher=uses_teacher, projections=projections)


def init_projections(
  obj: Objective, rng: jax.Array, d_student: int, d_teacher: int
) -> dict[str, jax.Array]:
  """Learned [Ds, Dt] maps, one per student layer of the hidden-state loss ({} if none)."""
  if not obj.projections:
    return {}
  keys = jax.random.split(rng, len(obj.projections))
  return {
    f"layer_{s}": losses.init_projection(k, d_student, d_teacher)
    for s, k in zip(obj.projections, keys)
  }


def compute_loss(
  obj: Objective,
  step: jax.Array,
  proj: dict,
  student_out: dict,
  teacher_out: dict | None,
  batch: dict,
  denom: jax.Array,
):
  """The weighted sum of the objective's terms for one (micro-)batch.

  Args:
    obj: the Objective.
    step: scalar int, for the schedules.
    proj: projection params from ``init_projections``.
    student_out, teacher_out: model output dicts from ``obj.student_request()`` /
      ``obj.teacher_request()`` (teacher_out None when ``obj.uses_teacher`` is False).
    batch: has ``targets`` and ``weights`` (the examples' shape: [B, T] for tokens), and a
      cache's ``teacher_*`` targets.
    denom: the GLOBAL sum of ``weights``.

  Returns:
    (loss, metrics): unweighted per-term values under ``distill/*``, ``task/ce``, plus
    ``train/loss``. All are sums over examples / denom, so they add up over micro-batches.
  """
  metrics, total = {}, 0.0
  for term in obj.terms:
    value, m = term.fn(student_out, teacher_out, batch, denom, step, proj)
    metrics.update(m)
    total += value if term.weight is None else term.weight(step) * value
  metrics["train/loss"] = total
  return total, metrics


def schedule_metrics(obj: Objective, step: jax.Array) -> dict[str, jax.Array]:
  """Current temperature and loss weights (not additive: report once per step)."""
  return {name: schedule(step) for term in obj.terms for name, schedule in term.reports}
