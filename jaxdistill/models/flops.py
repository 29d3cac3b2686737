"""Model FLOPs: per token of a transformer, per image of a classifier, per distillation step.

Model FLOPs count the useful arithmetic of the model, not what the compiled program happens to
execute (rematerialisation, padding, the masked half of causal attention are not counted), so
MFU compares runs and machines fairly. One multiply-add is 2 FLOPs.

A transformer's forward per token (T: sequence length attended over):

  body   per layer: q and out projections 2 * D * H * K each, k and v projections
         2 * D * KV * K each (KV key/value heads: grouped-query attention counted as it runs),
         MLP 2 * n_mlp * D * F (n_mlp = 3 for SwiGLU, 2 for GELU), attention scores and
         weighted values 2 * T * H * K each; a causal decoder's attention counted at half
         (only the lower triangle is useful), an encoder's in full
  head   the vocabulary head 2 * D * V (a decoder; an encoder has none)

Embedding lookups, norms, biases, activations, RoPE and softmax are not counted in the body.

A distillation step (``step_flops``) splits into three parts:

  student  its body, forward + backward = 3 x forward
  teacher  its body, forward only (a frozen teacher is never differentiated); none without a
           teacher model (teacher.source none or a precomputed cache)
  loss     the vocabulary heads (the student's 3 x 2DV, the teacher's 2DV), the learned
           feature projections (hidden-state [Ds, Dt] matrices, 1x1 convs of feature maps;
           forward + backward, 3x), and the elementwise softmax / divergence work per logit
           (``SOFTMAX_FLOPS_PER_LOGIT``, ``DIVERGENCE_FLOPS_PER_LOGIT``)

The step's batch is ``data.batch_size`` examples whatever ``optim.grad_accum`` is (the
micro-batches split it), so accumulation changes no FLOP count.

An image classifier's forward per image is ``flops_per_example`` (its convs and fcs; the final
fc is part of the body, so its loss part holds only the softmax over classes and projections).
"""

import dataclasses
from typing import Sequence

from jaxdistill.models import cnn, resnet
from jaxdistill.models.transformer_config import TransformerConfig
from jaxdistill.models.vision_config import VisionConfig

# Elementwise work of the loss per entry of a [tokens, V] logit row (model FLOPs convention:
# constants, not a trace of what XLA emits). A softmax or log-softmax: the max, the subtract,
# the exp, the sum, the normalising divide / log-subtract = 5. A divergence (KL, reverse KL,
# JSD's halves, a sparse one over its k entries): log-ratio, product with the weights, sum = 3.
SOFTMAX_FLOPS_PER_LOGIT = 5
DIVERGENCE_FLOPS_PER_LOGIT = 3
# Forward + backward of a trained computation: the backward costs about twice the forward (the
# gradient with respect to the inputs and the one with respect to the weights).
TRAIN_FACTOR = 3


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Model FLOPs of one optimizer step, in three parts (see the module docstring).

  Attributes:
    student: the student's body, forward + backward.
    teacher: the teacher's body, forward only (0 without a teacher model).
    loss: vocabulary heads, feature projections and the loss's elementwise work.
  """

  student: float
  teacher: float
  loss: float

  @property
  def total(self) -> float:
    return self.student + self.teacher + self.loss

  def as_dict(self) -> dict[str, float]:
    """{"student", "teacher", "loss", "total"}: for summaries and logs."""
    return dict(student=self.student, teacher=self.teacher, loss=self.loss, total=self.total)


def _n_mlp(config: TransformerConfig) -> int:
  return 3 if config.activation == "swiglu" else 2


def attention_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Forward FLOPs per token of attention's scores and weighted values over all layers.

  Args:
    config: the model config.
    seq_len: T, the length attended over.
  Returns:
    L * 4 * T * H * K, halved for a causal decoder (the useful triangle of the T x T matrix).
  """
  full = 4 * seq_len * config.num_heads * config.head_dim * config.num_layers
  return float(full if config.encoder else full / 2)


def body_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Forward FLOPs per token of a transformer without its vocabulary head.

  Args:
    config: the model config.
    seq_len: T, the length attended over.
  Returns:
    2 * L * (2 * D * H * K + 2 * D * KV * K + n_mlp * D * F) + attention.
  """
  d, k = config.d_model, config.head_dim
  per_layer = 2 * d * config.num_heads * k + 2 * d * config.kv_heads * k
  per_layer += _n_mlp(config) * d * config.d_ff
  return float(2 * config.num_layers * per_layer) + attention_flops_per_token(config, seq_len)


def head_flops_per_token(config: TransformerConfig | VisionConfig) -> float:
  """Forward FLOPs per token of the vocabulary head: 2 * D * V for a decoder (tied or not);
  0 for an encoder (no head) and an image classifier (its fc is in ``flops_per_example``)."""
  if isinstance(config, VisionConfig) or config.encoder:
    return 0.0
  return float(2 * config.d_model * config.vocab_size)


def logits_per_example(config: TransformerConfig | VisionConfig, seq_len: int) -> int:
  """Entries of the logit rows of one example: T * V (decoder), C (classifier), 0 (encoder)."""
  if isinstance(config, VisionConfig):
    return config.num_classes
  return 0 if config.encoder else seq_len * config.vocab_size


def flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Forward FLOPs per token of a transformer, head included (body + head).

  Args:
    config: the model config.
    seq_len: T, the length attended over.
  Returns:
    ``body_flops_per_token + head_flops_per_token`` (about 3x for forward + backward).
  """
  return body_flops_per_token(config, seq_len) + head_flops_per_token(config)


def flops_per_example(config: VisionConfig) -> float:
  """Forward FLOPs per image of an image classifier: 2 x the multiply-adds of its convs and fcs.

  Each conv counts H_out * W_out * k * k * C_in * C_out multiply-adds (taps on the zero padding
  included, the usual convention: XLA's cost analysis, which skips them, reports 5-15% less on
  small maps), each fc D_in * D_out; biases, BatchNorm, ReLU, pooling and option-A shortcuts are
  ignored. ResNet-20 at 32x32x3: 40.55M multiply-adds, 81.1 MFLOPs.

  Args:
    config: the model config.
  Returns:
    Forward FLOPs per example (about 3x for forward + backward).
  """
  macs = cnn.multiply_adds(config) if config.arch == "cnn" else resnet.multiply_adds(config)
  return float(2 * macs)


def _body_per_example(config: TransformerConfig | VisionConfig, seq_len: int) -> float:
  if isinstance(config, VisionConfig):
    return flops_per_example(config)
  return seq_len * body_flops_per_token(config, seq_len)


def step_flops(
  student: TransformerConfig | VisionConfig,
  teacher: TransformerConfig | VisionConfig | None,
  *,
  batch_size: int,
  seq_len: int,
  student_head: bool = True,
  teacher_head: bool = False,
  divergence_entries: int = 0,
  projections: Sequence[tuple[int, int, int]] = (),
) -> StepFlops:
  """Model FLOPs of one optimizer step of a distillation (or plain CE) run.

  Args:
    student: the student's config.
    teacher: the teacher's config when a teacher MODEL runs (None without one, and for a
      precomputed cache, whose targets cost no forward).
    batch_size: examples per optimizer step (``data.batch_size``; grad accumulation splits it).
    seq_len: T (ignored for image classifiers).
    student_head: the loss reads the student's logits (CE or a logit divergence).
    teacher_head: the loss reads the teacher's logits (a logit divergence with a teacher model).
    divergence_entries: per example, the entries a logit divergence runs over: T * V for a
      dense or fused one (C for a classifier), T * k for a sparse one, 0 without one.
    projections: (positions per example, d_in, d_out) of each learned feature projection:
      (T, Ds, Dt) for a hidden-state map, (h * w, Cs, Ct) for a 1x1 conv of a feature map.
  Returns:
    The StepFlops of ``batch_size`` examples (forward + backward of what trains, forward of
    the teacher).
  """
  tokens = batch_size * (1 if isinstance(student, VisionConfig) else seq_len)
  student_part = TRAIN_FACTOR * batch_size * _body_per_example(student, seq_len)
  teacher_part = batch_size * _body_per_example(teacher, seq_len) if teacher else 0.0
  loss = 0.0
  if student_head:
    loss += TRAIN_FACTOR * tokens * head_flops_per_token(student)
    loss += (
      TRAIN_FACTOR * SOFTMAX_FLOPS_PER_LOGIT * batch_size * logits_per_example(student, seq_len)
    )
  if teacher_head and teacher is not None:
    loss += tokens * head_flops_per_token(teacher)
    loss += SOFTMAX_FLOPS_PER_LOGIT * batch_size * logits_per_example(teacher, seq_len)
  loss += TRAIN_FACTOR * DIVERGENCE_FLOPS_PER_LOGIT * batch_size * divergence_entries
  for positions, d_in, d_out in projections:
    loss += TRAIN_FACTOR * batch_size * positions * 2 * d_in * d_out
  return StepFlops(float(student_part), float(teacher_part), float(loss))
