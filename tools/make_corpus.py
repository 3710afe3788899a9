"""Write the malformed-file corpus tests/corpus/*.fb from the golden file.

Each file breaks one rule of the format; tests/corpus/manifest.json names the exception the
reader must raise and a fragment of its message. `python tools/make_corpus.py`.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import flatbuffers
import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from packer import index_builder  # noqa: E402
from packer.encode import DataSection  # noqa: E402
from packer.writer import layout  # noqa: E402
from runtime.coders import CODERS  # noqa: E402
from runtime.format.index import parse_index  # noqa: E402
from runtime.format.preamble import FLAG_INDEX_ZSTD, INDEX_IDENTIFIER, PREAMBLE_SIZE  # noqa: E402
from runtime.format.records import (  # noqa: E402
    SCHEMES,
    ArchitectureRecord,
    ArrayRecord,
    BlobRef,
    InputSpec,
    ModelRecord,
    StreamRecord,
    TensorRecord,
)

GOLDEN = ROOT / "tests" / "golden" / "tiny-v1.fb"
CORPUS = ROOT / "tests" / "corpus"
_PRE = struct.Struct("<8sHHIQQQQQII")


def split(blob: bytes) -> tuple[list, bytes, bytes]:
    fields = list(_PRE.unpack_from(blob))
    index_size, data_offset = fields[5], fields[6]
    stored = blob[PREAMBLE_SIZE : PREAMBLE_SIZE + index_size]
    index = zstandard.ZstdDecompressor().decompress(stored) if fields[3] & 1 else stored
    return fields, index, blob[data_offset:]


def assemble(fields: list, index: bytes, data: bytes, compress: bool = True,
             level: int = 19) -> bytes:
    stored = zstandard.ZstdCompressor(level=level).compress(index) if compress else index
    align = fields[9]
    end = PREAMBLE_SIZE + len(stored)
    data_offset = end + (-end % align)
    fields = list(fields)
    fields[3] = FLAG_INDEX_ZSTD if compress else 0
    fields[4:9] = [PREAMBLE_SIZE, len(stored), data_offset, len(data), data_offset + len(data)]
    fields[10] = zlib.crc32(stored)
    return _PRE.pack(*fields) + stored + bytes(data_offset - end) + data


def with_model(blob: bytes, change: Callable[[ModelRecord], ModelRecord]) -> bytes:
    fields, index, data = split(blob)
    return assemble(fields, index_builder.build_index(change(parse_index(index))), data)


def first_tensor(model: ModelRecord, name: str):
    return next(t for t in model.tensors if t.name == name)


def swap_tensor(model: ModelRecord, target: str, **changes) -> ModelRecord:
    tensors = tuple(replace(t, **changes) if t.name == target else t for t in model.tensors)
    return replace(model, tensors=tensors)


def cases(golden: bytes) -> dict[str, tuple[bytes, str, str]]:
    fields, index, data = split(golden)
    out: dict[str, tuple[bytes, str, str]] = {}

    def put(name: str, blob: bytes, error: str, fragment: str) -> None:
        out[name] = (blob, error, fragment)

    put("empty", b"", "TruncatedFile", "empty")
    put("short", golden[:10], "TruncatedFile", "shorter than the 64-byte preamble")
    put("bad_magic", b"\x00" + golden[1:], "BadMagic", "bad magic")
    put("text_file", b"hello, this is not a packed model file at all" * 3, "BadMagic", "")
    major = bytearray(golden)
    major[8:10] = (2).to_bytes(2, "little")
    put("future_major", bytes(major), "UnsupportedVersion", "format 2.0")
    flags = bytearray(golden)
    flags[12:16] = (0x80).to_bytes(4, "little")
    put("unknown_flags", bytes(flags), "UnsupportedVersion", "flags")
    put("truncated_data", golden[:-100], "TruncatedFile", "truncated")
    put("truncated_index", golden[:100], "TruncatedFile", "truncated")
    put("trailing_bytes", golden + b"\x00" * 16, "FormatError", "trailing")
    flip_index = bytearray(golden)
    flip_index[PREAMBLE_SIZE + 20] ^= 0x40
    put("index_crc", bytes(flip_index), "ChecksumMismatch", "index")
    flip_data = bytearray(golden)
    flip_data[-10] ^= 0x01
    put("blob_crc", bytes(flip_data), "ChecksumMismatch", "CRC-32")
    put("not_a_flatbuffer", assemble(fields, b"\x10\x00\x00\x00XXXX" + bytes(24), data),
        "FormatError", "identifier")
    put("garbage_index", assemble(fields, index[:8] + bytes(range(256)) * 4, data),
        "FormatError", "")
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(300 << 20))
    put("index_bomb", assemble_stored(fields, bomb, data), "LimitExceeded", "over the cap")

    index_builder.CODERS = (*CODERS, "future1", "future2", "future3", "future4")
    try:
        put("unknown_coder", with_model(golden, lambda m: swap_tensor(
            m, "kmeans", indices=replace(first_tensor(m, "kmeans").indices, coder="future4"))),
            "UnsupportedVersion", "coder code 7")
    finally:
        index_builder.CODERS = CODERS
    put("future_coder_version", with_model(golden, lambda m: swap_tensor(
        m, "kmeans", indices=replace(first_tensor(m, "kmeans").indices, version=9))),
        "UnsupportedVersion", "version 9")
    put("future_scheme_version", with_model(golden, lambda m: swap_tensor(
        m, "kmeans", scheme_version=3)), "UnsupportedVersion", "version 3")
    put("huge_shape", with_model(golden, lambda m: swap_tensor(
        m, "raw_fp32", shape=(1 << 40, 1 << 40))), "LimitExceeded", "elements")
    put("too_many_dims", with_model(golden, lambda m: swap_tensor(
        m, "raw_fp32", shape=(1,) * 9)), "LimitExceeded", "dimensions")
    put("shape_mismatch", with_model(golden, lambda m: swap_tensor(
        m, "kmeans", shape=(8, 4, 3, 4))), "FormatError", "index count")
    put("overlapping_blobs", with_model(golden, lambda m: swap_tensor(
        m, "kmeans", codebook=replace(first_tensor(m, "kmeans").codebook,
                                      blob=first_tensor(m, "raw_fp32").values.blob))),
        "FormatError", "overlaps")
    put("blob_past_end", with_model(golden, lambda m: swap_tensor(
        m, "pq_raw", indices=replace(first_tensor(m, "pq_raw").indices, blob=replace(
            first_tensor(m, "pq_raw").indices.blob, length=1 << 20)))),
        "FormatError", "past the end")
    put("duplicate_names", with_model(golden, lambda m: swap_tensor(m, "kmeans", name="pq")),
        "FormatError", "not unique")
    put("alphabet_zero", with_model(golden, lambda m: swap_tensor(
        m, "kmeans", indices=replace(first_tensor(m, "kmeans").indices, alphabet_size=0))),
        "LimitExceeded", "alphabet")

    # Payload corrupted but its checksum updated: the decoder itself must notice.
    fields2, index2, data2 = split(golden)
    model = parse_index(index2)
    stream = first_tensor(model, "kmeans").indices
    start, stop = stream.blob.offset, stream.blob.offset + stream.blob.length
    bad = bytearray(data2)
    bad[start:stop] = bytes(stop - start)
    new_stream = replace(stream, blob=replace(stream.blob, crc32=zlib.crc32(bad[start:stop])))
    put("ans_payload_zeroed", assemble(fields2, index_builder.build_index(
        swap_tensor(model, "kmeans", indices=new_stream)), bytes(bad)), "CorruptBlob", "")

    # Issue 10: hostile files that cost memory, time or an untyped exception before.
    frame = zstandard.ZstdCompressor(level=19).compress(index)
    put("index_trailing_zeros", assemble_stored(fields, frame + bytes(8), data),
        "FormatError", "unused data")
    put("index_trailing_bytes", assemble_stored(fields, frame + b"payload!", data),
        "FormatError", "unused data")
    deep = "[" * 200_000 + "]" * 200_000
    put("json_nested_deep", with_model(golden, lambda m: replace(m, metadata_json=deep)),
        "LimitExceeded", "nests deeper than 64")
    put("shared_stream_index", assemble(fields, shared_stream_index(model, 2000), data),
        "LimitExceeded", "referenced more than once")
    put("zero_d_codebook", with_model(golden, lambda m: swap_tensor(
        m, "kmeans", codebook=replace(first_tensor(m, "kmeans").codebook, shape=()))),
        "FormatError", "codebook")
    put("ans_one_symbol_2e28", one_symbol_ans_file(fields, 1 << 28), "LimitExceeded",
        "elements in total")
    put("zstd_declares_16mib", zstd_claim_file(fields, 1 << 22), "CorruptBlob", "cannot hold")
    return out


def assemble_stored(fields: list, stored: bytes, data: bytes) -> bytes:
    """Like `assemble`, with the stored (compressed) index bytes given as they are."""
    align = fields[9]
    end = PREAMBLE_SIZE + len(stored)
    data_offset = end + (-end % align)
    f = list(fields)
    f[3] = FLAG_INDEX_ZSTD
    f[4:9] = [PREAMBLE_SIZE, len(stored), data_offset, len(data), data_offset + len(data)]
    f[10] = zlib.crc32(stored)
    return _PRE.pack(*f) + stored + bytes(data_offset - end) + data


def shared_stream_index(model: ModelRecord, copies: int) -> bytes:
    """An index of `copies` tensors (distinct names) that all point at one Stream table with
    65536-entry tables: 0.4 MB of FlatBuffer that a per-entry parse copies into 0.6 GB."""
    from runtime.format.generated.weightpack.fb import Model as FbModel, Tensor as FbTensor

    b = flatbuffers.Builder(1 << 20)
    stream = index_builder._stream(b, StreamRecord(
        blob=BlobRef(0, 0, 0), coder="huffman", version=1, alphabet_size=65536, count=1,
        code_lengths=np.ones(65536, np.uint8), frequencies=np.ones(65536, np.uint32)))
    tensors = []
    for i in range(copies):
        name = b.CreateString(f"t{i}")
        FbTensor.Start(b)
        FbTensor.AddName(b, name)
        FbTensor.AddScheme(b, SCHEMES.index("uniform"))
        FbTensor.AddSchemeVersion(b, 1)
        FbTensor.AddIndices(b, stream)
        tensors.append(FbTensor.End(b))
    FbModel.StartTensorsVector(b, len(tensors))
    for off in reversed(tensors):
        b.PrependUOffsetTRelative(off)
    vector = b.EndVector()
    arch, spec = index_builder._architecture(b, model.architecture), index_builder._input(
        b, model.input)
    FbModel.Start(b)
    FbModel.AddArchitecture(b, arch)
    FbModel.AddInput(b, spec)
    FbModel.AddTensors(b, vector)
    b.Finish(FbModel.End(b), file_identifier=INDEX_IDENTIFIER)
    return bytes(b.Output())


def _single_tensor_file(fields: list, record: TensorRecord, blobs: list[bytes]) -> bytes:
    data = DataSection(fields[9])
    refs = [data.add(blob) for blob in blobs]
    record = _with_blobs(record, refs)
    model = ModelRecord(
        producer="hostile", method="none", method_config_json="{}", source_sha256="0" * 64,
        architecture=ArchitectureRecord("builder", "cifar_resnet20", "{}"),
        input=InputSpec((3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), num_classes=10,
        tensors=(record,), fp32_bytes=4)
    return b"".join(layout(model, data).chunks)


def _with_blobs(record: TensorRecord, refs: list[BlobRef]) -> TensorRecord:
    """The record with its arrays, then its streams, pointing at `refs` in that order."""
    refs = list(refs)
    arrays = {role: replace(a, blob=refs.pop(0)) for role, a in record.arrays()}
    streams = {role: replace(s, blob=refs.pop(0)) for role, s in record.streams()}
    return replace(record, **arrays, **streams)


def one_symbol_ans_file(fields: list, count: int) -> bytes:
    """~440 bytes: an ans stream with one present symbol codes any count in zero bytes."""
    freq = np.zeros(2, np.uint32)
    freq[0] = 1 << 24
    record = TensorRecord(
        name="w", shape=(count,), dtype="float32", scheme="scalar_codebook",
        codebook=ArrayRecord(BlobRef(0, 0, 0), "float32", (2,)),
        indices=StreamRecord("ans", 1, blob=BlobRef(0, 0, 0), alphabet_size=2, count=count,
                             frequencies=freq, precision=24))
    return _single_tensor_file(fields, record, [np.array([0.5, -0.5], "<f4").tobytes(), b""])


def zstd_frame_claiming(size: int) -> bytes:
    """A zstd frame whose header declares `size` bytes but holds one 100-byte RLE block."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + size.to_bytes(8, "little")
    block = ((100 << 3) | (1 << 1) | 1).to_bytes(3, "little") + b"\x00"  # last, RLE
    return header + block


def zstd_claim_file(fields: list, numel: int) -> bytes:
    """A raw float32 tensor of `numel` whose 17-byte zstd payload declares all its bytes."""
    record = TensorRecord(
        name="w", shape=(numel,), dtype="float32", scheme="raw", values_dtype="float32",
        values=StreamRecord("zstd", 1, blob=BlobRef(0, 0, 0), alphabet_size=256,
                            count=4 * numel, bits=8))
    return _single_tensor_file(fields, record, [zstd_frame_claiming(4 * numel)])


def main() -> int:
    CORPUS.mkdir(exist_ok=True)
    for old in CORPUS.glob("*.fb"):
        old.unlink()
    manifest = {}
    for name, (blob, error, fragment) in cases(GOLDEN.read_bytes()).items():
        (CORPUS / f"{name}.fb").write_bytes(blob)
        manifest[name] = {"error": error, "match": fragment}
    (CORPUS / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(manifest)} malformed files to {CORPUS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
