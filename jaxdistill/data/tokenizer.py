"""Tokenizers: load a ``tokenizer.json`` or train a byte-level BPE on the training split.

A trained tokenizer is saved, so every run on the same data and vocabulary
size uses the exact same one: under the cache directory
(``CACHE/tokenizers/<key>.json``, keyed by the corpus fingerprint and the
vocabulary size) and, per run, as ``WORKDIR/tokenizer.json`` (what a later run
or a teacher-logit cache points ``data.tokenizer`` at).

Every document ends with ``<|endoftext|>`` (id 0), so a model learns where
documents stop; padding needs no token (its weight and segment id are 0).
"""

import hashlib
import os
from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxdistill import paths
from jaxdistill.errors import ConfigError, JaxdistillError

EOS = "<|endoftext|>"
# Bump when the training recipe changes: cached tokenizers are keyed by it.
RECIPE = "bytelevel-bpe-v1"
# Training reads at most this much text; BPE merges settle long before that.
MAX_TRAIN_BYTES = 200 << 20


def train_bpe(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE with ``vocab_size`` tokens (EOS is id 0).

  Args:
    texts: the training documents (read up to ``MAX_TRAIN_BYTES``).
    vocab_size: the exact vocabulary size wanted (>= 257: 256 bytes + EOS).

  Raises:
    JaxdistillError: the text is too small to learn that many tokens.
  """
  if vocab_size < 257:
    raise ConfigError(
      "student.vocab_size",
      f"is {vocab_size}; a byte-level BPE needs at least 257 (256 bytes + EOS)",
    )
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[EOS],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )

  def capped():
    seen = 0
    for text in texts:
      yield text
      seen += len(text)
      if seen >= MAX_TRAIN_BYTES:
        return

  tok.train_from_iterator(capped(), trainer)
  if tok.get_vocab_size() != vocab_size:
    raise ConfigError(
      "student.vocab_size",
      f"the training split only supports a {tok.get_vocab_size()}-token BPE, not "
      f"{vocab_size}; lower the vocabulary size or use more data",
    )
  return tok


def load(path: str) -> tokenizers.Tokenizer:
  """Loads a ``tokenizer.json`` (Hugging Face tokenizers format), local or remote (a run's
  own in a ``gs://`` workdir: read as text, the library opens local files only)."""
  if not paths.isfile(path):
    raise ConfigError(
      "data.tokenizer", f"no such file {path!r}; point it at a tokenizer.json or leave it empty"
    )
  try:
    tok = tokenizers.Tokenizer.from_str(paths.read_text(path))
  except Exception as e:  # the library raises plain Exceptions for bad files
    raise ConfigError("data.tokenizer", f"{path!r} is not a tokenizer.json: {e}") from None
  # Hugging Face model tokenizers often pad / truncate every text to a fixed length; here
  # documents are split and packed by the pipeline, so both would corrupt the rows.
  tok.no_padding()
  tok.no_truncation()
  return tok


def digest(tok: tokenizers.Tokenizer) -> str:
  """sha256 (hex, 16 chars) of the tokenizer's serialized form: equal hash, same tokens."""
  return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]


def eos_id(tok: tokenizers.Tokenizer) -> int:
  """The id appended after every document (``<|endoftext|>``, else ``</s>``, ``<eos>``, or a
  BERT WordPiece tokenizer's ``[SEP]``)."""
  for name in (EOS, "</s>", "<eos>", "[SEP]"):
    token_id = tok.token_to_id(name)
    if token_id is not None:
      return token_id
  raise JaxdistillError(
    f"the tokenizer has no end-of-document token ({EOS} or </s>); add one as a special token"
  )


def check_vocab(tok: tokenizers.Tokenizer, cfg, where: str) -> None:
  """The models' vocabulary must be the tokenizer's (ids must index the embedding).

  Args:
    tok: the tokenizer.
    cfg: the config (``student``, ``teacher``).
    where: the tokenizer's path, for the message.
  """
  size = tok.get_vocab_size()
  sides = ["student"] + (["teacher"] if cfg.teacher.source not in ("none",) else [])
  for side in sides:
    if cfg[side].vocab_size != size:
      raise ConfigError(
        f"{side}.vocab_size",
        f"is {cfg[side].vocab_size} but the tokenizer {where} has {size} tokens; "
        f"set {side}.vocab_size={size} or use a tokenizer of that size",
      )


def save_atomic(tok: tokenizers.Tokenizer, path: str) -> None:
  """Writes ``path`` via a temporary file, so readers never see half a tokenizer."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  tok.save(tmp)
  os.replace(tmp, path)


def cached_bpe(cache: str, corpus_key: str, vocab_size: int, texts) -> tuple:
  """The BPE for (corpus, vocab size): trained once, then loaded from the cache.

  Args:
    cache: the cache directory.
    corpus_key: a fingerprint of the training split's contents.
    vocab_size: the vocabulary size.
    texts: a zero-argument callable giving the training documents (only called to train).

  Returns:
    (tokenizer, path of the cached tokenizer.json).
  """
  key = hashlib.sha256(f"{RECIPE}:{corpus_key}:{vocab_size}".encode()).hexdigest()[:16]
  path = os.path.join(cache, "tokenizers", f"{key}.json")
  if os.path.isfile(path):
    return load(path), path
  tok = train_bpe(texts(), vocab_size)
  save_atomic(tok, path)
  return tok, path
