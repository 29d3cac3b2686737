"""Models that teach each other while all train: mutual learning and codistillation.

``codistill.peers`` names M - 1 further models (``peer_1``, ...) trained beside the student
(model 0) in the ONE jitted step, each with its own AdamW (its own learning rate) and its own
gradient clipping. Model k's loss on its rows of the batch:

  L_k = CE_k + weight * mean_{j != k} tau^2 KL(softmax(z_j / tau) || softmax(z_k / tau))

with z_j the other model's logits under ``stop_gradient``; the step minimises sum_k L_k, and
since each L_k reaches only model k's params (the others' logits are constants), each model
gets exactly the gradient of its own loss (tested against a hand-written two-model loss).

* ``exchange_every = 1``: deep mutual learning (Zhang et al. 2018): the others' predictions
  come from their current params (with the whole batch shared, their own forwards are
  reused: M forwards, no more).
* ``exchange_every = N > 1``: codistillation (Anil et al. 2018): model k sees the others only
  through copies of their params refreshed every N steps, ``TrainState.peer_copies``. The
  refresh is a select between the live params and the copies inside the step (a sharded
  copy on device, no host round-trip); the step at which ``step % N == 0`` refreshes before
  its forward, so the copies read in steps [t, t + N) are the params of step t. With N = 1
  the copies would always equal the live params, which is why 1 is mutual learning (the
  test builds the copy mechanism at N = 1 and checks it equals the live one).
* ``split_data``: model k trains on its own block of each batch's rows (rows [k B/M, (k+1)
  B/M)), as Anil et al.'s groups read their own data shards; the others are evaluated on
  that block. Contiguous blocks commute with gradient accumulation's micro-batches (rows a,
  a + A, ...): model k's rows over all micro-batches are exactly its block of the batch, so
  its CE and KL are normalised by its block's valid tokens, whatever ``optim.grad_accum``.

Every model lives on the whole mesh, sharded by its own logical axis names (FSDP / tensor as
the student), so peers of different sizes work; groups on separate sub-meshes are not built.
The losses run on dense float32 logits (the fused head is not used here). The student
(model 0) is what the run exports, evaluates and decodes; the peers are in the checkpoint
(``params["peers"]``) and come back on resume.

Metrics: ``codistill/ce_k``, ``codistill/kl_k`` and ``codistill/agreement_k`` (top-1
agreement of model k with the others on its rows) for every model, ``task/ce`` (the
student's), ``train/loss`` (the sum), ``codistill/exchanged`` (1 on a refreshing step).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxdistill import config as config_lib
from jaxdistill import models
from jaxdistill.distill import losses
from jaxdistill.models import flops as flops_lib
from jaxdistill.parallel import precision
from jaxdistill.train import optim as optim_lib


@dataclasses.dataclass(frozen=True)
class Codistill:
  """The peers and how the models teach each other (built by ``of``).

  Attributes:
    names: the peers' keys in ``params["peers"]``: ("peer_1", ...).
    modules: the peers' Flax modules, in the order of ``names``.
    lrs: the peers' peak learning rates (their schedules are ``optim``'s shape).
    weight: the KL term's weight; temperature: tau.
    exchange_every: steps between refreshes of the copies (1: none kept, the live params).
    split_data: each model on its own block of the batch's rows.
    use_copies: read the others from ``peer_copies`` (True when exchange_every > 1; a test
      sets it at 1 to check the copy mechanism equals mutual learning).
  """

  names: tuple[str, ...]
  modules: tuple[nn.Module, ...]
  lrs: tuple[float, ...]
  weight: float
  temperature: float
  exchange_every: int
  split_data: bool
  use_copies: bool

  @property
  def num_models(self) -> int:
    return 1 + len(self.names)


def of(cfg: Any) -> Codistill | None:
  """The run's codistillation (``codistill.peers`` non-empty), else None."""
  c = cfg.codistill
  if not c.peers:
    return None
  policy = precision.parse_policy(cfg.student.policy, "student.policy")
  names = tuple(f"peer_{k}" for k in range(1, len(c.peers) + 1))
  modules = tuple(
    models.build(config_lib.peer_section(cfg, k), policy, f"codistill.peers[{k - 1}]")
    for k in range(1, len(names) + 1)
  )
  lrs = tuple(float(dict(p).get("lr", 0) or cfg.optim.lr) for p in c.peers)
  n = int(c.exchange_every)
  return Codistill(
    names, modules, lrs, float(c.weight), float(c.temperature), n, bool(c.split_data), n > 1
  )


def peer_modules(cfg: Any) -> dict | None:
  """{peer name: its module} of a codistillation run (evaluated beside the student), else
  None."""
  co = of(cfg)
  return dict(zip(co.names, co.modules)) if co else None


def init_peers(co: Codistill, rng: jax.Array, seq_len: int) -> dict:
  """``params["peers"]``: each peer's initial params (boxed, with logical names)."""
  return {
    name: models.init_variables(m, jax.random.fold_in(rng, k + 1), seq_len)["params"]
    for k, (name, m) in enumerate(zip(co.names, co.modules))
  }


def optimizer(co: Codistill, optim: Any) -> optax.GradientTransformation:
  """One AdamW per model: the student and its projection heads on ``optim``, each peer on
  ``optim`` with its own learning rate (its own clipping, its own moments). The state is a
  dict {"model_0": the student's, "peer_1": ...}, each that optimizer's own state."""
  txs = {"model_0": optim_lib.make_optimizer(optim)}
  for name, lr in zip(co.names, co.lrs):
    peer_optim = ml_collections.ConfigDict(dict(optim))
    peer_optim.lr = lr
    txs[name] = optim_lib.make_optimizer(peer_optim)

  def split(tree: dict) -> dict:
    """params-like tree -> {model: its part}."""
    mine = {k: v for k, v in tree.items() if k != "peers"}
    return {"model_0": mine, **{n: tree["peers"][n] for n in co.names}}

  def init(params):
    return {n: txs[n].init(part) for n, part in split(params).items()}

  def update(grads, state, params=None):
    parts = split(params) if params is not None else dict.fromkeys(txs)
    out = {n: txs[n].update(g, state[n], parts[n]) for n, g in split(grads).items()}
    updates = {**out["model_0"][0], "peers": {n: out[n][0] for n in co.names}}
    return updates, {n: o[1] for n, o in out.items()}

  return optax.GradientTransformation(init, update)


def live_params(co: Codistill, params: dict) -> tuple:
  """Every model's current params, the student first."""
  return (params["student"], *(params["peers"][n] for n in co.names))


def exchange(co: Codistill, state: Any) -> tuple[Any, jax.Array]:
  """(the copies this step reads, 1.0 when it refreshed them): the live params at steps
  ``step % exchange_every == 0``, else the stored copies; (None, 0) without copies."""
  if not co.use_copies:
    return None, jnp.float32(0.0)
  refresh = state.step % co.exchange_every == 0
  live = live_params(co, state.params)
  copies = jax.tree.map(lambda c, p: jnp.where(refresh, p, c), state.peer_copies, live)
  return copies, refresh.astype(jnp.float32)


def _rows(batch: dict, co: Codistill, k: int) -> dict:
  """Model k's block of the batch's rows (the whole batch without ``split_data``)."""
  if not co.split_data:
    return batch
  size = batch["weights"].shape[0] // co.num_models
  return jax.tree.map(lambda x: x[k * size : (k + 1) * size], batch)


def denominators(co: Codistill, batch: dict) -> jax.Array:
  """[M] float32: each model's valid tokens of the WHOLE global batch (at least 1)."""
  return jnp.stack(
    [jnp.maximum(_rows(batch, co, k)["weights"].sum(), 1.0) for k in range(co.num_models)]
  ).astype(jnp.float32)


def _agreement(student_BxTxV, teacher_BxTxV, weights_BxT, denom) -> jax.Array:
  """Weighted share of tokens where both models' top-1 tokens agree."""
  same = jnp.argmax(student_BxTxV, -1) == jnp.argmax(teacher_BxTxV, -1)
  return jnp.sum(jnp.where(weights_BxT != 0, same * weights_BxT, 0.0)) / denom


def make_loss_fn(co: Codistill, student: nn.Module):
  """``loss_fn(params, model_state, copies, batch, step, denom_M, scale) -> (loss, (metrics,
  None))``: the sum of every model's loss (module docstring), the step's loss function.
  ``copies``: every model's params as the others see them (None: the live ones);
  ``denom_M`` [M]: ``denominators`` of the whole batch."""
  modules = (student, *co.modules)

  def loss_fn(params, model_state, copies, batch, step, denom_M, scale):
    del model_state, step  # codistilled models are plain float decoders (validated)
    live = live_params(co, params)
    seen = live if copies is None else copies
    shards = [_rows(batch, co, k) for k in range(co.num_models)]
    logits = [models.apply(m, {"params": p}, b)["logits"] for m, p, b in zip(modules, live, shards)]
    total, metrics = jnp.float32(0.0), {}
    for k, (mine, rows) in enumerate(zip(logits, shards)):
      weights, denom = rows["weights"], denom_M[k]
      ce, _ = losses.cross_entropy(mine, rows["targets"], weights, denom)
      kls, agree = [], []
      for j in range(co.num_models):
        if j == k:
          continue
        if copies is None and not co.split_data:  # the same rows: reuse its own forward
          theirs = logits[j]
        else:
          theirs = models.apply(modules[j], {"params": seen[j]}, rows)["logits"]
        theirs = jax.lax.stop_gradient(theirs)
        kl, _ = losses.logit_loss("kl", mine, theirs, weights, denom, temperature=co.temperature)
        kls.append(kl)
        agree.append(_agreement(mine, theirs, weights, denom))
      kl = sum(kls) / len(kls)
      total = total + ce + co.weight * kl
      metrics[f"codistill/ce_{k}"], metrics[f"codistill/kl_{k}"] = ce, kl
      metrics[f"codistill/agreement_{k}"] = sum(agree) / len(agree)
    metrics["task/ce"], metrics["train/loss"] = metrics["codistill/ce_0"], total
    return (total if scale is None else total * scale), (metrics, None)

  return loss_fn


def step_flops(co: Codistill, cfg: Any, student: nn.Module) -> models.StepFlops:
  """Model FLOPs of one codistillation step: each model's forward + backward with its head
  on its rows (``student``: model k's, summed over models), the others' forwards on those
  rows when they run again (copies or split rows; ``teacher``), the divergences (``loss``)."""
  configs = [m.config for m in (student, *co.modules)]
  rows = cfg.data.batch_size // (co.num_models if co.split_data else 1)
  seq_len, reuse = cfg.data.seq_len, not (co.use_copies or co.split_data)
  total = models.StepFlops(student=0.0, teacher=0.0, loss=0.0)
  for k, mine in enumerate(configs):
    for j, theirs in enumerate(configs):
      if j == k:
        continue
      part = models.step_flops(
        mine,
        None if reuse else theirs,
        batch_size=rows,
        seq_len=seq_len,
        student_head=False,
        teacher_head=not reuse,
        divergence_entries=flops_lib.logits_per_example(mine, seq_len),
      )
      total = dataclasses.replace(
        total, teacher=total.teacher + part.teacher, loss=total.loss + part.loss
      )
    own = models.step_flops(mine, None, batch_size=rows, seq_len=seq_len)
    total = dataclasses.replace(
      total, student=total.student + own.student, loss=total.loss + own.loss
    )
  return total
