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
off), chosen by ``heads.head_term`` when the objective is built, never by looking at the
models' outputs: dense, fused or sparse (``heads.py``, which also defines ``Needs`` / ``Term``).

Feature terms follow, in the order of ``FEATURES``: for language models attention KL, value
relation, hidden states, embedding cosine; for image classifiers attention transfer and
feature maps (``vision_losses.py``). A new feature loss is a pure function and one row there.

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
Stage pairs of image models use stage indices 1..S (stage s's output feature map).
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdistill import config as config_lib
from jaxdistill import models
from jaxdistill.distill import ensemble, heads, layer_maps, losses, schedules, vision_losses
from jaxdistill.distill.heads import Needs, Schedule, Term, TermFn  # noqa: F401 (the term records)
from jaxdistill.parallel import precision


@dataclasses.dataclass(frozen=True)
class Projection:
  """A learned map from a student output to its teacher's width, trained with the student.

  Attributes:
    name: its key in ``params["proj"]`` ("layer_<i>" hidden states, "stage_<s>" feature maps).
    d_in, d_out: student and teacher widths (hidden size, or channels).
    conv: a 1x1 convolution ({"kernel": [Cs, Ct], "bias": [Ct]}) instead of a [Ds, Dt] matrix.
  """

  name: str
  d_in: int
  d_out: int
  conv: bool = False


@dataclasses.dataclass(frozen=True)
class Objective:
  """The terms of the loss, in the order they add up.

  Attributes:
    terms: head term (if any) first, then feature terms.
    uses_teacher: a teacher model runs (False without one and with a cache).
    projections: the learned maps of student outputs whose widths differ from the teacher's.
    num_teachers: teacher models that run (``teacher`` and ``teachers``; 1 with a cache).
  """

  terms: tuple[Term, ...]
  uses_teacher: bool
  projections: tuple[Projection, ...] = ()
  num_teachers: int = 1

  def student_request(self) -> dict:
    """Keyword arguments asking the student model for what the terms read."""
    return _request([t.student for t in self.terms])

  def teacher_request(self, k: int = 0) -> dict:
    """Keyword arguments asking teacher ``k`` for what the terms that read it need."""
    return _request([t.teacher for t in self.terms if t.teacher_index in (k, None)])


def _request(needs: list[Needs]) -> dict:
  union = lambda field: tuple(sorted({i for n in needs for i in getattr(n, field)}))
  request = dict(
    hidden_layers=union("hidden"),
    attn_layers=union("attn"),
    qkv_layers=union("qkv"),
    return_logits=any(n.logits for n in needs),
  )
  if union("features"):  # only image models have stages: a transformer never sees the key
    request["feature_stages"] = union("features")
  return request


# --- Feature terms ---------------------------------------------------------------------


def _mean_over_pairs(pairs, fn):
  total, metrics = 0.0, {}
  for pair in pairs:
    value, m = fn(*pair)
    total += value
    metrics = {k: metrics.get(k, 0.0) + v / len(pairs) for k, v in m.items()}
  return total / len(pairs), metrics


def _keys(batch: dict):
  """The tokens that exist as attention keys: ``segment_ids`` > 0 (a prompt the loss skips
  is still attended to), or the weights where a batch has no segment ids."""
  return batch["segment_ids"] > 0 if "segment_ids" in batch else None


def _attention(s, t, batch, denom, step, proj, *, pairs, section):
  """MiniLM attention KL, mean over layer pairs (pair index i reads block i - 1)."""
  w, keys = batch["weights"], _keys(batch)
  kl = lambda i, j: losses.attention_kl(s["attn"][i - 1], t["attn"][j - 1], w, denom, keys)
  return _mean_over_pairs(pairs, kl)


def _value_relation(s, t, batch, denom, step, proj, *, pairs, section):
  """MiniLM value-relation KL, mean over layer pairs (qkv[i - 1][2] are block i - 1's values)."""
  w, keys = batch["weights"], _keys(batch)
  kl = lambda i, j: losses.value_relation(s["qkv"][i - 1][2], t["qkv"][j - 1][2], w, denom, keys)
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


def _attention_transfer(s, t, batch, denom, step, proj, *, pairs, section):
  """Attention transfer between stage feature maps, mean over stage pairs."""
  w, kind, p = batch["weights"], section["kind"], float(section["p"])
  loss = lambda i, j: vision_losses.attention_transfer(
    s["features"][i], t["features"][j], w, denom, p=p, kind=kind
  )
  return _mean_over_pairs(pairs, loss)


def _feature_map(s, t, batch, denom, step, proj, *, pairs, section):
  """Feature-map MSE or cosine, through the 1x1 conv ``proj["stage_<i>_to_<j>"]`` when the
  channels of student stage i and teacher stage j differ."""
  w, kind = batch["weights"], section["kind"]
  loss = lambda i, j: vision_losses.feature_map_loss(
    kind, s["features"][i], t["features"][j], w, denom, projection=proj.get(f"stage_{i}_to_{j}")
  )
  return _mean_over_pairs(pairs, loss)


@dataclasses.dataclass(frozen=True)
class Feature:
  """One row of ``FEATURES``: how the config turns a feature loss into a ``Term``.

  Attributes:
    name: the term's name (metrics ``distill/<name>``, ``weight/<name>``).
    section: the ``distill.<section>`` holding its weight, ``schedule`` and its map (a
      ``layer_map``, or an image model's ``stage_map``).
    weight_key: the key of its weight in that section (0 with a constant schedule = off).
    fn: the pure term function; called with ``pairs`` (layer pairs) and ``section`` (a dict).
    output: the per-layer model output it reads ("attn" and "qkv" per block, "hidden" per
      hidden-state index, "features" per stage of an image model), or None (no layer pairs).
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
  Feature("attention_transfer", "attention_transfer", "weight", _attention_transfer, "features"),
  Feature("feature_map", "feature_map", "weight", _feature_map, "features"),
)


def _policy(section: Any) -> precision.Policy:
  return precision.parse_policy(section.policy, "policy")


def depth(section: Any) -> int:
  """What a layer / stage map counts on one side: a transformer's layers, an image model's
  stages."""
  if section.arch == "transformer":
    return section.num_layers
  return models.vision_config_from_section(section, _policy(section), "").num_stages


def teacher_of(cfg: Any, section_name: str) -> Any:
  """The teacher section ``distill.<section_name>`` reads (its ``teacher`` index)."""
  return config_lib.teachers_of(cfg)[cfg.distill[section_name].teacher]


def pairs_of(cfg: Any, section_name: str) -> tuple[tuple[int, int], ...]:
  """The (student, teacher) pairs of ``distill.<section_name>``'s layer or stage map."""
  section = cfg.distill[section_name]
  spec = section.stage_map if "stage_map" in section else section.layer_map
  return layer_maps.layer_map(spec, depth(cfg.student), depth(teacher_of(cfg, section_name)))


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
    pairs = pairs_of(cfg, spec.section)
    offset = 1 if spec.output in ("attn", "qkv") else 0  # blocks are 0-based
    needs = tuple(
      Needs(**{spec.output: tuple(sorted({p[side] - offset for p in pairs}))}) for side in (0, 1)
    )
  fn = functools.partial(spec.fn, pairs=pairs, section=dict(section))
  reports = ((f"weight/{spec.name}", weight),)
  return Term(spec.name, fn, weight, *needs, reports, teacher_index=section.teacher)


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
  classifier = cfg.student.arch != "transformer"
  if t.source == "none":
    one = lambda s: jnp.float32(1.0)
    head = heads.head_term(d, one, None, one, uses_teacher=False, k=0, classifier=classifier)
    return Objective(terms=(head,), uses_teacher=False)
  steps = cfg.optim.steps
  temperature = schedules.parse_schedule(d.temperature_schedule, d.temperature, steps)
  uses_teacher = t.source != "cache"
  ce, logit = _weight(d.ce, "weight", steps), _weight(d.logit, "weight", steps)
  head = heads.head_term(d, ce, logit, temperature, uses_teacher, cfg.precompute.k, classifier)
  teachers = config_lib.teachers_of(cfg) if uses_teacher else (t,)
  if len(teachers) > 1 and logit is not None:  # an ensemble's logit target
    shares = ensemble.normalise([float(x.weight) for x in teachers])
    head = heads.ensemble_term(head, d.ensemble, shares)
  features = [_feature_term(spec, cfg) for spec in FEATURES] if uses_teacher else []
  terms = tuple(term for term in [head, *features] if term is not None)
  projections = _projections(cfg, {term.name: term for term in terms})
  return Objective(terms, uses_teacher, projections, len(teachers))


def _projections(cfg: Any, terms: dict[str, Term]) -> tuple[Projection, ...]:
  """The learned maps the terms need: per student layer of the hidden-state loss when the
  hidden sizes differ; per stage pair of the feature-map loss whose channels differ."""
  s, t = cfg.student, teacher_of(cfg, "hidden")
  if "hidden" in terms and s.d_model != t.d_model:
    layers = terms["hidden"].student.hidden
    return tuple(Projection(f"layer_{i}", s.d_model, t.d_model) for i in layers)
  if "feature_map" not in terms or not cfg.distill.feature_map.project:
    return ()
  s_shapes = models.vision_config_from_section(s, _policy(s), "student").stage_shapes
  t = teacher_of(cfg, "feature_map")
  t_shapes = models.vision_config_from_section(t, _policy(t), "teacher").stage_shapes
  return tuple(
    Projection(f"stage_{i}_to_{j}", s_shapes[i - 1][-1], t_shapes[j - 1][-1], conv=True)
    for i, j in pairs_of(cfg, "feature_map")
    if s_shapes[i - 1][-1] != t_shapes[j - 1][-1]
  )


def init_projections(obj: Objective, rng: jax.Array) -> dict[str, Any]:
  """The projections' initial params ({} if none): [Ds, Dt] matrices, or 1x1 convolutions
  {"kernel": [Cs, Ct], "bias": [Ct]}."""
  if not obj.projections:
    return {}
  keys = jax.random.split(rng, len(obj.projections))
  init = lambda p, k: (vision_losses.init_conv_projection if p.conv else losses.init_projection)(
    k, p.d_in, p.d_out
  )
  return {p.name: init(p, k) for p, k in zip(obj.projections, keys)}


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
      ``obj.teacher_request()`` (teacher_out None when ``obj.uses_teacher`` is False); with
      several teachers a tuple of them, teacher k's from ``obj.teacher_request(k)``.
    batch: has ``targets`` and ``weights`` (the examples' shape: [B, T] for tokens), and a
      cache's ``teacher_*`` targets.
    denom: the GLOBAL sum of ``weights``.

  Returns:
    (loss, metrics): unweighted per-term values under ``distill/*``, ``task/ce``, plus
    ``train/loss``. All are sums over examples / denom, so they add up over micro-batches.
  """
  metrics, total = {}, 0.0
  outs = teacher_out if isinstance(teacher_out, tuple) else (teacher_out,)
  for term in obj.terms:
    t = outs if term.teacher_index is None else outs[term.teacher_index]
    value, m = term.fn(student_out, t, batch, denom, step, proj)
    metrics.update(m)
    total += value if term.weight is None else term.weight(step) * value
  metrics["train/loss"] = total
  return total, metrics


def schedule_metrics(obj: Objective, step: jax.Array) -> dict[str, jax.Array]:
  """Current temperature and loss weights (not additive: report once per step)."""
  return {name: schedule(step) for term in obj.terms for name, schedule in term.reports}
