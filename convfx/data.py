"""Datasets and loaders for calibration, fine-tuning and accuracy reports.

Why this module: compression is only as honest as its evaluation data. Every dataset
here takes its normalization from the model (``normalization_of(model)``) rather than
hard-coding stats, labels keep their full index space even when a subset misses
classes, and zips are unpacked once, atomically, into a cache so that an interrupted
extraction is never mistaken for a complete one.

>>> from convfx import zoo
>>> model = zoo.demo_model()
>>> test, calib = demo_data(zoo.normalization_of(model))      # bundled CIFAR-10 JPEGs
>>> report, _ = split_dataset(test, [1000, 1000], seed=0)      # fixed, reproducible split
>>> loader = make_loader(report, 128, shuffle=False)
... # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from passes.latency import default_cache_dir

from convfx.zoo import ASSETS_DIR, CIFAR_NORMALIZATION, IMAGENET_NORMALIZATION, Normalization, normalization_of

__all__ = [
    "DEMO_TEST_ZIP",
    "DEMO_CALIB_ZIP",
    "CIFAR10_CLASSES",
    "cache_dir",
    "extract_zip",
    "imagenet_transform",
    "cifar10_transform",
    "ClassListImageFolder",
    "read_class_list",
    "imagenet",
    "cifar10",
    "demo_data",
    "UnlabeledImages",
    "unlabeled_images",
    "make_loader",
    "split_dataset",
]

log = logging.getLogger(__name__)

#: 2000 CIFAR-10 test JPEGs (200 per class), layout ``test/<class>/NNNN.jpg``.
DEMO_TEST_ZIP: Path = ASSETS_DIR / "cifar10-test-2000.zip"
#: 500 CIFAR-10 train JPEGs (50 per class) for calibration/fine-tuning, ``train/<class>/NNNN.jpg``.
DEMO_CALIB_ZIP: Path = ASSETS_DIR / "cifar10-calib-500.zip"
#: Alphabetical folder order == the standard CIFAR-10 label order.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

_MARKER = ".convfx-complete"
NormLike = Normalization | nn.Module | None


def _resolve_norm(normalization: NormLike, default: Normalization) -> Normalization:
    """Accept a Normalization, a model carrying one, or None (the documented default)."""
    if normalization is None:
        return default
    if isinstance(normalization, Normalization):
        return normalization
    if isinstance(normalization, nn.Module):
        return normalization_of(normalization)
    raise TypeError(f"normalization must be a Normalization, a model or None, got {type(normalization).__name__}")


# --------------------------------------------------------------------------------------
# Zip cache
# --------------------------------------------------------------------------------------
def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where convfx unpacks archives: argument > ``$CONVFX_CACHE`` (older name) > the cache
    directory latency profiles use too (``$CONVFX_CACHE_DIR``, ``$XDG_CACHE_HOME/convfx``,
    ``~/.cache/convfx``)."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("CONVFX_CACHE")
    if env:
        return Path(env).expanduser()
    return default_cache_dir()


def _zip_key(path: Path) -> str:
    """Identify an archive by location, size and mtime: cheap, and changes when it does."""
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return hashlib.sha256(ident).hexdigest()[:12]


def extract_zip(path: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None) -> Path:
    """Extract ``path`` once into the cache and return the extracted folder.

    Extraction goes to a temporary sibling folder which is renamed into place only
    after a completion marker is written, so a crash mid-way leaves nothing that a
    later call would reuse. A second call returns the existing folder immediately.
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"zip archive not found: {src}")
    if not zipfile.is_zipfile(src):
        raise ValueError(f"not a zip archive: {src}")
    root = cache_dir(cache) / "extracted"
    final = root / f"{src.stem}-{_zip_key(src)}"
    if (final / _MARKER).is_file():
        log.debug("reusing extracted %s at %s", src, final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    if final.exists():  # left over without a marker: not trustworthy
        log.warning("discarding incomplete extraction at %s", final)
        shutil.rmtree(final, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{src.stem}-", dir=root))
    try:
        log.info("extracting %s to %s", src, final)
        with zipfile.ZipFile(src) as zf:
            for name in zf.namelist():
                parts = Path(name).parts
                if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise ValueError(f"refusing unsafe member {name!r} in zip archive {src}")
            zf.extractall(tmp)
        (tmp / _MARKER).write_text(f"{src.resolve()}\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _MARKER).is_file():  # not a benign race with another process
                raise
            log.debug("another process finished extracting %s first", src)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------
def imagenet_transform(split: Literal["train", "val"], normalization: NormLike = None,
                       size: int = 224, resize: int = 256) -> transforms.Compose:
    """Standard ImageNet pipeline: train = RandomResizedCrop + flip; val = Resize + CenterCrop.

    ``normalization`` defaults to the ImageNet statistics.
    """
    norm = _resolve_norm(normalization, IMAGENET_NORMALIZATION)
    if split == "train":
        head: list[Any] = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    elif split == "val":
        head = [transforms.Resize(resize), transforms.CenterCrop(size)]
    else:
        raise ValueError(f"split must be 'train' or 'val', got split={split!r}")
    return transforms.Compose([*head, transforms.ToTensor(), norm.transform()])


def cifar10_transform(normalization: NormLike = None, train_augment: bool = False) -> transforms.Compose:
    """CIFAR pipeline; with ``train_augment`` adds random crop 32 (pad 4) + horizontal flip.

    ``normalization`` defaults to the stats the CIFAR ResNets were trained with.
    """
    norm = _resolve_norm(normalization, CIFAR_NORMALIZATION)
    head: list[Any] = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if train_augment else []
    return transforms.Compose([*head, transforms.ToTensor(), norm.transform()])


# --------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------
def read_class_list(source: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """Class names in index order, from a list or a file (first token per non-blank line).

    Works with ``wnids.txt`` and with ``synset_words.txt``-style "wnid description" lines.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"class list file not found: {path}")
        classes = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        origin = str(path)
    else:
        classes = [str(c) for c in source]
        origin = "the class list"
    if not classes:
        raise ValueError(f"{origin} is empty")
    seen: set[str] = set()
    dupes = sorted({c for c in classes if c in seen or seen.add(c)})  # type: ignore[func-returns-value]
    if dupes:
        raise ValueError(f"{origin} repeats class names: {dupes[:5]}")
    return classes


class ClassListImageFolder(datasets.ImageFolder):
    """ImageFolder whose class indices come from a fixed list instead of the folders found.

    A subset that lacks some classes (e.g. 1300 ImageNet val images covering 725 of
    1000 classes) then still yields the model's 1000-way labels. ``classes`` keeps the
    full list; folders not in the list are an error, since silently dropping them
    would change the evaluated data.
    """

    def __init__(self, root: str | os.PathLike[str], class_list: str | os.PathLike[str] | Sequence[str],
                 transform: Callable[..., Any] | None = None,
                 target_transform: Callable[..., Any] | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        self._class_list = read_class_list(class_list)
        self._class_source = str(class_list) if isinstance(class_list, (str, os.PathLike)) else "the class list"
        super().__init__(str(root), transform=transform, target_transform=target_transform)
        if len(self.samples) == 0:
            raise ValueError(f"no images found under {root}")
        present = {Path(p).parent.name for p, _ in self.samples}
        log.info("%s: %d images in %d of %d classes", root, len(self.samples), len(present), len(self.classes))

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        folders = sorted(e.name for e in os.scandir(directory) if e.is_dir())
        index = {c: i for i, c in enumerate(self._class_list)}
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise ValueError(
                f"folder(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} in {directory} "
                f"are not in {self._class_source} ({len(index)} classes)"
            )
        return list(self._class_list), index

    @staticmethod
    def make_dataset(directory: str | os.PathLike[str], class_to_idx: dict[str, int] | None = None,
                     extensions: tuple[str, ...] | None = None,
                     is_valid_file: Callable[[str], bool] | None = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """Index only the class folders present; absent or empty classes are expected here."""
        if class_to_idx is None:
            raise ValueError("class_to_idx is required")
        present = {c: i for c, i in class_to_idx.items() if os.path.isdir(os.path.join(directory, c))}
        try:
            return datasets.folder.make_dataset(str(directory), present, extensions, is_valid_file,
                                                allow_empty=True)
        except TypeError:  # torchvision < 0.18 has no allow_empty and rejects empty folders
            try:
                return datasets.folder.make_dataset(str(directory), present, extensions, is_valid_file)
            except FileNotFoundError as exc:
                raise ValueError(f"no images found in some class folders under {directory}: {exc}") from exc


def _image_folder(root: Path, transform: Callable[..., Any], class_list: Any = None) -> datasets.ImageFolder:
    if class_list is not None:
        return ClassListImageFolder(root, class_list, transform=transform)
    try:
        ds = datasets.ImageFolder(str(root), transform=transform)
    except FileNotFoundError as exc:
        raise ValueError(f"no images found under {root} (expected <class>/<image> folders): {exc}") from exc
    if len(ds) == 0:
        raise ValueError(f"no images found under {root}")
    return ds


def _has_images(folder: Path) -> bool:
    exts = tuple(datasets.folder.IMG_EXTENSIONS)
    return any(f.is_file() and f.name.lower().endswith(exts) for d in folder.iterdir() if d.is_dir()
               for f in d.iterdir())


def _split_folder(root: Path, split: str) -> Path:
    """``root/split`` when present, else ``root`` itself if it already holds class folders."""
    if (root / split).is_dir():
        return root / split
    if _has_images(root):
        return root
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    raise ValueError(f"no {split!r} folder in {root} (found: {found}); expected {root}/{split}/<class>/<image>")


def _as_folder(root: str | os.PathLike[str], cache: str | os.PathLike[str] | None) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset path not found: {path}")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ValueError(f"dataset path is a file but not a zip archive: {path}")
        return extract_zip(path, cache)
    return path


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------
def imagenet(root: str | os.PathLike[str], split: Literal["train", "val"] = "val",
             normalization: NormLike = None, *,
             class_list: str | os.PathLike[str] | Sequence[str] | None = None,
             size: int = 224, resize: int = 256,
             cache: str | os.PathLike[str] | None = None) -> datasets.ImageFolder:
    """ImageNet-style classification folder (or zip) with the standard transforms.

    ``root`` is either the split folder itself or its parent (``root/val/<wnid>/...``).
    Labels follow ``class_list`` when given, else a ``wnids.txt`` found in ``root``,
    else the sorted folder names; a subset with missing classes therefore keeps 1000-way
    labels as long as a class list is around.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got split={split!r}")
    base = _as_folder(root, cache)
    folder = _split_folder(base, split)
    if class_list is None:
        for candidate in (base / "wnids.txt", folder / "wnids.txt", folder.parent / "wnids.txt"):
            if candidate.is_file():
                class_list = candidate
                log.info("using class list %s", candidate)
                break
    return _image_folder(folder, imagenet_transform(split, normalization, size, resize), class_list)


def _cifar_batches(path: Path) -> Path | None:
    """The torchvision CIFAR10 root for ``path`` if it holds the python-pickle batches."""
    for batches in (path / "cifar-10-batches-py", path):
        if batches.name == "cifar-10-batches-py" and batches.is_dir() and any(
                (batches / f).is_file() for f in ("batches.meta", "test_batch", "data_batch_1")):
            return batches.parent
    return None


def cifar10(root: str | os.PathLike[str], split: Literal["train", "test"] = "test",
            normalization: NormLike = None, train_augment: bool = False, *,
            cache: str | os.PathLike[str] | None = None) -> Dataset[Any]:
    """CIFAR-10 from a torchvision root (pickle batches), a JPEG folder, or a JPEG zip.

    Folder/zip layout is ``<split>/<class>/<image>`` (or the class folders directly).
    Nothing is ever downloaded. ``train_augment`` adds random crop + flip whatever the
    split, so augmented calibration data is possible too.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got split={split!r}")
    transform = cifar10_transform(normalization, train_augment)
    path = _as_folder(root, cache)
    tv_root = _cifar_batches(path)
    if tv_root is not None:
        try:
            return datasets.CIFAR10(str(tv_root), train=(split == "train"), transform=transform, download=False)
        except RuntimeError as exc:
            raise ValueError(f"CIFAR-10 batches under {tv_root} are incomplete or corrupted: {exc}") from exc
    return _image_folder(_split_folder(path, split), transform)


def demo_data(normalization: NormLike = None, *, calib_augment: bool = False,
              cache: str | os.PathLike[str] | None = None) -> tuple[Dataset[Any], Dataset[Any]]:
    """(test, calibration) datasets from the CIFAR-10 JPEG subsets bundled with convfx.

    2000 test images (200/class) for reports and 500 train images (50/class) for
    calibration or a short fine-tune; pairs with :func:`convfx.zoo.demo_model`.
    """
    test = cifar10(DEMO_TEST_ZIP, "test", normalization, cache=cache)
    calib = cifar10(DEMO_CALIB_ZIP, "train", normalization, train_augment=calib_augment, cache=cache)
    return test, calib


class UnlabeledImages(Dataset[torch.Tensor]):
    """Every image file under a folder, in any layout, as transformed tensors without labels.

    Why: post-training compression needs a few hundred representative inputs, not a
    labelled dataset; a user's folder of images is what they have.
    """

    def __init__(self, root: Path, transform: Callable[..., Any]) -> None:
        exts = tuple(datasets.folder.IMG_EXTENSIONS)
        self.files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(exts)
                            and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not self.files:
            raise ValueError(f"calibration: no image files ({', '.join(exts)}) under {root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(datasets.folder.default_loader(str(self.files[i])))


def unlabeled_images(root: str | os.PathLike[str], transform: Callable[..., Any], *,
                     cache: str | os.PathLike[str] | None = None) -> UnlabeledImages:
    """:class:`UnlabeledImages` of a folder or a zip archive (extracted once into the cache)."""
    return UnlabeledImages(_as_folder(root, cache), transform)


# --------------------------------------------------------------------------------------
# Loaders and splits
# --------------------------------------------------------------------------------------
def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is optional for torch
        pass


def make_loader(dataset: Dataset[Any], batch_size: int, *, shuffle: bool, workers: int = 0,
                seed: int = 0, drop_last: bool = False) -> DataLoader[Any]:
    """A DataLoader whose shuffling and augmentation are reproducible from ``seed``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("dataset is empty")
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
        generator=gen, worker_init_fn=_seed_worker if workers > 0 else None,
        persistent_workers=False,
    )


def split_dataset(dataset: Dataset[Any], sizes: Sequence[int] | Sequence[float], seed: int = 0) -> list[Subset[Any]]:
    """Deterministic random split by counts (``[500, 1500]``) or fractions (``[0.25, 0.75]``).

    Parts may add up to less than the whole (the rest is left out), which is how a
    small calibration set is carved off a large test set reproducibly.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if not sizes:
        raise ValueError("sizes must not be empty")
    if any(s < 0 for s in sizes):
        raise ValueError(f"sizes must be non-negative, got {list(sizes)}")
    if all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        counts = [int(s) for s in sizes]
        if sum(counts) > n:
            raise ValueError(f"sizes {counts} add up to {sum(counts)} > dataset length {n}")
    elif all(isinstance(s, float) for s in sizes):
        total = float(sum(sizes))
        if total > 1 + 1e-6:
            raise ValueError(f"fractions {list(sizes)} add up to {total} > 1")
        counts = [int(n * float(f)) for f in sizes]
        if abs(total - 1) <= 1e-6:  # a full split: rounding leftovers go to the parts in order
            for i in range(n - sum(counts)):
                counts[i % len(counts)] += 1
    else:
        raise TypeError(f"sizes must be all ints (counts) or all floats (fractions), got {list(sizes)}")
    gen = torch.Generator()
    gen.manual_seed(seed)
    order = torch.randperm(n, generator=gen).tolist()
    parts: list[Subset[Any]] = []
    start = 0
    for c in counts:
        parts.append(Subset(dataset, order[start:start + c]))
        start += c
    return parts
