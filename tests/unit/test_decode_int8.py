"""Weight-only int8 decoding (``generate.int8_weights``) against the float model it came from."""

import jax
import jax.numpy as jnp
import numpy as np
import testing

from jaxdistill.generate import decode, int8_weights
from jaxdistill.generate.sampling import SamplingParams
from jaxdistill.models.transformer import Transformer, TransformerConfig


def test_int8_weights_logits_and_greedy_tokens_follow_float():
  cfg = TransformerConfig(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    num_heads=4,
    d_ff=64,
    max_len=32,
    num_kv_heads=2,
    tie_embeddings=False,
  )
  model = Transformer(cfg)
  variables = jax.tree.map(jnp.asarray, testing.host_variables(model, 0))
  model8, variables8 = int8_weights.quantize(model, variables)
  kernels = jax.tree.leaves(variables8["params"]["model"]["block_0"])
  assert any(k.dtype == jnp.int8 for k in kernels)
  assert variables8["params"]["model"]["lm_head"]["kernel"].dtype == jnp.float32
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
  ref = model.apply(variables, tokens)["logits"]
  got = model8.apply(variables8, tokens)["logits"]
  scale = float(jnp.abs(ref).max())
  assert float(jnp.abs(got - ref).max()) < 0.05 * scale
  assert float(jnp.abs(got - ref).max()) > 0  # the int8 path really ran
  # Greedy decode: int8 tokens equal float tokens wherever float's top-2 margin is clear.
  outs = []
  for m, v in ((model, variables), (model8, variables8)):
    d = decode.Decoder(m, SamplingParams(), (), 6)
    state = d.prefill(v, 32, tokens, jnp.full((2,), 12, jnp.int32), jnp.arange(2), jnp.int32(0))
    state = d.decode(v, state, jnp.int32(5), jnp.int32(0))
    outs.append(decode.to_host(state)["tokens_BxN"])
  assert (outs[0][:, 0] == outs[1][:, 0]).all()
  assert (outs[0] == outs[1]).mean() >= 0.8
