"""Tiny data sets written in the real on-disk formats: an image folder and CIFAR-10's python batches."""

from __future__ import annotations

import hashlib
import http.server
import pickle
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

CLASSES = ("cat", "dog", "ship")


def write_image_folder(root: Path, per_class: tuple[int, int] = (6, 3), size: int = 8, seed: int = 0, fmt: str = "jpg") -> Path:
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
    import io

    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
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
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5(files[f"data_batch_{i}"])] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(files["test_batch"])]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(files["batches.meta"])})


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
