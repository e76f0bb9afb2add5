"""Datasets: zip cache, ImageFolder variants, CIFAR roots, transforms, loaders and splits."""
from __future__ import annotations

import pickle
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision import datasets, transforms

from convfx import data, zoo


def make_images(root: Path, classes: Sequence[str], per_class: int = 2, size: int = 8) -> Path:
    """Write tiny JPEGs as ``root/<class>/NNNN.jpg``; each class gets its own colour."""
    for ci, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour = ((ci * 40) % 256, (i * 70) % 256, 128)
            Image.new("RGB", (size, size), colour).save(root / name / f"{i:04d}.jpg")
    return root


def make_zip(path: Path, split: str, classes: Sequence[str], per_class: int = 2) -> Path:
    folder = make_images(path.parent / f"src-{path.stem}" / split, classes, per_class)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for f in sorted(folder.rglob("*.jpg")):
            zf.write(f, f.relative_to(folder.parent).as_posix())
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CONVFX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_zip_is_extracted_once(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_zip(tmp_path / "test.zip", "test", ["cat", "dog", "airplane"], per_class=3)
    first = data.cifar10(archive, "test")
    assert len(first) == 9 and first.classes == ["airplane", "cat", "dog"]
    extracted = list((cache / "extracted").iterdir())
    assert len(extracted) == 1 and (extracted[0] / ".convfx-complete").is_file()

    def no_second_extraction(*args: object, **kwargs: object) -> None:
        raise AssertionError("zip extracted twice")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", no_second_extraction)
    second = data.cifar10(archive, "test")
    assert second.samples == first.samples
    assert list((cache / "extracted").iterdir()) == extracted


def test_interrupted_extraction_is_never_reused(tmp_path: Path, cache: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_zip(tmp_path / "train.zip", "train", ["a", "b"])
    real_extractall = zipfile.ZipFile.extractall

    def crash_midway(self: zipfile.ZipFile, path: str | Path, *args: object, **kwargs: object) -> None:
        self.extract(self.namelist()[0], path)
        raise KeyboardInterrupt  # e.g. Ctrl-C during extraction

    monkeypatch.setattr(zipfile.ZipFile, "extractall", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        data.extract_zip(archive)
    assert list((cache / "extracted").iterdir()) == []  # neither the temp nor a final folder

    monkeypatch.setattr(zipfile.ZipFile, "extractall", real_extractall)
    # a final folder without its marker (e.g. from an older, killed run) is replaced too
    stale = cache / "extracted" / f"train-{data._zip_key(archive)}"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("partial")
    folder = data.extract_zip(archive)
    assert folder == stale and not (folder / "junk").exists()
    assert len(data.cifar10(archive, "train")) == 4


@pytest.mark.parametrize("how", ["argument", "env", "default"])
def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONVFX_CACHE", raising=False)
    if how == "env":
        monkeypatch.setenv("CONVFX_CACHE", str(tmp_path / "env"))
    expected = {"argument": tmp_path / "arg", "env": tmp_path / "env",
                "default": tmp_path / "home" / ".cache" / "convfx"}[how]
    assert data.cache_dir(tmp_path / "arg" if how == "argument" else None) == expected


def test_unsafe_zip_member_is_refused(tmp_path: Path, cache: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.jpg", b"x")
    with pytest.raises(ValueError, match="unsafe member"):
        data.extract_zip(archive)
    assert not (cache / "escape.jpg").exists()


def test_wrong_split_in_zip_names_what_was_found(tmp_path: Path, cache: Path) -> None:
    archive = make_zip(tmp_path / "train.zip", "train", ["a", "b"])
    with pytest.raises(ValueError, match=r"no 'test' folder.*\['train'\]"):
        data.cifar10(archive, "test")


def test_cifar10_folder_without_split_level_and_augment(tmp_path: Path) -> None:
    root = make_images(tmp_path / "imgs", ["ship", "truck"], per_class=2, size=32)
    ds = data.cifar10(root, "train", zoo.CIFAR_NORMALIZATION, train_augment=True)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 0
    assert any(isinstance(t, transforms.RandomCrop) for t in ds.transform.transforms)


def _write_fake_cifar_batches(folder: Path, per_batch: int = 4) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [i % 10 for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(data.CIFAR10_CLASSES)}))


@pytest.mark.parametrize("point_at", ["parent", "batches"])
def test_cifar10_pickle_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point_at: str) -> None:
    batches = tmp_path / "cifar" / "cifar-10-batches-py"
    _write_fake_cifar_batches(batches)
    # the files are fake, so skip torchvision's md5 checks (they cover data and metadata)
    monkeypatch.setattr(datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    root = batches.parent if point_at == "parent" else batches
    test = data.cifar10(root, "test")
    train = data.cifar10(root, "train")
    assert isinstance(test, datasets.CIFAR10) and len(test) == 4 and len(train) == 20
    assert test.classes == list(data.CIFAR10_CLASSES)
    assert test[1][0].shape == (3, 32, 32) and test[1][1] == 1


def test_cifar10_corrupted_pickle_batches(tmp_path: Path) -> None:
    batches = tmp_path / "cifar-10-batches-py"
    _write_fake_cifar_batches(batches)  # real md5 check fails on fake data
    with pytest.raises(ValueError, match="cifar-10-batches-py|corrupted"):
        data.cifar10(tmp_path, "test")


@pytest.mark.parametrize("source", ["file", "list"])
def test_class_list_folder_keeps_full_label_space(tmp_path: Path, source: str) -> None:
    wnids = [f"n{i:08d}" for i in range(10)]
    root = make_images(tmp_path / "val", [wnids[2], wnids[7]], per_class=2)
    if source == "file":  # synset_words style: extra text after the wnid is ignored
        class_list: object = tmp_path / "synsets.txt"
        Path(class_list).write_text("".join(f"{w} some name, other\n" for w in wnids) + "\n")
    else:
        class_list = wnids
    ds = data.ClassListImageFolder(root, class_list)
    assert ds.classes == wnids and len(ds.class_to_idx) == 10
    assert sorted(Counter(ds.targets).items()) == [(2, 2), (7, 2)]


def test_class_list_mismatch_names_folder_and_list(tmp_path: Path) -> None:
    root = make_images(tmp_path / "val", ["n1", "stray"], per_class=1)
    listing = tmp_path / "wnids.txt"
    listing.write_text("n0\nn1\n")
    with pytest.raises(ValueError, match=r"\['stray'\].*wnids\.txt"):
        data.ClassListImageFolder(root, listing)


@pytest.mark.parametrize(("classes", "pattern"), [(["a", "b", "a"], "repeats"), ([], "empty")])
def test_class_list_validation(tmp_path: Path, classes: list[str], pattern: str) -> None:
    root = make_images(tmp_path / "val", ["a"], per_class=1)
    with pytest.raises(ValueError, match=pattern):
        data.ClassListImageFolder(root, classes)


@pytest.mark.parametrize("split", ["val", "train"])
def test_imagenet_folder_with_wnids_and_normalization(tmp_path: Path, split: str) -> None:
    wnids = [f"n{i:08d}" for i in range(5)]
    (tmp_path / "wnids.txt").write_text("\n".join(wnids) + "\n")
    make_images(tmp_path / split, [wnids[4]], per_class=1, size=40)
    norm = zoo.Normalization((0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    model = zoo.tag_model(torch.nn.Identity(), normalization=norm)
    ds = data.imagenet(tmp_path, split, model)
    assert ds.classes == wnids and ds.targets == [4]
    assert ds[0][0].shape == (3, 224, 224)
    normalize = ds.transform.transforms[-1]
    assert tuple(normalize.mean) == norm.mean and tuple(normalize.std) == norm.std


def test_transform_builders() -> None:
    val = data.imagenet_transform("val")
    assert [type(t) for t in val.transforms] == [transforms.Resize, transforms.CenterCrop,
                                                  transforms.ToTensor, transforms.Normalize]
    assert tuple(val.transforms[-1].mean) == zoo.IMAGENET_NORMALIZATION.mean
    train = data.imagenet_transform("train", zoo.LITE_NORMALIZATION)
    assert isinstance(train.transforms[0], transforms.RandomResizedCrop)
    assert tuple(train.transforms[-1].std) == zoo.LITE_NORMALIZATION.std
    assert len(data.cifar10_transform().transforms) == 2
    with pytest.raises(ValueError, match="split"):
        data.imagenet_transform("test")  # type: ignore[arg-type]


@pytest.mark.parametrize("call", [
    lambda p: data.cifar10(p, "test"),
    lambda p: data.imagenet(p, "val"),
    lambda p: data.ClassListImageFolder(p, ["a"]),
    lambda p: data.extract_zip(p),
])
def test_missing_path_is_named(tmp_path: Path, call) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        call(missing)


def test_missing_class_list_file(tmp_path: Path) -> None:
    root = make_images(tmp_path / "val", ["a"], per_class=1)
    with pytest.raises(FileNotFoundError, match="nolist.txt"):
        data.ClassListImageFolder(root, tmp_path / "nolist.txt")


@pytest.mark.parametrize("layout", ["empty-root", "empty-classes", "class-list"])
def test_empty_dataset_is_an_error(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "data" / "test"
    root.mkdir(parents=True)
    if layout != "empty-root":
        (root / "a").mkdir()
        (root / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images found"):
        if layout == "class-list":
            data.ClassListImageFolder(root, ["a", "b"])
        else:
            data.cifar10(tmp_path / "data", "test")


def test_non_zip_file_is_an_error(tmp_path: Path) -> None:
    bogus = tmp_path / "data.tar"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="data.tar"):
        data.cifar10(bogus, "test")


def test_demo_data(tmp_path: Path) -> None:
    test, calib = data.demo_data(cache=tmp_path)
    assert len(test) == 2000 and len(calib) == 500
    assert tuple(test.classes) == tuple(calib.classes) == data.CIFAR10_CLASSES
    assert set(Counter(test.targets).values()) == {200}
    assert set(Counter(calib.targets).values()) == {50}
    x, y = test[0]
    assert x.shape == (3, 32, 32) and y == 0


def _order(loader: torch.utils.data.DataLoader) -> list[int]:
    return [int(v) for (batch,) in loader for v in batch]


def test_make_loader_is_reproducible() -> None:
    ds = TensorDataset(torch.arange(50))
    a = _order(data.make_loader(ds, 8, shuffle=True, seed=3))
    assert a == _order(data.make_loader(ds, 8, shuffle=True, seed=3))
    assert a != _order(data.make_loader(ds, 8, shuffle=True, seed=4))
    assert sorted(a) == list(range(50))
    assert _order(data.make_loader(ds, 8, shuffle=False)) == list(range(50))
    assert len(data.make_loader(ds, 8, shuffle=False, drop_last=True)) == 6
    with pytest.raises(ValueError, match="empty"):
        data.make_loader(TensorDataset(torch.arange(0)), 8, shuffle=False)


@pytest.mark.parametrize(("sizes", "lengths"), [
    ([30, 50], [30, 50]),
    ([10], [10]),
    ([0.25, 0.75], [25, 75]),
    ([1 / 3, 1 / 3, 1 / 3], [34, 33, 33]),
    ([0.1, 0.2], [10, 20]),
])
def test_split_dataset_is_deterministic(sizes: list, lengths: list[int]) -> None:
    ds = TensorDataset(torch.arange(100))
    parts = data.split_dataset(ds, sizes, seed=7)
    assert [len(p) for p in parts] == lengths
    indices = [i for p in parts for i in p.indices]
    assert len(set(indices)) == len(indices)  # disjoint
    assert [p.indices for p in data.split_dataset(ds, sizes, seed=7)] == [p.indices for p in parts]
    assert [p.indices for p in data.split_dataset(ds, sizes, seed=8)] != [p.indices for p in parts]


@pytest.mark.parametrize(("sizes", "error"), [
    ([60, 50], ValueError), ([0.6, 0.5], ValueError), ([10, 0.5], TypeError), ([], ValueError), ([-1], ValueError),
])
def test_split_dataset_rejects_bad_sizes(sizes: list, error: type[Exception]) -> None:
    with pytest.raises(error):
        data.split_dataset(TensorDataset(torch.arange(100)), sizes)
