"""Model FLOPs (models/flops.py), device peaks, MFU and goodput (throughput.py) and the loop's
throughput rows (loop.py).

The FLOP formulas are checked against hand counts (literal numbers, and twice the kernels' sizes
read from initialised params) and against XLA's cost analysis of compiled programs.
"""

import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxdistill import config as config_lib
from jaxdistill.distill import objective as objective_lib
from jaxdistill.models import flops as F
from jaxdistill.models import module_for
from jaxdistill.models.transformer_config import TransformerConfig
from jaxdistill.models.vision_config import VisionConfig
from jaxdistill.train import loop, metrics, throughput
from jaxdistill.train import run as run_lib

# A tiny decoder: V=64, D=16, L=2, H=4 (K=4), F=32, SwiGLU; T=8.
TINY = dict(vocab_size=64, d_model=16, num_layers=2, num_heads=4, d_ff=32, max_len=8)
T = 8


def _block_kernel_size(config: TransformerConfig) -> int:
  """Scalars of the blocks' projection kernels, read from initialised params: what one token
  multiplies by in the body (an independent count of D*H*K, D*KV*K, n_mlp*D*F)."""
  model = module_for(config)
  init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, T), jnp.int32))
  params = nn.unbox(init["params"])
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys[0].startswith("block_") and keys[-1] == "kernel":
      total += leaf.size
  return total


# --- per token: hand counts ------------------------------------------------------------------


def test_tiny_decoder_by_hand():
  c = TransformerConfig(**TINY)
  # Per layer: q, out 2*16*16 = 512 each; k, v 512 each; SwiGLU MLP 2*3*16*32 = 3072.
  # Two layers: 10240. Attention 4*T*H*K = 512 per layer, causal half: 256 x 2 = 512.
  assert F.body_flops_per_token(c, T) == 10240 + 512
  assert F.head_flops_per_token(c) == 2 * 16 * 64 == 2048
  assert F.flops_per_token(c, T) == 12800
  # The body's matmuls are twice the blocks' kernel scalars.
  assert F.body_flops_per_token(c, T) - F.attention_flops_per_token(c, T) == 2 * (
    _block_kernel_size(c)
  )


def test_tiny_encoder_by_hand():
  c = TransformerConfig(
    **TINY, encoder=True, norm="layernorm", pos="learned", activation="gelu_erf", bias="all"
  )
  # Per layer: 4 projections 2048, GELU MLP 2*2*16*32 = 2048; two layers 8192. Attention in
  # full (bidirectional): 4*8*16 = 512 per layer -> 1024. No vocabulary head.
  assert F.body_flops_per_token(c, T) == 8192 + 1024
  assert F.head_flops_per_token(c) == 0
  assert F.logits_per_example(c, T) == 0
  assert F.body_flops_per_token(c, T) - 1024 == 2 * _block_kernel_size(c)


def test_gqa_counts_the_shared_key_value_heads():
  c = TransformerConfig(**TINY, num_kv_heads=1)
  # k and v project to ONE head of K=4: 2*16*4 = 128 each instead of 512.
  per_layer = 512 + 512 + 128 + 128 + 3072
  assert F.body_flops_per_token(c, T) == 2 * per_layer + 512
  assert F.body_flops_per_token(c, T) - 512 == 2 * _block_kernel_size(c)
  full = TransformerConfig(**TINY)
  assert (
    F.body_flops_per_token(full, T) - F.body_flops_per_token(c, T) == 2 * 2 * 384
  )  # k and v, 2 layers


def test_cnn_by_hand():
  c = VisionConfig("cnn", image_size=8, image_channels=1, cnn_channels=(4, 8), cnn_fc=16)
  # conv1 at 8x8: 64*9*1*4 = 2304; conv2 at 4x4: 16*9*4*8 = 4608; flatten 2*2*8 = 32 -> fc 16:
  # 512; fc 16 -> 10: 160. 7584 multiply-adds.
  assert F.flops_per_example(c) == 2 * 7584
  step = F.step_flops(c, None, batch_size=4, seq_len=0, student_head=True)
  assert step.student == 3 * 4 * 2 * 7584
  # The classifier's fc is in the body: the loss holds only the softmax over the 10 classes.
  assert step.loss == 3 * F.SOFTMAX_FLOPS_PER_LOGIT * 4 * 10
  assert step.teacher == 0


# --- per step ------------------------------------------------------------------------------


def _tiny_cfg(**teacher):
  cfg = config_lib.default_config()
  cfg.student.update(vocab_size=64, d_model=16, num_layers=2, num_heads=4, d_ff=32, max_len=8)
  cfg.teacher.update(vocab_size=64, d_model=32, num_layers=4, num_heads=4, d_ff=64, max_len=8)
  cfg.teacher.update(**teacher)
  cfg.data.update(batch_size=4, seq_len=8)
  cfg.log.progress = False
  return cfg


def _step(cfg):
  obj = objective_lib.make_objective(cfg)
  student = run_lib.model_of(cfg, "student")
  teacher = run_lib.model_of(cfg, "teacher") if obj.uses_teacher else None
  return run_lib._flops_per_step(cfg, obj, student, teacher)


def test_teacher_is_forward_only():
  # A teacher 10x the student's body: its part is its forward, once, exactly.
  cfg = _tiny_cfg()
  cfg.teacher.update(d_model=64, num_layers=4, d_ff=256, num_heads=4)
  s, t = (TransformerConfig(**{k: cfg[side][k] for k in TINY}) for side in ("student", "teacher"))
  assert F.body_flops_per_token(t, T) > 10 * F.body_flops_per_token(s, T)
  tokens = 4 * 8
  step = _step(cfg)
  assert step.teacher == tokens * (2 * _block_kernel_size(t) + F.attention_flops_per_token(t, T))
  assert step.student == 3 * tokens * F.body_flops_per_token(s, T)
  # Loss: the heads (student 3 x 2DV, teacher 2DV), softmaxes, the KL over every logit.
  head_s, head_t = 2 * 16 * 64, 2 * 64 * 64
  softmax = F.SOFTMAX_FLOPS_PER_LOGIT * 64
  kl = 3 * F.DIVERGENCE_FLOPS_PER_LOGIT * 64
  assert step.loss == tokens * (3 * head_s + head_t + 3 * softmax + softmax + kl)
  assert step.total == step.student + step.teacher + step.loss


def test_no_teacher_and_cache_have_no_teacher_flops():
  ce_only = _tiny_cfg(source="none")
  ce_only.distill.ce.weight, ce_only.distill.logit.weight = 1.0, 0.0
  step = _step(ce_only)
  tokens, head = 4 * 8, 2 * 16 * 64
  assert step.teacher == 0
  assert step.loss == tokens * 3 * (head + F.SOFTMAX_FLOPS_PER_LOGIT * 64)  # no divergence
  cache = _tiny_cfg(source="cache", path="/nonexistent")
  cache.distill.logit.kind = "topk_renorm"
  cache.precompute.k = 5
  step = _step(cache)
  assert step.teacher == 0
  # The sparse divergence runs over the k stored entries per token: a small loss term.
  sparse = 3 * F.DIVERGENCE_FLOPS_PER_LOGIT * 5
  assert step.loss == tokens * (3 * (head + F.SOFTMAX_FLOPS_PER_LOGIT * 64) + sparse)


def test_hidden_projection_counted_in_the_loss():
  cfg = _tiny_cfg(source="random")
  cfg.distill.hidden.update(weight=0.5, layer_map="uniform", project=True)
  with_proj, without = _step(cfg), _step(_tiny_cfg(source="random"))
  pairs = len(objective_lib.make_objective(cfg).projections)
  assert pairs == 2
  assert with_proj.loss - without.loss == 3 * 4 * 8 * pairs * 2 * 16 * 32


def test_cnn_feature_map_projection():
  cfg = config_lib.default_config()
  cfg.student.update(arch="cnn", image_size=8, image_channels=1, cnn_channels="4,8", cnn_fc=16)
  cfg.teacher.update(arch="cnn", image_size=8, image_channels=1, cnn_channels="8,16", cnn_fc=32)
  cfg.distill.feature_map.update(weight=1.0, stage_map="last", project=True)
  cfg.data.batch_size = 4
  step = _step(cfg)
  # The 1x1 conv maps the student's last stage (2x2x8) to the teacher's 16 channels.
  conv = 3 * 4 * (2 * 2) * 2 * 8 * 16
  heads = 4 * 10 * (3 * F.SOFTMAX_FLOPS_PER_LOGIT + F.SOFTMAX_FLOPS_PER_LOGIT)
  kl = 3 * F.DIVERGENCE_FLOPS_PER_LOGIT * 4 * 10
  assert step.loss == conv + heads + kl
  assert step.teacher == 4 * F.flops_per_example(run_lib.model_of(cfg, "teacher").config)


def test_grad_accumulation_changes_no_count():
  # The micro-batches split data.batch_size: one optimizer step is still batch_size rows.
  cfg = _tiny_cfg()
  one = _step(cfg)
  cfg.optim.grad_accum = 4
  assert _step(cfg) == one
  cfg.data.batch_size = 8
  assert _step(cfg).total == pytest.approx(2 * one.total)


# --- against XLA's cost analysis -----------------------------------------------------------
#
# XLA counts what the program executes: the full T x T attention (the model count takes the
# causal half; the test adds the masked half back) and every elementwise op (norms, softmax,
# RoPE, SwiGLU; in a step also the loss, the embedding gradient and AdamW), which the model
# count leaves out: a few % at these sizes, so XLA >= the model count + masked half, and at
# most 5% more. Unchunked (distill.fused=False) and without grad accumulation: XLA counts a
# loop body (a chunk scan, a micro-batch scan) once, not once per trip.


def test_forward_matches_xla_cost_analysis():
  c = TransformerConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, d_ff=256, max_len=32)
  model, b, t = module_for(c), 2, 32
  variables = model.init(jax.random.key(0), jnp.zeros((1, t), jnp.int32))
  fwd = jax.jit(lambda v, x: model.apply(v, x)["logits"])
  xla = fwd.lower(variables, jnp.zeros((b, t), jnp.int32)).compile().cost_analysis()["flops"]
  ours = b * t * F.flops_per_token(c, t)
  executed = ours + b * t * F.attention_flops_per_token(c, t)  # + the masked half
  assert executed <= xla <= 1.05 * executed
  assert xla > ours


def test_step_matches_xla_cost_analysis():
  cfg = _tiny_cfg(source="random")
  cfg.student.update(vocab_size=256, d_model=64, num_heads=4, d_ff=256, max_len=32)
  cfg.teacher.update(vocab_size=256, d_model=128, num_layers=2, num_heads=4, d_ff=512, max_len=32)
  cfg.distill.update(fused=False)
  cfg.distill.ce.weight = 0.5
  cfg.data.update(batch_size=4, seq_len=32)
  run = run_lib.build_run(cfg, devices=jax.devices()[:1], data=False)
  b, t = 4, 32
  ids = jnp.zeros((b, t), jnp.int32)
  batch = dict(inputs=ids, targets=ids, weights=jnp.ones((b, t)), segment_ids=ids + 1)
  batch["positions"] = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  xla = run.compile(batch).cost_analysis()["flops"]
  masked = (
    b
    * t
    * (
      3 * F.attention_flops_per_token(run.student.config, t)
      + F.attention_flops_per_token(run.teacher.config, t)
    )
  )
  executed = run.flops.total + masked
  # A teacher backward would add 2x the teacher part (more than 100% here): not in the program.
  assert run.flops.teacher > 0.5 * run.flops.total
  assert executed <= xla <= 1.05 * executed


# --- peaks, MFU, goodput -------------------------------------------------------------------


@pytest.mark.parametrize(
  "kind, dtype, chip, column, flops",
  [
    ("TPU v4", "bf16", "TPU v4", "bf16", 275e12),
    ("TPU v5 lite", "bf16", "TPU v5e", "bf16", 197e12),
    ("TPU v5", "bf16", "TPU v5p", "bf16", 459e12),
    ("TPU v5p", "bf16", "TPU v5p", "bf16", 459e12),
    ("TPU v6 lite", "bf16", "TPU v6e", "bf16", 918e12),
    ("TPU v6 lite", "fp8", "TPU v6e", "bf16", 918e12),  # no fp8 units: the bf16 column
    ("NVIDIA A100-SXM4-80GB", "bf16", "A100", "bf16", 312e12),
    ("NVIDIA H100 80GB HBM3", "fp8", "H100", "fp8", 1979e12),
    ("NVIDIA H100 80GB HBM3", "f32", "H100", "bf16", 989e12),  # f32 against the bf16 peak
    ("NVIDIA H100 PCIe", "bf16", "H100 PCIe", "bf16", 756e12),
    ("NVIDIA H200", "fp8", "H200", "fp8", 1979e12),
    ("NVIDIA B200", "bf16", "B200", "bf16", 2250e12),
  ],
)
def test_peak_table(kind, dtype, chip, column, flops):
  assert throughput.chip_of(kind) == chip
  peak = throughput.table_peak(kind, dtype)
  assert peak.flops_per_s == flops
  assert peak.source.startswith(f"{chip} {column} (table")
  assert (f"{dtype} compute counted" in peak.source) == (dtype != column)


def test_unknown_device_has_no_peak_and_dtype_columns():
  assert throughput.table_peak("NVIDIA GeForce GTX 1080", "bf16") is None
  assert throughput.peak_dtype(jnp.bfloat16) == "bf16"
  assert throughput.peak_dtype(jnp.float16) == "bf16"
  assert throughput.peak_dtype(jnp.float32) == "f32"
  assert throughput.peak_dtype(jnp.bfloat16, fp8=True) == "fp8"


def test_cpu_probe_is_cached_and_reused(tmp_path, monkeypatch):
  path = str(tmp_path / "sub" / "peaks.json")
  monkeypatch.setattr(throughput, "_PROBED", {})
  calls = []

  def fake_time(dtype, size, budget_s):
    calls.append(dtype)
    return 1.5e10

  monkeypatch.setattr(throughput, "time_matmul", fake_time)
  peak = throughput.cpu_probe("f32", path)
  assert peak.flops_per_s == 1.5e10 and calls == [jnp.float32]
  key = f"{throughput.cpu_model()}|f32"
  assert json.load(open(path))[key]["flops_per_s"] == 1.5e10
  # A new process (empty memory) reads the file and measures nothing.
  monkeypatch.setattr(throughput, "_PROBED", {})
  assert throughput.cpu_probe("f32", path).flops_per_s == 1.5e10 and len(calls) == 1
  # bf16 is its own entry; fp8 compute probes as bf16.
  assert throughput.cpu_probe("fp8", path).source.startswith("cpu probe bf16")
  assert calls == [jnp.float32, jnp.bfloat16]
  assert set(json.load(open(path))) == {key, f"{throughput.cpu_model()}|bf16"}


def test_cpu_probe_measures_a_matmul():
  rate = throughput.time_matmul(jnp.float32, 128, 0.01)
  assert 1e6 < rate < 1e14  # a real, finite FLOP/s figure


def test_mfu_parts_sum():
  out = throughput.mfu(dict(student=3e12, teacher=1e12, loss=0.5e12), 2.0, 10e12)
  assert out["perf/mfu_student"] == pytest.approx(0.15)
  assert out["perf/mfu_teacher"] == pytest.approx(0.05)
  assert out["perf/mfu_loss"] == pytest.approx(0.025)
  assert out["perf/mfu"] == pytest.approx(0.225)


def test_goodput_shares_sum_to_one():
  now = [100.0]
  g = throughput.Goodput(clock=lambda: now[0])
  with g.phase("input"):
    now[0] += 2.0
  with g.phase("compute"):
    now[0] += 3.0
    with g.phase("eval"):  # nested: the outer phase keeps counting
      now[0] += 1.0
    assert g.shares()["compute"] == pytest.approx(4.0 / 6.0)  # open: counted to now
  now[0] += 2.0  # bookkeeping between phases
  with g.phase("checkpoint"):
    now[0] += 2.0
  shares = g.shares()
  assert shares == pytest.approx(
    dict(input=0.2, compile=0.0, compute=0.4, checkpoint=0.2, eval=0.0, other=0.2)
  )
  assert g.row()["perf/goodput_input"] == pytest.approx(0.2) and len(g.row()) == 6
  assert sum(shares.values()) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="unknown goodput phase"):
    with g.phase("lunch"):
      pass


class _SlowIterator:
  """A data iterator that waits ``delay`` seconds before each batch (an input-bound run)."""

  def __init__(self, inner, delay):
    self.inner, self.delay = inner, delay

  def __next__(self):
    time.sleep(self.delay)
    return next(self.inner)

  def __getattr__(self, name):
    return getattr(self.inner, name)


def test_train_writes_mfu_and_goodput(tmp_path, monkeypatch):
  cfg = _tiny_cfg(source="none")
  cfg.distill.ce.weight, cfg.distill.logit.weight = 1.0, 0.0
  cfg.optim.update(steps=6, warmup_steps=1)
  cfg.log.every = 1
  cfg.cache_dir = str(tmp_path / "cache")
  delay = 0.1
  make = run_lib.data_lib.make_iterator
  monkeypatch.setattr(
    run_lib.data_lib, "make_iterator", lambda *a, **k: _SlowIterator(make(*a, **k), delay)
  )
  summary = loop.train(cfg, str(tmp_path / "w"), devices=jax.devices()[:1])
  rows = metrics.read_jsonl(str(tmp_path / "w" / "metrics.jsonl"))
  assert len(rows) == 6
  for row in rows:
    shares = {k: v for k, v in row.items() if k.startswith("perf/goodput_")}
    assert len(shares) == 6 and sum(shares.values()) == pytest.approx(1.0)
    parts = sum(row[f"perf/mfu_{p}"] for p in ("student", "teacher", "loss"))
    assert row["perf/mfu"] == pytest.approx(parts) and row["perf/mfu_teacher"] == 0
    assert row["perf/mfu"] == pytest.approx(
      row["perf/tflops_per_s"] * 1e12 / summary["peak_flops_per_s"]
    )
  # The sleeps are input wait: at least 6 x delay of it, and more than the compute.
  seconds = summary["goodput_s"]
  assert seconds["input"] >= 6 * delay
  assert summary["goodput"]["input"] > summary["goodput"]["compute"]
  assert sum(summary["goodput"].values()) == pytest.approx(1.0)
  assert summary["peak"].startswith("cpu probe f32")
  assert summary["flops_per_step"]["teacher"] == 0
  assert json.load(open(tmp_path / "cache" / "peak_flops.json"))  # the probe's cache
