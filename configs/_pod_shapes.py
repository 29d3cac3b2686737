"""Real model shapes for pod preflight (``jaxdistill compile``): described, never trained here.

Shared by ``configs/llama70b_to_8b.py``, ``configs/llama8b_to_1b.py`` and
``configs/qwen7b_to_05b.py``: the published architectures (Hugging Face config.json values) of
Llama-3.1-70B / 8B, Llama-3.2-1B and Qwen2.5-7B / 0.5B as jaxdistill model keys, and the run
settings of a pod-scale logit-KD job (bf16 compute, float32 master params for the student,
bf16 for the frozen teacher, the fused vocabulary head, FSDP over every chip, scanned blocks
with full remat). A random teacher stands in for the real one: its shapes are what a compile
needs; to train, set ``teacher.source='hf'`` and ``teacher.path`` to the downloaded model.
"""

from jaxdistill.config import default_config

LLAMA_VOCAB = 128256

MODELS = {
  "llama3.1-70b": dict(
    vocab_size=LLAMA_VOCAB, d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8,
    d_ff=28672, tie_embeddings=False,
  ),
  "llama3.1-8b": dict(
    vocab_size=LLAMA_VOCAB, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
    d_ff=14336, tie_embeddings=False,
  ),
  "llama3.2-1b": dict(
    vocab_size=LLAMA_VOCAB, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8,
    d_ff=8192, tie_embeddings=True,
  ),
  # Qwen2.5's 7B and 0.5B pad their vocabularies differently (152064 vs 151936 rows over the
  # same 151,665 tokens): KD needs one vocabulary, so both use the teacher's row count here.
  "qwen2.5-7b": dict(
    vocab_size=152064, d_model=3584, num_layers=28, num_heads=28, num_kv_heads=4,
    d_ff=18944, tie_embeddings=False, bias="qkv",
  ),
  "qwen2.5-0.5b": dict(
    vocab_size=152064, d_model=896, num_layers=24, num_heads=14, num_kv_heads=2,
    d_ff=4864, tie_embeddings=True, bias="qkv",
  ),
}  # fmt: skip


def pod_config(teacher: str, student: str, seq_len: int, batch_size: int):
  """A logit-KD run of ``student`` from ``teacher`` (keys of ``MODELS``) at pod scale.

  Args:
    teacher, student: model names.
    seq_len: tokens per row (max_len too).
    batch_size: rows per step (one per chip is the usual start: override it with the slice).
  """
  cfg = default_config()
  cfg.student.update(MODELS[student], max_len=seq_len, policy="p=f32,c=bf16,o=f32")
  cfg.teacher.update(
    MODELS[teacher], source="random", max_len=seq_len, policy="p=bf16,c=bf16,o=f32", rules="fsdp"
  )
  for side in (cfg.student, cfg.teacher):
    if "scan_layers" in side:  # scanned blocks compile in seconds at any depth
      side.scan_layers = True
    if "remat" in side:
      side.remat = "full"
  cfg.distill.update(temperature=1.0, fused=True)
  cfg.distill.logit.update(kind="kl", weight=1.0)
  cfg.data.update(source="synthetic", batch_size=batch_size, seq_len=seq_len)
  cfg.mesh.update(data=1, fsdp=-1, tensor=1)
  cfg.optim.update(steps=1000, lr=1e-4, warmup_steps=100)
  return cfg
