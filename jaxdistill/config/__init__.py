"""Configs: Python files returning an ``ml_collections.ConfigDict``.

A config file defines ``get_config()`` which starts from ``default_config()``
and changes what it needs. The sections are fixed; every key exists in
``default_config()`` so a typo is an error, not a silently ignored setting:

  seed      top-level int: init and data seed
  cache_dir top-level str: built corpora, tokenizers, cached teachers
  student   the trained model (shape, ``policy``)
  teacher   the teacher: ``source`` none | random | pretrain | workdir | hf | cache | ema
  teachers  further teachers (a tuple of ``teacher_fields`` dicts): an ensemble
  distill   the losses (logit, ce, attention, hidden, ...), each with a weight and a
            schedule; the fused head, on-policy, per-token strength (``adaptive``)
  optim     AdamW, warmup + cosine, clipping, ``steps``, ``grad_accum``
  data      source (synthetic, built-in stdlib corpus, tfds, files), tokenizer, packing, shape
  mesh      ``data`` / ``fsdp`` / ``tensor`` sizes, -1 = the rest
  ckpt      checkpointing
  eval      evaluation
  log       ``every`` (steps between metric lines), ``progress`` bar, ``tensorboard``
  precompute  sparse teacher targets written by ``jaxdistill precompute``

A config is named on the command line by its file (``--config configs/smoke.py``), or by the
name of one the package ships from ``configs/`` (``--config smoke``; ``--config
quickstart:distill,test`` calls ``get_config("distill,test")``): ``files.resolve``.

Overrides come from the command line as ``--config.distill.temperature=2.0`` (``overrides``).
The further teachers are a tuple of dicts, so one key of one of them is named by its index:
``--config.teachers[0].weight=2.0`` sets ``weight`` of ``teachers[0]`` (teacher 1; ``teacher``
is teacher 0), any ``teacher_fields`` key likewise. An index past the last teacher, or a key
no teacher has, is a one-line error. (Quote the argument in shells that expand brackets.)
"""

from typing import Sequence

import ml_collections

from jaxdistill.config.files import config_module, configs_dir, names, resolve
from jaxdistill.config.overrides import apply_override, parse_value
from jaxdistill.errors import ConfigError

__all__ = ["apply_override", "config_module", "configs_dir", "names", "parse_value", "resolve"]
__all__ += ["default_config", "load_config", "teacher_fields", "teachers_of", "SECTIONS"]

SECTIONS = ("student", "teacher", "distill", "optim", "data", "mesh", "ckpt", "eval", "log")
SECTIONS += ("precompute",)


def _model_fields(**overrides) -> dict:
  fields = dict(
    vocab_size=256,
    d_model=64,
    num_layers=2,
    num_heads=4,
    d_ff=256,
    max_len=128,
    norm="rmsnorm",
    pos="rope",
    tie_embeddings=True,
    activation="swiglu",
    # Hugging Face architectures (jaxdistill/models/hf.py): grouped-query attention (0 = off),
    # projection biases (none | qkv | all), norm epsilon, a BERT-style encoder.
    num_kv_heads=0,
    bias="none",
    norm_eps=1e-6,
    encoder=False,
    type_vocab_size=0,
    # Per-head width (0 = d_model // num_heads); set when heads * head_size != d_model, as a
    # head-pruned model (jaxdistill/models/prune.py) has.
    head_size=0,
    # Large runs (docs/configs.md): scan_layers runs the decoder's blocks under nn.scan, params
    # stacked in one "blocks" subtree (one block compiled instead of num_layers; saved params
    # of either layout load into either: models/scan.py); remat recomputes each block's
    # activations in the backward pass: none | full (keep only its input) | dots (keep the
    # weight matmuls' outputs). Neither changes the numbers.
    scan_layers=False,
    remat="none",
    # Image classifiers (jaxdistill/models/cnn.py, resnet.py): arch picks the model; the
    # transformer keys above are then unused. cnn: conv3x3 + ReLU + maxpool2 stages of
    # cnn_channels, then fc cnn_fc, then fc num_classes. resnet: CIFAR ResNet-depth (6n+2:
    # 20, 32, 56); wrn: WRN-depth-widen (6n+4: 16, 28, 40). Inputs [B, image_size,
    # image_size, image_channels].
    arch="transformer",  # transformer | cnn | resnet | wrn
    num_classes=10,
    image_size=32,
    image_channels=3,
    cnn_channels="32,64",
    cnn_fc=512,
    depth=20,
    widen=1,
    policy="p=f32,c=f32,o=f32",
  )
  fields.update(overrides)
  return fields


def teacher_fields(**overrides) -> dict:
  """One teacher's keys with their defaults: the ``teacher`` section, and each entry of
  ``teachers`` (``cfg.teachers = (config.teacher_fields(source="workdir", path=...),)``)."""
  fields = _model_fields(d_model=128, num_layers=4, d_ff=512, policy="p=f32,c=f32,o=f32")
  fields.update(
    # none: CE alone (how teachers are made); random: random init (tests); pretrain: trained
    # in-process on CE for `pretrain_steps` first; workdir: an earlier run's final params at
    # `path`; hf: a Hugging Face model directory at `path`; cache: `jaxdistill precompute`'s
    # targets at `path`; ema: the student on a moving average of its params (train/ema.py):
    # decay ema_decay * min(1, step / ema_warmup_steps), teacher model keys = the student's.
    source="random",
    path="",
    pretrain_steps=0,
    pretrain_lr=3e-3,
    # c=fp8 teachers: batches (of a fresh training iterator) calibrating static FP8 scales.
    fp8_calibration_batches=8,
    # Where the teacher's params live (jaxdistill/parallel/placement.py): a preset student (the
    # student's rules) | tensor | fsdp | replicated, then optional overrides "name=axes".
    rules="student",
    weight=1.0,  # its share of an ensemble (several teachers; weights normalised to sum 1)
    ema_decay=0.999,
    ema_warmup_steps=0,
  )
  unknown = set(overrides) - set(fields)
  if unknown:
    raise ConfigError(f"teachers: {sorted(unknown)[0]}", f"unknown key; known: {sorted(fields)}")
  fields.update(overrides)
  return fields


def teachers_of(cfg: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, ...]:
  """Every teacher section: ``teacher`` (teacher 0), then each entry of ``teachers``, the
  entries completed with ``teacher_fields``'s defaults (a saved config.json holds dicts)."""
  extra = tuple(ml_collections.ConfigDict(teacher_fields(**dict(t))) for t in cfg.teachers)
  return (cfg.teacher, *extra)


def default_config() -> ml_collections.ConfigDict:
  """Every key jaxdistill knows, with its default."""
  C = ml_collections.ConfigDict
  cfg = C()
  cfg.seed = 0
  cfg.student = C(_model_fields())
  # Weights-only start: a final_params directory (or a workdir holding one).
  cfg.student.init_from = ""
  # Start from blocks of the teacher (same width): every_other | last | uniform | "0,2,4".
  cfg.student.init_layers = ""
  # c=int8 students: training batches (the first of a fresh iterator) that set their static
  # activation scales before step 1 (models.quant.calibrate).
  cfg.student.quant_calibration_batches = 8
  cfg.teacher = C(teacher_fields())
  # Further teachers (docs/losses.md, "Several teachers"): a tuple of teacher_fields(...) dicts,
  # teacher 1, 2, ... (``teacher`` is teacher 0), each its own source (random | workdir | hf).
  cfg.teachers = ()

  d = cfg.distill = C()
  d.temperature = 1.0
  # Several teachers (``teachers``): how their logit targets combine (distill/ensemble.py).
  # probs: KL to the weighted average of their probabilities at the temperature; logits: to
  # the softmax of their weighted average logits; losses: the average of per-teacher losses.
  d.ensemble = "probs"
  # constant | linear(end=..) | cosine(end=..) | exp(decay=.., min=..)
  d.temperature_schedule = "constant"
  # kind: kl | reverse_kl | jsd, or sparse (jaxdistill/distill/sparse.py): topk_renorm | topk_tail |
  # sampled (from a cache; the top-k kinds also with an online teacher, k = precompute.k).
  d.logit = C(dict(kind="kl", weight=1.0, schedule="constant", beta=0.5))
  d.ce = C(dict(weight=0.0, schedule="constant"))
  # MiniLM: KL between attention distributions (and value relations) of the
  # layer pairs in layer_map ("last", "last:K", "uniform", "1:2,2:4").
  # ``teacher``: which teacher a feature term reads (0 = ``teacher``, i = ``teachers[i - 1]``).
  d.attention = C(
    dict(weight=0.0, schedule="constant", value_weight=0.0, layer_map="last", teacher=0)
  )
  d.hidden = C(
    dict(kind="mse", weight=0.0, schedule="constant", layer_map="uniform", project=True, teacher=0)
  )
  # Encoders: 1 - cosine between the pooled sentence embeddings of student and teacher.
  d.embedding = C(dict(weight=0.0, schedule="constant", teacher=0))
  # Image classifiers: attention transfer (Zagoruyko & Komodakis) between the stage feature
  # maps of stage_map ("uniform", "last", "last:K", "1:2,2:3"; stages 1..S): kind "paper" is
  # ||Q_s - Q_t||_2 of the L2-normalised maps Q = sum_c |A_c|^p; "squared" the mean of the
  # squared differences (the authors' public code). feature_map: FitNets-style MSE or
  # cosine between stage maps through a learned 1x1 conv when the channels differ.
  d.attention_transfer = C(
    dict(kind="paper", weight=0.0, schedule="constant", p=2.0, stage_map="uniform", teacher=0)
  )
  d.feature_map = C(
    dict(kind="mse", weight=0.0, schedule="constant", stage_map="last", project=True, teacher=0)
  )
  # Fused loss head (distill/fused.py): CE and the logit loss from final hidden states and
  # heads, never materialising [tokens x vocab] logits. token_chunk: rows per chunk per batch
  # shard (0 = all rows at once); vocab_chunk: columns per chunk per vocab shard (0 = off;
  # forward KL only; +50% head FLOPs, for vocabularies too large for one token chunk).
  d.fused = True
  d.token_chunk = 256
  d.vocab_chunk = 0
  # Per-token KD strength (distill/adaptive.py): none | teacher_entropy | teacher_correct |
  # student_teacher_gap; weights of mean 1 over real tokens x logit.weight (docs/losses.md).
  d.adaptive = "none"
  # On-policy distillation (GKD; jaxdistill/train/on_policy.py): with probability lmbda a step's
  # continuations are the student's own samples (max_new_tokens after each row's prompt: its
  # first prompt_tokens tokens, or with 0 its positions before the first weighted target), and
  # the logit term (jsd with logit.beta, reverse_kl, kl, or sampled_reverse_kl) runs on them.
  # time_split: timed runs of each part of a sampling step (sampling, teacher, update) at the
  # run's first step, logged as perf/split_* (0 = off).
  d.on_policy = C(
    dict(lmbda=0.0, max_new_tokens=32, temperature=1.0, top_k=0, prompt_tokens=0, time_split=3)
  )

  o = cfg.optim = C()
  o.steps = 100
  o.lr = 1e-3
  o.warmup_steps = 10
  o.lr_schedule = "cosine"  # cosine | constant (both after linear warmup)
  o.min_lr_ratio = 0.1
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8  # Adam's epsilon (added to the second-moment root; optax's default), > 0
  o.weight_decay = 0.01
  o.clip_norm = 1.0
  o.grad_accum = 1  # micro-batches per step; losses normalised globally
  # A non-finite loss or gradient never updates the state: "stop" ends the run
  # with a message (the last good checkpoint intact); "skip" drops that update.
  o.nan_policy = "stop"
  # Dynamic loss scaling, required by a float16 student (none | dynamic): the scale starts at
  # loss_scale_init, halves (and the update is skipped) on overflow, doubles after
  # loss_scale_period finite steps. "none" leaves f32 / bf16 runs untouched.
  o.loss_scale = "none"
  o.loss_scale_init = 2.0**15
  o.loss_scale_period = 2000

  # source: synthetic | stdlib (the built-in corpus) | tfds | array_record | text | task; see
  # jaxdistill/data/sources.py. pad_fraction, branching: synthetic only. tokenizer: a
  # tokenizer.json, or "" to train a byte-level BPE of student.vocab_size on the train split.
  # packing: pack (concatenate documents, split at seq_len, segment ids) | pad (one piece a row).
  cfg.data = C(
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
      # reference solutions; task_eval_problems: held-out problems evaluated.
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
  cfg.mesh = C(dict(data=-1, fsdp=1, tensor=1))
  # every: save interval in steps (0 = only on preemption and at the end);
  # best_metric: also keep the student params of the best step by this metric
  # (e.g. "train/loss" or an eval metric) in WORKDIR/best/.
  cfg.ckpt = C(
    dict(every=0, max_to_keep=3, save_final=True, async_save=True, best_metric="", best_mode="min")
  )
  # every: steps between validation evaluations during training (0 = never), each over
  # `batches` validation batches (0 = the whole split; text sources only).
  cfg.eval = C(dict(every=0, batches=4))
  # Built corpora, trained tokenizers and cached teachers ("" = $JAXDISTILL_CACHE_DIR,
  # else $XDG_CACHE_HOME/jaxdistill, else ~/.cache/jaxdistill).
  cfg.cache_dir = ""
  # tensorboard: also write metrics.jsonl's scalars (and the loss curve at the end) as
  # TensorBoard event files in WORKDIR/tensorboard/ (process 0; tensorboardX, no TensorFlow).
  cfg.log = C(dict(every=10, progress=True, tensorboard=True))
  # `jaxdistill precompute` (jaxdistill/precompute/text.py): sparse teacher targets per token.
  # targets: topk | sampled | both; k: top-k size (also the online k of distill.logit.kind
  # topk_*); samples: draws per token; temperature: generation temperature (0 =
  # distill.temperature); logprob_dtype: bf16 | f16 | f32; rows: rows to precompute (0 = the
  # whole training split; synthetic: optim.steps x data.batch_size); rows_per_shard: per shard.
  # An image model stores whole raw class logits per example in logprob_dtype (f32 exact;
  # targets / k / samples unused, temperature and rows must be 0): precompute_images.py.
  cfg.precompute = C(
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
  # `samples` completions of each prompt (prompts_file, one a line, else the first `prompts`
  # training problems of data.task) at temperature / top_k / top_p, up to max_new_tokens;
  # filters drop unfinished ones (require_stop), those outside [min_tokens, max_tokens]
  # (0 = no bound), duplicates (dedup: none | exact | near) and those the verifier
  # ("module:function" of (prompt, completion) -> keep) rejects. topk > 0 also stores the
  # teacher's top-k ids and log-probs (at precompute.temperature, or distill.temperature if 0)
  # at every completion token, for token-level KD on the set (teacher.source='cache').
  cfg.precompute.generate = C(
    dict(
      prompts=256,
      prompts_file="",
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
  return cfg


def _check_known(cfg, default, prefix="") -> None:
  """Every key of ``cfg`` exists in ``default`` and vice versa."""
  for key in default.keys():
    if key not in cfg:
      raise ConfigError(
        f"{prefix}{key}", "missing; start config files from jaxdistill.config.default_config()"
      )
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if key not in default:
      raise ConfigError(name, f"unknown key; known keys here: {sorted(default.keys())}")
    if isinstance(default[key], ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(name, "must be a section (ConfigDict)")
      _check_known(value, default[key], name + ".")


def load_config(path: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  """Loads a config file and applies overrides; it does not validate (``validate.validate``).

  Args:
    path: a Python file defining ``get_config()``; ``FILE:ARG`` calls ``get_config(ARG)``
      (a variant, as big_vision's configs take one: ``configs/quickstart.py:distill,test``);
      or a shipped config's name, ``NAME`` / ``NAME:ARG`` (``smoke``, ``quickstart:distill``;
      ``files.resolve``).
    overrides: (dotted key, raw string value) pairs applied in order (``apply_override``).

  Returns:
    The ConfigDict (every key known; values not yet checked against each other).

  Raises:
    ConfigError: missing file or unknown name, no get_config, unknown key, an override of the
      wrong type or a bad teacher index.
  """
  path, args = resolve(path)
  try:
    module = config_module(path)
    if not hasattr(module, "get_config"):
      raise ConfigError("--config", f"{path} defines no get_config() function")
    cfg = module.get_config(*args)
  except ConfigError:
    raise
  except Exception as e:  # a config file is user code: report, don't trace back
    raise ConfigError("--config", f"{path} failed: {type(e).__name__}: {e}") from e
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError("--config", f"{path}: get_config() must return a ConfigDict")
  _check_known(cfg, default_config())
  for key, raw in overrides:
    apply_override(cfg, key, raw)
  return cfg
