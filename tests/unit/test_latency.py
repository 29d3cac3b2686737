"""Latency and size (jaxdistill/evaluation/latency.py): timing against models of known duration, the
statistics against NumPy on a scripted clock, compiled memory against known array sizes, and
the eval JSON's "latency" block for a tiny transformer, encoder and CNN."""

import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import generate, models
from jaxdistill.config import default_config
from jaxdistill.evaluation import latency
from jaxdistill.generate import timing
from jaxdistill.parallel import sharding
from jaxdistill.parallel.precision import parse_policy

# --- measure ----------------------------------------------------------------------------------


def _sleeper(seconds: float):
  """A compiled forward that sleeps ``seconds`` on the host (a pure_callback) and returns x."""

  def host(x):
    time.sleep(seconds)
    return x

  shape = jax.ShapeDtypeStruct((4,), jnp.float32)
  forward = jax.jit(lambda x: jax.pure_callback(host, shape, x) + 1.0)
  x = jnp.zeros((4,), jnp.float32)
  return lambda: forward(x)


def test_measure_reads_known_sleeps():
  # 50 and 100 ms. A call's own overhead (dispatch, the callback's thread hop) is additive: ~0.5
  # ms here, 4-6 ms with the machine's two cores shared by a test suite and a training run; so
  # a time is never below its sleep, and at most 20 ms above it (a wrong unit or a missed wait
  # is off by far more).
  stats = latency.measure({"a": _sleeper(0.05), "b": _sleeper(0.1)}, repeats=7, warmup=1)
  for name, sleep in (("a", 0.05), ("b", 0.1)):
    assert sleep <= stats[name]["min_s"] <= stats[name]["median_s"] < sleep + 0.02
  for s in stats.values():
    assert s["repeats"] == 7
    assert s["min_s"] <= s["median_s"] <= s["p90_s"]


def test_measure_waits_for_the_result():
  # A jitted call returns before the device finishes; without block_until_ready the host's
  # sleep (which the result waits on) would not be in the time.
  def host(x):
    time.sleep(0.03)
    return x

  shape = jax.ShapeDtypeStruct((), jnp.float32)
  forward = jax.jit(lambda x: jax.pure_callback(host, shape, x) * 2)
  stats = latency.measure({"f": lambda: forward(jnp.float32(1))}, repeats=3, warmup=1)
  assert stats["f"]["min_s"] >= 0.03


def test_measure_interleaves_after_warming_each():
  calls = []
  fns = {name: (lambda n=name: calls.append(n) or jnp.zeros(())) for name in ("a", "b", "c")}
  latency.measure(fns, repeats=4, warmup=2)
  assert calls == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] * 4


def test_measure_statistics_on_a_scripted_clock(monkeypatch):
  # Each call advances a fake clock by the next scripted duration: the times are known exactly.
  durations = {"a": [5.0, 1.0, 3.0, 2.0, 4.0, 10.0, 6.0], "b": [0.5] * 7}
  now = [0.0]

  def fn(name):
    def call():
      now[0] += durations[name].pop(0) if durations[name] else 0.0
      return np.zeros(())

    return call

  expected = {k: v[1:] for k, v in durations.items()}  # the first call of each is the warmup
  monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
  stats = latency.measure({"a": fn("a"), "b": fn("b")}, repeats=6, warmup=1)
  for name, times in expected.items():
    assert stats[name] == {
      "median_s": float(np.median(times)),
      "p25_s": float(np.percentile(times, 25)),
      "p75_s": float(np.percentile(times, 75)),
      "p90_s": float(np.percentile(times, 90)),
      "min_s": min(times),
      "repeats": 6,
    }
  assert stats["a"]["p90_s"] == pytest.approx(8.0)  # [1, 2, 3, 4, 6, 10]: 6 + 0.5 * (10 - 6)
  # The quartiles at positions 1.25 and 3.75 of the sorted six: 2 + 0.25 and 4 + 0.75 * 2.
  assert stats["a"]["p25_s"] == pytest.approx(2.25) and stats["a"]["p75_s"] == pytest.approx(5.5)


def test_measure_needs_a_repeat():
  with pytest.raises(ValueError, match="repeats"):
    latency.measure({"a": lambda: None}, repeats=0)


# --- memory and size --------------------------------------------------------------------------


def test_compiled_memory_counts_the_arguments():
  x = jnp.ones((256, 256), jnp.float32)
  y = jnp.ones((256,), jnp.float32)
  mem = latency.compiled_memory(jax.jit(lambda x, y: x @ y), x, y)
  assert mem["argument_bytes"] >= 256 * 256 * 4 + 256 * 4
  assert mem["output_bytes"] >= 256 * 4
  assert mem["temp_bytes"] >= 0
  parts = mem["argument_bytes"] + mem["output_bytes"] + mem["temp_bytes"]
  assert mem["total_bytes"] == parts - mem["alias_bytes"]
  # Abstract arguments compile the same program: nothing needs to be allocated.
  abstract = (
    jax.ShapeDtypeStruct((256, 256), jnp.float32),
    jax.ShapeDtypeStruct((256,), jnp.float32),
  )
  assert latency.compiled_memory(jax.jit(lambda x, y: x @ y), *abstract) == mem


def test_compiled_memory_without_an_analysis():
  compiled = types.SimpleNamespace(memory_analysis=lambda: None)
  jitted = types.SimpleNamespace(lower=lambda *a: types.SimpleNamespace(compile=lambda: compiled))
  mem = latency.compiled_memory(jitted, 1)
  assert set(mem) >= {"temp_bytes", "argument_bytes", "output_bytes", "total_bytes"}
  assert all(v is None for v in mem.values())


def test_size_counts_params_and_bytes_by_dtype():
  variables = {
    "params": {
      "dense": {"kernel": np.zeros((3, 4), np.float32), "bias": jnp.zeros((4,), jnp.bfloat16)},
      "embed": nn.Partitioned(jnp.zeros((5, 2), jnp.bfloat16), names=("vocab", "embed")),
    },
    "batch_stats": {"mean": jax.ShapeDtypeStruct((4,), jnp.float32)},
  }
  assert latency.size(variables) == {
    "params": 12 + 4 + 10,  # the params collection only
    "bytes": 12 * 4 + 4 * 2 + 10 * 2 + 4 * 4,  # every collection
    "bytes_by_dtype": {"bfloat16": 28, "float32": 64},
  }
  bare = latency.size(variables["params"])  # a bare param tree
  assert bare == {"params": 26, "bytes": 76, "bytes_by_dtype": {"bfloat16": 28, "float32": 48}}


# --- model_latency ----------------------------------------------------------------------------


def _model(**fields):
  section = default_config().student
  section.update(fields)
  module = models.build(section, parse_policy(section.policy), "student")
  # Random values made on the host from the variables' shapes: no init program to compile (the
  # timings do not depend on the values).
  shapes = jax.eval_shape(
    lambda r: nn.unbox(models.init_variables(module, r, 8)), jax.random.key(0)
  )
  rng = np.random.default_rng(0)
  return module, jax.tree.map(
    lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), shapes
  )


def _check_block(block, names, batch_sizes, repeats):
  assert block["batch_sizes"] == list(batch_sizes)
  assert set(block) == {"batch_sizes", *names}
  for name in names:
    assert set(block[name]) == {f"batch_{b}" for b in batch_sizes} | {"memory"}
    for b in batch_sizes:
      s = block[name][f"batch_{b}"]
      assert s["repeats"] == repeats
      assert 0 < s["min_s"] <= s["median_s"] <= s["p90_s"]


TRANSFORMER = dict(vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=8)


def test_model_latency_transformer_and_encoder():
  decoder = _model(**TRANSFORMER)
  encoder = _model(**TRANSFORMER, encoder=True, norm="layernorm", pos="learned", bias="all")
  block = latency.model_latency(
    {"student": decoder, "teacher": encoder},
    lambda b: latency.example_batch(decoder[0], b, 8),
    batch_sizes=(1, 4),
    repeats=3,
    warmup=1,
  )
  _check_block(block, ["student", "teacher"], (1, 4), 3)
  batch_bytes = 4 * 8 * 4  # [4, 8] int32 ids at the serving batch
  for name, (_, variables), out_bytes in (
    ("student", decoder, 4 * 8 * 64 * 4),  # logits [4, 8, 64] float32
    ("teacher", encoder, 4 * 16 * 4),  # the embedding [4, 16] float32
  ):
    mem = block[name]["memory"]
    # Exactly the variables and the batch (XLA's CPU buffers are unpadded).
    assert mem["argument_bytes"] == latency.size(variables)["bytes"] + batch_bytes
    assert mem["output_bytes"] == out_bytes
    assert mem["total_bytes"] > mem["argument_bytes"]


def test_model_latency_cnn_on_a_mesh():
  cnn = _model(arch="cnn", image_size=8, image_channels=1, cnn_channels="4", cnn_fc=8)
  images = latency.example_batch(cnn[0], 2)["inputs"]
  assert images.shape == (2, 8, 8, 1) and images.dtype == np.float32
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=1), jax.devices()[:2])
  variables = jax.device_put(cnn[1], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  block = latency.model_latency(
    {"student": (cnn[0], variables)},
    lambda b: latency.example_batch(cnn[0], b),
    batch_sizes=(1, 4),  # 1: replicated, 4: split over the data axis
    repeats=2,
    warmup=1,
    mesh=mesh,
  )
  _check_block(block, ["student"], (1, 4), 2)
  assert block["student"]["memory"]["output_bytes"] == 2 * 10 * 4  # per device: [2 of 4, 10]


def test_example_batch():
  section = default_config().student
  section.update(TRANSFORMER)
  batch = latency.example_batch(section, 3, 5)
  assert set(batch) == {"inputs"}
  assert batch["inputs"].shape == (3, 5) and batch["inputs"].dtype == np.int32
  assert 0 <= batch["inputs"].min() and batch["inputs"].max() < 64
  assert latency.example_batch(section, 2)["inputs"].shape == (2, 8)  # default: max_len
  with pytest.raises(ValueError, match="exceeds the model's max_len 8"):
    latency.example_batch(section, 1, 9)


def test_generation_latency_times_decoders_only():
  decoder = _model(**TRANSFORMER)
  encoder = _model(**TRANSFORMER, encoder=True, norm="layernorm", pos="learned", bias="all")
  block = latency.generation_latency(
    {"student": decoder, "teacher": encoder}, (1, 2, 4), 6, 6, repeats=2, warmup=1
  )
  assert set(block) == {"student"}  # an encoder does not generate
  gen = block["student"]
  assert set(gen) == {"batch_1", "batch_4", "memory"}  # one request and the serving batch
  for b in (1, 4):
    s = gen[f"batch_{b}"]
    assert (s["prompt_tokens"], s["new_tokens"], s["repeats"]) == (4, 4, 2)  # max_len 8
    assert s["decode_tokens"] == b * 3  # every row got its 4 tokens: 3 after the first
    assert 0 < s["ttft"]["min_s"] <= s["ttft_s"] == s["ttft"]["median_s"]
    assert s["decode_tokens_per_s"] == pytest.approx(b / s["decode_step"]["median_s"])
  config = decoder[0].config
  # The cache's bucket holds all 8 positions: k and v of [4 rows, 8, kv heads, head width].
  kv = 4 * 8 * config.kv_heads * config.head_dim * jnp.dtype(config.dtype).itemsize
  assert gen["memory"]["cache_bytes"] == 2 * config.num_layers * kv
  assert gen["memory"]["params_bytes"] == latency.size(decoder[1])["bytes"]
  assert (
    gen["memory"]["total_bytes"] == gen["memory"]["cache_bytes"] + latency.size(decoder[1])["bytes"]
  )


def test_samplers_of_one_architecture_share_programs_not_variables():
  module, kd = _model(**TRANSFORMER)
  ce = jax.tree.map(lambda a: a[::-1] if a.ndim == 2 else -a, kd)  # other values, same shapes
  found = latency.samplers({"kd": (module, kd), "ce": (module, ce)}, {"ce": "a tokenizer"})
  assert found["ce"]._decoders is found["kd"]._decoders  # compiled once, for both
  assert (found["kd"].tokenizer, found["ce"].tokenizer) == (None, "a tokenizer")
  found["ce"].tokenizer = None  # (a stand-in: token-id prompts need none)
  greedy = lambda s: s.generate([[1, 2, 3]], max_new_tokens=4, stop_tokens=())[0].token_ids
  # The twin runs its own variables: its tokens are a sampler of its own's, not the first's.
  assert greedy(found["ce"]) == greedy(generate.Sampler(module, ce)) != greedy(found["kd"])


class _SleepySampler:
  """Stands in for a ``generate.Sampler``: a request sleeps ``prefill`` s, yields every row's
  first token, sleeps ``decode`` s and yields all ``max_new_tokens``; calls go to ``log``."""

  def __init__(self, name, prefill, decode, log):
    self.config = types.SimpleNamespace(max_len=64, vocab_size=10)
    self.name, self.prefill, self.decode, self.log = name, prefill, decode, log

  def stream(self, rows, max_new_tokens, stop_tokens, chunk):
    assert stop_tokens == () and chunk == 0 and {len(r) for r in rows} == {8}
    self.log.append(self.name)
    time.sleep(self.prefill)
    yield [types.SimpleNamespace(token_ids=[1]) for _ in rows]
    time.sleep(self.decode)
    yield [types.SimpleNamespace(token_ids=[1] * max_new_tokens) for _ in rows]


def test_generation_timing_reads_known_sleeps():
  # TTFT 20 / 40 ms, then 60 ms for 6 more tokens of 4 rows: 24 decode tokens, 400 tok/s. As
  # in test_measure_reads_known_sleeps, overhead only adds, at most 20 ms.
  log = []
  found = {"a": _SleepySampler("a", 0.02, 0.06, log), "b": _SleepySampler("b", 0.04, 0.06, log)}
  out = timing.measure(found, 4, prompt_tokens=8, new_tokens=7, repeats=2, warmup=1)
  assert log == ["a", "b"] + ["a", "b"] * 2  # warm-ups, then timed round-robin
  for name, ttft in (("a", 0.02), ("b", 0.04)):
    s = out[name]
    assert ttft <= s["ttft"]["min_s"] <= s["ttft_s"] < ttft + 0.02
    assert s["decode_tokens"] == 24 and (s["prompt_tokens"], s["new_tokens"]) == (8, 7)
    assert 4 * 0.06 / 24 <= s["decode_step"]["min_s"] < 4 * 0.08 / 24  # one step, all rows
    assert 24 / 0.08 < s["decode_tokens_per_s"] <= 24 / 0.06


def test_generation_lengths_fit_the_context():
  config = lambda n: types.SimpleNamespace(max_len=n, vocab_size=5)
  assert timing.lengths(config(128), 32, 32) == (32, 32)  # the quickstart's full size
  assert timing.lengths(config(32), 32, 32) == (16, 16)  # its test size
  assert timing.lengths(config(40), 8, 64) == (8, 32)
  rows = timing.prompts(config(32), 3, 16)
  assert len(rows) == 3 and {len(r) for r in rows} == {16}
  assert all(0 <= t < 5 for r in rows for t in r)


def test_eval_table_shows_generation_for_decoders_only():
  from jaxdistill.evaluation import job

  at = lambda ttft, tok_s: {"ttft_s": ttft, "decode_tokens_per_s": tok_s}
  forward = {"batch_1": {"median_s": 1e-3}, "batch_32": {"median_s": 8e-3}}
  metrics = dict(val_loss=3.5, val_ppl=33.1, accuracy=0.3, top5_accuracy=0.6, ece=0.01)
  result = {
    "task": "text",
    "models": {"student": metrics, "teacher": metrics},
    "size": dict.fromkeys(("student", "teacher"), {"params": 10**6, "bytes": 4 * 10**6}),
    "latency": {
      "batch_sizes": [1, 32],
      "student": {
        **forward,
        "generate": {"batch_1": at(2.5e-3, 400.0), "batch_32": at(0.1, 6400.0)},
      },
      "teacher": forward,  # not timed generating: dashes
    },
  }
  lines = job.format_table(result).splitlines()
  head, _, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
  cells = {row[0]: dict(zip(head, row)) for row in rows}
  assert cells["student"]["TTFT ms @ batch 1"] == "2.50"
  assert cells["teacher"]["TTFT ms @ batch 1"] == "—"
  assert cells["student"]["decode tok/s @ batch 1"] == "400"
  assert cells["student"]["decode tok/s @ batch 32"] == "6,400"
  assert cells["student"]["ms @ batch 32"] == "8.00"
  del result["latency"]["student"]["generate"]
  assert "TTFT" not in job.format_table(result)  # no decoder timed: no generation columns
