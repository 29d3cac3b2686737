"""The head terms of the objective (CE and the logit divergence) and the term records.

``Needs`` (what a term reads from a model) and ``Term`` (one loss term) are the records every
term is built as; ``objective.py`` describes them and builds the feature terms. Exactly one
head term runs (``head_term`` picks it at build time):

  dense   CE and the logit divergence from full logits (``losses.py``): a language model's
          [B, T, V] or a classifier's [B, C]; a classifier's mixed batches (mixup / cutmix)
          weigh CE between their two labels
  fused   the same from final hidden states and heads, one chunk at a time (``fused.py``)
  sparse  CE and a sparse divergence (``sparse.py``) against top-k / sampled targets that come
          from the batch (a cache, no teacher model) or from the online teacher's head

With several teachers the head term reads all of them (``Term.teacher_index`` None) and
combines them as ``distill.ensemble`` says (``ensemble_term``, ``ensemble.py``).
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdistill.distill import adaptive as adaptive_lib
from jaxdistill.distill import ensemble, losses, policy_losses, sparse
from jaxdistill.distill import fused as fused_lib

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
    features: stage indices (1..S) of an image model's "features" (feature maps).
  """

  logits: bool = False
  head: bool = False
  hidden: tuple[int, ...] = ()
  attn: tuple[int, ...] = ()
  qkv: tuple[int, ...] = ()
  features: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Term:
  """One loss term (see ``objective``'s module docstring)."""

  name: str
  fn: TermFn
  weight: Schedule | None = None
  student: Needs = Needs()
  teacher: Needs = Needs()
  reports: tuple[tuple[str, Schedule], ...] = ()
  # Which teacher ``fn`` reads (0 = ``teacher``, i = ``teachers[i - 1]``); None: all of them,
  # as a tuple of their outputs (the head term of an ensemble). ``teacher`` Needs apply to it.
  teacher_index: int | None = 0


def _rows(x: jax.Array, lead: int) -> jax.Array:
  """[<weights' shape>, ...] -> [N, ...]: one row per example."""
  return x.reshape(-1, *x.shape[lead:])


def _cross_entropy(logits, batch, denom):
  """CE on the batch's labels; a mixed batch (mixup / cutmix: ``mix_targets`` [B] and
  ``mix_lambda`` [B]) weighs it lambda * CE(targets) + (1 - lambda) * CE(mix_targets), i.e.
  the same per-example CE under the weights w * lambda and w * (1 - lambda)."""
  mask = batch["weights"]
  if "mix_lambda" not in batch:
    return losses.cross_entropy(logits, batch["targets"], mask, denom)
  lam = batch["mix_lambda"].astype(jnp.float32)
  first, _ = losses.cross_entropy(logits, batch["targets"], mask * lam, denom)
  second, _ = losses.cross_entropy(logits, batch["mix_targets"], mask * (1.0 - lam), denom)
  return first + second, {"task/ce": first + second}


def _dense_head(
  s, t, batch, denom, step, proj, *, ce, logit, kind, temperature, beta, adaptive, policy=()
):
  """CE and the logit divergence, weighted, from full logits ([B, T, V] or a classifier's
  [B, C]); a cache's stored logits (``teacher_logits``) stand in for a teacher model. With
  ``adaptive`` (``distill.adaptive``) each token's divergence is weighted (adaptive.py).
  ``policy``: a policy kind's (baseline, clip) (``distill.on_policy``)."""
  del proj
  mask, total, metrics = batch["weights"], 0.0, {}
  if ce:
    value, m = _cross_entropy(s["logits"], batch, denom)
    metrics.update(m)
    total += ce(step) * value
  if logit and kind in policy_losses.POLICY_KINDS:
    # The student's own samples are the targets: only their log-probabilities are read.
    student_logp_BxT = policy_losses.token_logprobs(s["logits"], batch["targets"])
    teacher_logp_BxT = policy_losses.token_logprobs(t["logits"], batch["targets"])
    value, m = policy_losses.sampled_token_reverse_kl(
      student_logp_BxT, teacher_logp_BxT, mask, denom, *policy
    )
    metrics.update(m)
    total += logit(step) * value
  elif logit:
    teacher_logits = batch["teacher_logits"] if t is None else t["logits"]
    tau = temperature(step)
    if adaptive != "none":
      how = dict(kind=kind, temperature=tau, beta=beta)
      zs, y = s["logits"], batch["targets"]
      mask = mask * adaptive_lib.token_weights(adaptive, zs, teacher_logits, y, mask, **how)
    value, m = losses.logit_loss(
      kind, s["logits"], teacher_logits, mask, denom, temperature=tau, beta=beta
    )
    metrics.update(m)
    total += logit(step) * value
  return total, metrics


def _fused_head(
  s, t, batch, denom, step, proj, *, ce, logit, kind, temperature, beta, chunks, adaptive
):
  """CE and the logit divergence, weighted, from final hidden states and heads (fused.py).
  With ``adaptive``, a first pass over token chunks scores every token (adaptive.py)."""
  del proj
  rows = functools.partial(_rows, lead=batch["weights"].ndim)
  teacher, hs_NxDs, y_N, w_N = {}, rows(s["final_hidden"]), rows(batch["targets"]), None
  if logit:
    teacher = dict(teacher_hidden_NxDt=rows(t["final_hidden"]), teacher_head_DtxV=t["head"])
  if logit and adaptive != "none":
    how = dict(kind=kind, temperature=temperature(step), beta=beta, token_chunk=chunks[0])
    ht_NxDt = teacher["teacher_hidden_NxDt"]
    r_N = adaptive_lib.chunk_scores(adaptive, hs_NxDs, s["head"], ht_NxDt, t["head"], y_N, **how)
    w_N = adaptive_lib.normalise(r_N, rows(batch["weights"]))
  out = fused_lib.fused_loss_head(
    hs_NxDs,
    s["head"],
    y_N,
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
    divergence_weights_N=w_N,
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
  else:  # an ensemble's "probs" passes every teacher's hidden states and heads, and its mix
    mix = t.get("mix")
    hidden = tuple(map(rows, t["final_hidden"])) if mix else rows(t["final_hidden"])
    teacher = sparse.teacher_targets(
      hidden, t["head"], temperature=tau, k=k, token_chunk=chunk, mix=mix
    )
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


def head_term(
  d: Any, ce, logit, temperature, uses_teacher: bool, k: int, classifier: bool = False
) -> Term | None:
  """The ONE head term: sparse for a sparse logit kind (it needs a logit weight), else fused or
  dense (``distill.fused``); None when CE and the logit loss are both off. A classifier's
  [B, C] class logits are small: its head is always dense (a cache stores them whole)."""
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
  # A policy kind reads the sampled tokens' log-probabilities from the dense logits.
  common.update(beta=beta, adaptive=d.get("adaptive", "none"))
  if d.fused and not classifier and common["kind"] not in policy_losses.POLICY_KINDS:
    fn = functools.partial(_fused_head, **common, chunks=(d.token_chunk, d.vocab_chunk))
    return Term("fused", fn, None, Needs(head=True), Needs(head=bool(logit)), reports)
  if common["kind"] in policy_losses.POLICY_KINDS:
    op = d.on_policy
    common["policy"] = (str(op.get("baseline", "none")), float(op.get("signal_clip", 0.0)))
  fn = functools.partial(_dense_head, **common)
  return Term("dense", fn, None, Needs(logits=True), Needs(logits=bool(logit)), reports)


# --- Several teachers -------------------------------------------------------------------


def _mixed_head(s, ts, batch, denom, step, proj, *, head, how, weights):
  """An ensemble's "probs" / "logits" target as one teacher, then the one-teacher head."""
  if head.func is _sparse_head and how == "probs":  # mixed per token chunk (sparse.py)
    hidden, head_w = tuple(t["final_hidden"] for t in ts), tuple(t["head"] for t in ts)
    t = {"final_hidden": hidden, "head": head_w, "mix": (how, weights)}
    return head(s, t, batch, denom, step, proj)
  if head.func is not _dense_head:  # fused / sparse, "logits": one teacher of stacked widths
    hidden, head_w = ensemble.stacked_head(
      [t["final_hidden"] for t in ts], [t["head"] for t in ts], weights
    )
    return head(s, {"final_hidden": hidden, "head": head_w}, batch, denom, step, proj)
  tau = head.keywords["temperature"](step)
  mixed = ensemble.mix_logits([t["logits"] for t in ts], weights, tau, how)
  return head(s, {"logits": mixed}, batch, denom, step, proj)


def _losses_head(s, ts, batch, denom, step, proj, *, heads_k, weights, kind):
  """sum_k w_k (head term against teacher k); CE once (in teacher 0's call). Reports the
  averaged divergence and each teacher's (``distill/<kind>/teacher_<k>``)."""
  total, metrics, name = 0.0, {}, f"distill/{kind}"
  for k, (fn, w, t) in enumerate(zip(heads_k, weights, ts)):
    value, m = fn(s, t, batch, denom, step, proj)
    total += value
    metrics.update({key: v for key, v in m.items() if key != name})
    metrics[f"{name}/teacher_{k}"] = m[name]
    metrics[name] = metrics.get(name, 0.0) + w * m[name]
  return total, metrics


def ensemble_term(head: Term, how: str, weights: tuple[float, ...]) -> Term:
  """The head term of several teachers (``weights``: their shares, summing to 1).

  Args:
    head: the one-teacher head term (``head_term``) with a logit divergence.
    how: ``distill.ensemble``: "probs" | "logits" | "losses" (``ensemble.py``).
    weights: one share per teacher.

  The fused head takes "logits" (stacked heads) and "losses"; the sparse head every kind
  ("probs" mixed per token chunk); the dense head every kind.

  Returns:
    A Term reading every teacher (``teacher_index`` None).
  """
  fn, kw = head.fn.func, head.fn.keywords
  if how == "losses":
    scaled = lambda w: lambda step: w * kw["logit"](step)  # noqa: E731
    heads_k = tuple(
      functools.partial(fn, **{**kw, "ce": kw["ce"] if k == 0 else None, "logit": scaled(w)})
      for k, w in enumerate(weights)
    )
    kind = kw["kind"]
    bound = functools.partial(_losses_head, heads_k=heads_k, weights=weights, kind=kind)
  else:
    if head.name == "fused" and how != "logits":
      raise ValueError("the fused head combines teachers by 'logits' or 'losses'")
    bound = functools.partial(_mixed_head, head=head.fn, how=how, weights=weights)
  return dataclasses.replace(head, fn=bound, teacher_index=None)
