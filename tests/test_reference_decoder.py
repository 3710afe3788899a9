"""The coder spec is complete: implementations written from docs/CODERS.md alone
(tests/reference_ans.py, tests/reference_huffman.py; no constriction, no runtime coder code)
decode real streams and reproduce the writer's bytes."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from packer.compress import PackRequest, pack
from runtime.coders import CodedStream, decode
from runtime.coders._huffman import choose_chunk_size, code_lengths_for
from runtime.decode import read_stream
from runtime.errors import CorruptBlob
from runtime.format.reader import PackedFile, open_packed
from tests import reference_ans, reference_huffman

GOLDEN = Path(__file__).parent / "golden" / "tiny-v1.fb"


@pytest.fixture(scope="module")
def resnet20_packs(shared_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """The shared ResNet-20 packed three ways: every stream of each file in one coder."""
    source = shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth"
    out = tmp_path_factory.mktemp("reference")
    paths = {}
    for method, coder in (("kmeans", "ans"), ("uniform", "ans"), ("kmeans", "huffman")):
        path = out / f"{method}-{coder}.fb"
        pack(PackRequest(source, path, method, coder=coder, progress=False))
        paths[f"{method}-{coder}"] = path
    return paths


def streams(packed: PackedFile):
    """(label, stream record, payload bytes, symbols the runtime decodes) of every stream."""
    for tensor in packed.model.tensors:
        for role, stream in tensor.streams():
            what = f"{tensor.name}/{role}"
            yield what, stream, bytes(packed.blob(stream.blob, what)), \
                read_stream(packed, stream, what)


def check_ans_file(path: Path) -> int:
    """Reference-decode and reference-encode every ans stream; returns the symbols checked."""
    checked = 0
    with open_packed(path) as packed:
        for what, stream, payload, symbols in streams(packed):
            if stream.coder != "ans":
                continue
            got = reference_ans.decode(payload, stream.frequencies, stream.precision,
                                       stream.count, stream.alphabet_size)
            assert np.array_equal(got, symbols), what
            freq, again = reference_ans.encode(symbols, stream.alphabet_size)
            assert again == payload, what
            assert (freq is None) == (stream.frequencies is None), what
            if freq is not None:
                assert np.array_equal(freq, stream.frequencies), what
            checked += stream.count
    return checked


@pytest.mark.parametrize("name", ["kmeans-ans", "uniform-ans"])
def test_reference_ans_decodes_and_rewrites_every_stream_of_resnet20(
        resnet20_packs: dict[str, Path], name: str) -> None:
    with open_packed(resnet20_packs[name]) as packed:
        coders = {s.coder for t in packed.model.tensors for _, s in t.streams()}
        weights = sum(t.numel for t in packed.model.tensors if t.scheme != "raw")
    assert coders == {"ans"}
    assert weights > 268_000  # every conv and linear weight of ResNet-20 is a coded stream
    assert check_ans_file(resnet20_packs[name]) > weights  # plus the raw tensors' bytes


def test_reference_ans_reproduces_the_golden_streams() -> None:
    assert check_ans_file(GOLDEN) > 0


def test_the_stored_table_is_not_the_coding_model(resnet20_packs: dict[str, Path]) -> None:
    """Why the spec must say how the model is rebuilt: coding with the stored frequencies
    themselves would decode other symbols."""
    differing = 0
    with open_packed(resnet20_packs["kmeans-ans"]) as packed:
        for _, stream, _, _ in streams(packed):
            present = np.flatnonzero(stream.frequencies)
            if present.size > 1:
                _, _, prob = reference_ans.coding_model(stream.frequencies, stream.precision)
                differing += not np.array_equal(prob, stream.frequencies[present])
    assert differing > 10


def _tampered(freq: np.ndarray, payload: bytes) -> dict[str, tuple[np.ndarray, bytes]]:
    words = np.frombuffer(payload, dtype="<u4")
    fewer = freq.astype(np.int64)
    present = np.flatnonzero(fewer)
    fewer[present[0]] += 1
    fewer[present[1]] -= 1
    return {
        "trailing zero word": (freq, payload + bytes(4)),
        "extra word at the bottom": (freq, np.concatenate(([7], words)).astype("<u4").tobytes()),
        "last word dropped": (freq, payload[:-4]),
        "half a word": (freq, payload[:-2]),
        "first word changed": (freq, np.concatenate(([words[0] ^ 1], words[1:]))
                               .astype("<u4").tobytes()),
        "table shifted by one unit": (fewer.astype(np.uint32), payload),
    }


def test_reference_and_runtime_agree_on_tampered_streams() -> None:
    rng = np.random.default_rng(0)
    symbols = np.minimum(rng.geometric(0.3, 5000) - 1, 15)
    freq, payload = reference_ans.encode(symbols, 16)
    for case, (table, data) in _tampered(freq, payload).items():
        try:
            reference = reference_ans.decode(data, table, 24, symbols.size, 16)
        except reference_ans.AnsStreamError:
            reference = None
        try:
            runtime = decode(CodedStream("ans", 1, payload=data, frequencies=table, precision=24),
                             symbols.size, 16)
        except CorruptBlob:
            runtime = None
        assert (reference is None) == (runtime is None), case
        if reference is not None:
            assert np.array_equal(reference, runtime), case


def test_reference_huffman_lengths_match_the_writer_on_real_streams(
        resnet20_packs: dict[str, Path]) -> None:
    checked = 0
    with open_packed(resnet20_packs["kmeans-huffman"]) as packed:
        for what, stream, payload, symbols in streams(packed):
            assert stream.coder == "huffman"
            lengths, again, offsets, size = reference_huffman.encode(symbols,
                                                                     stream.alphabet_size)
            assert np.array_equal(lengths, stream.code_lengths), what
            assert (again, offsets, size) == (payload, stream.chunk_offsets.tolist(),
                                              stream.chunk_size), what
            checked += 1
    assert checked > 60


def test_reference_huffman_reproduces_the_golden_streams() -> None:
    checked = 0
    with open_packed(GOLDEN) as packed:
        for what, stream, payload, symbols in streams(packed):
            if stream.coder == "huffman":
                lengths, again, offsets, size = reference_huffman.encode(
                    symbols, stream.alphabet_size)
                assert again == payload and zlib.crc32(again) == stream.blob.crc32, what
                assert np.array_equal(lengths, stream.code_lengths), what
                assert (offsets, size) == (stream.chunk_offsets.tolist(), stream.chunk_size)
                checked += 1
    assert checked == 3


@pytest.mark.parametrize("seed", range(6))
def test_reference_huffman_lengths_match_when_the_limit_applies(seed: int) -> None:
    """Fibonacci-like counts make the unlimited tree deeper than 16 bits."""
    rng = np.random.default_rng(seed)
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    k = int(rng.integers(30, 300))
    counts = np.zeros(k, dtype=np.int64)
    slots = rng.choice(k, 30, replace=False)
    counts[slots] = fib
    counts[rng.choice(k, k // 3)] += rng.integers(1, 5, k // 3)  # plus ties and small counts
    assert max(reference_huffman.tree_lengths(counts.tolist())) > 16
    expected = code_lengths_for(counts)
    assert reference_huffman.limited_lengths(counts.tolist()) == expected.tolist()
    kraft = sum(2.0 ** -n for n in expected.tolist() if n)
    assert kraft == 1.0 and int(expected.max()) == 16


def test_chunk_size_table_matches_the_writer() -> None:
    rng = np.random.default_rng(1)
    edges = [1 << e for e in (17, 19, 21, 23)]
    counts = [0, 1, 511, 4096, *[e + d for e in edges for d in (-1, 0, 1)],
              *rng.integers(0, 1 << 26, 200).tolist()]
    for n in counts:
        assert reference_huffman.chunk_size(int(n)) == choose_chunk_size(int(n)), n
