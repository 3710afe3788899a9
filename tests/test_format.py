"""The packed format: round trips for every scheme x coder, layout rules, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from packer.config import CODER_CHOICES
from runtime.coders import CODERS
from runtime.decode import decode_tensor
from runtime.errors import UnsupportedVersion, WeightpackError
from runtime.format.generated.weightpack.fb import ArchKind, Coder, Scheme
from runtime.format.preamble import FORMAT_MAJOR, MAGIC, PREAMBLE_SIZE, parse_preamble
from runtime.format.reader import open_packed
from runtime.format.records import ARCH_KINDS, SCHEMES
from runtime.report import build_report
from runtime.tensors import (
    RawTensor,
    ScalarCodebookTensor,
    UniformTensor,
    VectorCodebookTensor,
)
from tests.packing import pack_tensors


def sample_tensors(seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 8, 3, 3, generator=g)
    codes = torch.randint(-15, 16, (16, 8, 3, 3), generator=g, dtype=torch.int32)
    codes[codes.abs() < 4] = 0  # skewed like real weights
    return {
        "raw32": RawTensor(w, torch.float32),
        "raw16": RawTensor(w.half(), torch.float32),
        "rawbf16": RawTensor(w.to(torch.bfloat16), torch.bfloat16),
        "raw_int64_scalar": RawTensor(torch.tensor(5865), torch.int64),
        "raw_empty": RawTensor(torch.zeros(0, 4), torch.float32),
        "uniform_channel": UniformTensor(codes, torch.rand(16, generator=g) + 0.01, None, 5, 0),
        "uniform_layer": UniformTensor(codes, torch.tensor([0.02]), None, 5, None),
        "uniform_asym": UniformTensor(codes + 15, torch.rand(16, generator=g),
                                      torch.full((16,), 15, dtype=torch.int32), 5, 0),
        "scalar": ScalarCodebookTensor(torch.linspace(-1, 1, 32).sort().values,
                                       torch.randint(0, 32, (16, 8, 3, 3), generator=g)),
        "scalar_k1": ScalarCodebookTensor(torch.zeros(1), torch.zeros(10, 3, dtype=torch.long)),
        "scalar_fp16_book": ScalarCodebookTensor(torch.randn(300, generator=g).half(),
                                                 torch.randint(0, 300, (40, 40), generator=g)),
        "vector": VectorCodebookTensor(torch.randn(64, 9, generator=g),
                                       torch.randint(0, 64, (128,), generator=g), (16, 8, 3, 3)),
    }


def _enum_names(enum: type) -> list[str]:
    """A generated FlatBuffers enum's names in code order, snake_case like ours."""
    items = sorted((v, k) for k, v in vars(enum).items() if not k.startswith("_"))
    return ["".join(f"_{c.lower()}" if c.isupper() else c for c in k).lstrip("_")
            for _, k in items]


def test_name_lists_follow_the_schema_enums() -> None:
    # Each list is the one home of its names; a name's position is its code in the file.
    assert _enum_names(Coder.Coder) == list(CODERS)
    assert _enum_names(Scheme.Scheme) == list(SCHEMES)
    assert _enum_names(ArchKind.ArchKind) == list(ARCH_KINDS)


@pytest.mark.parametrize("coder", CODER_CHOICES)
def test_every_scheme_round_trips_bit_exact(tmp_path: Path, coder: str) -> None:
    tensors = sample_tensors()
    pack_tensors(tmp_path / "m.fb", tensors, coder=coder)
    with open_packed(tmp_path / "m.fb") as packed:
        assert packed.verify() == len(packed.model.blobs())
        for record in packed.model.tensors:
            decoded = decode_tensor(packed, record).dequantize()
            expected = tensors[record.name].dequantize()
            assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
            assert torch.equal(decoded, expected), record.name
            for _, stream in record.streams():
                assert coder == "auto" or stream.coder == coder


def test_compressed_forms_come_back_not_just_values(tmp_path: Path) -> None:
    tensors = sample_tensors()
    pack_tensors(tmp_path / "m.fb", tensors)
    with open_packed(tmp_path / "m.fb") as packed:
        by_name = {t.name: t for t in packed.model.tensors}
        vec = decode_tensor(packed, by_name["vector"])
        assert isinstance(vec, VectorCodebookTensor)
        assert torch.equal(vec.codebook, tensors["vector"].codebook)
        assert torch.equal(vec.indices, tensors["vector"].indices)
        uni = decode_tensor(packed, by_name["uniform_channel"])
        assert isinstance(uni, UniformTensor) and uni.bits == 5 and uni.axis == 0
        assert torch.equal(uni.codes, tensors["uniform_channel"].codes)
        assert decode_tensor(packed, by_name["raw16"]).values.dtype == torch.float16


def test_packing_twice_gives_identical_bytes(tmp_path: Path) -> None:
    pack_tensors(tmp_path / "a.fb", sample_tensors())
    pack_tensors(tmp_path / "b.fb", sample_tensors())
    assert (tmp_path / "a.fb").read_bytes() == (tmp_path / "b.fb").read_bytes()


@pytest.mark.parametrize("alignment", [8, 64, 4096])
def test_blobs_are_aligned_sorted_and_disjoint(tmp_path: Path, alignment: int) -> None:
    pack_tensors(tmp_path / "m.fb", sample_tensors(), alignment=alignment)
    with open_packed(tmp_path / "m.fb") as packed:
        assert packed.preamble.alignment == alignment
        assert packed.preamble.data_offset % alignment == 0
        refs = sorted((ref for _, ref in packed.model.blobs()), key=lambda r: r.offset)
        for a, b in zip(refs, refs[1:], strict=False):
            assert a.offset + a.length <= b.offset
        assert all(r.offset % alignment == 0 for r in refs)


def test_blob_views_are_zero_copy_numpy(tmp_path: Path) -> None:
    pack_tensors(tmp_path / "m.fb", sample_tensors())
    with open_packed(tmp_path / "m.fb") as packed:
        record = next(t for t in packed.model.tensors if t.name == "scalar")
        view = np.frombuffer(packed.blob(record.codebook.blob), dtype="<f4")
        assert not view.flags.owndata and not view.flags.writeable
        assert np.array_equal(view, sample_tensors()["scalar"].codebook.numpy())
        del view


def test_model_metadata_survives(tmp_path: Path) -> None:
    model = pack_tensors(tmp_path / "m.fb", sample_tensors())
    with open_packed(tmp_path / "m.fb") as packed:
        m = packed.model
        assert m.producer == model.producer and m.class_names == ("a", "b")
        assert json.loads(m.method_config_json) == {"k": 1}
        assert m.input == model.input and m.num_classes == 10


def test_report_sections_add_up_to_file_bytes(tmp_path: Path) -> None:
    pack_tensors(tmp_path / "m.fb", sample_tensors())
    with open_packed(tmp_path / "m.fb") as packed:
        report = build_report(packed)
    assert report["file_bytes"] == (tmp_path / "m.fb").stat().st_size
    assert sum(report["sections"].values()) == report["file_bytes"]
    assert all(v >= 0 for v in report["sections"].values())
    assert report["ratio"] == pytest.approx(1024 / report["file_bytes"])


def test_unknown_major_version_names_the_version(tmp_path: Path) -> None:
    pack_tensors(tmp_path / "m.fb", sample_tensors())
    data = bytearray((tmp_path / "m.fb").read_bytes())
    data[8:10] = (FORMAT_MAJOR + 1).to_bytes(2, "little")
    with pytest.raises(UnsupportedVersion, match=f"format {FORMAT_MAJOR + 1}"):
        parse_preamble(bytes(data[:PREAMBLE_SIZE]), len(data))


def test_missing_file_and_directory_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightpackError, match="no such file"):
        open_packed(tmp_path / "nope.fb")
    with pytest.raises(WeightpackError, match="directory"):
        open_packed(tmp_path)


def test_magic_is_first(tmp_path: Path) -> None:
    pack_tensors(tmp_path / "m.fb", sample_tensors())
    assert (tmp_path / "m.fb").read_bytes()[:8] == MAGIC
