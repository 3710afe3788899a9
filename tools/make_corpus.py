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

import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from packer import index_builder  # noqa: E402
from runtime.coders import CODERS  # noqa: E402
from runtime.format.index import parse_index  # noqa: E402
from runtime.format.preamble import FLAG_INDEX_ZSTD, PREAMBLE_SIZE  # noqa: E402
from runtime.format.records import ModelRecord  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "tiny-v1.fb"
CORPUS = ROOT / "tests" / "corpus"
_PRE = struct.Struct("<8sHHIQQQQQII")


def split(blob: bytes) -> tuple[list, bytes, bytes]:
    fields = list(_PRE.unpack_from(blob))
    index_size, data_offset = fields[5], fields[6]
    stored = blob[PREAMBLE_SIZE : PREAMBLE_SIZE + index_size]
    index = zstandard.ZstdDecompressor().decompress(stored) if fields[3] & 1 else stored
    return fields, index, blob[data_offset:]


def assemble(fields: list, index: bytes, data: bytes, compress: bool = True) -> bytes:
    stored = zstandard.ZstdCompressor(level=19).compress(index) if compress else index
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
    put("index_bomb", _bomb(fields, bomb, data), "LimitExceeded", "over the cap")

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
    return out


def _bomb(fields: list, frame: bytes, data: bytes) -> bytes:
    """A compressed index whose frame declares 300 MB: must be refused before inflating."""
    align = fields[9]
    end = PREAMBLE_SIZE + len(frame)
    data_offset = end + (-end % align)
    f = list(fields)
    f[3] = FLAG_INDEX_ZSTD
    f[4:9] = [PREAMBLE_SIZE, len(frame), data_offset, len(data), data_offset + len(data)]
    f[10] = zlib.crc32(frame)
    return _PRE.pack(*f) + frame + bytes(data_offset - end) + data


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
