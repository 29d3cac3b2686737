"""Every config key with its default: ``default_config()``, and the model and teacher keys
(``teacher_fields``) that ``teacher``, ``teachers`` and ``student`` share. The larger sections'
defaults are in ``sections.py``."""

import ml_collections

from jaxdistill.config import sections
from jaxdistill.errors import ConfigError

__all__ = ["default_config", "model_fields", "peer_section", "teacher_fields", "teachers_of"]


def model_fields(**overrides) -> dict:
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
  fields = model_fields(d_model=128, num_layers=4, d_ff=512, policy="p=f32,c=f32,o=f32")
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


def peer_section(cfg: ml_collections.ConfigDict, k: int) -> ml_collections.ConfigDict:
  """Codistillation peer k's (1-based) model section: ``student`` with the keys of
  ``codistill.peers[k - 1]`` (all but its ``lr``)."""
  section = ml_collections.ConfigDict(cfg.student.to_dict())
  for key, value in dict(cfg.codistill.peers[k - 1]).items():
    if key != "lr":
      section[key] = value
  return section


def default_config() -> ml_collections.ConfigDict:
  """Every key jaxdistill knows, with its default."""
  C = ml_collections.ConfigDict
  cfg = C()
  cfg.seed = 0
  cfg.student = C(model_fields())
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
  # run's first step, logged as perf/split_* (0 = off). baseline (none | batch | sequence) and
  # signal_clip (0 = off): variance reduction of sampled_reverse_kl's per-token signal
  # log q - log p (the batch's or the row's mean subtracted, then clipped to +-signal_clip).
  d.on_policy = C(
    dict(
      lmbda=0.0, max_new_tokens=32, temperature=1.0, top_k=0, prompt_tokens=0, time_split=3,
      baseline="none", signal_clip=0.0,
    )
  )  # fmt: skip

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

  cfg.data = sections.data_section()
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
  cfg.precompute = sections.precompute_section()
  cfg.codistill = sections.codistill_section()
  cfg.continual = sections.continual_section()
  return cfg
