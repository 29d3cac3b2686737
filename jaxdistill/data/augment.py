"""Host-side image augmentation and normalisation, vectorised over a batch.

Every random choice for the examples of global batch b comes from ONE generator seeded by
(seed, b), drawn for all B rows of the global batch at once (``draws``); a process uses the
rows it holds. Since global batch b's row r is the example at stream position b B + r
(which fixes its epoch and its index in the dataset), augmentation is a pure function of
(seed, example index, epoch) for a given batch size, independent of the process count,
threads, or where a run was resumed.

  crop_flip  zero-pad by ``data.crop_padding`` on each side and crop back to H x W at a
             random offset; flip left-right with probability 1/2 when ``data.flip``
  mix        mixup / cutmix with a partner from the same global batch: the rows are paired
             along one random cycle, so no example is its own partner (B > 1). Every example
             is mixed; lambda ~ Beta(alpha, alpha); with both ``data.mixup`` and
             ``data.cutmix`` > 0 each example picks one with probability 1/2. Cutmix pastes
             the partner's box of area share about 1 - lambda, centred uniformly and
             clipped at the border; lambda is then the share actually kept.
  Finalize   (a grain Map over batches) pixels -> (x / 255 - image_mean) / image_std,
             float32, and the batch contract's keys; padding rows (weight 0) get inputs 0

Shape legend: B batch rows, H, W image height and width, C channels.
"""

import dataclasses

import grain
import numpy as np

# Separates the augmentation draws from the shuffle's use of the seed.
AUGMENT_STREAM = 7


def draws(seed: int, batch_index: int, batch_size: int, mixup: float, cutmix: float) -> dict:
  """The random choices for every row of global batch ``batch_index``.

  Returns:
    {"offset_Bx2": crop offsets in [0, 2 padding] as uniforms in [0, 1), "flip_B": bool,
     "partner_B": row indices, "cut_B": bool (cutmix rather than mixup), "lam_B": float64,
     "centre_Bx2": box centres as uniforms in [0, 1)}.
  """
  rng = np.random.default_rng([seed, AUGMENT_STREAM, batch_index])
  b = batch_size
  out = {"offset_Bx2": rng.random((b, 2)), "flip_B": rng.random(b) < 0.5}
  order = rng.permutation(b)
  out["partner_B"] = np.empty(b, np.int64)
  out["partner_B"][order] = np.roll(order, -1)  # one cycle through all rows
  cut_B = rng.random(b) < 0.5
  if cutmix <= 0 or mixup <= 0:  # only one of them is on
    cut_B[:] = cutmix > 0
  lam_mixup_B = rng.beta(mixup, mixup, b) if mixup > 0 else np.ones(b)
  lam_cutmix_B = rng.beta(cutmix, cutmix, b) if cutmix > 0 else np.ones(b)
  out.update(cut_B=cut_B, lam_B=np.where(cut_B, lam_cutmix_B, lam_mixup_B))
  out["centre_Bx2"] = rng.random((b, 2))
  return out


def crop_flip(
  images_BxHxWxC: np.ndarray, offset_Bx2: np.ndarray, flip_B: np.ndarray, padding: int, flip: bool
) -> np.ndarray:
  """Random crops after zero padding and horizontal flips: a slice per row (3x faster than
  one fancy-indexing gather on this kind of batch; the same pixels).

  Args:
    images_BxHxWxC: uint8 pixels.
    offset_Bx2: uniforms in [0, 1) picking (dy, dx) in [0, 2 padding].
    flip_B: which rows to flip (used only when ``flip``).
    padding, flip: ``data.crop_padding`` and ``data.flip``.
  """
  b, h, w, _ = images_BxHxWxC.shape
  p = padding
  padded = np.pad(images_BxHxWxC, ((0, 0), (p, p), (p, p), (0, 0))) if p else images_BxHxWxC
  shift_Bx2 = (offset_Bx2 * (2 * p + 1)).astype(np.int64)
  out = np.empty_like(images_BxHxWxC)
  for i, (dy, dx) in enumerate(shift_Bx2):
    crop_HxWxC = padded[i, dy : dy + h, dx : dx + w]
    out[i] = crop_HxWxC[:, ::-1] if flip and flip_B[i] else crop_HxWxC
  return out


def mix(
  x_BxHxWxC: np.ndarray,
  x2_BxHxWxC: np.ndarray,
  cut_B: np.ndarray,
  lam_B: np.ndarray,
  centre_Bx2: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
  """Mixup rows: lam x + (1 - lam) x2; cutmix rows: x with a box of x2 pasted in.

  Returns:
    (images float32 [B, H, W, C], lambda_B float32: the share of x in each row).
  """
  _, h, w, _ = x_BxHxWxC.shape
  x = x_BxHxWxC.astype(np.float32)
  x2 = x2_BxHxWxC.astype(np.float32)
  lam_B = lam_B.astype(np.float32)
  mixed = lam_B[:, None, None, None] * x + (1.0 - lam_B[:, None, None, None]) * x2
  cut = np.sqrt(1.0 - lam_B)
  size_Bx2 = np.stack([(h * cut).astype(np.int64), (w * cut).astype(np.int64)], axis=1)
  centre_Bx2 = (centre_Bx2 * [h, w]).astype(np.int64)
  lo_Bx2 = np.clip(centre_Bx2 - size_Bx2 // 2, 0, [h, w])
  hi_Bx2 = np.clip(centre_Bx2 + size_Bx2 - size_Bx2 // 2, 0, [h, w])
  in_rows_BxH = (np.arange(h) >= lo_Bx2[:, :1]) & (np.arange(h) < hi_Bx2[:, :1])
  in_cols_BxW = (np.arange(w) >= lo_Bx2[:, 1:]) & (np.arange(w) < hi_Bx2[:, 1:])
  box_BxHxW = in_rows_BxH[:, :, None] & in_cols_BxW[:, None, :]
  pasted = np.where(box_BxHxW[..., None], x2, x)
  kept_B = 1.0 - box_BxHxW.sum(axis=(1, 2)) / (h * w)
  images = np.where(cut_B[:, None, None, None], pasted, mixed)
  return images, np.where(cut_B, kept_B, lam_B).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Finalize(grain.transforms.Map):
  """A batch of examples -> the image batch contract (numpy, this process's rows).

  Attributes:
    mean_C, std_C: ``data.image_mean`` / ``image_std`` per channel (pixels scaled to [0, 1]).
  """

  mean_C: np.ndarray
  std_C: np.ndarray

  def map(self, batch: dict) -> dict[str, np.ndarray]:
    image_BxHxWxC = batch["image"]
    scale_C = (1.0 / (255.0 * self.std_C)).astype(np.float32)
    shift_C = (self.mean_C / self.std_C).astype(np.float32)
    inputs_BxHxWxC = image_BxHxWxC.astype(np.float32) * scale_C - shift_C
    weights_B = batch.get("weight")
    if weights_B is None:  # training: every row is real
      weights_B = np.ones(len(image_BxHxWxC), np.float32)
    else:
      inputs_BxHxWxC[weights_B == 0] = 0.0
    out = {
      "inputs": inputs_BxHxWxC,
      "targets": batch["label"].astype(np.int32),
      "weights": weights_B.astype(np.float32),
    }
    if "mix_label" in batch:
      out["mix_targets"] = batch["mix_label"].astype(np.int32)
      out["mix_lambda"] = batch["mix_lambda"].astype(np.float32)
    if "teacher_logits" in batch:  # a cache's stored class logits [B, C]
      out["teacher_logits"] = batch["teacher_logits"].astype(np.float32)
    return out
