"""Sentence embeddings: ``jaxdistill embed --model DIR --input FILE --output F.npy``.

Each of the three may be local or remote (``gs://...``, read and written through ``paths``).

``DIR`` is a Hugging Face encoder directory (config.json with model_type "bert", safetensors,
tokenizer.json; e.g. all-MiniLM-L6-v2 or a jaxdistill export) or the workdir of a finished
``jaxdistill train`` run whose student is an encoder (config.json, final_params/,
tokenizer.json). Sentences are
tokenized with the model's tokenizer.json (no padding, truncated to sentence-transformers'
``max_seq_length`` when declared, by the model or, for a workdir, by the Hugging Face
teacher it was distilled from; else the model's max_len), batched, padded to a bucketed
length (few compilations), and pooled as the encoder does (``models/bert.py``): mean over valid
tokens, L2-normalised. The output is float32 [n, D], row i for line i of the input.
"""

import json
import os
import tempfile

import jax
import numpy as np
import tokenizers

from jaxdistill import models, paths
from jaxdistill.errors import JaxdistillError
from jaxdistill.models import hf

# Padded lengths are rounded up to a multiple of this: one compilation per bucket, not per batch.
LENGTH_BUCKET = 32


def _load(path: str):
  """(HFModel, params) of an HF directory or a finished run's workdir (final_params/)."""
  from jaxdistill.train import checkpoint
  from jaxdistill.train import workdir as workdir_lib

  if not paths.isdir(path):
    raise JaxdistillError(f"--model {path!r} is not a directory")
  if paths.isdir(paths.join(path, checkpoint.FINAL_PARAMS)):
    return workdir_lib.load_workdir(path)
  if not paths.isfile(paths.join(path, "config.json")):
    raise JaxdistillError(
      f"--model {path!r} is neither a Hugging Face model directory (config.json) nor the "
      f"workdir of a finished run ({checkpoint.FINAL_PARAMS}/)"
    )
  if paths.is_remote(path):  # safetensors memory-maps local files: fetch the directory once
    local = tempfile.mkdtemp(prefix="jaxdistill-model-")
    paths.copytree(path, local)
    path = local
  return hf.load(path)


def _sentence_config_dirs(model_dir: str) -> list[str]:
  """Where a sentence_bert_config.json may be: the model's dir, then for a run's workdir the
  Hugging Face teacher it was distilled from (teacher.source='hf': same tokenizer)."""
  dirs = [model_dir]
  try:
    teacher = json.loads(paths.read_text(paths.join(model_dir, "config.json"))).get("teacher", {})
  except (OSError, ValueError, AttributeError):  # no file, not JSON, not an object
    return dirs
  if isinstance(teacher, dict) and teacher.get("source") == "hf" and teacher.get("path"):
    dirs.append(teacher["path"])
  return dirs


def max_seq_length(model_dir: str, max_len: int) -> int:
  """The tokens per sentence sentence-transformers keeps for this model.

  That is ``max_seq_length`` of the model's sentence_bert_config.json (256 for
  all-MiniLM-L6-v2, whose tokenizer.json alone says 128), also for a run's workdir
  distilled from such a model (its teacher's file), capped at the model's position limit.

  Args:
    model_dir: an HF model directory or a finished run's workdir.
    max_len: the model's position limit.
  Returns:
    The truncation length: ``max_len`` when no file declares one.
  """
  for directory in _sentence_config_dirs(model_dir):
    path = paths.join(directory, "sentence_bert_config.json")
    if not paths.isfile(path):
      continue
    try:
      declared = json.loads(paths.read_text(path)).get("max_seq_length") or max_len
      return min(max_len, int(declared))
    except (ValueError, TypeError, AttributeError) as e:
      raise JaxdistillError(f"{path!r} is not a valid sentence_bert_config.json: {e}") from None
  return max_len


def load_tokenizer(model_dir: str, max_len: int) -> tokenizers.Tokenizer:
  """The model's tokenizer.json, unpadded, truncated to ``max_seq_length(model_dir, max_len)``.

  Args:
    model_dir: an HF model directory or a finished run's workdir.
    max_len: the model's position limit (cap on the truncation length).
  """
  path = paths.join(model_dir, "tokenizer.json")
  if not paths.isfile(path):
    raise JaxdistillError(f"no tokenizer.json in {model_dir!r}")
  tok = tokenizers.Tokenizer.from_str(paths.read_text(path))  # the library opens local files
  tok.no_padding()
  # Overrides the truncation tokenizer.json may carry (128 in all-MiniLM-L6-v2's).
  tok.enable_truncation(max_seq_length(model_dir, max_len))
  return tok


def encode(tok: tokenizers.Tokenizer, texts: list[str], bucket: int = LENGTH_BUCKET, cap: int = 0):
  """Token ids and validity of ``texts``, right-padded to a bucketed length.

  Args:
    tok: from ``load_tokenizer``.
    texts: the sentences.
    bucket: the padded length is a multiple of it (capped at ``cap`` when > 0).
    cap: the model's max_len (0: no cap).
  Returns:
    (tokens_BxT int32, valid_BxT int32: 1 for real tokens, 0 for padding).
  """
  ids = [e.ids for e in tok.encode_batch(texts)]
  longest = max(len(x) for x in ids)
  t = -(-longest // bucket) * bucket
  t = min(t, cap) if cap else t
  tokens_BxT = np.zeros((len(ids), t), np.int32)
  valid_BxT = np.zeros((len(ids), t), np.int32)
  for i, x in enumerate(ids):
    tokens_BxT[i, : len(x)] = x
    valid_BxT[i, : len(x)] = 1
  return tokens_BxT, valid_BxT


class Embedder:
  """A loaded encoder: ``Embedder(dir)(texts) -> [n, D] float32``."""

  def __init__(self, model_dir: str):
    if paths.isfile(paths.join(model_dir, "config.json")) and not paths.isdir(
      paths.join(model_dir, "final_params")
    ):
      found = hf.read_config(model_dir)  # before loading any weight
      if not found.is_encoder:
        raise JaxdistillError(
          f"{model_dir!r} holds a {found.model_type} decoder; embed needs an encoder (bert)"
        )
    self.hfm, self.params = _load(model_dir)
    if not self.hfm.is_encoder:
      raise JaxdistillError(f"{model_dir!r} holds a decoder; embed needs an encoder")
    self.tokenizer = load_tokenizer(model_dir, self.hfm.config.max_len)
    module = self.hfm.module()
    self._apply = jax.jit(
      lambda p, tokens, valid: models.apply(
        module, {"params": p}, {"inputs": tokens, "segment_ids": valid}
      )["embedding"]
    )

  def __call__(self, texts: list[str], batch_size: int = 64, progress: bool = False):
    """Embeddings of ``texts`` in order: float32 [n, D] (rows L2-normalised).

    Args:
      texts: sentences.
      batch_size: sentences per forward pass.
      progress: show a progress bar on stderr.
    """
    from jaxdistill import progress as progress_lib

    out = []
    bar = progress_lib.bar(len(texts), unit="sent", show=progress)
    for start in range(0, len(texts), batch_size):
      chunk = texts[start : start + batch_size]
      tokens_BxT, valid_BxT = encode(self.tokenizer, chunk, cap=self.hfm.config.max_len)
      out.append(np.asarray(self._apply(self.params, tokens_BxT, valid_BxT), np.float32))
      bar.update(len(chunk))
    bar.close()
    return np.concatenate(out) if out else np.zeros((0, self.hfm.config.d_model), np.float32)


def read_lines(path: str) -> list[str]:
  """One sentence per line (no trailing newline row); errors name the file."""
  if not paths.isfile(path):
    raise JaxdistillError(f"--input {path!r} does not exist")
  try:
    lines = paths.read_text(path).splitlines()
  except UnicodeDecodeError as e:
    raise JaxdistillError(f"--input {path!r} is not UTF-8 text: {e}") from None
  if not lines:
    raise JaxdistillError(f"--input {path!r} is empty; put one sentence per line")
  return lines


def run(model: str, input_path: str, output: str, batch_size: int = 64) -> np.ndarray:
  """The ``embed`` command: embeds ``input_path``'s lines into ``output`` (.npy).

  Returns:
    The float32 [n, D] array written.
  """
  if not output.endswith(".npy"):
    raise JaxdistillError(f"--output {output!r} must end in .npy")
  parent = os.path.dirname(os.path.abspath(output))
  # An object store has no directories to check: a gs:// output's "directory" is its prefix.
  if not paths.is_remote(output) and not os.path.isdir(parent):
    raise JaxdistillError(f"--output directory {parent!r} does not exist")
  if batch_size <= 0:
    raise JaxdistillError(f"--batch_size must be > 0, got {batch_size}")
  texts = read_lines(input_path)
  emb_NxD = Embedder(model)(texts, batch_size=batch_size, progress=True)
  with paths.path(output).open("wb") as f:
    np.save(f, emb_NxD)
  return emb_NxD
