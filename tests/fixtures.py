"""Tiny data sets in the real on-disk formats: an image folder, the CIFAR python pickles, MNIST's idx files."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

CLASSES = ("cat", "dog", "ship")


def write_image_folder(root: Path, per_class: tuple[int, int] = (6, 3), size: int = 8, seed: int = 0,
                       fmt: str = "jpg") -> Path:
    """root/{train,test}/<class>/NNNN.jpg, like the cifar10-jpeg archive; each class its own colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.zeros((size, size, 3), dtype=np.float64)
                base[..., c % 3] = 200
                pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.{fmt}")
    return root


def cifar10_batches(n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict[str, bytes]:
    """Files of cifar-10-batches-py in CIFAR-10's own format (pickled dicts of uint8 rows)."""
    rng = np.random.default_rng(seed)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def batch(n: int, label: str) -> bytes:
        return pickle.dumps(
            {
                "batch_label": label,
                "labels": rng.integers(0, 10, n).tolist(),
                "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                "filenames": [f"img_{i}.png" for i in range(n)],
            }
        )

    files = {f"data_batch_{i}": batch(n_train // 5, f"training batch {i} of 5") for i in range(1, 6)}
    files["test_batch"] = batch(n_test, "testing batch 1 of 1")
    files["batches.meta"] = pickle.dumps({"label_names": names, "num_cases_per_batch": n_train // 5, "num_vis": 3072})
    return files


def write_cifar10_archive(path: Path, files: dict[str, bytes]) -> Path:
    """cifar-10-python.tar.gz as distributed: a cifar-10-batches-py/ folder inside a tar.gz."""
    return write_tar_gz(path, "cifar-10-batches-py", files)


def write_tar_gz(path: Path, folder: str, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def patch_cifar10_checksums(monkeypatch, files: dict[str, bytes], archive: Path, url: str) -> None:  # noqa: ANN001
    """Point torchvision's CIFAR10 at our archive: its URL and the md5 sums it verifies."""
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "url", url)
    monkeypatch.setattr(CIFAR10, "tgz_md5", md5(archive.read_bytes()))
    monkeypatch.setattr(CIFAR10, "train_list",
                        [[f"data_batch_{i}", md5(files[f"data_batch_{i}"])] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(files["test_batch"])]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(files["batches.meta"])})


# --- CIFAR-100: one train and one test pickle, fine and coarse labels ------------------------


def cifar100_files(n_train: int = 40, n_test: int = 20, seed: int = 0) -> dict[str, bytes]:
    """Files of cifar-100-python in CIFAR-100's own format (pickled dicts of uint8 rows)."""
    rng = np.random.default_rng(seed)

    def split(n: int, label: str) -> bytes:
        fine = rng.integers(0, 100, n)
        return pickle.dumps(
            {
                "filenames": [f"img_{i}.png" for i in range(n)],
                "batch_label": label,
                "fine_labels": fine.tolist(),
                "coarse_labels": (fine // 5).tolist(),
                "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            }
        )

    meta = {
        "fine_label_names": [f"fine{i:02d}" for i in range(100)],
        "coarse_label_names": [f"coarse{i:02d}" for i in range(20)],
    }
    return {
        "train": split(n_train, "training batch 1 of 1"),
        "test": split(n_test, "testing batch 1 of 1"),
        "meta": pickle.dumps(meta),
    }


def write_cifar100_archive(path: Path, files: dict[str, bytes]) -> Path:
    """cifar-100-python.tar.gz as distributed: a cifar-100-python/ folder inside a tar.gz."""
    return write_tar_gz(path, "cifar-100-python", files)


def patch_cifar100_checksums(monkeypatch, files: dict[str, bytes], archive: Path, url: str) -> None:  # noqa: ANN001
    """Point torchvision's CIFAR100 at our archive: its URL and the md5 sums it verifies."""
    from torchvision.datasets import CIFAR100

    monkeypatch.setattr(CIFAR100, "url", url)
    monkeypatch.setattr(CIFAR100, "tgz_md5", md5(archive.read_bytes()))
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5(files["train"])]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5(files["test"])]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5(files["meta"])})


# --- MNIST and Fashion-MNIST: gzipped idx files ---------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format of MNIST's files: magic (0, 0, 0x08 = uint8, ndim), big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def mnist_files(n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict[str, tuple[np.ndarray, bytes]]:
    """MNIST-style files as distributed (gzipped idx): name -> (the array inside, the .gz bytes)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    return {name: (a, gzip.compress(idx_bytes(a), mtime=0)) for name, a in arrays.items()}


def write_mnist_files(folder: Path, files: dict[str, tuple[np.ndarray, bytes]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (_, data) in files.items():
        (folder / name).write_bytes(data)
    return folder


MnistFiles = dict[str, tuple[np.ndarray, bytes]]  # file name -> (the array inside, the .gz bytes)


def patch_mnist_mirrors(monkeypatch, cls: type, files: MnistFiles, mirror: str) -> None:  # noqa: ANN001
    """Point torchvision's MNIST-style class at one mirror (a URL ending in /) and our files' md5 sums."""
    monkeypatch.setattr(cls, "mirrors", [mirror])
    monkeypatch.setattr(cls, "resources", [(name, md5(data)) for name, (_, data) in files.items()])


@contextmanager
def serve_directory(directory: Path) -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server for `directory`; yields (base URL, list of requested paths)."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):  # noqa: ANN002, ANN003
            super().__init__(*args, directory=str(directory), **kwargs)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address) -> None:  # noqa: ANN001
            pass  # torchvision probes for redirects and hangs up mid-file: not an error

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
