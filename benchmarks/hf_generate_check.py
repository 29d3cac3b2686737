"""An exported student gives the same greedy tokens in jaxdistill and in `transformers`.

  python benchmarks/hf_generate_check.py [--hf_venv PATH] [--new_tokens 12] [--output PATH]

Builds a small random Llama (GQA, untied head) and a GPT-2-shaped student (layernorm, learned
positions, gelu, biases, tied), exports each with ``models.hf_export.export``, decodes the same
mixed prompts greedily with ``generate.Sampler`` and with ``transformers`` ``generate``
(PyTorch) in a scratch venv (``--hf_venv``, created with pip when missing: torch and
transformers are never jaxdistill dependencies), and compares the tokens. Prints the result,
writes JSON; exit 1 on a mismatch.

The same file is the worker that runs inside the scratch venv (``--worker SPEC``: only the
standard library, numpy, torch and transformers are imported there); ``benchmarks/decode.py``
uses it to time ``transformers``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ("torch", "transformers", "safetensors", "numpy")


def ensure_venv(path: str) -> str:
  """The python of the scratch venv at ``path`` (created, with torch + transformers, if missing)."""
  python = os.path.join(path, "bin", "python")
  if not os.path.exists(python):
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *PACKAGES], check=True)
  return python


def run_worker(python: str, spec: dict, timeout: int = 3600) -> dict:
  """Runs ``spec`` in the scratch venv's ``python``; returns the worker's JSON."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "spec.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump(spec, f)
    out = subprocess.run(
      [python, os.path.abspath(__file__), "--worker", path],
      capture_output=True,
      text=True,
      timeout=timeout,
    )
    if out.returncode:
      raise RuntimeError(f"transformers worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker(spec_path: str) -> None:
  """In the scratch venv: greedy ``generate`` of spec's prompts; prints JSON (tokens, timing)."""
  import numpy as np
  import torch
  from transformers import AutoModelForCausalLM

  with open(spec_path, encoding="utf-8") as f:
    spec = json.load(f)
  torch.set_num_threads(spec.get("threads") or os.cpu_count())
  model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], torch_dtype=torch.float32)
  model.eval()
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  n = spec["new_tokens"]
  result = {"rows": []}
  for prompts in spec["batches"]:  # each: one batch of equal-length prompts
    ids = torch.tensor(np.asarray(prompts, np.int64))
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
      row = {"ttft_s": float("inf"), "total_s": float("inf")}
      if spec.get("time"):
        model.generate(ids[:, :8], max_new_tokens=2, min_new_tokens=2, **kw)  # warm up
      # The 1-token call (time to first token) and the N-token call interleaved, the fastest
      # of three each: on a shared CPU a single timing of either can land in someone else's
      # burst, and their difference (the decode time) then comes out too small or negative.
      for _ in range(3 if spec.get("time") else 1):
        if spec.get("time"):
          start = time.perf_counter()
          model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
          row["ttft_s"] = min(row["ttft_s"], time.perf_counter() - start)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        row["total_s"] = min(row["total_s"], time.perf_counter() - start)
      if not spec.get("time"):
        del row["ttft_s"]
      row["tokens"] = out[:, ids.shape[1] :].tolist()
      if spec.get("time"):
        decode_s = row["total_s"] - row["ttft_s"]
        row["decode_tok_s"] = ids.shape[0] * (n - 1) / decode_s if decode_s > 0 else None
    result["rows"].append(row)
  result["torch"], result["threads"] = torch.__version__, torch.get_num_threads()
  import transformers

  result["transformers"] = transformers.__version__
  print(json.dumps(result))


FAMILIES = {
  "llama_gqa": dict(num_heads=4, num_kv_heads=2, tie_embeddings=False),
  "gpt2": dict(norm="layernorm", pos="learned", activation="gelu", bias="all"),
}


def check(python: str, new_tokens: int) -> dict:
  import jax
  import numpy as np

  sys.path.insert(0, os.path.join(HERE, ".."))
  from jaxdistill.generate import Sampler
  from jaxdistill.models import hf_export
  from jaxdistill.models.transformer import Transformer, TransformerConfig

  sys.path.insert(0, HERE)
  from decode import random_variables

  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 256, 9).tolist(), rng.integers(0, 256, 9).tolist()]
  out = {}
  for name, kw in FAMILIES.items():
    base = dict(vocab_size=256, d_model=64, num_layers=2, num_heads=4, d_ff=128, max_len=64)
    cfg = TransformerConfig(**{**base, **kw})
    model = Transformer(cfg)
    variables = random_variables(model, seed=1)
    ours = [
      c.token_ids for c in Sampler(model, variables).generate(prompts, max_new_tokens=new_tokens)
    ]
    with tempfile.TemporaryDirectory() as tmp:
      hf_export.export(jax.device_get(variables["params"]), hf_export.hf_model_for(cfg), tmp)
      theirs = run_worker(
        python, {"model_dir": tmp, "new_tokens": new_tokens, "batches": [prompts]}
      )
    theirs_tokens = theirs["rows"][0]["tokens"]
    out[name] = {"same": ours == theirs_tokens, "ours": ours, "transformers": theirs_tokens}
    out["versions"] = {"torch": theirs["torch"], "transformers": theirs["transformers"]}
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hf_venv", default=os.path.join(tempfile.gettempdir(), "hfvenv"))
  parser.add_argument("--new_tokens", type=int, default=12)
  parser.add_argument(
    "--output", default=os.path.join(tempfile.gettempdir(), "hf_generate_check.json")
  )
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    worker(args.worker)
    return {}
  result = check(ensure_venv(args.hf_venv), args.new_tokens)
  for name in FAMILIES:
    r = result[name]
    print(f"{name}: {'same greedy tokens' if r['same'] else 'MISMATCH'}")
    print(f"  jaxdistill:   {r['ours']}\n  transformers: {r['transformers']}")
  print(f"torch {result['versions']['torch']}, transformers {result['versions']['transformers']}")
  with open(args.output, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.output}")
  if not all(result[n]["same"] for n in FAMILIES):
    sys.exit(1)
  return result


if __name__ == "__main__":
  main()
