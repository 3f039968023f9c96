"""Loading data: synthetic, image folders (with their cache), CIFAR-10 through torchvision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import (
    CLASSES,
    cifar10_batches,
    cifar100_files,
    mnist_files,
    patch_cifar10_checksums,
    patch_cifar100_checksums,
    patch_mnist_mirrors,
    serve_directory,
    write_cifar10_archive,
    write_cifar100_archive,
    write_image_folder,
    write_mnist_files,
)
from trainable.__main__ import main as trainable_main
from trainable.config import TrainConfig
from trainable.data import DataError, load_cifar10, load_dataset, load_image_folder, make_synthetic
from trainable.fit import Trainer


def test_synthetic_is_seeded_and_shaped_like_cifar10():
    a, b, c = make_synthetic(seed=1), make_synthetic(seed=1), make_synthetic(seed=2)
    assert a.train_inputs.dtype == np.uint8 and a.train_inputs.shape == (2048, 3, 32, 32)
    assert a.train_labels.dtype == np.int64 and a.num_classes == 10
    assert np.array_equal(a.train_inputs, b.train_inputs) and np.array_equal(a.test_labels, b.test_labels)
    assert not np.array_equal(a.train_inputs, c.train_inputs)


def test_image_folder_loads_every_image_with_its_class(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=(4, 2), size=8)
    data = load_image_folder(root, cache_dir=tmp_path / "cache")
    assert data.classes == tuple(sorted(CLASSES))
    assert data.train_inputs.shape == (12, 3, 8, 8) and data.test_inputs.shape == (6, 3, 8, 8)
    assert np.bincount(data.train_labels).tolist() == [4, 4, 4]
    # the fixture paints class c in colour channel c % 3: decoding kept channels and labels together
    brightest = data.train_inputs.astype(float).mean(axis=(2, 3)).argmax(axis=1)
    assert [CLASSES.index(data.classes[label]) % 3 for label in data.train_labels] == brightest.tolist()


def test_image_folder_second_load_reads_the_cache_not_the_images(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    first = load_image_folder(root, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    # Garble one image but keep its size and time stamp: only a decode would notice.
    victim = root / "train" / "cat" / "0000.jpg"
    stat = victim.stat()
    victim.write_bytes(b"x" * stat.st_size)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = load_image_folder(root, cache_dir=cache)
    assert np.array_equal(first.train_inputs, second.train_inputs)
    # A changed file (new time stamp) invalidates the cache: decoded again, and the bad file named.
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=r"cat/0000\.jpg: cannot read image"):
        load_image_folder(root, cache_dir=cache)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: None, r"no such folder"),
        (lambda r: write_image_folder(r).joinpath("test").rename(r / "val"), r"no test/ folder"),
        (lambda r: [p.unlink() for p in write_image_folder(r).joinpath("train", "dog").iterdir()],
         r"train/dog: class folder has no images"),
        (lambda r: write_image_folder(r).joinpath("train", "dog", "0001.jpg").write_bytes(b"not an image"),
         r"train/dog/0001\.jpg: cannot read image"),
        (lambda r: _truncate(write_image_folder(r) / "test" / "ship" / "0002.jpg"),
         r"test/ship/0002\.jpg: cannot read image"),
        (lambda r: _resize(write_image_folder(r) / "train" / "cat" / "0003.jpg"),
         r"train/cat/0003\.jpg: image is 9x9.*one size"),
        (lambda r: write_image_folder(r).joinpath("test", "cow").mkdir()
         or (r / "test" / "cow" / "a.jpg").write_bytes((r / "test" / "cat" / "0000.jpg").read_bytes()),
         r"different class folders \(cow\)"),
    ],
    ids=["missing-folder", "missing-split", "empty-class", "unreadable-image", "truncated-image", "mixed-sizes",
         "class-mismatch"],
)
def test_bad_image_folders_name_the_file_or_folder(tmp_path, breakage, message):
    root = tmp_path / "imgs"
    breakage(root)
    with pytest.raises(DataError, match=message):
        load_image_folder(root, cache_dir=tmp_path / "cache")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _resize(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (9, 9)).save(path)


# --- CIFAR-10 through torchvision, from a local server -------------------------------------


@pytest.fixture
def cifar10_server(tmp_path, monkeypatch):
    """cifar-10-python.tar.gz in CIFAR-10's real format, served over HTTP on localhost."""
    files = cifar10_batches()
    site = tmp_path / "site"
    site.mkdir()
    archive = write_cifar10_archive(site / "cifar-10-python.tar.gz", files)
    with serve_directory(site) as (base, requests):
        url = f"{base}/cifar-10-python.tar.gz"
        patch_cifar10_checksums(monkeypatch, files, archive, url)
        yield {"url": url, "requests": requests, "files": files, "archive": archive}


def test_cifar10_downloads_once_then_loads_from_disk(tmp_path, cifar10_server):
    root = tmp_path / "data"
    data = load_dataset("cifar10", root)
    assert data.train_inputs.shape == (50, 3, 32, 32) and data.test_inputs.shape == (20, 3, 32, 32)
    assert data.classes[0] == "airplane" and data.train_labels.dtype == np.int64
    # CIFAR-10 rows are channel-major 32x32 planes: row 0 of batch 1 is image 0 exactly.
    import pickle

    row0 = pickle.loads(cifar10_server["files"]["data_batch_1"])["data"][0]
    assert np.array_equal(data.train_inputs[0].reshape(-1), row0)
    one_download = len(cifar10_server["requests"])  # torchvision probes for redirects, then fetches
    assert one_download >= 1
    again = load_dataset("cifar10", root)
    assert np.array_equal(again.train_inputs, data.train_inputs)
    assert len(cifar10_server["requests"]) == one_download  # found on disk: no second download


def test_cifar10_offline_without_a_copy_says_where_to_put_it(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens on port 9
    with pytest.raises(DataError,
                       match=r"CIFAR-10 is not in .* could not be downloaded "
                             r".*Put cifar-10-python\.tar\.gz .* or pass --data PATH"):
        load_cifar10(tmp_path / "data")


def test_cifar10_archive_placed_by_hand_is_used_offline(tmp_path, cifar10_server, monkeypatch):
    from torchvision.datasets import CIFAR10

    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(cifar10_server["archive"].read_bytes())
    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    assert load_cifar10(root).train_inputs.shape == (50, 3, 32, 32)


CONCURRENT_LOADER = textwrap.dedent(
    """
    import json, sys
    from torchvision.datasets import CIFAR10
    spec = json.loads(sys.argv[1])
    CIFAR10.url, CIFAR10.tgz_md5 = spec["url"], spec["tgz_md5"]
    CIFAR10.train_list, CIFAR10.test_list = spec["train_list"], spec["test_list"]
    CIFAR10.meta = dict(CIFAR10.meta, md5=spec["meta_md5"])
    from trainable.data import load_cifar10
    print(load_cifar10(spec["root"]).train_inputs.shape)
    """
)


def test_two_processes_loading_cifar10_at_once_download_it_once(tmp_path, cifar10_server):
    from torchvision.datasets import CIFAR10

    load_cifar10(tmp_path / "alone")
    one_download = len(cifar10_server["requests"])
    cifar10_server["requests"].clear()

    spec = json.dumps(
        {
            "url": cifar10_server["url"],
            "tgz_md5": CIFAR10.tgz_md5,
            "train_list": CIFAR10.train_list,
            "test_list": CIFAR10.test_list,
            "meta_md5": CIFAR10.meta["md5"],
            "root": str(tmp_path / "data"),
        }
    )
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_LOADER, spec], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all("(50, 3, 32, 32)" in out for out, _ in outputs)
    assert len(cifar10_server["requests"]) == one_download


def test_two_processes_decoding_one_image_folder_share_one_cache(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=(30, 10))
    script = ("import sys; from trainable.data import load_image_folder; "
              "print(load_image_folder(sys.argv[1], cache_dir=sys.argv[2]).train_inputs.sum())")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(root), str(tmp_path / "cache")],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs[0] == outs[1]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    assert not list((tmp_path / "cache").glob(".*.tmp"))


# --- CIFAR-100, MNIST and Fashion-MNIST by name, in their own formats, from a local server ---

MNIST_STYLE = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # --data name -> torchvision class
NOWHERE = "http://127.0.0.1:9/"  # nothing listens on port 9: offline


def torchvision_class(name: str) -> type:
    import torchvision.datasets

    return getattr(torchvision.datasets, {**MNIST_STYLE, "cifar100": "CIFAR100"}[name])


@pytest.fixture
def site(tmp_path):
    """A folder served over HTTP on localhost: (folder, base URL, requested paths)."""
    folder = tmp_path / "site"
    folder.mkdir()
    with serve_directory(folder) as (base, requests):
        yield folder, base, requests


@pytest.mark.parametrize("name", list(MNIST_STYLE))
def test_mnist_style_sets_download_once_as_1x28x28_grayscale(tmp_path, monkeypatch, site, name):
    folder, base, requests = site
    cls = torchvision_class(name)
    files = mnist_files()
    write_mnist_files(folder, files)
    patch_mnist_mirrors(monkeypatch, cls, files, f"{base}/")
    root = tmp_path / "data"
    data = load_dataset(name, root)
    assert data.train_inputs.dtype == np.uint8 and data.train_inputs.shape == (30, 1, 28, 28)
    assert data.test_inputs.shape == (10, 1, 28, 28) and data.input_shape == (1, 28, 28)
    # the idx files' pixels and labels, unchanged and in order
    assert np.array_equal(data.train_inputs[:, 0], files["train-images-idx3-ubyte.gz"][0])
    assert data.test_labels.dtype == np.int64
    assert np.array_equal(data.test_labels, files["t10k-labels-idx1-ubyte.gz"][0])
    assert data.classes == tuple(cls.classes) and data.num_classes == 10
    assert sorted(p.name for p in (root / MNIST_STYLE[name] / "raw").glob("*.gz")) == sorted(files)
    downloaded = len(requests)
    assert downloaded >= len(files)
    again = load_dataset(name, root)
    assert np.array_equal(again.train_inputs, data.train_inputs)
    assert len(requests) == downloaded  # found on disk: nothing fetched again


def test_cifar100_downloads_once_with_its_100_fine_classes(tmp_path, monkeypatch, site):
    import pickle

    folder, base, requests = site
    files = cifar100_files()
    archive = write_cifar100_archive(folder / "cifar-100-python.tar.gz", files)
    patch_cifar100_checksums(monkeypatch, files, archive, f"{base}/cifar-100-python.tar.gz")
    root = tmp_path / "data"
    data = load_dataset("cifar100", root)
    assert data.train_inputs.shape == (40, 3, 32, 32) and data.test_inputs.shape == (20, 3, 32, 32)
    assert data.num_classes == 100 and data.classes[:2] == ("fine00", "fine01")
    train = pickle.loads(files["train"])
    assert data.train_labels.tolist() == train["fine_labels"]
    assert np.array_equal(data.train_inputs[0].reshape(-1), train["data"][0])  # channel-major rows
    downloaded = len(requests)
    assert downloaded >= 1
    load_dataset("cifar100", root)
    assert len(requests) == downloaded


@pytest.mark.parametrize(
    "name, title, files",
    [
        ("mnist", "MNIST", "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz"),
        ("fashion-mnist", "Fashion-MNIST", "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz"),
        ("cifar100", "CIFAR-100", "cifar-100-python.tar.gz"),
    ],
)
def test_offline_without_a_copy_says_where_to_put_the_files(cli, tmp_path, monkeypatch, name, title, files):
    cls = torchvision_class(name)
    if name in MNIST_STYLE:
        monkeypatch.setattr(cls, "mirrors", [NOWHERE])
    else:
        monkeypatch.setattr(cls, "url", NOWHERE + "cifar-100-python.tar.gz")
    root = tmp_path / "data"
    status, _, err = cli(trainable_main, ["--data", name, "--data-root", str(root)])
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{title} is not in {root} and could not be downloaded" in err
    assert f"Put {files} (" in err and f") in {root}, or pass --data PATH" in err


def test_fashion_mnist_placed_by_hand_trains_the_tutorials_mlp_offline(cli, tmp_path, monkeypatch):
    from torchvision.datasets import FashionMNIST

    files = mnist_files()
    root = tmp_path / "data"
    write_mnist_files(root / "FashionMNIST" / "raw", files)  # where the offline message says
    patch_mnist_mirrors(monkeypatch, FashionMNIST, files, NOWHERE)
    status, out, err = cli(trainable_main, ["--data", "fashion-mnist", "--data-root", str(root), "--epochs", "2"])
    assert status == 0, err
    assert "fashion-mnist(" in out and "10 classes, images 1x28x28" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("Epoch")] == ["1/2", "2/2"]
    # the MLP's input is the data's: 1 x 28 x 28 = 784 pixels, not CIFAR's 3072
    trainer = Trainer(TrainConfig(epochs=1), load_dataset("fashion-mnist", root), device="cpu")
    assert trainer.model[1].in_features == 28 * 28
