"""CIFAR-10/100 from the official "python version" files, and augmentation in JAX.

Loading: :func:`load_cifar` reads ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``,
``batches.meta``) or ``cifar-100-python/`` (``train``, ``test``, ``meta``). The files are Python 2
pickles; they are read with :class:`SafeUnpickler`, which can only build the three numpy objects
the real files contain, so a crafted file cannot run code. Arrays come back as uint8 NHWC images
and int32 labels, on the host; put them on the device once (the training script does).

Augmentation: :func:`augment` (random crop with padding, horizontal flip, optional Cutout, then
per-channel normalisation) is pure JAX, so it runs on the device inside the jitted train step.
"""

import io
import os
import pickle
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# numpy's array-unpickling helper (numpy._core.multiarray._reconstruct in numpy 2,
# numpy.core.multiarray._reconstruct in numpy 1), reached without importing a private module.
_np_reconstruct = np.ndarray((0,)).__reduce__()[0]

IMAGE_SHAPE = (32, 32, 3)
_ROW_SIZE = 32 * 32 * 3

# Per-channel statistics of the training sets (RGB, in [0, 1]), as used by the AMP authors.
MEAN = {
    "cifar10": (125.3 / 255, 123.0 / 255, 113.9 / 255),
    "cifar100": (129.3 / 255, 124.1 / 255, 112.4 / 255),
}
STD = {
    "cifar10": (63.0 / 255, 62.1 / 255, 66.7 / 255),
    "cifar100": (68.2 / 255, 65.4 / 255, 70.4 / 255),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
SUBDIR = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}

_HOW_TO_GET = (
    "Get the 'python version' of the dataset from https://www.cs.toronto.edu/~kriz/cifar.html "
    "and extract it (cifar-10-python.tar.gz -> cifar-10-batches-py/, cifar-100-python.tar.gz "
    "-> cifar-100-python/), or, for CIFAR-10 without a download, build the JPEG copy shipped "
    "next to this project: python ../shared/data/cifar-10-jpeg/build.py OUT (then pass "
    "--data-dir OUT). Pass --data-dir as the folder holding the extracted folder, or the "
    "extracted folder itself."
)


class CifarFormatError(ValueError):
  """A CIFAR file or folder is missing, malformed or not what the official files hold."""


class CifarData(NamedTuple):
  """A loaded CIFAR dataset, on the host.

  Attributes:
    train_images: uint8 ``(N, 32, 32, 3)``.
    train_labels: int32 ``(N,)``.
    test_images: uint8 ``(M, 32, 32, 3)``.
    test_labels: int32 ``(M,)``.
    class_names: the label names from the meta file.
    num_classes: 10 or 100.
  """

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]
  num_classes: int


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
  if subtype is not np.ndarray:
    raise pickle.UnpicklingError(f"refusing to build an array of type {subtype!r}")
  return _np_reconstruct(subtype, shape, dtype)


def _safe_dtype(*args: Any) -> np.dtype:
  dtype = np.dtype(*args)
  if dtype.hasobject:
    raise pickle.UnpicklingError(f"refusing an object dtype {dtype!r}")
  return dtype


class SafeUnpickler(pickle.Unpickler):
  """An unpickler that can only build what the official CIFAR files hold.

  Every global a pickle refers to goes through :meth:`find_class`; this one admits
  ``numpy.core.multiarray._reconstruct`` (also spelled ``numpy._core.multiarray._reconstruct``),
  ``numpy.ndarray`` and ``numpy.dtype``, and raises :class:`pickle.UnpicklingError` for anything
  else (``os.system``, ``builtins.eval``, ...), so no code from the file runs. Even the admitted
  ones are wrapped: arrays must be plain ``ndarray`` and dtypes must not hold Python objects.
  """

  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
      ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): _safe_dtype,
  }

  def find_class(self, module: str, name: str) -> Any:
    """Returns an admitted global; raises for every other one."""
    try:
      return self._ALLOWED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"refusing to load global {module}.{name}: a CIFAR file only refers to numpy's "
          "_reconstruct, ndarray and dtype") from None

  def persistent_load(self, pid: Any) -> Any:
    """Persistent ids never occur in CIFAR files."""
    raise pickle.UnpicklingError("refusing a persistent id")


def safe_load(path: str) -> Any:
  """Unpickles one CIFAR file with :class:`SafeUnpickler` (``encoding="bytes"``).

  Args:
    path: the file.

  Returns:
    The unpickled object (a dict with bytes keys for a real CIFAR file).

  Raises:
    CifarFormatError: if the file is missing, not a pickle, or refers to anything but the
      admitted numpy globals.
  """
  if not os.path.isfile(path):
    raise CifarFormatError(f"missing file {path}. {_HOW_TO_GET}")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
  except pickle.UnpicklingError as e:
    raise CifarFormatError(f"{path}: not a valid CIFAR file ({e}).") from e
  except Exception as e:  # any other failure to parse means a malformed file
    raise CifarFormatError(f"{path}: not a valid CIFAR pickle ({type(e).__name__}: {e}).") from e


def _get(d: Any, key: str, path: str) -> Any:
  if not isinstance(d, dict):
    raise CifarFormatError(f"{path}: expected a dict, got {type(d).__name__}.")
  for k in (key.encode(), key):
    if k in d:
      return d[k]
  raise CifarFormatError(f"{path}: no {key!r} entry (keys: {sorted(map(str, d))}).")


def _decode(names: Any, path: str) -> tuple[str, ...]:
  if not isinstance(names, list):
    raise CifarFormatError(f"{path}: label names must be a list.")
  return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _read_batch(path: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  d = safe_load(path)
  data = _get(d, "data", path)
  labels = _get(d, label_key, path)
  if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
      or data.shape[1] != _ROW_SIZE:
    got = (f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}")
    raise CifarFormatError(f"{path}: 'data' must be a uint8 array of shape (N, {_ROW_SIZE}), "
                           f"got {got}.")
  try:
    labels = np.asarray(labels)
  except (TypeError, ValueError) as e:
    raise CifarFormatError(f"{path}: '{label_key}' is not a list of ints.") from e
  if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
    raise CifarFormatError(f"{path}: '{label_key}' must be {len(data)} ints, got "
                           f"{labels.dtype} shape {labels.shape}.")
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise CifarFormatError(f"{path}: labels must lie in 0..{num_classes - 1}, got "
                           f"{labels.min()}..{labels.max()}.")
  # The rows are channel-major (R plane, G plane, B plane); make them NHWC.
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def find_dataset_dir(data_dir: str, dataset: str = "cifar10") -> str:
  """The folder holding the dataset's files: ``data_dir`` or ``data_dir/<official name>``.

  Raises:
    CifarFormatError: naming the path and how to get the data, if neither exists.
  """
  if dataset not in SUBDIR:
    raise ValueError(f"dataset must be one of {sorted(SUBDIR)}, got {dataset!r}.")
  inner = os.path.join(data_dir, SUBDIR[dataset])
  if os.path.isdir(inner):
    return inner
  if os.path.isdir(data_dir) and os.path.basename(os.path.normpath(data_dir)) == SUBDIR[dataset]:
    return data_dir
  if os.path.isdir(data_dir):
    files = ["batches.meta"] if dataset == "cifar10" else ["meta"]
    if all(os.path.exists(os.path.join(data_dir, f)) for f in files):
      return data_dir
    raise CifarFormatError(f"{os.path.abspath(data_dir)} holds neither {SUBDIR[dataset]}/ nor "
                           f"the {dataset} files themselves. {_HOW_TO_GET}")
  raise CifarFormatError(f"data directory {os.path.abspath(data_dir)} does not exist. "
                         f"{_HOW_TO_GET}")


def load_cifar(data_dir: str, dataset: str = "cifar10") -> CifarData:
  """Loads CIFAR-10 or CIFAR-100 from the official "python version" files.

  Args:
    data_dir: the folder that holds ``cifar-10-batches-py/`` (or ``cifar-100-python/``), or that
      folder itself.
    dataset: ``"cifar10"`` or ``"cifar100"`` (fine labels).

  Returns:
    A :class:`CifarData` with uint8 NHWC images and int32 labels.

  Raises:
    CifarFormatError: if the folder or a file is missing or malformed; the message names the
      path and says how to get the data.
  """
  root = find_dataset_dir(data_dir, dataset)
  num_classes = NUM_CLASSES[dataset]
  if dataset == "cifar10":
    meta_path = os.path.join(root, "batches.meta")
    class_names = _decode(_get(safe_load(meta_path), "label_names", meta_path), meta_path)
    parts = [_read_batch(os.path.join(root, f"data_batch_{i}"), "labels", num_classes)
             for i in range(1, 6)]
    train_images = np.concatenate([p[0] for p in parts])
    train_labels = np.concatenate([p[1] for p in parts])
    test_images, test_labels = _read_batch(os.path.join(root, "test_batch"), "labels",
                                           num_classes)
  else:
    meta_path = os.path.join(root, "meta")
    class_names = _decode(_get(safe_load(meta_path), "fine_label_names", meta_path), meta_path)
    train_images, train_labels = _read_batch(os.path.join(root, "train"), "fine_labels",
                                             num_classes)
    test_images, test_labels = _read_batch(os.path.join(root, "test"), "fine_labels",
                                           num_classes)
  if len(class_names) != num_classes:
    raise CifarFormatError(f"{meta_path}: expected {num_classes} label names, got "
                           f"{len(class_names)}.")
  if len(train_images) == 0 or len(test_images) == 0:
    raise CifarFormatError(f"{root}: empty train or test split.")
  return CifarData(train_images, train_labels, test_images, test_labels, class_names,
                   num_classes)


def synthetic_cifar(num_train: int = 2048, num_test: int = 512, num_classes: int = 10,
                    seed: int = 0, image_size: int = 32, noise: float = 96.0) -> CifarData:
  """A small learnable stand-in for CIFAR, generated in memory (no download).

  Each class is a fixed random smooth colour pattern; an image is its class pattern, randomly
  shifted by a few pixels and scaled in contrast, plus pixel noise. A small CNN learns it to
  well above chance in a few epochs, but not instantly.

  Returns:
    A :class:`CifarData` shaped like the real one (uint8 NHWC, int32 labels).
  """
  rng = np.random.default_rng(seed)
  coarse = rng.normal(size=(num_classes, 4, 4, 3))
  patterns = np.kron(coarse, np.ones((1, image_size // 4, image_size // 4, 1)))
  patterns = patterns / patterns.std(axis=(1, 2, 3), keepdims=True)

  def make(n):
    labels = rng.integers(0, num_classes, size=n).astype(np.int32)
    shifts = rng.integers(-3, 4, size=(n, 2))
    contrast = rng.uniform(20.0, 45.0, size=(n, 1, 1, 1))
    base = np.stack([np.roll(patterns[c], tuple(s), axis=(0, 1))
                     for c, s in zip(labels, shifts, strict=True)])
    x = 128.0 + contrast * base + noise * rng.normal(size=base.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8), labels

  train_images, train_labels = make(num_train)
  test_images, test_labels = make(num_test)
  names = tuple(f"class_{i}" for i in range(num_classes))
  return CifarData(train_images, train_labels, test_images, test_labels, names, num_classes)


# ---------------------------------------------------------------------------------------------
# Augmentation: pure JAX, batched, jit-able.


def random_crop(rng: jax.Array, images: jax.Array, padding: int = 4,
                pad_value: int = 128) -> jax.Array:
  """Pads each image by ``padding`` pixels of ``pad_value`` and crops it back at a random place.

  Args:
    rng: a PRNG key.
    images: ``(B, H, W, C)``, any dtype.
    padding: pixels added on each side; the crop offset is uniform in ``0..2*padding``.
    pad_value: value of the padding (128, mid-grey, as in the AMP authors' code; torchvision's
      default is 0).

  Returns:
    Images of the input's shape and dtype.
  """
  if padding == 0:
    return images
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                   constant_values=jnp.asarray(pad_value, images.dtype))
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * padding + 1)
  # One slice per image (a gather with a batch dimension): on a batch-sharded mesh each device
  # crops its own rows. Indexing with three index arrays instead made XLA gather or reduce
  # the whole batch onto every device.
  crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def random_flip(rng: jax.Array, images: jax.Array) -> jax.Array:
  """Flips each image left-right with probability 1/2."""
  flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def cutout(rng: jax.Array, images: jax.Array, size: int) -> jax.Array:
  """Cutout (DeVries and Taylor, 2017): zeroes one ``size`` x ``size`` square per image.

  The square's centre is uniform over the image; the square is clipped at the borders, so it
  may be smaller near an edge.

  Args:
    rng: a PRNG key.
    images: ``(B, H, W, C)``.
    size: side of the square; 0 disables Cutout.

  Returns:
    Images of the input's shape and dtype with the square set to 0.
  """
  if size <= 0:
    return images
  b, h, w, _ = images.shape
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (b, 1), 0, h)
  cx = jax.random.randint(kx, (b, 1), 0, w)
  ys, xs = jnp.arange(h), jnp.arange(w)
  in_y = (ys >= cy - size // 2) & (ys < cy - size // 2 + size)  # (B, H)
  in_x = (xs >= cx - size // 2) & (xs < cx - size // 2 + size)  # (B, W)
  hole = in_y[:, :, None] & in_x[:, None, :]
  return jnp.where(hole[..., None], jnp.zeros((), images.dtype), images)


def normalize(images: jax.Array, mean: Any, std: Any, dtype: Any = jnp.float32) -> jax.Array:
  """uint8 images to ``dtype``: ``(x / 255 - mean) / std`` per channel."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def augment(rng: jax.Array, images: jax.Array, mean: Any, std: Any, *, padding: int = 4,
            flip: bool = True, cutout_size: int = 0, pad_value: int = 128) -> jax.Array:
  """The CIFAR training augmentation, on a batch of uint8 images, in JAX.

  Random crop with ``padding`` pixels of ``pad_value``, random horizontal flip, optional Cutout
  (zero pixels, before normalisation, as in the AMP authors' pipeline), then per-channel
  normalisation. Each image gets its own random draws, all from ``rng``.

  Args:
    rng: a PRNG key.
    images: uint8 ``(B, H, W, C)``.
    mean: per-channel mean in [0, 1].
    std: per-channel standard deviation in [0, 1].
    padding: crop padding (0 disables the crop).
    flip: whether to flip at random.
    cutout_size: side of the Cutout square (0 disables it).
    pad_value: value of the crop padding.

  Returns:
    float32 ``(B, H, W, C)`` normalised images.
  """
  k_crop, k_flip, k_cut = jax.random.split(rng, 3)
  images = random_crop(k_crop, images, padding, pad_value)
  if flip:
    images = random_flip(k_flip, images)
  images = cutout(k_cut, images, cutout_size)
  return normalize(images, mean, std)
