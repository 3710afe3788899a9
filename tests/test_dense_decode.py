"""decode_state_dict (dense, in place, threaded) against decode_tensor().dequantize(), the
compressed form's own arithmetic: equal bit for bit for every scheme, dtype and coder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from packer.encode import DataSection, Encoder
from packer.writer import write_packed
from runtime import decode as decode_module
from runtime.decode import decode_state_dict, decode_tensor
from runtime.format.reader import open_packed
from runtime.format.records import ArchitectureRecord, ModelRecord
from runtime.tensors import (
    RawTensor,
    ScalarCodebookTensor,
    UniformTensor,
    VectorCodebookTensor,
)
from tests.golden_data import golden_tensors
from tests.packing import CIFAR_SPEC

GOLDEN = Path(__file__).parent / "golden" / "tiny-v1.fb"


def _tensors() -> dict:
    """Every scheme, with zero points, per-layer and per-channel axes, other float dtypes."""
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 16, (6, 5, 3), generator=g, dtype=torch.int32)
    out = dict(golden_tensors())
    out.update({
        "uniform_zp_axis1": UniformTensor(codes, torch.rand(5, generator=g) + 0.1,
                                          torch.randint(-3, 9, (5,), generator=g,
                                                        dtype=torch.int32), 4, 1),
        "uniform_offset": UniformTensor(codes - 7, torch.tensor([0.25]), None, 4, None),
        "uniform_zp_layer": UniformTensor(codes, torch.tensor([0.5]),
                                          torch.tensor([3], dtype=torch.int32), 4, None),
        "uniform_zp_axis0": UniformTensor(codes, torch.rand(6, generator=g) + 0.1,
                                          torch.randint(-3, 9, (6,), generator=g,
                                                        dtype=torch.int32), 4, 0),
        "uniform_fp16": UniformTensor(codes - 7, torch.rand(6, generator=g), None, 4, 0,
                                      torch.float16),
        "uniform_12bit": UniformTensor(torch.randint(-2000, 2000, (300,), generator=g,
                                                     dtype=torch.int32),
                                       torch.tensor([1e-3]), None, 12, None),
        "kmeans_f64_book": ScalarCodebookTensor(torch.randn(300, generator=g,
                                                            dtype=torch.float64),
                                                torch.randint(0, 300, (40, 7), generator=g)),
        "kmeans_bf16_out": ScalarCodebookTensor(torch.randn(8, generator=g),
                                                torch.randint(0, 8, (33,), generator=g),
                                                torch.bfloat16),
        "pq_f64": VectorCodebookTensor(torch.randn(4, 2, generator=g), torch.randint(
            0, 4, (10,), generator=g), (4, 5), torch.float64),
        "raw_int8": RawTensor(torch.randint(-128, 127, (77,), generator=g, dtype=torch.int8),
                              torch.int8),
        "raw_bool": RawTensor(torch.rand(9, generator=g) > 0.5, torch.bool),
        "raw_f64_to_f16": RawTensor(torch.randn(31, generator=g, dtype=torch.float64),
                                    torch.float16),
        "scalar": RawTensor(torch.tensor(2.5), torch.float32),
        "empty": RawTensor(torch.zeros(0, 3), torch.float32),
    })
    return out


def _write(path: Path, coder: str) -> Path:
    data = DataSection(64)
    encoder = Encoder(data, coder)
    records = tuple(encoder.tensor(name, t).record for name, t in _tensors().items())
    write_packed(path, ModelRecord(
        producer="test", method="test", method_config_json="{}", source_sha256="",
        architecture=ArchitectureRecord("builder", "cifar_resnet20", "{}"), input=CIFAR_SPEC,
        num_classes=10, tensors=records, fp32_bytes=0), data)
    return path


def _assert_same(path: Path, threads: int) -> None:
    with open_packed(path) as packed:
        want = {t.name: decode_tensor(packed, t).dequantize() for t in packed.model.tensors}
        got = decode_state_dict(packed, threads=threads)
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        a, b = got[name].contiguous(), value.contiguous()
        if a.dtype == torch.bfloat16:
            a, b = a.view(torch.int16), b.view(torch.int16)
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


@pytest.mark.parametrize("threads", [1, 3])
def test_golden_file_decodes_densely_as_its_compressed_form(threads: int,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setattr(decode_module, "PARALLEL_ELEMENTS", 1)  # every tensor on the pool
    _assert_same(GOLDEN, threads)


@pytest.mark.parametrize("coder", ["auto", "raw", "zstd", "huffman", "ans"])
def test_every_scheme_and_dtype_decodes_densely_as_its_compressed_form(
        tmp_path: Path, coder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "m.fb", coder)
    _assert_same(path, 1)
    monkeypatch.setattr(decode_module, "PARALLEL_ELEMENTS", 1)
    _assert_same(path, 4)


@pytest.mark.parametrize("threads", [1, 3])
def test_codebook_lookups_in_blocks_and_in_numpy_agree(
        tmp_path: Path, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large lookups go through torch a block at a time, small ones through numpy: both
    paths, blocks that do not divide a tensor, serial and on the pool, equal bit for bit."""
    path = _write(tmp_path / "m.fb", "zstd")
    monkeypatch.setattr(decode_module, "PARALLEL_ELEMENTS", 1)
    monkeypatch.setattr(decode_module, "SMALL_GATHER", 1)
    monkeypatch.setattr(decode_module, "GATHER_BLOCK", 7)
    _assert_same(path, threads)
    monkeypatch.setattr(decode_module, "SMALL_GATHER", 1 << 30)
    _assert_same(path, threads)


def test_dense_tensors_share_one_block_per_dtype_and_are_writable(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.fb", "zstd")
    with open_packed(path) as packed:
        state = decode_state_dict(packed)
    storages = {t.untyped_storage().data_ptr() for n, t in state.items()
                if n in ("kmeans", "pq_raw", "uniform")}
    assert len(storages) == 1
    state["kmeans"].add_(1)  # an ordinary writable tensor
    assert state["kmeans"].data_ptr() % 64 == 0


def test_decoded_state_dict_round_trips_through_torch_save(tmp_path: Path) -> None:
    """torch.save refuses tensors viewing one storage as two dtypes: a file with float32
    weights and an int64 counter (a BatchNorm's num_batches_tracked) must still save."""
    path = _write(tmp_path / "m.fb", "zstd")
    with open_packed(path) as packed:
        state = decode_state_dict(packed)
    assert len({t.dtype for t in state.values()}) > 1
    torch.save(state, tmp_path / "state.pth")
    again = torch.load(tmp_path / "state.pth", weights_only=True)
    assert all(torch.equal(again[n], t) for n, t in state.items())


def test_the_first_bad_tensor_in_index_order_is_reported(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Two corrupt tensors, decoded on a pool: the error is the earlier one's, as when decoding
    one by one."""
    path = _write(tmp_path / "m.fb", "raw")
    with open_packed(path) as packed:
        names = [t.name for t in packed.model.tensors]
        spans = {t.name: t.values.blob if t.values else t.indices.blob
                 for t in packed.model.tensors}
        base = packed.preamble.data_offset
    blob = bytearray(path.read_bytes())
    for name in (names[3], names[8]):
        blob[base + spans[name].offset] ^= 0xFF
    path.write_bytes(bytes(blob))
    monkeypatch.setattr(decode_module, "PARALLEL_ELEMENTS", 1)
    with open_packed(path) as packed, pytest.raises(Exception, match=names[3]):
        decode_state_dict(packed, threads=4)


@pytest.mark.parametrize("threads", [1, 3])
def test_uniform_tensors_dequantized_in_blocks_agree(
        tmp_path: Path, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large per-tensor and leading-axis uniform tensors are dequantized a block of rows (or
    elements) at a time: blocks that do not divide them give the same bits."""
    monkeypatch.setattr(decode_module, "PARALLEL_ELEMENTS", 1)
    monkeypatch.setattr(decode_module, "DEQUANT_BLOCK", 4)
    _assert_same(_write(tmp_path / "m.fb", "zstd"), threads)
