"""Load a data set ONCE into memory: uint8 images (N, C, H, W), int64 labels, class names.

Every source ends in the same `Dataset`, so the training loop never sees files:

- ``cifar10``, ``cifar100``, ``mnist``, ``fashion-mnist``
                torchvision's data sets in a data root, downloaded only when missing, under a file
                lock so concurrent processes never download or extract twice; MNIST-style sets are
                1x28x28 grayscale, the CIFAR sets 3x32x32;
- a folder      ``<path>/train/<class>/*.jpg`` and ``<path>/test/<class>/*.jpg`` (torchvision's
                ImageFolder layout); decoded once, then cached on disk as arrays;
- ``synthetic`` a small learnable set generated from a seed, for tests and smoke runs.

Arrays are numpy so Ray can share them zero-copy through its object store.
"""

from __future__ import annotations

import hashlib
import io
import os
import urllib.error
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from trainable.fileio import atomic_write_bytes

# torchvision's ImageFolder extensions; anything else in a class folder is ignored, as there.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_FORMAT = 1  # bump when the cached arrays change meaning


class DataError(RuntimeError):
    """Data that cannot be loaded; the message names the file or folder and what to do."""


@dataclass(frozen=True)
class Dataset:
    train_images: np.ndarray  # uint8 (N, C, H, W)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray  # uint8 (M, C, H, W)
    test_labels: np.ndarray  # int64 (M,)
    classes: tuple[str, ...]
    source: str  # what was loaded, for messages and reports

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.source}: {len(self.train_labels)} train + {len(self.test_labels)} test, "
            f"{self.num_classes} classes, images {'x'.join(map(str, self.input_shape))})"
        )


def default_cache_dir() -> Path:
    return Path(os.environ.get("HPTUNE_CACHE", "~/.cache/hptune")).expanduser()


def load_dataset(source: str, data_root: str | os.PathLike[str] = "data",
                 cache_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Load `source` (a torchvision set's name, ``synthetic`` or an image-folder path) into memory.

    A relative path (image folder, data root) is relative to the working directory.
    """
    if source in TORCHVISION_SETS:
        return load_torchvision(source, data_root)
    if source == "synthetic":
        return make_synthetic()
    return load_image_folder(source, cache_dir=cache_dir)


# --- synthetic -----------------------------------------------------------------------------


def make_synthetic(
    seed: int = 0,
    n_train: int = 2048,
    n_test: int = 512,
    shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
) -> Dataset:
    """A small learnable set: each class is a fixed random pattern under heavy pixel noise.

    It reproduces the tutorial's situation in seconds: with the tutorial's hyperparameters the
    MLP under-fits for all 10 epochs (its epoch-mean train loss stays above the test loss), while
    a good configuration learns the patterns and then memorises the noise, so its train loss
    falls below the test loss and keeps falling.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(0.0, 1.0, size=(num_classes, *shape))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, num_classes, size=n)
        pixels = 128 + 30 * prototypes[labels] + 55 * rng.normal(0.0, 1.0, size=(n, *shape))
        return np.clip(pixels, 0, 255).astype(np.uint8), labels.astype(np.int64)

    train_x, train_y = split(n_train)
    test_x, test_y = split(n_test)
    classes = tuple(f"class{i}" for i in range(num_classes))
    return Dataset(train_x, train_y, test_x, test_y, classes, f"synthetic(seed={seed})")


# --- torchvision's data sets, by name ------------------------------------------------------


@dataclass(frozen=True)
class TorchvisionSet:
    """One of torchvision's data sets as `--data` names it, and where its files go offline."""

    cls: str  # the class in torchvision.datasets
    title: str  # the name in messages
    files: str  # the files to place by hand, relative to the data root
    site: str  # where to get them


CIFAR_SITE = "https://www.cs.toronto.edu/~kriz/cifar.html"
TORCHVISION_SETS = {
    "cifar10": TorchvisionSet("CIFAR10", "CIFAR-10", "cifar-10-python.tar.gz", CIFAR_SITE),
    "cifar100": TorchvisionSet("CIFAR100", "CIFAR-100", "cifar-100-python.tar.gz", CIFAR_SITE),
    "mnist": TorchvisionSet(
        "MNIST",
        "MNIST",
        "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
    ),
    "fashion-mnist": TorchvisionSet(
        "FashionMNIST",
        "Fashion-MNIST",
        "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz",
        "https://github.com/zalandoresearch/fashion-mnist",
    ),
}
SOURCE_NAMES = (*TORCHVISION_SETS, "synthetic")  # what --data takes besides a folder's path


def load_torchvision(name: str, data_root: str | os.PathLike[str]) -> Dataset:
    """`name` (a key of TORCHVISION_SETS) via torchvision.datasets in `data_root`.

    Downloaded only when missing, under a file lock so concurrent processes never download or
    extract twice. Colour sets become (N, 3, 32, 32), MNIST-style sets (N, 1, 28, 28), uint8.
    """
    import torchvision.datasets

    spec = TORCHVISION_SETS[name]
    cls = getattr(torchvision.datasets, spec.cls)
    root = Path(data_root).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{root}: cannot create the {spec.title} data root ({exc.strerror})") from None
    # One process downloads and extracts; any other waits here and then finds the files.
    with _lock(root / f".{name}.lock"):
        try:
            train = cls(str(root), train=True, download=False)
        except RuntimeError:  # "Dataset not found or corrupted"
            train = _download(cls, spec, root)
        test = cls(str(root), train=False, download=False)
    return Dataset(*_arrays(train), *_arrays(test), tuple(train.classes), f"{name}({root})")


def load_cifar10(data_root: str | os.PathLike[str]) -> Dataset:
    """CIFAR-10 via torchvision.datasets.CIFAR10 in `data_root`, downloading only when missing."""
    return load_torchvision("cifar10", data_root)


def _arrays(split) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001 - a torchvision data set
    """(images uint8 (N, C, H, W), labels int64) from a torchvision CIFAR or MNIST object."""
    images = np.asarray(split.data)  # CIFAR: numpy (N, H, W, C); MNIST: a uint8 tensor (N, H, W)
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images, dtype=np.uint8), np.asarray(split.targets, dtype=np.int64)


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Hold a file lock; DataError if its folder does not let us create one."""
    lock = FileLock(str(path))
    try:
        lock.acquire()
    except OSError as exc:
        raise DataError(f"{path.parent}: cannot write here ({exc.strerror or exc})") from None
    try:
        yield
    finally:
        lock.release()


def _download(cls: type, spec: TorchvisionSet, root: Path):  # noqa: ANN202 - torchvision's class
    try:
        return cls(str(root), train=True, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split())  # MNIST's has a line per mirror
        raise DataError(
            f"{spec.title} is not in {root} and could not be downloaded ({reason}). "
            f"Put {spec.files} ({spec.site}) in {root}, "
            "or pass --data PATH to an image folder with train/<class>/ and test/<class>/ "
            "(for example the extracted cifar10-jpeg archive)."
        ) from None


# --- image folder --------------------------------------------------------------------------


def load_image_folder(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Decode ``path/{train,test}/<class>/<image>`` once; later loads read the cached arrays."""
    root = Path(path).expanduser().resolve()
    listing = _list_image_folder(root)
    key = _listing_key(root, listing)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{cache}: cannot create the cache folder ({exc.strerror})") from None
    cache_file = cache / f"imagefolder-{key}.npz"
    # A second process loading the same folder waits for the first to finish decoding.
    with _lock(Path(str(cache_file) + ".lock")):
        if cache_file.exists():
            try:
                return _read_cache(cache_file, root)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                cache_file.unlink(missing_ok=True)  # damaged: decode again
        data = _decode_image_folder(root, listing)
        _write_cache(cache_file, data)
    return data


Listing = dict[str, list[tuple[str, list[os.DirEntry]]]]  # split -> [(class, [image entries])]


def _list_image_folder(root: Path) -> Listing:
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (--data expects {', '.join(SOURCE_NAMES)} or an image folder)")
    listing: Listing = {}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(
                f"{root}: no {split}/ folder; an image folder needs train/<class>/<image> and test/<class>/<image>"
            )
        class_dirs = sorted((e for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")),
                            key=lambda e: e.name)
        if not class_dirs:
            raise DataError(f"{split_dir}: no class folders")
        classes = []
        for class_dir in class_dirs:
            images = sorted(
                (e for e in os.scandir(class_dir.path) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)),
                key=lambda e: e.name,
            )
            if not images:
                raise DataError(f"{class_dir.path}: class folder has no images")
            classes.append((class_dir.name, images))
        listing[split] = classes
    train_classes = [c for c, _ in listing["train"]]
    test_classes = [c for c, _ in listing["test"]]
    if train_classes != test_classes:
        only = sorted(set(train_classes) ^ set(test_classes))
        raise DataError(f"{root}: train/ and test/ have different class folders ({', '.join(only)})")
    return listing


def _listing_key(root: Path, listing: Listing) -> str:
    """Identity of the folder's contents: every file's path, size and modification time."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}\0{root}".encode())
    for split, classes in listing.items():
        for name, entries in classes:
            for entry in entries:
                st = entry.stat()
                digest.update(f"{split}/{name}/{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _decode(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:  # PIL raises many types for bad files
        raise DataError(f"{path}: cannot read image ({exc})") from None


def _decode_image_folder(root: Path, listing: Listing) -> Dataset:
    arrays = {}
    for split, classes in listing.items():
        paths = [entry.path for _, entries in classes for entry in entries]
        labels = np.concatenate([np.full(len(entries), i, dtype=np.int64) for i, (_, entries) in enumerate(classes)])
        first = _decode(paths[0])
        images = np.empty((len(paths), 3, *first.shape[:2]), dtype=np.uint8)

        def fill(i: int) -> None:
            pixels = _decode(paths[i])
            if pixels.shape != first.shape:
                raise DataError(
                    f"{paths[i]}: image is {pixels.shape[1]}x{pixels.shape[0]}, but {paths[0]} is "
                    f"{first.shape[1]}x{first.shape[0]}; all images must have one size"
                )
            images[i] = pixels.transpose(2, 0, 1)

        # PIL releases the GIL while decoding, so threads use every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(fill, range(len(paths))))
        arrays[split] = (images, labels)
    if arrays["train"][0].shape[1:] != arrays["test"][0].shape[1:]:
        raise DataError(f"{root}: train/ and test/ images have different sizes")
    classes = tuple(name for name, _ in listing["train"])
    return Dataset(*arrays["train"], *arrays["test"], classes, f"image folder({root})")


def _write_cache(cache_file: Path, data: Dataset) -> None:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        train_images=data.train_images,
        train_labels=data.train_labels,
        test_images=data.test_images,
        test_labels=data.test_labels,
        classes=np.array(data.classes),
    )
    atomic_write_bytes(cache_file, buffer.getvalue())


def _read_cache(cache_file: Path, root: Path) -> Dataset:
    with np.load(cache_file, allow_pickle=False) as npz:
        return Dataset(
            npz["train_images"],
            npz["train_labels"],
            npz["test_images"],
            npz["test_labels"],
            tuple(str(c) for c in npz["classes"]),
            f"image folder({root})",
        )
