"""The prompts and stop tokens of ``jaxdistill generate``, checked before anything is generated.

  sampling_params(values)                 SamplingParams; a bad value names its --flag
  from_file(path, tokenizer)              (texts, ids) of a prompt file, one prompt a line
  from_data(cfg, n, length, tokenizer)    (texts, ids) cut from a run's validation rows
  check(items, config)                    each prompt fits the model (tokens, max_len, ids)
  stop_ids(stops, tokenizer, vocab_size)  the ids of --stop tokens (default: end-of-text)

A model without a tokenizer (a run on synthetic tokens) reads a prompt line as token ids
separated by spaces. Every mistake is a ``JaxdistillError`` naming the flag, file and line.
"""

import codecs
import itertools
from typing import Any

from jaxdistill import paths
from jaxdistill.errors import JaxdistillError
from jaxdistill.generate.sampling import SamplingParams


def sampling_params(**values) -> SamplingParams:
  """``SamplingParams(**values)``; a bad value is an error naming its flag."""
  try:
    return SamplingParams(**values)
  except ValueError as e:  # "top_p must be in (0, 1], got 2.0": the field comes first
    raise JaxdistillError(f"--{e}") from None


def _encode_line(text: str, tokenizer: Any, where: str) -> list[int]:
  if tokenizer is not None:
    return list(tokenizer.encode(text).ids)
  try:
    return [int(t) for t in text.split()]
  except ValueError:
    raise JaxdistillError(
      f"{where}: the model has no tokenizer (tokenizer.json), so a prompt is token ids "
      f"separated by spaces, got {text[:40]!r}"
    ) from None


def from_file(path: str, tokenizer: Any) -> tuple[list[str], list[list[int]], list[str]]:
  """(texts, ids, where) of the non-blank lines of ``path``; ``where`` names each line."""
  if not paths.isfile(path):
    raise JaxdistillError(f"--prompts {path!r}: no such file (one prompt a line)")
  numbered = [(n, s) for n, s in enumerate(paths.read_text(path).splitlines(), 1) if s.strip()]
  if not numbered:
    raise JaxdistillError(f"--prompts {path!r} holds no prompt (only blank lines)")
  where = [f"--prompts {path} line {n}" for n, _ in numbered]
  ids = [_encode_line(s, tokenizer, w) for (_, s), w in zip(numbered, where)]
  return [s for _, s in numbered], ids, where


def from_data(
  cfg: Any, n: int, length: int, tokenizer: Any
) -> tuple[list[str], list[list[int]], list[str]]:
  """(texts, ids, where) of ``n`` prompts: the first ``length`` tokens of the first document
  of each of the first ``n`` rows of ``cfg``'s validation split."""
  from jaxdistill import data as data_lib

  if data_lib.is_image_model(cfg):
    raise JaxdistillError("--from_data: the run's data are images; pass --prompts FILE")
  out = []
  for batch in data_lib.make_iterator(cfg, "validation"):
    seg_BxT = batch.get("segment_ids")
    for b, row in enumerate(batch["inputs"]):
      keep = row if seg_BxT is None else row[seg_BxT[b] == seg_BxT[b][0]]
      if seg_BxT is not None and seg_BxT[b][0] == 0:
        continue  # an all-padding row
      out.append([int(t) for t in keep[:length]])
    if len(out) >= n:
      break
  if not out:
    raise JaxdistillError("--from_data: the run's validation split has no rows")
  out = list(itertools.islice(out, n))
  texts = [tokenizer.decode(p) if tokenizer is not None else "" for p in out]
  return texts, out, [f"--from_data row {i}" for i in range(len(out))]


def check(ids: list[list[int]], where: list[str], config: Any) -> None:
  """Every prompt has tokens, ids in the vocabulary and fewer than ``config.max_len``."""
  for p, w in zip(ids, where):
    if not p:
      raise JaxdistillError(f"{w}: the prompt has no tokens")
    if len(p) >= config.max_len:
      raise JaxdistillError(
        f"{w}: {len(p)} tokens, but the model's context (max_len) is {config.max_len}; "
        f"shorten it below {config.max_len} tokens (and leave room for --max_new_tokens)"
      )
    if min(p) < 0 or max(p) >= config.vocab_size:
      raise JaxdistillError(f"{w}: token ids outside the vocabulary [0, {config.vocab_size})")


def stop_ids(stops: tuple[str, ...] | None, tokenizer: Any, vocab_size: int) -> tuple[int, ...]:
  """Token ids of ``--stop`` values: an id, a token of the vocabulary, or a string that encodes
  to one token (``\\n`` escapes allowed). None: the tokenizer's end-of-text token (none
  without a tokenizer).

  Raises:
    JaxdistillError: an id outside the vocabulary, or a string that is not one token.
  """
  if stops is None:
    if tokenizer is None:
      return ()
    from jaxdistill.data import tokenizer as tok_lib

    try:
      return (tok_lib.eos_id(tokenizer),)
    except JaxdistillError:
      return ()
  out = []
  for s in stops:
    if s.strip().isdigit():
      if int(s) >= vocab_size:
        raise JaxdistillError(f"--stop {s}: not a token id of the vocabulary [0, {vocab_size})")
      out.append(int(s))
      continue
    if tokenizer is None:
      raise JaxdistillError(f"--stop {s!r}: the model has no tokenizer; give token ids")
    text = codecs.decode(s, "unicode_escape") if "\\" in s else s
    found = tokenizer.token_to_id(text)
    if found is None:
      enc = tokenizer.encode(text, add_special_tokens=False).ids
      if len(enc) != 1:
        raise JaxdistillError(
          f"--stop {s!r} is not a single token of the vocabulary (it encodes to {len(enc)} "
          "tokens); give one token or its id"
        )
      found = enc[0]
    out.append(int(found))
  return tuple(dict.fromkeys(out))
