"""Generation against the full forward: prefill logits at every position, greedy decoding against
the argmax of the full forward re-run on the growing sequence, for every model family; batches,
batch sizes and meshes that must not change sampled tokens; the sampling transforms against a
float64 NumPy reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testing

from jaxdistill import generate
from jaxdistill.generate import cache as cache_lib
from jaxdistill.generate import sampling
from jaxdistill.models.transformer import Transformer, TransformerConfig
from jaxdistill.parallel import sharding

V, MAX_LEN, STEPS = 64, 32, 6
PROMPTS = [[3, 9, 27, 17, 51], [1, 2, 3, 4, 5, 6, 7, 8, 9]]  # different lengths, one batch
FAMILIES = {
  "rope_tied": dict(),
  "gpt2_shape": dict(norm="layernorm", pos="learned", activation="gelu", bias="all"),
  "gqa_untied": dict(num_heads=4, num_kv_heads=2, tie_embeddings=False),
  "head_pruned": dict(num_heads=3, head_size=8),  # H * K = 24 != D = 16
}


def _config(**kw) -> TransformerConfig:
  base = dict(vocab_size=V, d_model=16, num_layers=2, num_heads=2, d_ff=32, max_len=MAX_LEN)
  return TransformerConfig(**{**base, **kw})


def _host(module, seed=0):
  return jax.tree.map(jnp.asarray, testing.host_variables(module, seed))


def _reference(full, variables, prompt, steps):
  """Greedy tokens and their logits from the full forward ``full`` re-run on the growing
  sequence (one compiled shape: the sequence right-padded to max_len; attention is causal)."""
  seq, logits = list(prompt), []
  for _ in range(steps):
    padded = np.zeros((1, MAX_LEN), np.int32)
    padded[0, : len(seq)] = seq
    row = np.asarray(full(variables, padded)[0, len(seq) - 1], np.float64)
    logits.append(row)
    seq.append(int(row.argmax()))
  return seq[len(prompt) :], np.stack(logits)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def check_against_full_forward(model, variables, atol=1e-5):
  """Prefill logits == the full forward's at every prompt position; then each cached decode
  step's logits == the full forward's on the growing sequence, the same greedy tokens; and
  the Sampler (mixed-length batch) gives each prompt's reference tokens and log-probs."""
  full = jax.jit(lambda v, t: model.apply(v, t)["logits"])
  step = jax.jit(lambda v, t, c: model.apply(v, t, cache=c))
  cfg, refs = model.config, [_reference(full, variables, p, STEPS) for p in PROMPTS]
  for prompt, (want_tokens, want_logits) in zip(PROMPTS, refs):
    tokens = jnp.asarray([prompt], jnp.int32)
    out = step(variables, tokens, cache_lib.init(cfg, 1, MAX_LEN))
    np.testing.assert_allclose(out["logits"][0], full(variables, tokens)[0], atol=atol, rtol=0)
    got_logits = [np.asarray(out["logits"][0, -1])]
    for t in want_tokens[:-1]:
      out = step(variables, jnp.asarray([[t]], jnp.int32), out["cache"])
      got_logits.append(np.asarray(out["logits"][0, 0]))
    np.testing.assert_allclose(np.stack(got_logits), want_logits, atol=atol, rtol=0)
    assert [int(row.argmax()) for row in got_logits] == want_tokens
  sampler = generate.Sampler(model, variables)
  done = sampler.generate(PROMPTS, max_new_tokens=STEPS, logprobs=True)
  for (want_tokens, want_logits), c in zip(refs, done):
    assert c.token_ids == want_tokens and c.stop_reason == "length"
    want_logp = [_log_softmax(row)[t] for row, t in zip(want_logits, want_tokens)]
    np.testing.assert_allclose(c.logprobs, want_logp, atol=atol, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoding_matches_the_full_forward(family):
  model = Transformer(_config(**FAMILIES[family]))
  check_against_full_forward(model, _host(model))


@pytest.mark.slow
def test_fp8_decoding_matches_the_full_forward():
  from jaxdistill import models
  from jaxdistill.parallel import precision

  section = dict(_config().__dict__)
  section = {k: section[k] for k in models.MODEL_KEYS}
  model = models.build(section, precision.parse_policy("c=fp8"), "student")
  assert model.config.fp8 and model.config.dtype == jnp.bfloat16
  variables = nn.unbox(models.init_variables(model, jax.random.key(0), 8))
  # c=fp8 computes in bf16 (FP8 projections): the cached and full paths round differently,
  # so the logits agree to bf16's precision, the greedy tokens exactly.
  check_against_full_forward(model, variables, atol=2e-2)


@pytest.mark.slow
def test_int8_decoding_matches_the_full_forward():
  from jaxdistill.models import quant

  float_model = Transformer(_config())
  qat = quant.qat_model(float_model, "symmetric")
  variables = nn.unbox(quant.init_variables(qat, jax.random.key(0), 8))
  variables["params"] = _host(float_model)["params"]
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rng = np.random.default_rng(0)
  batches = [{"inputs": rng.integers(0, V, (2, 16)).astype(np.int32)} for _ in range(2)]
  variables[quant.COLLECTION] = quant.calibrate(qat, variables, batches, mesh)
  int8, int8_vars = quant.quantize(qat, variables, "symmetric", 8)
  check_against_full_forward(int8, jax.tree.map(jnp.asarray, int8_vars))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hugging_face_models_decode_like_their_full_forward(kind, tmp_path):
  from jaxdistill.models import hf, hf_export

  shape = FAMILIES["gpt2_shape"] if kind == "gpt2" else FAMILIES["gqa_untied"]
  cfg = _config(**shape, norm_eps=1e-5)
  hfm = hf_export.hf_model_for(cfg)
  assert hfm.model_type == kind
  hf_export.export(_host(Transformer(cfg))["params"], hfm, str(tmp_path / kind))
  loaded, params = hf.load(str(tmp_path / kind))
  check_against_full_forward(loaded.module(), {"params": params})


# --- rows that must not depend on their batch ---------------------------------------------

SAMPLED = generate.SamplingParams(temperature=1.0, top_k=20)


@pytest.fixture(scope="module")
def rope_model():
  model = Transformer(_config())
  return model, _host(model, seed=1)


def test_a_mixed_length_batch_samples_what_each_prompt_samples_alone(rope_model):
  sampler = generate.Sampler(*rope_model)
  kw = dict(max_new_tokens=STEPS, sampling=SAMPLED, seed=5)
  together = sampler.generate(PROMPTS, **kw)
  for i, prompt in enumerate(PROMPTS):
    (alone,) = sampler.generate([prompt], prompt_offset=i, **kw)
    assert alone.token_ids == together[i].token_ids and alone.index == together[i].index == i


def test_sampled_tokens_do_not_depend_on_the_batch_size(rope_model):
  prompts = PROMPTS + [[7, 7, 7]]
  kw = dict(max_new_tokens=STEPS, sampling=SAMPLED, seed=11, num_samples=2)
  whole = generate.Sampler(*rope_model).generate(prompts, **kw)
  one = generate.Sampler(*rope_model, batch_size=1).generate(prompts, **kw)
  assert [c.token_ids for c in whole] == [c.token_ids for c in one]
  assert whole[0].token_ids != whole[1].token_ids  # two samples of one prompt differ


def test_sampled_tokens_do_not_depend_on_the_mesh():
  from jaxdistill import models

  model = Transformer(_config(d_model=32, num_heads=8, d_ff=64))  # 8 heads: split 8 or 4 ways
  host = testing.host_variables(model)
  got = []
  for data, tensor in ((1, 8), (2, 4)):
    mesh = sharding.make_mesh({"data": data, "fsdp": 1, "tensor": tensor})
    placed = jax.device_put(host, models.variable_shardings(model, mesh, 8))
    sampler = generate.Sampler(model, placed, mesh=mesh)
    got.append(sampler.generate(PROMPTS * 2, max_new_tokens=STEPS, sampling=SAMPLED, seed=2))
  assert [c.token_ids for c in got[0]] == [c.token_ids for c in got[1]]


# --- the sampling transforms ---------------------------------------------------------------


def _process_reference(x, p: sampling.SamplingParams, seen):
  """``sampling.process`` in float64 NumPy (-inf = excluded)."""
  x = x.astype(np.float64)
  if p.repetition_penalty != 1:
    x = np.where(seen, np.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
  if p.greedy:
    return x
  x = x / p.temperature
  if 0 < p.top_k < x.shape[-1]:
    kth = np.sort(x, -1)[:, ::-1][:, p.top_k - 1 : p.top_k]
    x = np.where(x >= kth, x, -np.inf)
  if p.top_p < 1:
    s = np.sort(x, -1)[:, ::-1]
    probs = np.exp(_log_softmax(s))
    kept = np.cumsum(probs, -1) - probs < p.top_p
    cutoff = np.where(kept, s, np.inf).min(-1, keepdims=True)
    x = np.where(x >= cutoff, x, -np.inf)
  if p.min_p > 0:
    with np.errstate(invalid="ignore"):
      logp = _log_softmax(x)
    x = np.where(logp >= logp.max(-1, keepdims=True) + np.log(p.min_p), x, -np.inf)
  return x


@pytest.mark.parametrize(
  "params",
  [
    sampling.SamplingParams(temperature=0.7, top_k=5),
    sampling.SamplingParams(temperature=1.3, top_p=0.6),
    sampling.SamplingParams(temperature=1.0, min_p=0.2),
    sampling.SamplingParams(temperature=0.9, top_k=12, top_p=0.8, min_p=0.05),
    sampling.SamplingParams(temperature=1.0, repetition_penalty=1.5),
    sampling.SamplingParams(repetition_penalty=2.0),  # greedy: the penalty alone
  ],
  ids=str,
)
def test_process_matches_numpy(params):
  rng = np.random.default_rng(0)
  # Distinct, well separated logits: no threshold falls on a float32 rounding tie.
  logits = np.stack([rng.permutation(np.linspace(-4, 4, V)) for _ in range(6)]).astype(np.float32)
  seen = rng.random((6, V)) < 0.3
  got = np.asarray(sampling.process(jnp.asarray(logits), params, jnp.asarray(seen)))
  want = _process_reference(logits, params, seen)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  kept = np.isfinite(want)
  np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6, atol=1e-6)
  keys = sampling.row_keys(3, jnp.arange(6, dtype=jnp.int32), jnp.int32(0))
  tokens, logp = sampling.choose(jnp.asarray(logits), params, keys, jnp.asarray(seen))
  assert all(kept[b, t] for b, t in enumerate(np.asarray(tokens)))  # drawn from the kept set
  want_logp = _log_softmax(logits.astype(np.float64))[np.arange(6), np.asarray(tokens)]
  np.testing.assert_allclose(logp, want_logp, atol=1e-5)
  if params.greedy:
    np.testing.assert_array_equal(tokens, want.argmax(-1))
