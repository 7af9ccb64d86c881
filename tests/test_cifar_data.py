"""Tests of examples/cifar/data.py: the safe CIFAR loader and the JAX augmentation."""

import os
import pickle
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.cifar import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_PY = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar-10-jpeg", "build.py")


# ---------------------------------------------------------------------------------------------
# Files encoded like the official ones: Python 2 cPickle, protocol 2, strings as BINSTRING (bytes
# under encoding="bytes"), the image array through numpy.core.multiarray._reconstruct with its raw
# bytes as one BINSTRING. Python 3's pickler cannot write that, so the opcodes are spelled out.

PROTO2, MARK, STOP, DICT_EMPTY, SETITEMS = b"\x80\x02", b"(", b".", b"}", b"u"
LIST_EMPTY, APPENDS, TUPLE, TUPLE1, TUPLE3 = b"]", b"e", b"t", b"\x85", b"\x87"
REDUCE, BUILD, NONE, NEWTRUE, NEWFALSE = b"R", b"b", b"N", b"\x88", b"\x89"


def _str(b: bytes) -> bytes:
  if len(b) < 256:
    return b"U" + bytes([len(b)]) + b  # SHORT_BINSTRING
  return b"T" + struct.pack("<i", len(b)) + b  # BINSTRING


def _int(i: int) -> bytes:
  return b"K" + bytes([i]) if 0 <= i < 256 else b"J" + struct.pack("<i", i)


def _global(module: str, name: str) -> bytes:
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _uint8_array(a: np.ndarray) -> bytes:
  a = np.ascontiguousarray(a, np.uint8)
  out = _global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
  out += _int(0) + TUPLE1 + _str(b"b") + TUPLE3 + REDUCE
  dtype = _global("numpy", "dtype") + _str(b"u1") + NEWFALSE + NEWTRUE + TUPLE3 + REDUCE
  dtype += MARK + _int(3) + _str(b"|") + NONE * 3 + _int(-1) + _int(-1) + _int(0) + TUPLE + BUILD
  shape = MARK + b"".join(_int(d) for d in a.shape) + TUPLE
  return out + MARK + _int(1) + shape + dtype + NEWFALSE + _str(a.tobytes()) + TUPLE + BUILD


def _list(items: list[bytes]) -> bytes:
  return LIST_EMPTY + MARK + b"".join(items) + APPENDS


def _dict(entries: list[tuple[bytes, bytes]]) -> bytes:
  return PROTO2 + DICT_EMPTY + MARK + b"".join(_str(k) + v for k, v in entries) + SETITEMS + STOP


def encode_batch(rows: np.ndarray, labels, label_key: bytes = b"labels", extra=()) -> bytes:
  names = [_str(f"img_{i:05d}.png".encode()) for i in range(len(rows))]
  return _dict([(b"batch_label", _str(b"a batch")),
                (label_key, _list([_int(int(v)) for v in labels])),
                *extra,
                (b"data", _uint8_array(rows)),
                (b"filenames", _list(names))])


def write_cifar10(root: str, n_per_batch: int = 4, n_test: int = 6, seed: int = 0) -> dict:
  """Writes ROOT/cifar-10-batches-py/ with random images; returns what was written."""
  rng = np.random.default_rng(seed)
  out = os.path.join(root, "cifar-10-batches-py")
  os.makedirs(out, exist_ok=True)
  written = {}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    n = n_test if name == "test_batch" else n_per_batch
    rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    with open(os.path.join(out, name), "wb") as f:
      f.write(encode_batch(rows, labels))
    written[name] = (rows, labels)
  names = [_str(f"class{i}".encode()) for i in range(10)]
  with open(os.path.join(out, "batches.meta"), "wb") as f:
    f.write(_dict([(b"num_cases_per_batch", _int(n_per_batch)), (b"label_names", _list(names)),
                   (b"num_vis", _int(3072))]))
  return written


def write_cifar100(root: str, n_train: int = 8, n_test: int = 4, seed: int = 0) -> dict:
  """Writes ROOT/cifar-100-python/ (train, test, meta) with random images."""
  rng = np.random.default_rng(seed)
  out = os.path.join(root, "cifar-100-python")
  os.makedirs(out, exist_ok=True)
  written = {}
  for name, n in (("train", n_train), ("test", n_test)):
    rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    fine = rng.integers(0, 100, size=n)
    coarse = _list([_int(int(v) // 5) for v in fine])
    with open(os.path.join(out, name), "wb") as f:
      f.write(encode_batch(rows, fine, b"fine_labels", extra=[(b"coarse_labels", coarse)]))
    written[name] = (rows, fine)
  with open(os.path.join(out, "meta"), "wb") as f:
    f.write(_dict([(b"fine_label_names", _list([_str(b"f%d" % i) for i in range(100)])),
                   (b"coarse_label_names", _list([_str(b"c%d" % i) for i in range(20)]))]))
  return written


def _nhwc(rows: np.ndarray) -> np.ndarray:
  return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------
# Loading.


def test_encoder_matches_shared_writer():
  """The fixture writer produces the same bytes as ../shared/data/cifar_pickle.py (if present)."""
  shared = os.path.join(os.path.dirname(REPO), "shared", "data")
  if not os.path.exists(os.path.join(shared, "cifar_pickle.py")):
    pytest.skip("../shared/data/cifar_pickle.py not present")
  sys.path.insert(0, shared)
  try:
    import cifar_pickle
  finally:
    sys.path.remove(shared)
  rows = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
  theirs = cifar_pickle.dumps_batch("a batch", [3, 7], rows, ["img_00000.png", "img_00001.png"])
  assert encode_batch(rows, [3, 7]) == theirs


def test_load_cifar10(tmp_path):
  written = write_cifar10(str(tmp_path), n_per_batch=4, n_test=6)
  for where in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
    d = data.load_cifar(str(where), "cifar10")
    assert d.train_images.shape == (20, 32, 32, 3) and d.train_images.dtype == np.uint8
    assert d.test_images.shape == (6, 32, 32, 3)
    assert d.train_labels.dtype == np.int32 and d.train_labels.shape == (20,)
    assert d.num_classes == 10 and d.class_names == tuple(f"class{i}" for i in range(10))
    rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])
    np.testing.assert_array_equal(d.train_images, _nhwc(rows))
    np.testing.assert_array_equal(d.train_labels, labels)
    np.testing.assert_array_equal(d.test_images, _nhwc(written["test_batch"][0]))
  # Channel-major rows: the first 1024 bytes are the red plane, row by row.
  assert d.test_images[0, 0, 1, 0] == written["test_batch"][0][0, 1]
  assert d.test_images[0, 1, 0, 2] == written["test_batch"][0][0, 2048 + 32]


def test_load_cifar100(tmp_path):
  written = write_cifar100(str(tmp_path))
  d = data.load_cifar(str(tmp_path), "cifar100")
  assert d.num_classes == 100 and len(d.class_names) == 100
  np.testing.assert_array_equal(d.train_images, _nhwc(written["train"][0]))
  np.testing.assert_array_equal(d.train_labels, written["train"][1])
  np.testing.assert_array_equal(d.test_labels, written["test"][1])


class _Evil:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def _crafted(kind: str, marker: str) -> bytes:
  command = f"touch {marker}"
  if kind == "protocol2_opcodes":  # a CIFAR-looking dict whose labels call posix.system
    call = _global("posix", "system") + _str(command.encode()) + TUPLE1 + REDUCE
    return _dict([(b"labels", call), (b"data", _uint8_array(np.zeros((1, 3072))))])
  if kind == "builtins_eval":
    call = _global("builtins", "eval") + _str(f"__import__('os').system({command!r})".encode())
    return _dict([(b"data", call + TUPLE1 + REDUCE)])
  protocol = {"pickler_protocol2": 2, "pickler_protocol4": 4, "pickler_protocol5": 5}[kind]
  return pickle.dumps({b"data": _Evil(command), b"labels": [0]}, protocol=protocol)


@pytest.mark.parametrize("kind", ["protocol2_opcodes", "builtins_eval", "pickler_protocol2",
                                  "pickler_protocol4", "pickler_protocol5"])
def test_crafted_pickle_is_refused_and_not_run(tmp_path, kind):
  write_cifar10(str(tmp_path))
  marker = tmp_path / "PWNED"
  blob = _crafted(kind, str(marker))
  path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
  path.write_bytes(blob)
  with pytest.raises(data.CifarFormatError, match="data_batch_2.*refusing"):
    data.load_cifar(str(tmp_path))
  with pytest.raises(data.CifarFormatError):
    data.safe_load(str(path))
  assert not marker.exists()
  # The payload is live: a plain unpickler runs it.
  try:
    pickle.loads(blob, encoding="bytes")
  except Exception:  # the call happened; what follows it may not unpickle
    pass
  assert marker.exists()


def test_object_arrays_are_refused(tmp_path):
  path = tmp_path / "objects"
  path.write_bytes(pickle.dumps(np.array([1, "x"], dtype=object), protocol=4))
  with pytest.raises(data.CifarFormatError, match="object dtype"):
    data.safe_load(str(path))


def test_missing_directory_says_how_to_get_data(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(data.CifarFormatError) as e:
    data.load_cifar(str(missing))
  assert str(missing) in str(e.value) and "build.py" in str(e.value)
  assert "cs.toronto.edu" in str(e.value)
  with pytest.raises(data.CifarFormatError, match="holds neither"):
    data.load_cifar(str(tmp_path))  # exists, but holds no CIFAR files


def test_missing_file(tmp_path):
  write_cifar10(str(tmp_path))
  os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
  with pytest.raises(data.CifarFormatError, match="missing file .*data_batch_3"):
    data.load_cifar(str(tmp_path))


@pytest.mark.parametrize("what", ["shape", "label_range", "label_count", "not_a_pickle",
                                  "truncated", "no_data_key"])
def test_malformed_files(tmp_path, what):
  write_cifar10(str(tmp_path))
  path = tmp_path / "cifar-10-batches-py" / "test_batch"
  rows = np.zeros((3, 3072), np.uint8)
  blob = {
      "shape": encode_batch(np.zeros((3, 3000), np.uint8), [0, 1, 2]),
      "label_range": encode_batch(rows, [0, 1, 10]),
      "label_count": encode_batch(rows, [0, 1]),
      "not_a_pickle": b"this is not a pickle",
      "truncated": encode_batch(rows, [0, 1, 2])[:500],
      "no_data_key": _dict([(b"labels", _list([_int(0)]))]),
  }[what]
  path.write_bytes(blob)
  expected = {"shape": r"\(N, 3072\)", "label_range": "0..9", "label_count": "must be 3 ints",
              "not_a_pickle": "not a valid", "truncated": "not a valid",
              "no_data_key": "no 'data' entry"}[what]
  with pytest.raises(data.CifarFormatError, match=expected) as e:
    data.load_cifar(str(tmp_path))
  assert "test_batch" in str(e.value)


@pytest.mark.slow
def test_real_subset_from_shared_build(tmp_path):
  """Builds 500/100 real CIFAR-10 images with ../shared/.../build.py and loads them."""
  if not os.path.exists(BUILD_PY):
    pytest.skip("../shared/data/cifar-10-jpeg/build.py not present")
  subprocess.run([sys.executable, BUILD_PY, str(tmp_path), "--train", "500", "--test", "100"],
                 check=True, capture_output=True)
  d = data.load_cifar(str(tmp_path), "cifar10")
  assert d.train_images.shape == (500, 32, 32, 3) and d.test_images.shape == (100, 32, 32, 3)
  assert d.class_names[0] == "airplane" and d.class_names[-1] == "truck"
  assert set(np.unique(d.train_labels)) == set(range(10))
  mean = d.train_images.reshape(-1, 3).mean(0) / 255  # CIFAR-10's channel means, roughly
  np.testing.assert_allclose(mean, data.MEAN["cifar10"], atol=0.03)


def test_synthetic_dataset_shapes():
  d = data.synthetic_cifar(64, 32, num_classes=10, seed=1)
  assert d.train_images.shape == (64, 32, 32, 3) and d.train_images.dtype == np.uint8
  assert d.test_labels.shape == (32,) and d.test_labels.dtype == np.int32
  np.testing.assert_array_equal(d.train_images, data.synthetic_cifar(64, 32, seed=1).train_images)


# ---------------------------------------------------------------------------------------------
# Augmentation.


def _images(n=16, h=32, w=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(1, 256, (n, h, w, 3), dtype=np.uint8))


def test_flip_is_a_flip():
  x = _images()
  y = np.asarray(data.random_flip(jax.random.key(0), x))
  flipped = [np.array_equal(y[i], np.asarray(x[i])[:, ::-1]) for i in range(len(x))]
  same = [np.array_equal(y[i], np.asarray(x[i])) for i in range(len(x))]
  assert all(f or s for f, s in zip(flipped, same, strict=True))
  assert any(flipped) and any(same)


def test_crop_is_a_shifted_window():
  x, padding = _images(8), 4
  y = np.asarray(data.random_crop(jax.random.key(1), x, padding, pad_value=7))
  assert y.shape == x.shape and y.dtype == x.dtype
  padded = np.pad(np.asarray(x), ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)),
                  constant_values=7)
  offsets = set()
  for i in range(len(x)):
    hits = [(a, b) for a in range(2 * padding + 1) for b in range(2 * padding + 1)
            if np.array_equal(y[i], padded[i, a:a + 32, b:b + 32])]
    assert hits, f"image {i} is not a window of its padded image"
    offsets.add(hits[0])
  assert len(offsets) > 1
  np.testing.assert_array_equal(data.random_crop(jax.random.key(1), x, 0), x)


def test_cutout_zeroes_one_square():
  x = jnp.full((32, 32, 32, 3), 5, jnp.uint8)
  size = 8
  y = np.asarray(data.cutout(jax.random.key(2), x, size))
  assert y.shape == x.shape and set(np.unique(y)) <= {0, 5}
  full_squares = 0
  for img in y:
    hole = img[..., 0] == 0
    assert (img[hole] == 0).all() and (img[~hole] == 5).all()  # all channels together
    rows, cols = np.nonzero(hole.any(1))[0], np.nonzero(hole.any(0))[0]
    assert 0 < hole.sum() <= size * size
    assert hole.sum() == len(rows) * len(cols)  # one axis-aligned rectangle
    assert rows.max() - rows.min() < size and cols.max() - cols.min() < size
    full_squares += hole.sum() == size * size
  assert full_squares > 0  # away from the borders the square is whole
  np.testing.assert_array_equal(data.cutout(jax.random.key(2), x, 0), x)


def test_normalize():
  x = jnp.asarray([[[[0, 255, 51]]]], jnp.uint8)
  y = data.normalize(x, (0.5, 0.5, 0.2), (0.25, 0.5, 0.1))
  np.testing.assert_allclose(y[0, 0, 0], [-2.0, 1.0, 0.0], atol=1e-6)
  assert y.dtype == jnp.float32


def test_augment_jits_and_is_deterministic():
  x = _images(8)
  mean, std = data.MEAN["cifar10"], data.STD["cifar10"]
  fn = jax.jit(lambda k, im: data.augment(k, im, mean, std, cutout_size=16))
  a, b = fn(jax.random.key(3), x), fn(jax.random.key(3), x)
  assert a.shape == (8, 32, 32, 3) and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, fn(jax.random.key(4), x))
  plain = data.augment(jax.random.key(3), x, mean, std, padding=0, flip=False)
  np.testing.assert_allclose(plain, data.normalize(x, mean, std))
