"""Speculative decoding: the target's greedy output token for token, its sampling distribution
(a chi-square test), the draft's acceptance, and bad pairs."""

import itertools

import jax
import numpy as np
import pytest
import testing
from scipy import stats as scipy_stats

from jaxdistill import generate
from jaxdistill.generate import SamplingParams
from jaxdistill.models.transformer import Transformer, TransformerConfig

TARGET = dict(testing.TINY_LM_TEACHER, max_len=32)
DRAFT = dict(testing.TINY_LM, max_len=32)


def _model(section, seed, scale=1.0):
  """A tiny decoder with host-filled variables, its kernels scaled (sharper, less repetitive
  greedy output than the default init)."""
  model = Transformer(TransformerConfig(**section))
  variables = testing.host_variables(model, seed)
  return model, jax.tree.map(lambda x: x * scale if x.ndim > 1 else x, variables)


def _perturbed(variables, seed, noise):
  """``variables`` plus Gaussian noise: a draft that agrees with its target only sometimes."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + noise * rng.normal(size=x.shape).astype(x.dtype), variables)


def test_greedy_is_the_target_greedy_decoding_token_for_token():
  target, t_vars = _model(TARGET, 0, scale=3.0)
  d_vars = _perturbed(t_vars, 2, 0.02)  # the target perturbed: it disagrees often
  # Mixed lengths, one prompt near the context end (max_len 32: it stops for "context").
  prompts = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12, 13], [4, 4], list(range(20, 45))]
  sampler = generate.Sampler(target, t_vars)
  ref = sampler.generate(prompts, max_new_tokens=13, logprobs=True)
  assert {c.stop_reason for c in ref} == {"length", "context"}
  assert len({tuple(c.token_ids) for c in ref}) == len(prompts)
  stop = ref[0].token_ids[5]  # a stop token some rows meet
  ref_stop = sampler.generate(prompts, max_new_tokens=13, stop_tokens=[stop], logprobs=True)
  assert "stop" in {c.stop_reason for c in ref_stop}
  spec = generate.SpeculativeSampler(target, t_vars, target, d_vars, k=3)
  for want, stops in ((ref, None), (ref_stop, [stop])):
    got, stats = spec.generate(prompts, max_new_tokens=13, stop_tokens=stops, logprobs=True)
    for a, b in zip(want, got):
      assert b.token_ids == a.token_ids and b.stop_reason == a.stop_reason, (a.index, stops)
      np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=1e-4, atol=1e-5)
    assert stats.tokens == sum(len(c.token_ids) for c in want)
    assert 0.1 < stats.acceptance_rate < 0.9  # rows accept different counts
    assert stats.target_forwards < stats.tokens


@pytest.mark.slow
def test_greedy_with_a_repetition_penalty_is_the_target_greedy_decoding():
  # The penalty of each verified position counts the drafts before it as seen.
  target, t_vars = _model(TARGET, 0, scale=3.0)
  d_vars = _perturbed(t_vars, 2, 0.02)
  prompts, params = (
    [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12, 13]],
    SamplingParams(repetition_penalty=1.5),
  )
  want = generate.Sampler(target, t_vars).generate(prompts, max_new_tokens=20, sampling=params)
  spec = generate.SpeculativeSampler(target, t_vars, target, d_vars, k=3)
  got, stats = spec.generate(prompts, max_new_tokens=20, sampling=params)
  assert [c.token_ids for c in got] == [c.token_ids for c in want]
  assert 0 < stats.acceptance_rate < 1


def test_a_draft_equal_to_its_target_is_always_accepted():
  target, t_vars = _model(TARGET, 0, scale=3.0)
  spec = generate.SpeculativeSampler(target, t_vars, target, t_vars, k=4)
  # 16 new tokens: the prefill's token, then three full rounds of 4 + 1.
  _, stats = spec.generate([[1, 2], [3, 4, 5, 6]], max_new_tokens=16)
  assert stats.acceptance_rate == 1.0 and stats.tokens_per_forward == 4.0
  rate = generate.acceptance_rate(target, t_vars, target, t_vars, [[1, 2]], temperature=1.0)
  assert rate == 1.0


def _target_distribution(model, variables, prompt, params, steps):
  """The exact probability of every sequence of ``steps`` tokens after ``prompt`` under the
  model's processed (``sampling.process``) distribution: [V] * steps, float64."""
  from jaxdistill.generate import sampling

  v = model.config.vocab_size
  joint = np.ones([1], np.float64)
  for step in range(steps):
    tails = np.array(list(itertools.product(range(v), repeat=step)), np.int32).reshape(
      v**step, step
    )
    seqs = np.concatenate([np.tile(prompt, (len(tails), 1)), tails], axis=1).astype(np.int32)
    logits = model.apply(variables, seqs)["logits"][:, -1]
    probs = np.asarray(jax.nn.softmax(sampling.process(logits, params)), np.float64)
    joint = (joint[:, None] * probs).reshape(-1)
  return joint.reshape((v,) * steps)


def _chi_square_p(tokens, probs):
  """p-value of the tokens' counts against ``probs`` (cells expecting < 5 pooled)."""
  counts = np.bincount(tokens, minlength=probs.size).astype(np.float64)
  expected = probs.reshape(-1) * len(tokens)
  small = expected < 5
  observed = np.append(counts[~small], counts[small].sum())
  expected = np.append(expected[~small], expected[small].sum())
  if expected[-1] == 0:
    observed, expected = observed[:-1], expected[:-1]
  return scipy_stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


@pytest.mark.parametrize(
  "params",
  [
    SamplingParams(temperature=1.0),
    pytest.param(SamplingParams(temperature=0.8, top_k=6, top_p=0.9), marks=pytest.mark.slow),
  ],
)
def test_sampled_tokens_follow_the_target_distribution(params):
  vocab16 = dict(vocab_size=16, max_len=16)
  target, t_vars = _model(dict(TARGET, **vocab16), 0, scale=2.0)
  draft, d_vars = _model(dict(DRAFT, **vocab16), 1, scale=2.0)
  prompt, n = [3, 1, 4], 4000
  exact = _target_distribution(target, t_vars, prompt, params, 3)
  spec = generate.SpeculativeSampler(target, t_vars, draft, d_vars, k=2)
  got, stats = spec.generate([prompt], max_new_tokens=3, sampling=params, seed=7, num_samples=n)
  seqs = np.array([c.token_ids for c in got])
  assert 0.05 < stats.acceptance_rate < 0.9  # both accepted drafts and residual draws are tested
  v = 16
  # The pair (token 2, token 3) (drafted, then verified) and the whole triple's first two.
  assert _chi_square_p(seqs[:, 1] * v + seqs[:, 2], exact.sum(0)) > 1e-3
  assert _chi_square_p(seqs[:, 0] * v + seqs[:, 1], exact.sum(2)) > 1e-3
  # The test has power: the draft's own distribution is far from the target's.
  drafted = _target_distribution(draft, d_vars, prompt, params, 2)
  assert _chi_square_p(seqs[:, 0] * v + seqs[:, 1], drafted) < 1e-6


def test_pairs_that_cannot_work_are_refused_and_a_short_draft_is_only_slower():
  target, t_vars = _model(TARGET, 0)
  other, o_vars = _model(dict(DRAFT, vocab_size=48), 1)
  with pytest.raises(ValueError, match="vocabulary"):
    generate.SpeculativeSampler(target, t_vars, other, o_vars)
  # A draft with a shorter context drafts past its end (badly): the output stays the target's.
  short, s_vars = _model(dict(DRAFT, max_len=8, pos="learned"), 1)
  spec = generate.SpeculativeSampler(target, t_vars, short, s_vars, k=2)
  with pytest.raises(ValueError, match="the draft's context is 8"):
    spec.generate([list(range(1, 12))])
  want = generate.Sampler(target, t_vars).generate([[1, 2, 3], [5]], max_new_tokens=12)
  got, _ = spec.generate([[1, 2, 3], [5]], max_new_tokens=12)
  assert [c.token_ids for c in got] == [c.token_ids for c in want]
  with pytest.raises(ValueError, match="k"):
    generate.SpeculativeSampler(target, t_vars, target, t_vars, k=0)
