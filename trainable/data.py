"""Load a data set ONCE into memory: inputs (N, ...), int64 labels, class names.

Every source ends in the same `Dataset`, so the training loop never sees files:

- ``cifar10``, ``cifar100``, ``mnist``, ``fashion-mnist``
                torchvision's data sets in a data root, downloaded only when missing, under a file
                lock so concurrent processes never download or extract twice; MNIST-style sets are
                1x28x28 grayscale, the CIFAR sets 3x32x32;
- a folder      ``<path>/train/<class>/*.jpg`` and ``<path>/test/<class>/*.jpg`` (torchvision's
                ImageFolder layout); decoded once, then cached on disk as arrays;
- ``synthetic`` a small learnable set generated from a seed, for tests and smoke runs;
- a data factory, ``pkg.module:factory`` or ``path/to/file.py:factory``: a function of no
                arguments returning the train and test splits, as tensors or arrays, or as
                map-style torch Datasets (`from_splits` says which forms).

Inputs are uint8 images (scaled to [0, 1] per batch, as torchvision's ToTensor does), floats
(used as they are; float64 is stored as float32) or other integers (handed to the model as they
are, e.g. token ids). Arrays are numpy so Ray can share them zero-copy through its object store.
Map-style Datasets too large to hold in memory (`memory_limit`) stay Datasets (`StreamedData`),
read through a DataLoader in each trial.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import urllib.error
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from filelock import FileLock

from trainable.fileio import atomic_write_bytes
from trainable.refs import BadReferenceError, call_user, describe, is_reference, resolve

# torchvision's ImageFolder extensions; anything else in a class folder is ignored, as there.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_FORMAT = 1  # bump when the cached arrays change meaning


class DataError(RuntimeError):
    """Data that cannot be loaded; the message names the file or folder and what to do."""


@dataclass(frozen=True)
class Dataset:
    train_inputs: np.ndarray  # (N, ...): uint8 images (N, C, H, W), floats, or integers
    train_labels: np.ndarray  # int64 (N,), class indices 0 .. num_classes - 1
    test_inputs: np.ndarray  # (M, ...), the same dtype and shape per example
    test_labels: np.ndarray  # int64 (M,)
    classes: tuple[str, ...]
    source: str  # what was loaded, for messages and reports

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_inputs.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_size(self) -> int:
        return len(self.train_labels)

    @property
    def test_size(self) -> int:
        return len(self.test_labels)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.train_inputs, self.train_labels, self.test_inputs, self.test_labels))

    def __repr__(self) -> str:
        kind = "images" if self.train_inputs.dtype == np.uint8 and len(self.input_shape) == 3 else "inputs"
        return (
            f"Dataset({self.source}: {len(self.train_labels)} train + {len(self.test_labels)} test, "
            f"{self.num_classes} classes, {kind} {'x'.join(map(str, self.input_shape))}"
            f"{'' if kind == 'images' else ' ' + str(self.train_inputs.dtype)})"
        )


@dataclass(frozen=True)
class StreamedData:
    """Map-style Datasets too large to load into memory once: each trial reads them through a
    DataLoader (an item is (input, label); inputs as for `Dataset`)."""

    train: Any  # torch.utils.data.Dataset
    test: Any
    input_shape: tuple[int, ...]
    input_dtype: str  # of one example, e.g. "uint8", "float32"
    classes: tuple[str, ...]
    source: str
    nbytes: int  # what holding both splits in memory would take

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_size(self) -> int:
        return len(self.train)

    @property
    def test_size(self) -> int:
        return len(self.test)

    def __repr__(self) -> str:
        return (f"StreamedData({self.source}: {len(self.train)} train + {len(self.test)} test, "
                f"{self.num_classes} classes, inputs {'x'.join(map(str, self.input_shape))} {self.input_dtype}, "
                "read through a DataLoader)")


Data = Union[Dataset, StreamedData]  # noqa: UP007 - a runtime alias


def default_cache_dir() -> Path:
    return Path(os.environ.get("HPTUNE_CACHE", "~/.cache/hptune")).expanduser()


DEFAULT_MEMORY_LIMIT = 8 << 30  # bytes: a map-style Dataset larger than this is streamed


def load_dataset(source: str, data_root: str | os.PathLike[str] = "data",
                 cache_dir: str | os.PathLike[str] | None = None, *,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT) -> Data:
    """Load `source` (a torchvision set's name, ``synthetic``, an image-folder path, or a data
    factory's reference) into memory.

    A relative path (image folder, data root, a factory's file) is relative to the working directory.
    """
    if source in TORCHVISION_SETS:
        return load_torchvision(source, data_root)
    if source == "synthetic":
        return make_synthetic()
    if source.startswith("<"):
        raise DataError(f"data {source}: the data was handed to hptune.search as objects, so this configuration "
                        "cannot load it again; give --data a name, an image folder or a data factory MODULE:NAME or "
                        "FILE.py:NAME")
    if is_reference(source):
        try:
            factory = resolve(source, "data")
        except BadReferenceError as exc:
            raise DataError(str(exc)) from None
        return from_factory(factory, source, memory_limit=memory_limit)
    return load_image_folder(source, cache_dir=cache_dir)


def from_factory(factory: Any, source: str | None = None, *, memory_limit: int = DEFAULT_MEMORY_LIMIT) -> Data:
    """Call a data factory (no arguments) and turn what it returns into a Dataset (`from_splits`).
    What it raises becomes a UserCodeError naming it."""
    source = source or describe(factory)
    result = call_user(factory, "the data factory")
    return from_splits(result, source, memory_limit=memory_limit, what=f"the data factory {source}")


# --- a user's splits ---------------------------------------------------------------------------


def from_splits(result: Any, source: str, *, memory_limit: int = DEFAULT_MEMORY_LIMIT,
                what: str = "the data") -> Data:
    """A Dataset from what a data factory returns. Accepted forms:

    - ``(train, test)`` where each split is ``(inputs, labels)`` (tensors or numpy arrays) or a
      map-style torch Dataset whose items are ``(input, label)``;
    - ``(train_inputs, train_labels, test_inputs, test_labels)``;
    - a dict ``{"train": ..., "test": ..., "classes": [names]}`` (classes optional);
    - a `Dataset` of this module.

    Labels are whole numbers 0 .. C-1 (C: len(classes), or the largest label + 1). DataError
    naming the problem for anything else.
    """
    if isinstance(result, (Dataset, StreamedData)):
        return result
    classes = None
    if isinstance(result, dict):
        unknown = set(result) - {"train", "test", "classes"}
        if unknown or not {"train", "test"} <= set(result):
            raise DataError(f"{what} returned a dict with keys {sorted(result)}; expected train, test and "
                            "optionally classes")
        train, test, classes = result["train"], result["test"], result.get("classes")
    elif isinstance(result, (tuple, list)) and len(result) == 4 and not any(_is_split(r) for r in result):
        train, test = (result[0], result[1]), (result[2], result[3])
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        train, test = result
    else:
        raise DataError(f"{what} returned {_kind(result)}; expected (train, test) with each split (inputs, labels) "
                        "or a map-style torch Dataset, or (train_inputs, train_labels, test_inputs, test_labels)")
    splits = {"train": _split(train, "train", what), "test": _split(test, "test", what)}
    if any(isinstance(s, _Lazy) for s in splits.values()):
        lazy = {k: (v if isinstance(v, _Lazy) else _Lazy.of_arrays(*v)) for k, v in splits.items()}
        return _from_lazy(lazy, classes, source, memory_limit, what)
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    return _checked(train_x, train_y, test_x, test_y, classes, source, what)


def _is_split(value: Any) -> bool:
    return isinstance(value, (tuple, list)) or _is_map_dataset(value)


def _is_map_dataset(value: Any) -> bool:
    return (hasattr(value, "__getitem__") and hasattr(value, "__len__")
            and not isinstance(value, (np.ndarray, tuple, list, str, dict)) and not _is_tensor(value))


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _kind(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _array(value: Any, name: str, what: str) -> np.ndarray:
    """A numpy array from a tensor or array (a tensor in bf16 or on a GPU is brought to the CPU)."""
    if _is_tensor(value):
        import torch

        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):
        try:
            return np.asarray(value)
        except ValueError:
            pass
    raise DataError(f"{what}: {name} is {_kind(value)}; expected a tensor or a numpy array")


def _split(value: Any, split: str, what: str) -> tuple[np.ndarray, np.ndarray] | _Lazy:
    if _is_map_dataset(value):
        return _Lazy(value, split, what)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise DataError(f"{what}: the {split} split is {_kind(value)}; expected (inputs, labels) or a map-style "
                        "torch Dataset")
    return _array(value[0], f"the {split} inputs", what), _array(value[1], f"the {split} labels", what)


def _labels(labels: np.ndarray, split: str, n: int, what: str) -> np.ndarray:
    if labels.ndim != 1:
        raise DataError(f"{what}: the {split} labels have shape {labels.shape}; expected one class index per example "
                        f"(shape ({n},)), not one-hot rows")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what}: the {split} labels are {labels.dtype}; expected whole numbers (class indices "
                        "0 .. C-1)")
    if len(labels) != n:
        raise DataError(f"{what}: the {split} split has {n} inputs but {len(labels)} labels")
    if n and labels.min() < 0:
        raise DataError(f"{what}: the {split} labels include {labels.min()}; class indices start at 0")
    return labels.astype(np.int64, copy=False)


def _inputs(inputs: np.ndarray, split: str, what: str) -> np.ndarray:
    if inputs.ndim < 1 or not (np.issubdtype(inputs.dtype, np.number) or inputs.dtype == np.bool_):
        raise DataError(f"{what}: the {split} inputs are {inputs.dtype}; expected numbers")
    if len(inputs) == 0:
        raise DataError(f"{what}: the {split} split is empty")
    if inputs.dtype == np.float64:
        inputs = inputs.astype(np.float32)  # trained in fp32 (or bf16) anyway: half the memory
    elif inputs.dtype == np.bool_:
        inputs = inputs.astype(np.uint8) * 255  # a 0/1 image: scaled back to 0/1 like any uint8 one
    return np.ascontiguousarray(inputs)


def _classes(classes: Any, labels: list[np.ndarray], what: str) -> tuple[str, ...]:
    top = max(int(y.max()) for y in labels if len(y)) + 1
    if classes is None:
        if top < 2:
            raise DataError(f"{what}: every label is 0; a classifier needs at least two classes")
        return tuple(str(i) for i in range(top))
    names = tuple(str(c) for c in classes)
    if len(names) < 2:
        raise DataError(f"{what}: classes names {len(names)} class(es); a classifier needs at least two")
    if top > len(names):
        raise DataError(f"{what}: a label is {top - 1}, out of range for {len(names)} classes (0 .. {len(names) - 1})")
    return names


def _checked(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, classes: Any,
             source: str, what: str) -> Dataset:
    train_x, test_x = _inputs(train_x, "train", what), _inputs(test_x, "test", what)
    train_y = _labels(train_y, "train", len(train_x), what)
    test_y = _labels(test_y, "test", len(test_x), what)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"{what}: train inputs are {train_x.shape[1:]} per example, test inputs {test_x.shape[1:]}")
    if train_x.dtype != test_x.dtype:
        test_x = test_x.astype(train_x.dtype)
    return Dataset(train_x, train_y, test_x, test_y, _classes(classes, [train_y, test_y], what), source)


class _Lazy:
    """One split given as a map-style Dataset, before it is loaded (or left to stream)."""

    def __init__(self, dataset: Any, split: str, what: str) -> None:
        self.dataset, self.split, self.what = dataset, split, what
        try:
            self.n = len(dataset)
        except Exception as exc:  # noqa: BLE001 - the user's Dataset
            raise DataError(f"{what}: len() of the {split} Dataset raised {type(exc).__name__}: {exc}") from None
        if self.n == 0:
            raise DataError(f"{what}: the {split} split is empty")
        x, y = self.item(0)
        self.shape, self.dtype = x.shape, x.dtype

    @classmethod
    def of_arrays(cls, inputs: np.ndarray, labels: np.ndarray) -> Any:
        import torch.utils.data

        return cls(torch.utils.data.TensorDataset(torch_tensor(inputs), torch_tensor(labels)), "", "")

    def item(self, i: int) -> tuple[np.ndarray, int]:
        try:
            item = self.dataset[i]
        except Exception as exc:  # noqa: BLE001 - the user's Dataset
            raise DataError(f"{self.what}: the {self.split} Dataset's item {i} raised {type(exc).__name__}: "
                            f"{exc}") from None
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"{self.what}: an item of the {self.split} Dataset is {_kind(item)}; expected "
                            "(input, label)")
        x, y = item
        if type(x).__module__.startswith("PIL"):
            raise DataError(f"{self.what}: the {self.split} Dataset gives PIL images; give it a transform that makes "
                            "tensors (torchvision.transforms.PILToTensor() keeps uint8, ToTensor() scales to floats)")
        x = _array(x, f"an input of the {self.split} Dataset", self.what)
        label = np.asarray(_array(y, "a label", self.what) if not isinstance(y, (int, np.integer)) else y)
        if label.ndim != 0 or not np.issubdtype(label.dtype, np.integer):
            raise DataError(f"{self.what}: a label of the {self.split} Dataset is {label!r}; expected a whole number")
        return x, int(label)

    @property
    def nbytes(self) -> int:
        return self.n * (int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize + 8)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        inputs = np.empty((self.n, *self.shape), dtype=self.dtype)
        labels = np.empty(self.n, dtype=np.int64)
        for i in range(self.n):
            x, y = self.item(i)
            if x.shape != self.shape:
                raise DataError(f"{self.what}: item {i} of the {self.split} Dataset has shape {x.shape}, item 0 "
                                f"{self.shape}; every input must have one shape")
            inputs[i], labels[i] = x, y
        return inputs, labels


def torch_tensor(array: np.ndarray) -> Any:
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")  # Ray's arrays are read-only; we only read
        return torch.from_numpy(array)


def _from_lazy(splits: dict[str, _Lazy], classes: Any, source: str, memory_limit: int, what: str) -> Data:
    train, test = splits["train"], splits["test"]
    if train.shape != test.shape:
        raise DataError(f"{what}: train inputs are {train.shape} per example, test inputs {test.shape}")
    nbytes = train.nbytes + test.nbytes
    if nbytes <= memory_limit:
        (train_x, train_y), (test_x, test_y) = train.load(), test.load()
        return _checked(train_x, train_y, test_x, test_y, classes, source, what)
    # Too large to hold: the labels are still read once, to know the classes and check them.
    labels = [np.array([s.item(i)[1] for i in range(s.n)], dtype=np.int64) for s in (train, test)]
    names = _classes(classes, labels, what)
    return StreamedData(train.dataset, test.dataset, tuple(train.shape), str(np.dtype(train.dtype)), names, source,
                        nbytes)


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
    return Dataset(*_arrays(train), *_arrays(test), tuple(train.classes), f"{name}({root})")  # uint8 (N, C, H, W)


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
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise DataError(f"{path}: cannot read image ({exc})") from None


def _fill(images: np.ndarray, paths: list[str], shape: tuple[int, ...], i: int) -> None:
    """Decode image `i` into its row of `images`; every image must have the first one's `shape`."""
    pixels = _decode(paths[i])
    if pixels.shape != shape:
        raise DataError(f"{paths[i]}: image is {pixels.shape[1]}x{pixels.shape[0]}, but {paths[0]} is "
                        f"{shape[1]}x{shape[0]}; all images must have one size")
    images[i] = pixels.transpose(2, 0, 1)


def _decode_image_folder(root: Path, listing: Listing) -> Dataset:
    arrays = {}
    for split, classes in listing.items():
        paths = [entry.path for _, entries in classes for entry in entries]
        labels = np.concatenate([np.full(len(entries), i, dtype=np.int64) for i, (_, entries) in enumerate(classes)])
        first = _decode(paths[0])
        images = np.empty((len(paths), 3, *first.shape[:2]), dtype=np.uint8)
        # PIL releases the GIL while decoding, so threads use every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(functools.partial(_fill, images, paths, first.shape), range(len(paths))))
        arrays[split] = (images, labels)
    if arrays["train"][0].shape[1:] != arrays["test"][0].shape[1:]:
        raise DataError(f"{root}: train/ and test/ images have different sizes")
    classes = tuple(name for name, _ in listing["train"])
    return Dataset(*arrays["train"], *arrays["test"], classes, f"image folder({root})")


def _write_cache(cache_file: Path, data: Dataset) -> None:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        train_images=data.train_inputs,
        train_labels=data.train_labels,
        test_images=data.test_inputs,
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
