"""Rules of docs/FORMAT.md that a reader must enforce or a decoder must compute exactly:
preamble checks and their order, blob placement, fields foreign to a scheme or coder,
names and labels, byte shuffle, and the arithmetic of decoding."""

from __future__ import annotations

import itertools
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from packer.encode import DataSection, Encoder
from packer.writer import write_packed
from runtime.decode import decode_tensor, read_stream
from runtime.errors import (
    BadMagic,
    ChecksumMismatch,
    CorruptBlob,
    FormatError,
    LayoutError,
    LimitExceeded,
    TruncatedFile,
    UnsupportedVersion,
)
from runtime.format.preamble import parse_preamble
from runtime.format.reader import open_packed
from runtime.format.records import ArchitectureRecord, BlobRef, ModelRecord, TensorRecord
from runtime.tensors import RawTensor, ScalarCodebookTensor, UniformTensor
from tests.packing import CIFAR_SPEC

# --- preamble --------------------------------------------------------------------------------

_LAYOUT = struct.Struct("<8sHHIQQQQQII")
_VALID = {"magic": b"\x89WPK\r\n\x1a\n", "major": 1, "minor": 0, "flags": 1, "index_offset": 64,
          "index_size": 1350, "data_offset": 1472, "data_size": 4304, "file_size": 5776,
          "alignment": 64, "crc": 0, "actual": 5776, "head_len": 64}

# (fault, fields it changes, error, message fragment), in the order FORMAT.md checks them.
PREAMBLE_FAULTS = [
    ("empty file", {"actual": 0, "head_len": 0}, TruncatedFile, "empty"),
    ("shorter than the preamble", {"head_len": 10, "actual": 10}, TruncatedFile, "shorter"),
    ("bad magic", {"magic": b"\x00WPK\r\n\x1a\n"}, BadMagic, "bad magic"),
    ("future major", {"major": 2}, UnsupportedVersion, "format 2"),
    ("unknown flag", {"flags": 0x81}, UnsupportedVersion, "flags"),
    ("file_size over the size on disk", {"file_size": 5840}, TruncatedFile, "truncated"),
    ("trailing bytes", {"actual": 5777}, LayoutError, "trailing"),
    ("alignment not a power of two", {"alignment": 48}, LayoutError, "alignment"),
    ("index_offset not 64", {"index_offset": 128}, LayoutError, "right after the preamble"),
    ("index over 256 MiB", {"index_size": (256 << 20) + 1}, LimitExceeded, "over the cap"),
    ("index under 8 bytes", {"index_size": 4}, LayoutError, "too short"),
    ("index runs into the data", {"data_offset": 1408}, LayoutError, "overlap"),
    ("data section misaligned", {"data_offset": 1480}, LayoutError, "not aligned"),
    ("data does not end the file", {"data_size": 4300}, LayoutError, "does not end"),
]


def _parse(changes: dict) -> None:
    f = {**_VALID, **changes}
    head = _LAYOUT.pack(f["magic"], f["major"], f["minor"], f["flags"], f["index_offset"],
                        f["index_size"], f["data_offset"], f["data_size"], f["file_size"],
                        f["alignment"], f["crc"])
    parse_preamble(head[: f["head_len"]], f["actual"])


def test_the_valid_preamble_parses() -> None:
    _parse({})


@pytest.mark.parametrize(("fault", "changes", "error", "fragment"), PREAMBLE_FAULTS,
                         ids=[f[0] for f in PREAMBLE_FAULTS])
def test_each_preamble_check_raises_its_named_error(fault, changes, error, fragment) -> None:
    with pytest.raises(error, match=fragment):
        _parse(changes)


PAIRS = [(a, b) for a, b in itertools.combinations(PREAMBLE_FAULTS, 2)
         if not set(a[1]) & set(b[1]) and a[0] != "shorter than the preamble"]


@pytest.mark.parametrize(("first", "later"), PAIRS,
                         ids=[f"{a[0]} + {b[0]}" for a, b in PAIRS])
def test_preamble_checks_run_in_the_documented_order(first, later) -> None:
    """Two faults at once: the one FORMAT.md lists first is the one reported."""
    _, changes, error, fragment = first
    with pytest.raises(error, match=fragment) as info:
        _parse({**later[1], **changes})
    assert type(info.value) is error


def test_a_short_file_is_truncated_only_if_it_starts_like_one() -> None:
    with pytest.raises(BadMagic, match="too short"):
        _parse({"head_len": 10, "actual": 10, "magic": b"\x00WPK\r\n\x1a\n"})


# --- files built from records ----------------------------------------------------------------


def encode(tensors: dict, coder: str = "auto") -> tuple[list[TensorRecord], DataSection]:
    data = DataSection(64)
    encoder = Encoder(data, coder)
    return [encoder.tensor(name, t).record for name, t in tensors.items()], data


def write(path: Path, records: list[TensorRecord], data: DataSection, **model) -> Path:
    record = ModelRecord(
        producer="weightpack test", method="test", method_config_json="{}",
        source_sha256="0" * 64, architecture=builder_arch(), input=CIFAR_SPEC,
        num_classes=10, tensors=tuple(records), fp32_bytes=1024, **model)
    write_packed(path, record, data)
    return path


def builder_arch() -> ArchitectureRecord:
    return ArchitectureRecord("builder", "cifar_resnet20", "{}")


def decode_all(path: Path) -> dict[str, torch.Tensor]:
    with open_packed(path) as packed:
        return {t.name: decode_tensor(packed, t).dequantize() for t in packed.model.tensors}


def test_index_checks_come_before_layout_checks(tmp_path: Path) -> None:
    """Index CRC, then the padding after the index, then blob placement."""
    records, data = encode({"w": RawTensor(torch.randn(100), torch.float32)})
    records[0] = replace(records[0], values=replace(records[0].values, blob=replace(
        records[0].values.blob, offset=64)))  # misplaced: a layout fault
    path = write(tmp_path / "m.fb", records, data)
    with pytest.raises(LayoutError, match="unreferenced bytes before"):
        open_packed(path)
    blob = bytearray(path.read_bytes())
    index_end = 64 + struct.unpack_from("<Q", blob, 24)[0]
    blob[index_end] = 1  # non-zero padding after the index
    path.write_bytes(bytes(blob))
    with pytest.raises(LayoutError, match="padding after the index"):
        open_packed(path)
    blob[70] ^= 0xFF  # and a damaged index
    path.write_bytes(bytes(blob))
    with pytest.raises(ChecksumMismatch, match="index"):
        open_packed(path)


def _layout_outcome(check) -> str:
    try:
        check()
    except LayoutError as exc:
        return str(exc)
    return "ok"


def test_the_vectorised_blob_walk_matches_the_walk_blob_by_blob(tmp_path: Path) -> None:
    """reader._check_layout (array operations) reports exactly what the documented walk does,
    blob by blob (_check_layout_slowly), on many random placements over one data section."""
    records, data = encode({f"t{i}": RawTensor(torch.randn(40 + 7 * i), torch.float32)
                            for i in range(6)}, coder="raw")
    path = write(tmp_path / "m.fb", records, data)
    blob = bytearray(path.read_bytes())
    data_offset = struct.unpack_from("<Q", blob, 32)[0]
    blob[data_offset + 200] = 7  # a non-zero byte for some placements to expose
    path.write_bytes(bytes(blob))
    rng = np.random.default_rng(0)
    outcomes = set()
    with open_packed(path) as packed:
        model = packed.model
        for _ in range(300):
            tensors = []
            for t in model.tensors:
                ref = t.values.blob
                offset = int(max(0, ref.offset + rng.choice([0, 0, 0, -64, 64, -8, 8, 1])))
                length = int(max(0, ref.length + rng.choice([0, 0, 0, 64, -20, 300])))
                tensors.append(replace(t, values=replace(t.values, blob=replace(
                    ref, offset=offset, length=length))))
            packed.model = replace(model, tensors=tuple(tensors))
            fast, slow = _layout_outcome(packed._check_layout), _layout_outcome(
                packed._check_layout_slowly)
            assert fast == slow
            outcomes.add(fast.split(" ")[0])
    assert len(outcomes) >= 4  # the placements reach several different checks


# --- zero-length and shared blobs -------------------------------------------------------------


def _with_empty_blob() -> tuple[list[TensorRecord], DataSection]:
    """`one` has a 4-byte codebook and an empty ans payload (one symbol): the writer puts the
    empty blob at the next aligned offset, where `big`'s values start."""
    return encode({"one": ScalarCodebookTensor(torch.zeros(1), torch.zeros(6, dtype=torch.long)),
                   "big": RawTensor(torch.linspace(-1, 1, 300), torch.float32)}, coder="ans")


def test_zero_length_blob_may_share_an_offset_in_either_index_order(tmp_path: Path) -> None:
    records, data = _with_empty_blob()
    one, big = records
    assert one.indices.blob.length == 0 and one.indices.blob.offset == big.values.blob.offset
    for order in ([one, big], [big, one]):
        decoded = decode_all(write(tmp_path / "m.fb", order, data))
        assert decoded["one"].shape == (6,) and decoded["big"].shape == (300,)


def test_two_zero_length_blobs_may_share_an_offset(tmp_path: Path) -> None:
    records, data = encode({
        "a": ScalarCodebookTensor(torch.zeros(1), torch.zeros(3, dtype=torch.long)),
        "b": ScalarCodebookTensor(torch.ones(1), torch.zeros(3, dtype=torch.long))}, "ans")
    a, b = records
    a = replace(a, indices=replace(a.indices, blob=b.indices.blob))
    assert decode_all(write(tmp_path / "m.fb", [a, b], data))["b"].tolist() == [1.0] * 3


def test_zero_length_blob_inside_another_blob_is_an_overlap(tmp_path: Path) -> None:
    records, data = _with_empty_blob()
    one, big = records
    inside = BlobRef(big.values.blob.offset + 64, 0, 0)
    path = write(tmp_path / "m.fb", [replace(one, indices=replace(one.indices, blob=inside)),
                                     big], data)
    with pytest.raises(LayoutError, match="overlaps"):
        open_packed(path)


def test_zero_length_blob_must_be_aligned(tmp_path: Path) -> None:
    records, data = _with_empty_blob()
    one, big = records
    ref = replace(one.indices.blob, offset=one.indices.blob.offset + 8)
    with pytest.raises(LayoutError, match="aligned"):
        open_packed(write(tmp_path / "m.fb", [replace(one, indices=replace(
            one.indices, blob=ref)), big], data))


def test_a_blob_shared_by_two_references_is_an_overlap(tmp_path: Path) -> None:
    records, data = encode({"a": RawTensor(torch.randn(64), torch.float32),
                            "b": RawTensor(torch.randn(64), torch.float32)}, coder="raw")
    a, b = records
    with pytest.raises(LayoutError, match="overlaps"):
        open_packed(write(tmp_path / "m.fb", [a, replace(b, values=a.values)], data))


# --- fields that do not belong to the scheme or the coder -------------------------------------


def _records(spare: str | None = None) -> tuple[dict[str, TensorRecord], DataSection, object]:
    """Three tensors, plus a spare "array" or "stream" (a blob of its own) to misplace."""
    g = torch.Generator().manual_seed(0)
    data = DataSection(64)
    encoder = Encoder(data, "huffman")
    tensors = {
        "raw": RawTensor(torch.randn(4, 4, generator=g), torch.float32),
        "uniform": UniformTensor(torch.randint(-7, 8, (4, 4), generator=g, dtype=torch.int32),
                                 torch.rand(4, generator=g) + 0.1, None, 4, 0),
        "scalar": ScalarCodebookTensor(torch.linspace(-1, 1, 8),
                                       torch.randint(0, 8, (4, 4), generator=g)),
    }
    records = {name: encoder.tensor(name, t).record for name, t in tensors.items()}
    if spare == "array":
        return records, data, encoder.array(torch.ones(4))
    if spare == "stream":
        return records, data, encoder.stream(np.arange(16) % 8, 8, "x", [], "huffman")
    return records, data, None


FOREIGN = [
    ("raw", {"bits": 4}), ("raw", {"symbol_offset": -3}), ("raw", {"axis": 0}),
    ("raw", {"subvector_size": 2}), ("raw", {"layout": 1}),
    ("raw", {"codebook": "array"}), ("raw", {"indices": "stream"}),
    ("raw", {"scales": "array"}), ("raw", {"zero_points": "array"}),
    ("uniform", {"values_dtype": "float16"}), ("uniform", {"codebook": "array"}),
    ("uniform", {"values": "stream"}), ("uniform", {"subvector_size": 4}),
    ("uniform", {"layout": 1}),
    ("scalar", {"bits": 3}), ("scalar", {"axis": 1}), ("scalar", {"scales": "array"}),
    ("scalar", {"zero_points": "array"}), ("scalar", {"symbol_offset": 1}),
    ("scalar", {"layout": 1}), ("scalar", {"values": "stream"}),
    ("scalar", {"values_dtype": "int8"}),
]


@pytest.mark.parametrize(("target", "change"), FOREIGN,
                         ids=[f"{t}.{next(iter(c))}" for t, c in FOREIGN])
def test_a_field_foreign_to_the_scheme_is_refused(tmp_path: Path, target, change) -> None:
    (field, value), = change.items()
    records, data, spare = _records(value if value in ("array", "stream") else None)
    if spare is not None:
        value = spare
    records[target] = replace(records[target], **{field: value})
    path = write(tmp_path / "m.fb", list(records.values()), data)
    with open_packed(path) as packed:
        record = next(t for t in packed.model.tensors if t.name == target)
        with pytest.raises(FormatError, match=f"field {field} does not belong"):
            decode_tensor(packed, record)


STREAM_FOREIGN = [("bits", 4), ("precision", 24), ("frequencies", np.ones(8, np.uint32))]


@pytest.mark.parametrize(("field", "value"), STREAM_FOREIGN, ids=[f for f, _ in STREAM_FOREIGN])
def test_a_stream_field_foreign_to_the_coder_is_refused(tmp_path: Path, field, value) -> None:
    records, data, _ = _records()
    scalar = records["scalar"]
    records["scalar"] = replace(scalar, indices=replace(scalar.indices, **{field: value}))
    path = write(tmp_path / "m.fb", list(records.values()), data)
    with open_packed(path) as packed, pytest.raises(FormatError, match="does not belong to coder"):
        decode_tensor(packed, packed.model.tensors[2])


@pytest.mark.parametrize(("change", "fragment"), [
    ({"axis": -2}, "axis outside"), ({"axis": 2}, "axis outside"),
    ({"symbol_offset": (1 << 16) + 1}, "symbol offset"),
])
def test_uniform_fields_out_of_range_are_refused(tmp_path: Path, change, fragment) -> None:
    records, data, _ = _records()
    records["uniform"] = replace(records["uniform"], **change)
    path = write(tmp_path / "m.fb", list(records.values()), data)
    with open_packed(path) as packed, pytest.raises(FormatError, match=fragment):
        decode_tensor(packed, packed.model.tensors[1])


def test_zero_points_out_of_range_are_refused(tmp_path: Path) -> None:
    records, data = encode({"u": UniformTensor(
        torch.zeros(2, 3, dtype=torch.int32), torch.ones(2), torch.tensor([0, 1 << 17],
                                                                           dtype=torch.int32),
        4, 0)}, coder="raw")
    with pytest.raises(FormatError, match="zero point"):
        decode_all(write(tmp_path / "m.fb", records, data))


def test_raw_values_restore_only_to_their_own_or_another_float_type(tmp_path: Path) -> None:
    records, data = encode({"i": RawTensor(torch.arange(6, dtype=torch.int32), torch.int32)})
    bad = replace(records[0], dtype="float32")
    with pytest.raises(FormatError, match="cannot be restored"):
        decode_all(write(tmp_path / "m.fb", [bad], data))


def test_a_bool_byte_other_than_0_or_1_is_corrupt(tmp_path: Path) -> None:
    records, data = encode({"b": RawTensor(torch.tensor([True, False]), torch.bool)}, "raw")
    data.parts[-1] = b"\x02\x00"
    ref = records[0].values.blob
    records[0] = replace(records[0], values=replace(records[0].values, blob=replace(
        ref, crc32=zlib.crc32(b"\x02\x00"))))
    with pytest.raises(CorruptBlob, match="bool"):
        decode_all(write(tmp_path / "m.fb", records, data))


@pytest.mark.parametrize("kind", ["builder", "onnx_graph"])
def test_an_architecture_sets_no_field_of_the_other_kind(tmp_path: Path, kind: str) -> None:
    records, data = encode({"x": RawTensor(torch.zeros(1), torch.float32)})
    arch = ArchitectureRecord(kind, "cifar_resnet20", "{}", graph=data.add(b"not a graph"))
    path = tmp_path / "m.fb"
    write_packed(path, ModelRecord(
        producer="t", method="t", method_config_json="{}", source_sha256="",
        architecture=arch, input=CIFAR_SPEC, num_classes=1, tensors=tuple(records),
        fp32_bytes=4), data)
    with pytest.raises(FormatError, match="fields of the other kind"):
        open_packed(path)


# --- names and labels -------------------------------------------------------------------------


@pytest.mark.parametrize(("names", "fragment"), [(["", "b"], "no name"),
                                                 (["a", "a"], "not unique")])
def test_tensor_names_are_non_empty_and_unique(tmp_path: Path, names, fragment) -> None:
    records, data = encode({"x": RawTensor(torch.zeros(1), torch.float32),
                            "y": RawTensor(torch.ones(1), torch.float32)})
    records = [replace(r, name=n) for r, n in zip(records, names, strict=True)]
    with pytest.raises(FormatError, match=fragment):
        open_packed(write(tmp_path / "m.fb", records, data))


@pytest.mark.parametrize("labels", [("conv1", "conv1"), ("", "conv1")])
def test_activation_labels_are_non_empty_and_unique(tmp_path: Path, labels) -> None:
    records, data = encode({"x": RawTensor(torch.zeros(1), torch.float32)})
    path = write(tmp_path / "m.fb", records, data,
                 activation_scales=tuple((label, 0.5) for label in labels))
    with pytest.raises(FormatError, match="labels must be non-empty and unique"):
        open_packed(path)


def test_input_spec_over_64_channels_is_a_limit(tmp_path: Path) -> None:
    records, data = encode({"x": RawTensor(torch.zeros(1), torch.float32)})
    spec = replace(CIFAR_SPEC, shape=(65, 4, 4), mean=(0.5,) * 65, std=(0.5,) * 65)
    path = tmp_path / "m.fb"
    record = ModelRecord(producer="t", method="t", method_config_json="{}", source_sha256="",
                         architecture=builder_arch(), input=spec, num_classes=1,
                         tensors=tuple(records), fp32_bytes=4)
    write_packed(path, record, data)
    with pytest.raises(LimitExceeded, match="mean/std"):
        open_packed(path)



@pytest.mark.parametrize("shape,resize,crop", [
    ((3, 33554432, 32), 0, 0),  # fuzz campaign 10, case 85804: a 12.9 GB input
    ((3, 32, 32), 1 << 14, 0),
    ((3, 32, 32), 0, 1 << 14),
])
def test_input_spec_over_2_26_elements_is_a_limit(tmp_path: Path, shape, resize, crop) -> None:
    records, data = encode({"x": RawTensor(torch.zeros(1), torch.float32)})
    spec = replace(CIFAR_SPEC, shape=shape, resize=resize or None, crop=crop or None)
    path = tmp_path / "m.fb"
    record = ModelRecord(producer="t", method="t", method_config_json="{}", source_sha256="",
                         architecture=builder_arch(), input=spec, num_classes=1,
                         tensors=tuple(records), fp32_bytes=4)
    write_packed(path, record, data)
    with pytest.raises(LimitExceeded, match="input spec declares an image over 67,108,864"):
        open_packed(path)

# --- bytes and arithmetic ---------------------------------------------------------------------


def test_raw_byte_planes_are_little_endian_lowest_first(tmp_path: Path) -> None:
    records, data = encode({"w": RawTensor(torch.tensor([1.0, 2.0]), torch.float32)}, "raw")
    path = write(tmp_path / "m.fb", records, data)
    with open_packed(path) as packed:
        symbols = read_stream(packed, packed.model.tensors[0].values, "w")
    # 1.0 = 0x3F800000, 2.0 = 0x40000000: plane 0 holds both lowest bytes, plane 3 the highest
    assert symbols.tolist() == [0x00, 0x00, 0x00, 0x00, 0x80, 0x00, 0x3F, 0x40]


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest, ties to even (FORMAT.md), finite x."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.mark.parametrize("target", [torch.float16, torch.bfloat16, torch.float64])
def test_uniform_arithmetic_is_one_float32_product_then_one_rounding(tmp_path: Path,
                                                                     target) -> None:
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(1, 256, (6, 50), generator=g, dtype=torch.int32)
    scales = torch.rand(6, generator=g) * 1e-2 + 1e-4
    zps = torch.randint(100, 156, (6,), generator=g, dtype=torch.int32)
    records, data = encode({"u": UniformTensor(codes, scales, zps, 8, 0, target),
                            "v": UniformTensor(codes - 128, scales[:1], None, 8, None, target)})
    decoded = decode_all(write(tmp_path / "m.fb", records, data))
    c, s, z = codes.numpy(), scales.numpy(), zps.numpy()
    product = {"u": np.float32(c - z[:, None]) * s[:, None],  # float32 x float32 -> float32
               "v": np.float32(c - 128) * s[0]}
    for name, value in product.items():
        assert value.dtype == np.float32
        got = decoded[name]
        if target == torch.bfloat16:
            assert np.array_equal(got.view(torch.int16).numpy().view(np.uint16),
                                  _bf16_bits(value))
        else:
            assert np.array_equal(got.numpy(), value.astype(torch.empty(0, dtype=target)
                                                            .numpy().dtype))


def test_codebook_entries_pass_through_float32(tmp_path: Path) -> None:
    x = 1 + 2.0 ** -40  # not a float32: rounds to 1.0 on the way
    records, data = encode({"k": ScalarCodebookTensor(torch.tensor([x, 2.0], dtype=torch.float64),
                                                      torch.tensor([0, 1]), torch.float64)})
    assert decode_all(write(tmp_path / "m.fb", records, data))["k"].tolist() == [1.0, 2.0]


def test_float64_to_float16_rounds_twice_via_float32(tmp_path: Path) -> None:
    x = 1 + 2.0 ** -11 + 2.0 ** -40  # nearest half: 1 + 2**-10; via float32 a tie -> 1.0
    records, data = encode({"r": RawTensor(torch.tensor([x], dtype=torch.float64),
                                           torch.float16),
                            "b": RawTensor(torch.tensor([1 + 2.0 ** -8 + 2.0 ** -40],
                                                        dtype=torch.float64), torch.bfloat16)})
    decoded = decode_all(write(tmp_path / "m.fb", records, data))
    assert decoded["r"].item() == 1.0 and decoded["b"].item() == 1.0


def test_resnet20_labels_follow_the_documented_grammar() -> None:
    from runtime import zoo
    from runtime.quant.plan import build_plan

    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    expected = ["conv1", "conv1:out"]
    for block in blocks:
        expected += [f"{block}.conv1", f"{block}.conv1:out", f"{block}.conv2",
                     f"{block}.conv2:out", f"{block}/add"]
    expected.append("linear")
    assert build_plan(zoo.build("cifar_resnet20").eval()).scale_labels() == expected
