"""Defaults of the config's larger sections (``default_config`` assembles them)."""

import ml_collections

C = ml_collections.ConfigDict


def data_section() -> ml_collections.ConfigDict:
  """``data``: where training and evaluation batches come from, and their shape."""
  # source: synthetic | stdlib (the built-in corpus) | tfds | array_record | text | task; see
  # jaxdistill/data/sources.py. pad_fraction, branching: synthetic only. tokenizer: a
  # tokenizer.json, or "" to train a byte-level BPE of student.vocab_size on the train split.
  # packing: pack (concatenate documents, split at seq_len, segment ids) | pad (one piece a row).
  return C(
    dict(
      source="synthetic",
      batch_size=8,
      seq_len=64,
      pad_fraction=0.25,
      branching=4,
      tfds_name="",  # tfds: "name[/config][:version]" or a prepared dataset's directory
      tfds_data_dir="",  # tfds: where it was prepared ("" = TFDS's default)
      train_split="train",  # tfds split names
      eval_split="validation",
      train_files="",  # array_record / text: comma-separated globs (.txt, .jsonl)
      eval_files="",
      text_key="text",  # the text feature (tfds) / JSON key (jsonl)
      tokenizer="",
      packing="pack",
      # Training rows shuffled within windows of this many (0/1 = off). Long documents give
      # many consecutive rows: a window too small for them makes batches of few documents,
      # and a model trained on them ends worse (measured: BENCHMARKS.md, "The shuffle window").
      shuffle_rows=1024,
      # Long documents: N > 1 packs rows from N document streams (each every N-th document of
      # the shuffled order) taken in turn, so consecutive rows come from N documents before
      # the window shuffle and a batch mixes many files at a small window. It does not make
      # a run far shorter than an epoch cover more files (measured: BENCHMARKS.md, "Long
      # documents"). 0 / 1 = one stream (the pipeline as before).
      interleave=0,
      stdlib_max_files=0,  # built-in corpus subset for tests (0 = every file)
      stdlib_max_file_bytes=0,
      stdlib_root="",  # "" = this interpreter's standard library
      stdlib_kind="all",  # all | code | docstrings (English prose only)
      # source task (jaxdistill/data/task_data.py): a built-in task with checkable answers,
      # one prompt + completion a row, loss on the completion only. task_train_files: its
      # training pairs from .jsonl / ArrayRecord files (e.g. teacher-written) instead of the
      # reference solutions (with a text corpus as source: the training rows instead of the
      # corpus, e.g. a teacher's continuations of its prompts; validation stays the corpus's);
      # task_eval_problems: held-out problems evaluated.
      task="arithmetic",
      task_seed=0,
      task_train_files="",
      task_eval_problems=256,
      # Images (an image model: student.arch != transformer). source digits: the built-in
      # 5,000 real MNIST digits; tfds: data.tfds_name with image_key / label_key. Pixels
      # are scaled to [0, 1], then (x - image_mean) / image_std (one value or one per
      # channel, comma-separated). Training augmentation on the host, deterministic per
      # (seed, example, epoch): random crop after zero-padding by crop_padding, horizontal
      # flip, mixup / cutmix with Beta(alpha, alpha) (0 = off).
      image_key="image",
      label_key="label",
      image_mean="0.5",
      image_std="0.5",
      crop_padding=0,
      flip=False,
      mixup=0.0,
      cutmix=0.0,
      num_threads=2,  # grain threads reading and tokenising documents
      prefetch=2,  # batches prepared ahead in a background thread (0 = none)
    )
  )


def precompute_section() -> ml_collections.ConfigDict:
  """``precompute``: ``jaxdistill precompute``'s sparse targets and teacher-written sets."""
  # `jaxdistill precompute` (jaxdistill/precompute/text.py): sparse teacher targets per token.
  # targets: topk | sampled | both; k: top-k size (also the online k of distill.logit.kind
  # topk_*); samples: draws per token; temperature: generation temperature (0 =
  # distill.temperature); logprob_dtype: bf16 | f16 | f32; rows: rows to precompute (0 = the
  # whole training split; synthetic: optim.steps x data.batch_size); rows_per_shard: per shard.
  # An image model stores whole raw class logits per example in logprob_dtype (f32 exact;
  # targets / k / samples unused, temperature and rows must be 0): precompute_images.py.
  # A teacher-written set's top-k log-probs and tails (generate.topk) are stored in it too.
  section = C(
    dict(
      targets="topk",
      k=32,
      samples=16,
      temperature=0.0,
      logprob_dtype="bf16",
      rows=0,
      rows_per_shard=1024,
    )
  )
  # `jaxdistill precompute --generate` (jaxdistill/precompute/generated.py): the teacher writes
  # `samples` completions of each of `prompts` prompts. prompts_from: file (prompts_file, one a
  # line), task (the first training problems of data.task), data (the first prompt_tokens
  # tokens of the first training rows of data.source, a corpus: the teacher continues them)
  # or auto (file when prompts_file is set, else task). Sampling at temperature / top_k / top_p
  # up to max_new_tokens;
  # filters drop unfinished ones (require_stop), those outside [min_tokens, max_tokens]
  # (0 = no bound), duplicates (dedup: none | exact | near) and those the verifier
  # ("module:function" of (prompt, completion) -> keep) rejects. topk > 0 also stores the
  # teacher's top-k ids and log-probs (at precompute.temperature, or distill.temperature if 0)
  # at every completion token, for token-level KD on the set (teacher.source='cache').
  section.generate = C(
    dict(
      prompts=256,
      prompts_from="auto",
      prompts_file="",
      prompt_tokens=16,
      samples=4,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      max_new_tokens=64,
      min_tokens=1,
      max_tokens=0,
      require_stop=True,
      dedup="near",
      verifier="",
      prompts_per_shard=256,
      batch_size=64,
      topk=0,
    )
  )
  return section


def codistill_section() -> ml_collections.ConfigDict:
  """``codistill``: models trained together, each teaching the others (train/codistill.py)."""
  # peers: further models trained beside the student (model 0), a tuple of dicts of student
  # keys that differ (d_model, num_layers, ...) plus "lr" (0 = optim.lr); empty = off. Each
  # model's loss: its CE + weight x temperature^2 x the mean KL from each other model's
  # predictions (stop-gradient). exchange_every: 1 = mutual learning (the others' current
  # params, Zhang et al. 2018); N > 1 = codistillation (Anil et al. 2018): the others are
  # read from copies refreshed every N steps inside the step. split_data: model k trains on
  # its own share of each batch's rows (rows k, k + M, ...) instead of the whole batch.
  return C(dict(peers=(), weight=1.0, temperature=1.0, exchange_every=1, split_data=False))


def continual_section() -> ml_collections.ConfigDict:
  """``continual``: continual distillation over a drifting stream (off by default)."""
  # jaxdistill/data/continual.py and train/continual.py. domains: D > 0 turns it on: the
  # training documents in their order (the built-in corpus: sorted by file path, so a domain
  # is a group of neighbouring modules) cut into D contiguous domains, packed, each domain's
  # rows shuffled within it, and streamed domain after domain, once. window_steps: the stream
  # is cut into windows of this many steps (plus eval_rows held-out rows each, never trained
  # on); at each window's end every window seen so far is evaluated (eval/window_<k>/loss).
  # refresh_every: every N steps the teacher is the loaded one fine-tuned for teacher_steps
  # CE steps (teacher_lr, constant) on the most recent window_steps of streamed rows (0 =
  # never: the teacher stays as loaded). teacher_dir: instead of fine-tuning, each refresh picks
  # up the teacher checkpoint of this directory named by the largest step <= the current one
  # (DIR/<step>/: a run's workdir or its final_params; none yet: the loaded teacher).
  # snapshot_weight: weight of a KL term to the
  # student's own snapshot taken at the start of each window (learning without forgetting;
  # 0 = no snapshot), at distill.temperature.
  return C(
    dict(
      domains=0,
      window_steps=8,
      eval_rows=16,
      refresh_every=0,
      teacher_steps=4,
      teacher_lr=1e-3,
      teacher_dir="",
      snapshot_weight=0.0,
    )
  )
