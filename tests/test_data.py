"""Evaluation data: class mapping, image preparation, bad files and bad folders."""

from __future__ import annotations

import collections
import io
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from runtime import data
from runtime.errors import DataError
from runtime.zoo import input_spec
from tests.assets import require

CIFAR_SPEC = input_spec("cifar_resnet20")


@pytest.fixture(scope="module")
def imagenet_dir(shared_dir: Path) -> Path:
    return require(shared_dir / "data" / "imagenet-sample", "shared ImageNet sample")


@pytest.fixture(scope="module")
def cifar_dir(shared_dir: Path) -> Path:
    return require(shared_dir / "data" / "cifar10" / "test", "shared CIFAR-10 test folder").parent


def write_jpeg(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.effect_noise(size, 64).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_packaged_class_list_is_the_shared_one(imagenet_dir: Path) -> None:
    shipped = Path(data.__file__).parent / "data" / "imagenet_classes.tsv"
    assert shipped.read_bytes() == (imagenet_dir / "imagenet_classes.tsv").read_bytes()
    wnids = [w for w, _ in data.imagenet_classes()]
    assert len(wnids) == 1000 and wnids == sorted(wnids)


def test_imagenet_sample_uses_true_indices(imagenet_dir: Path) -> None:
    rows = (imagenet_dir / "imagenet_classes.tsv").read_text().splitlines()[1:]
    index = {wnid: int(i) for i, wnid, _ in (r.split("\t") for r in rows)}
    for root in (imagenet_dir, imagenet_dir / "val"):
        ds = data.imagenet_dataset(root)
        assert len(ds) == 40 and len(ds.classes) == 1000
        for path, label in ds.samples:
            assert label == index[Path(path).parent.name]
    labels = {Path(p).parent.name: label for p, label in ds.samples}
    assert labels["n01537544"] == 14  # indigo bunting: 1st folder, true index 14
    assert labels["n02096051"] == index["n02096051"] == 191  # Airedale
    assert ds.classes[191] == "n02096051"


def test_imagenet_grayscale_becomes_rgb(imagenet_dir: Path) -> None:
    ds = data.imagenet_dataset(imagenet_dir)
    gray = [i for i, (p, _) in enumerate(ds.samples) if Image.open(p).mode != "RGB"]
    assert len(gray) == 3
    for i in gray:
        image, _ = ds[i]
        assert image is not None and image.shape == (3, 224, 224)


def test_imagenet_unknown_wnid_folder(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "val" / "n01440764" / "a.jpg")
    write_jpeg(tmp_path / "val" / "n99999999" / "b.jpg")
    with pytest.raises(DataError, match="n99999999"):
        data.imagenet_dataset(tmp_path)


def test_cifar10_folder_test_split(cifar_dir: Path) -> None:
    ds = data.cifar10_dataset(cifar_dir, split="test")
    assert len(ds) == 10_000
    assert ds.classes == list(data.CIFAR10_CLASSES)
    assert ds.classes[:3] == ["airplane", "automobile", "bird"]
    assert collections.Counter(ds.targets) == {c: 1000 for c in range(10)}
    assert len(data.cifar10_dataset(cifar_dir / "test")) == 10_000
    image, label = ds[0]
    assert image is not None and image.shape == (3, 32, 32) and label == 0


def test_cifar10_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="split"):
        data.cifar10_dataset(tmp_path, split="val")
    write_jpeg(tmp_path / "test" / "cat" / "0.jpg")
    with pytest.raises(DataError, match="no train/ folder"):
        data.cifar10_dataset(tmp_path, split="train")
    write_jpeg(tmp_path / "test" / "unicorn" / "0.jpg")
    with pytest.raises(DataError, match="unicorn"):
        data.cifar10_dataset(tmp_path)
    fake = tmp_path / "fake" / "cifar-10-batches-py"
    fake.mkdir(parents=True)
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        data.cifar10_dataset(fake.parent)


def test_cifar10_partial_folder_keeps_cifar_indices(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "truck" / "0.jpg")
    ds = data.cifar10_dataset(tmp_path)
    assert ds.targets == [9]


def test_truncated_jpeg_is_skipped_and_counted(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "a" / "good.jpg")
    whole = write_jpeg(tmp_path / "b" / "bad.jpg", size=(64, 64))
    (tmp_path / "b" / "bad.jpg").write_bytes(whole[: len(whole) // 2])
    write_jpeg(tmp_path / "b" / "good.jpg")
    ds = data.image_folder_dataset(tmp_path, spec=CIFAR_SPEC)
    assert ds.classes == ["a", "b"] and ds.targets == [0, 1, 1]
    batches = list(data.make_loader(ds, batch_size=2, workers=0))
    assert sum(b.skipped for b in batches) == 1
    assert sum(len(b.targets) for b in batches) == 2
    assert batches[0].images.shape == (1, 3, 32, 32)  # bad.jpg sorts before good.jpg
    assert [Path(p).name for p in ds.skipped] == ["bad.jpg"]

    strict = data.image_folder_dataset(tmp_path, spec=CIFAR_SPEC, strict=True)
    with pytest.raises(DataError, match="bad.jpg"):
        list(data.make_loader(strict, batch_size=2, workers=0))


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found.*expected"):
        data.image_folder_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="not found"):
        data.imagenet_dataset(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images"):
        data.image_folder_dataset(tmp_path / "empty")


def test_transform_fits_and_converts() -> None:
    transform = data.build_transform(CIFAR_SPEC)
    cmyk = Image.new("CMYK", (50, 40))
    assert transform(cmyk).shape == (3, 32, 32)
    gray = data.build_transform(replace(CIFAR_SPEC, shape=(1, 32, 32), mean=(0.5,), std=(0.5,)))
    assert gray(Image.new("RGB", (32, 32), (255, 255, 255))).tolist()[0][0][0] == 1.0
    imagenet = data.build_transform(input_spec("torchvision.resnet18"))
    assert imagenet(Image.new("RGB", (500, 300))).shape == (3, 224, 224)


@pytest.mark.parametrize("bad", [
    {"shape": (3, 32)}, {"shape": (4, 32, 32)}, {"std": (0.0, 1.0, 1.0)}, {"mean": (0.5,)},
    {"resize": -1}, {"crop": 2.5}, {"shape": None},
])  # fmt: skip
def test_bad_specs(bad: dict[str, object]) -> None:
    with pytest.raises(DataError, match="input spec"):
        data.build_transform(replace(CIFAR_SPEC, **bad))


def test_limit_spreads_over_classes(cifar_dir: Path) -> None:
    assert data.spread_indices(10, 4) == [0, 2, 5, 7]
    assert data.spread_indices(3, None) == data.spread_indices(3, 10) == [0, 1, 2]
    ds = data.cifar10_dataset(cifar_dir)
    loader = data.make_loader(ds, batch_size=100, workers=0, limit=500)
    assert len(loader.dataset) == 500
    subset_targets = [ds.targets[i] for i in loader.dataset.indices]
    assert collections.Counter(subset_targets) == {c: 50 for c in range(10)}
    with pytest.raises(DataError):
        data.make_loader(ds, batch_size=0, workers=0)
