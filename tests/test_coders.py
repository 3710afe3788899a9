"""Tests for runtime.coders: round trips, size guarantees, determinism and hostile input."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

import huffman as huffman_ref
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from runtime import coders
from runtime.coders import (
    BYTE_WIDE,
    CODERS,
    FAST_CODERS,
    SLOW_MARGIN_PERCENT,
    CodedStream,
    _runs,
    decode,
    encode,
    encode_best,
    entropy_bits,
    min_bits,
    symbol_dtype,
)
from runtime.coders._huffman import MAX_CODE_LENGTH, code_lengths_for, huffman_lengths
from runtime.errors import CorruptBlob, LimitExceeded, UnsupportedVersion

FILE_ERRORS = (CorruptBlob, LimitExceeded)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _skewed(n: int, k: int, seed: int = 0, p_top: float = 0.99) -> np.ndarray:
    """Mostly one symbol, the rest spread over a pruned subset of the alphabet."""
    rng = _rng(seed)
    top = k // 3
    rest = rng.choice(np.arange(0, k, 7), size=n)
    return np.where(rng.random(n) < p_top, top, rest)


CASES: dict[str, tuple[np.ndarray, int]] = {
    "empty": (np.zeros(0, dtype=np.int64), 7),
    "empty_k1": (np.zeros(0, dtype=np.uint8), 1),
    "k1": (np.zeros(1000, dtype=np.int64), 1),
    "single_symbol_of_many": (np.full(999, 41, dtype=np.int32), 300),
    "one_element": (np.array([5]), 6),
    "k2": (_rng(1).integers(0, 2, 5001), 2),
    "k2_skewed": ((_rng(2).random(20000) < 0.03).astype(np.uint8), 2),
    "k3": (_rng(3).integers(0, 3, 777), 3),
    "k16_70pct_zero": (
        np.where(_rng(4).random(30000) < 0.7, 0, _rng(5).integers(1, 16, 30000)),
        16,
    ),
    "k256_bytes": (_rng(6).integers(0, 256, 10000).astype(np.uint8), 256),
    "k257": (_rng(7).integers(0, 257, 3000), 257),
    "k1000_10bit": (_rng(8).integers(0, 1000, 4000).astype(np.uint16), 1000),
    "k65536_dense": (_rng(9).permutation(np.tile(np.arange(65536), 2)), 65536),
    "k65536_sparse": (_rng(10).integers(0, 65536, 500), 65536),
    "skewed_pruned": (_skewed(40000, 300), 300),
    "shape_3d": (_rng(11).integers(0, 12, (7, 5, 3)), 12),
    "shape_2d_bool": (_rng(12).random((33, 9)) < 0.5, 2),
}


def _stored_copy(stream: CodedStream) -> CodedStream:
    """Rebuild the stream the way the file reader does: from stored bytes, no shared objects."""

    def copy(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.frombuffer(a.tobytes(), dtype=a.dtype)

    return CodedStream(
        coder=str(stream.coder),
        version=int(stream.version),
        payload=bytes(bytearray(stream.payload)),
        bits=int(stream.bits),
        code_lengths=copy(stream.code_lengths),
        frequencies=copy(stream.frequencies),
        precision=int(stream.precision),
        chunk_offsets=copy(stream.chunk_offsets),
        chunk_size=int(stream.chunk_size),
    )


def _roundtrip(symbols: np.ndarray, k: int, coder: str) -> CodedStream | None:
    if not coders.applies(coder, np.asarray(symbols).size, k):
        with pytest.raises(ValueError, match="at most 32768"):
            encode(symbols, k, coder)
        return None
    stream = encode(symbols, k, coder)
    assert stream.coder == coder and stream.version == 1
    out = decode(_stored_copy(stream), symbols.size, k)
    assert out.dtype == symbol_dtype(k)
    assert out.shape == (symbols.size,)
    np.testing.assert_array_equal(out, np.asarray(symbols).reshape(-1))
    return stream


# --------------------------------------------------------------------------- helpers & API


def test_public_names() -> None:
    assert sorted(coders.__all__) == sorted(
        [
            "BYTE_WIDE",
            "CODERS",
            "FAST_CODERS",
            "FORMAT_VERSION",
            "CodedStream",
            "applies",
            "CoderParams",
            "MAX_ZSTD_EXPANSION",
            "SLOW_MARGIN_PERCENT",
            "decode",
            "encode",
            "encode_best",
            "encode_candidates",
            "pick",
            "entropy_bits",
            "min_bits",
            "symbol_dtype",
        ]
    )
    assert CODERS == ("raw", "zstd", "huffman", "ans", "runs")


@pytest.mark.parametrize(
    ("k", "bits", "dtype"),
    [
        (1, 0, np.uint8),
        (2, 1, np.uint8),
        (3, 2, np.uint8),
        (16, 4, np.uint8),
        (17, 5, np.uint8),
        (256, 8, np.uint8),
        (257, 9, np.uint16),
        (65536, 16, np.uint16),
    ],
)
def test_min_bits_and_dtype(k: int, bits: int, dtype: type) -> None:
    assert min_bits(k) == bits
    assert symbol_dtype(k) == np.dtype(dtype)


@pytest.mark.parametrize("k", [0, -1, 65537])
def test_bad_alphabet(k: int) -> None:
    with pytest.raises(LimitExceeded):
        min_bits(k)
    with pytest.raises(LimitExceeded):
        encode(np.zeros(3, dtype=np.int64), k, "raw")


def test_entropy_bits() -> None:
    assert entropy_bits(np.zeros(0, dtype=np.int64), 4) == 0.0
    assert entropy_bits(np.zeros(10, dtype=np.int64), 4) == 0.0
    assert entropy_bits(np.arange(16) % 4, 4) == pytest.approx(2.0)
    assert entropy_bits(np.array([0, 0, 0, 1]), 2) == pytest.approx(0.8112781244591328)


def test_bad_encoder_input() -> None:
    with pytest.raises(ValueError):
        encode(np.array([0, 4]), 4, "raw")
    with pytest.raises(ValueError):
        encode(np.array([-1, 0]), 4, "huffman")
    with pytest.raises(TypeError):
        encode(np.array([0.0, 1.0]), 4, "ans")


def test_unknown_coder_and_version() -> None:
    with pytest.raises(UnsupportedVersion, match="lz77"):
        encode(np.zeros(3, dtype=np.int64), 2, "lz77")
    with pytest.raises(UnsupportedVersion, match="lz77"):
        encode_best(np.zeros(3, dtype=np.int64), 2, coders=("raw", "lz77"))
    stream = encode(np.zeros(3, dtype=np.int64), 2, "raw")
    with pytest.raises(UnsupportedVersion, match="lz77"):
        decode(dataclasses.replace(stream, coder="lz77"), 3, 2)
    with pytest.raises(UnsupportedVersion, match="version 2"):
        decode(dataclasses.replace(stream, version=2), 3, 2)


def test_nbytes_counts_params() -> None:
    symbols = _rng(0).integers(0, 16, 1000)
    for coder in CODERS:
        s = encode(symbols, 16, coder)
        arrays = [a for a in (s.code_lengths, s.frequencies, s.chunk_offsets) if a is not None]
        assert s.params_nbytes() == sum(a.nbytes for a in arrays)
        assert s.nbytes == len(s.payload) + s.params_nbytes()
    h = encode(symbols, 16, "huffman")
    assert h.code_lengths is not None and h.code_lengths.dtype == np.uint8
    assert h.chunk_offsets is not None and h.chunk_offsets.dtype == np.uint64
    a = encode(symbols, 16, "ans")
    assert a.frequencies is not None and a.frequencies.dtype == np.uint32
    assert int(a.frequencies.sum()) == 1 << a.precision


def test_stream_equality() -> None:
    symbols = _rng(0).integers(0, 16, 1000)
    for coder in CODERS:
        a, b = encode(symbols, 16, coder), encode(symbols, 16, coder)
        assert a == b and a == _stored_copy(b)
        assert a != dataclasses.replace(a, payload=a.payload + b"x")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_roundtrip_cases(coder: str, case: str) -> None:
    symbols, k = CASES[case]
    _roundtrip(symbols, k, coder)


@pytest.mark.parametrize("coder", CODERS)
def test_roundtrip_all_dtypes(coder: str) -> None:
    base = _rng(13).integers(0, 100, 500)
    for dtype in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64):
        _roundtrip(base.astype(dtype), 100, coder)


@st.composite
def symbol_streams(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    k = draw(
        st.one_of(
            st.sampled_from([1, 2, 3, 15, 16, 255, 256, 257, 4096, 65536]), st.integers(1, 65536)
        )
    )
    n = draw(st.integers(0, 3000))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["uniform", "skewed", "few", "runs"]))
    rng = _rng(seed)
    if kind == "uniform":
        symbols = rng.integers(0, k, n)
    elif kind == "skewed":
        p = rng.random(min(k, 64)) ** 8
        symbols = rng.choice(min(k, 64), size=n, p=p / p.sum()) * (k // min(k, 64))
    elif kind == "few":
        symbols = rng.choice(rng.integers(0, k, 3), size=n)
    else:
        symbols = np.repeat(rng.integers(0, k, max(1, n // 50)), 50)[:n]
    return symbols.astype(np.int64), k


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(symbol_streams(), st.sampled_from(CODERS))
def test_roundtrip_property(data: tuple[np.ndarray, int], coder: str) -> None:
    symbols, k = data
    _roundtrip(symbols, k, coder)


# --------------------------------------------------------------------------- sizes & choice


@settings(max_examples=25, deadline=None)
@given(symbol_streams())
def test_encode_best_rule_and_determinism(data: tuple[np.ndarray, int]) -> None:
    """auto: the smallest fast stream (raw, zstd at either width) unless huffman/ans is more
    than SLOW_MARGIN_PERCENT smaller; never more than that margin over the smallest."""
    symbols, k = data
    best, sizes = encode_best(symbols, k)
    usable = [c for c in CODERS if coders.applies(c, symbols.size, k)]
    assert (k > 32768) == ("runs" not in usable)
    byte_wide = 1 <= min_bits(k) < 8
    assert set(sizes) == set(usable) | ({BYTE_WIDE} if byte_wide else set())
    singles = {c: encode(symbols, k, c) for c in usable}
    assert {c: sizes[c] for c in usable} == {c: s.nbytes for c, s in singles.items()}
    smallest = min(sizes.values())
    fast = min(v for c, v in sizes.items() if c == BYTE_WIDE or c in FAST_CODERS)
    assert best.nbytes * 100 <= smallest * (100 + SLOW_MARGIN_PERCENT)
    if best.coder in FAST_CODERS:
        assert best.nbytes == fast
    else:
        assert best.nbytes == smallest and fast * 100 > smallest * (100 + SLOW_MARGIN_PERCENT)
    pure, _ = encode_best(symbols, k, slow_margin_percent=0)
    assert pure.nbytes == smallest
    again, sizes_again = encode_best(symbols, k, coders=tuple(reversed(CODERS)))
    assert again == best and sizes_again == sizes
    np.testing.assert_array_equal(decode(best, symbols.size, k), symbols)


def test_encode_best_byte_wide_zstd_on_skewed_indices() -> None:
    """5-bit indices with a skewed histogram: zstd over one byte per symbol (its Huffman
    literals) beats zstd over the tight 5-bit packing and is what auto keeps over ans."""
    p = np.exp(-np.arange(32) / 4.0)
    symbols = _rng(3).choice(32, size=60_000, p=p / p.sum())
    best, sizes = encode_best(symbols, 32)
    assert sizes[BYTE_WIDE] < sizes["zstd"]
    assert best.coder == "zstd" and best.bits == 8 and best.nbytes == sizes[BYTE_WIDE]
    np.testing.assert_array_equal(decode(best, symbols.size, 32), symbols)


def test_encode_best_keeps_zstd_within_the_margin_and_not_beyond() -> None:
    """5-bit k-means-like indices (a bell over 32 letters): ans/runs beat byte-wide zstd by
    Huffman's integer-length loss, 1.29% here, so auto keeps zstd (issue 12: at 1% it took the
    slow coder); at a 1% margin the slow coder wins, at 0 the smallest does."""
    p = np.exp(-0.5 * ((np.arange(32) - 15.5) / 4.0) ** 2)
    symbols = np.random.default_rng(0).choice(32, size=200_000, p=p / p.sum())
    best, sizes = encode_best(symbols, 32)
    fast, smallest = sizes[BYTE_WIDE], min(sizes.values())
    assert 101 * smallest < 100 * fast <= (100 + SLOW_MARGIN_PERCENT) * smallest
    assert best.coder == "zstd" and best.bits == 8 and best.nbytes == fast
    tight, _ = encode_best(symbols, 32, slow_margin_percent=1)
    assert tight.coder in ("ans", "runs") and tight.nbytes == smallest
    np.testing.assert_array_equal(decode(best, symbols.size, 32), symbols)


def test_encode_best_subset() -> None:
    symbols = _rng(0).integers(0, 16, 2000)
    best, sizes = encode_best(symbols, 16, coders=("huffman", "raw"))
    assert set(sizes) == {"raw", "huffman"}
    assert best.coder in sizes
    with pytest.raises(ValueError):
        encode_best(symbols, 16, coders=())


def test_encode_deterministic() -> None:
    for case in ("k16_70pct_zero", "skewed_pruned", "k65536_sparse"):
        symbols, k = CASES[case]
        for coder in CODERS:
            if coders.applies(coder, symbols.size, k):
                assert encode(symbols, k, coder) == encode(symbols.copy(), k, coder)


ANS_BOUND_CASES = [
    ("uniform16", lambda r, n: r.integers(0, 16, n), 16),
    ("zero70", lambda r, n: np.where(r.random(n) < 0.7, 0, r.integers(1, 16, n)), 16),
    ("bytes", lambda r, n: r.integers(0, 256, n), 256),
    ("geometric", lambda r, n: np.minimum(r.geometric(0.3, n) - 1, 63), 64),
    ("skew99", lambda r, n: _skewed(n, 300, seed=int(r.integers(1 << 30))), 300),
    ("k65536", lambda r, n: r.integers(0, 65536, n), 65536),
]


@pytest.mark.parametrize(("name", "gen", "k"), ANS_BOUND_CASES, ids=[c[0] for c in ANS_BOUND_CASES])
@pytest.mark.parametrize("n", [8200, 100_000])
def test_ans_within_one_percent_of_entropy(
    name: str, gen: Callable[[np.random.Generator, int], np.ndarray], k: int, n: int
) -> None:
    """Product requirement: ANS payload <= 1.01 x order-0 entropy (table counted separately)."""
    symbols = gen(_rng(n), n)
    assert symbols.size * min_bits(k) / 8 > 4096  # a stream over 4 KB stored raw
    bound = entropy_bits(symbols, k) * symbols.size / 8
    stream = _roundtrip(symbols, k, "ans")
    # The final ANS state adds at most 8 bytes; below ~800 bytes of information that constant
    # alone exceeds 1 %, see docs/CODERS.md.
    assert len(stream.payload) <= 1.01 * bound + 8
    if bound >= 800:
        assert len(stream.payload) <= 1.01 * bound


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 2000), st.integers(0, 2**32 - 1), st.floats(0.2, 12.0))
def test_ans_bound_property(k: int, seed: int, sharpness: float) -> None:
    rng = _rng(seed)
    p = rng.random(k) ** sharpness
    symbols = rng.choice(k, size=6000, p=p / p.sum())
    bound = entropy_bits(symbols, k) * symbols.size / 8
    stream = _roundtrip(symbols, k, "ans")
    assert len(stream.payload) <= 1.01 * bound + 8


# --------------------------------------------------------------------------- huffman specifics


def _reference_huffman_decode(stream: CodedStream, count: int) -> tuple[list[int], list[int]]:
    """Bit-by-bit canonical Huffman decoder, written independently of the vectorised one."""
    assert stream.code_lengths is not None
    lengths = [int(x) for x in stream.code_lengths]
    codebook: dict[tuple[int, int], int] = {}
    code, prev = 0, 0
    for length, sym in sorted((n, s) for s, n in enumerate(lengths) if n):
        code <<= length - prev
        codebook[(length, code)] = sym
        code, prev = code + 1, length
    bits = "".join(f"{b:08b}" for b in stream.payload)
    out: list[int] = []
    starts: list[int] = []
    pos = 0
    for i in range(count):
        if i % stream.chunk_size == 0:
            starts.append(pos)
        value, length = 0, 0
        while (length, value) not in codebook:
            value, length = (value << 1) | int(bits[pos]), length + 1
            pos += 1
        out.append(codebook[(length, value)])
    assert len(stream.payload) == (pos + 7) // 8
    return out, starts


@pytest.mark.parametrize("case", ["k2", "k3", "k16_70pct_zero", "skewed_pruned", "one_element"])
def test_huffman_matches_reference_decoder(case: str) -> None:
    symbols, k = CASES[case]
    symbols = symbols[:5000]
    stream = encode(symbols, k, "huffman")
    expected, starts = _reference_huffman_decode(stream, symbols.size)
    np.testing.assert_array_equal(expected, symbols)
    assert stream.chunk_offsets is not None
    assert stream.chunk_offsets.tolist() == starts


@pytest.mark.parametrize("seed", range(6))
def test_huffman_lengths_are_optimal(seed: int) -> None:
    """Same total cost as the `huffman` package (any optimal code has the same cost)."""
    rng = _rng(seed)
    k = int(rng.integers(2, 400))
    counts = (rng.random(k) ** 4 * 1000).astype(np.int64)
    counts[rng.random(k) < 0.2] = 0
    counts[0] += 1
    counts[1] += 1
    ours = huffman_lengths(counts)
    ref = huffman_ref.codebook([(s, int(c)) for s, c in enumerate(counts) if c])
    ref_cost = sum(int(counts[s]) * len(code) for s, code in ref.items())
    assert int((ours * counts).sum()) == ref_cost
    assert int(ours.max()) <= MAX_CODE_LENGTH  # no limiting needed for these, so equal cost
    np.testing.assert_array_equal(code_lengths_for(counts), ours)


def test_huffman_length_limit() -> None:
    """Power-of-two counts give a 19-deep tree; the limited code must still be complete."""
    k = 20
    counts = 1 << np.arange(k - 1, -1, -1)
    assert int(huffman_lengths(counts).max()) == k - 1
    lengths = code_lengths_for(counts).astype(np.int64)
    assert int(lengths.max()) == MAX_CODE_LENGTH
    assert int((1 << (MAX_CODE_LENGTH - lengths)).sum()) == 1 << MAX_CODE_LENGTH  # Kraft = 1
    assert np.all(np.diff(lengths) >= 0)  # more frequent symbols never get longer codes
    symbols = _rng(0).permutation(np.repeat(np.arange(k), counts))
    stream = _roundtrip(symbols, k, "huffman")
    unlimited = int((huffman_lengths(counts) * counts).sum())
    assert 8 * len(stream.payload) <= unlimited * 1.001 + 8


def test_huffman_long_codes_all_symbols() -> None:
    """K=65536 with a skewed histogram: 16-bit codes and a full 2**16 decode table."""
    rng = _rng(21)
    symbols = np.concatenate([np.arange(65536), rng.integers(0, 4, 200_000)])
    stream = _roundtrip(rng.permutation(symbols), 65536, "huffman")
    assert stream.code_lengths is not None
    assert int(stream.code_lengths.max()) == MAX_CODE_LENGTH
    assert np.all(stream.code_lengths > 0)


# --------------------------------------------------------------------------- golden bytes

GOLDEN_SYMBOLS = np.array([0] * 20 + [1, 2, 3, 4, 5] * 4 + [9, 9, 0, 3, 7, 7, 7], dtype=np.int64)
GOLDEN_K = 10


def _digest(stream: CodedStream) -> str:
    h = hashlib.sha256()
    h.update(f"{stream.coder}|{stream.version}|{stream.bits}|{stream.precision}|".encode())
    h.update(f"{stream.chunk_size}|".encode())
    for a in (stream.code_lengths, stream.frequencies, stream.chunk_offsets):
        h.update(b"-" if a is None else a.dtype.str.encode() + a.tobytes())
    h.update(stream.payload)
    return h.hexdigest()[:32]


GOLDEN = {  # coder: (payload hex, digest of every stored field)
    "raw": ("000000000000000000002143153254214315325499307707", "35036c54ed63d900f8475e7be5ba1489"),
    "zstd": (
        "28b52ffd2018ad0000780021431532542143153254993077070100051002",
        "96483288caa33d747f3103b35e00e624",
    ),
    "huffman": ("00000ab99b57336ae66d5ccdff4eee", "66f20e6975cd21c169eb907be3f912b2"),
    "ans": ("6f5378691ffc9ac147f53418856f505604050000", "6b21ecfe4d1db581535ae6c6333b012c"),
    "runs": (
        "0000020001250000001a00000002000000030000000ff159770398220000b113b1139e18b113b1130000"
        "c50e0000d9092b71ce3bf42c210094cb4805eb5b053724fa2b15",
        "fdac471c608d3d35a05ad5d69642eb66",
    ),
}


@pytest.mark.parametrize("coder", CODERS)
def test_golden_bytes(coder: str) -> None:
    """Pins each bitstream: a dependency upgrade that changes the bytes must fail here."""
    stream = encode(GOLDEN_SYMBOLS, GOLDEN_K, coder)
    payload_hex, digest = GOLDEN[coder]
    assert stream.payload.hex() == payload_hex
    assert _digest(stream) == digest
    np.testing.assert_array_equal(decode(stream, GOLDEN_SYMBOLS.size, GOLDEN_K), GOLDEN_SYMBOLS)


def test_golden_params() -> None:
    h = encode(GOLDEN_SYMBOLS, GOLDEN_K, "huffman")
    assert h.code_lengths is not None and h.chunk_offsets is not None
    assert h.code_lengths.tolist() == [1, 4, 4, 3, 4, 4, 0, 4, 0, 4]
    assert (h.chunk_offsets.tolist(), h.chunk_size) == ([0], 512)
    a = encode(GOLDEN_SYMBOLS, GOLDEN_K, "ans")
    assert a.frequencies is not None and a.precision == 24
    assert a.frequencies.tolist() == [
        7496200,
        1427849,
        1427849,
        1784810,
        1427848,
        1427848,
        0,
        1070887,
        0,
        713925,
    ]


# --------------------------------------------------------------------------- hostile input

CORRUPTION_INPUT = np.where(_rng(30).random(6000) < 0.6, 0, _rng(31).integers(0, 40, 6000))
CORRUPTION_K = 48  # symbols 40..47 absent


def _decode_checked(stream: CodedStream, count: int, k: int) -> np.ndarray | None:
    """Decode and return the result, or None on a file error; anything else fails the test."""
    try:
        out = decode(stream, count, k)
    except FILE_ERRORS:
        return None
    assert out.shape == (count,) and out.dtype == symbol_dtype(k)
    assert count == 0 or int(out.max()) < k
    return out


@pytest.mark.parametrize("coder", CODERS)
def test_truncated_payload_raises(coder: str) -> None:
    stream = encode(CORRUPTION_INPUT, CORRUPTION_K, coder)
    n = CORRUPTION_INPUT.size
    for cut in (1, 4, len(stream.payload) // 2, len(stream.payload)):
        bad = dataclasses.replace(stream, payload=stream.payload[: len(stream.payload) - cut])
        with pytest.raises(CorruptBlob):
            decode(bad, n, CORRUPTION_K)
    with pytest.raises(CorruptBlob):
        decode(dataclasses.replace(stream, payload=stream.payload + b"\0\0\0\1"), n, CORRUPTION_K)


@pytest.mark.parametrize("coder", ["raw", "zstd"])
def test_wrong_count_raises(coder: str) -> None:
    stream = encode(CORRUPTION_INPUT, CORRUPTION_K, coder)
    for count in (0, CORRUPTION_INPUT.size - 8, CORRUPTION_INPUT.size + 8):
        with pytest.raises(CorruptBlob):
            decode(stream, count, CORRUPTION_K)


@pytest.mark.parametrize("coder", CODERS)
def test_bad_count_and_alphabet(coder: str) -> None:
    stream = encode(CORRUPTION_INPUT, CORRUPTION_K, coder)
    with pytest.raises(CorruptBlob):
        decode(stream, -1, CORRUPTION_K)
    with pytest.raises(LimitExceeded):
        decode(stream, 1 << 40, CORRUPTION_K)
    with pytest.raises(LimitExceeded):
        decode(stream, 10, 0)
    for count in (1, 5999, 6001, 12000):  # detection is not guaranteed, errors are
        _decode_checked(stream, count, CORRUPTION_K)
    for k in (2, 39, 41, 256, 65536):
        _decode_checked(stream, CORRUPTION_INPUT.size, k)


def _tampered(stream: CodedStream) -> list[CodedStream]:
    """Parameter tampering that every decoder must detect."""
    r = dataclasses.replace
    out = [
        r(stream, bits=-1),
        r(stream, bits=17),
        r(stream, bits=min_bits(CORRUPTION_K) - 1),
    ]
    if stream.coder in ("raw", "zstd"):
        return out
    if stream.coder == "runs":
        return out + [r(stream, payload=p) for p in _runs_tampered(stream.payload)]
    if stream.coder == "huffman":
        lengths = stream.code_lengths
        offsets = stream.chunk_offsets
        assert lengths is not None and offsets is not None
        over = lengths.copy()
        over[over > 0] = 1  # Kraft sum far above 1
        long = lengths.copy()
        long[0] = 17
        shifted = offsets.copy()
        shifted[0] = 1
        swapped = offsets.copy()
        swapped[[0, -1]] = swapped[[-1, 0]]
        return [
            r(stream, code_lengths=None),
            r(stream, code_lengths=lengths[:-1]),
            r(stream, code_lengths=np.append(lengths, 0).astype(np.uint8)),
            r(stream, code_lengths=over),
            r(stream, code_lengths=long),
            r(stream, code_lengths=np.zeros_like(lengths)),
            r(stream, code_lengths=lengths.astype(np.float32)),
            r(stream, code_lengths=lengths.reshape(1, -1)),
            r(stream, chunk_offsets=None),
            r(stream, chunk_offsets=offsets[:-1]),
            r(stream, chunk_offsets=shifted),
            r(stream, chunk_offsets=swapped),
            r(stream, chunk_offsets=offsets + np.uint64(1 << 40)),
            r(stream, chunk_offsets=offsets.astype(np.int64) - 5),
            r(stream, chunk_size=0),
            r(stream, chunk_size=-4),
            r(stream, chunk_size=1 << 20),
            r(stream, chunk_size=stream.chunk_size // 2),
        ]
    freq = stream.frequencies
    assert freq is not None
    plus = freq.copy()
    plus[0] += 1
    moved = freq.copy()
    moved[0] -= 1
    moved[np.flatnonzero(freq == 0)[0]] += 1  # same sum, one more present symbol
    return [
        r(stream, frequencies=None),
        r(stream, frequencies=freq[:-1]),
        r(stream, frequencies=plus),
        r(stream, frequencies=freq.astype(np.float64)),
        r(stream, frequencies=freq.astype(np.int64) * -1),
        r(stream, precision=0),
        r(stream, precision=25),
        r(stream, precision=stream.precision - 1),
        r(stream, frequencies=moved),
    ]


def _runs_tampered(payload: bytes) -> list[bytes]:
    """Header and table damage the runs decoder must detect (docs/CODERS.md, `runs`)."""
    fields = dict(zip(("z", "d", "j", "tokens", "m", "w_runs", "w_values", "p"),
                      _runs.HEADER.unpack_from(payload), strict=True))
    rest = payload[_runs.HEADER.size:]

    def header(**change: int) -> bytes:
        return _runs.HEADER.pack(*{**fields, **change}.values()) + rest

    run_table = _runs.HEADER.size
    value_table = run_table + 2 * (fields["d"] + fields["j"])
    z_in_values = bytearray(payload)  # give the run symbol a value frequency, same sum
    lowered = int.from_bytes(payload[value_table + 2:value_table + 4], "little")
    assert lowered > 0 and fields["z"] == 0
    z_in_values[value_table:value_table + 2] = (1).to_bytes(2, "little")
    z_in_values[value_table + 2:value_table + 4] = (lowered - 1).to_bytes(2, "little")
    bad_sum = bytearray(payload)
    bad_sum[run_table] ^= 1
    tokens, m = fields["tokens"], fields["m"]
    return [
        payload[: _runs.HEADER.size - 1],
        header(z=CORRUPTION_K), header(d=0), header(p=0), header(p=16),
        header(d=65535, j=2), header(d=1 << 14, j=20), header(j=fields["j"] + 1),
        header(tokens=CORRUPTION_INPUT.size + 2), header(tokens=m), header(tokens=tokens + 1),
        header(tokens=tokens - 1), header(m=CORRUPTION_INPUT.size), header(m=m - 1),
        header(m=m + 1), header(w_runs=fields["w_runs"] + 1),
        header(w_values=fields["w_values"] - 1),
        header(w_runs=fields["w_runs"] + 1, w_values=fields["w_values"] - 1), header(m=0),
        bytes(bad_sum), bytes(z_in_values),
    ]


@pytest.mark.parametrize("coder", CODERS)
def test_tampered_params_raise(coder: str) -> None:
    stream = encode(CORRUPTION_INPUT, CORRUPTION_K, coder)
    for i, bad in enumerate(_tampered(stream)):
        if coder in ("huffman", "ans", "runs") and bad.bits != stream.bits:
            continue  # bits is unused by these coders
        with pytest.raises(FILE_ERRORS):
            decode(bad, CORRUPTION_INPUT.size, CORRUPTION_K)
            pytest.fail(f"tampering #{i} went undetected")


def test_payload_of_wrong_type() -> None:
    stream = encode(CORRUPTION_INPUT, CORRUPTION_K, "raw")
    with pytest.raises(CorruptBlob):
        decode(dataclasses.replace(stream, payload="text"), CORRUPTION_INPUT.size, CORRUPTION_K)


@settings(max_examples=120, deadline=None)
@given(
    st.sampled_from(CODERS),
    st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=4),
    st.integers(0, 3),
)
def test_corrupted_payload_never_leaks_other_errors(
    coder: str, flips: list[tuple[int, int]], cut: int
) -> None:
    """Random byte damage: a file error or a well-formed array, never anything else."""
    stream = encode(CORRUPTION_INPUT, CORRUPTION_K, coder)
    payload = bytearray(stream.payload)
    for where, xor in flips:
        payload[where % len(payload)] ^= xor
    damaged = dataclasses.replace(stream, payload=bytes(payload[: len(payload) - cut]))
    _decode_checked(damaged, CORRUPTION_INPUT.size, CORRUPTION_K)


@pytest.mark.parametrize("coder", ["huffman", "ans"])
def test_param_damage_never_leaks_other_errors(coder: str) -> None:
    stream = encode(CORRUPTION_INPUT, CORRUPTION_K, coder)
    rng = _rng(40)
    for _ in range(200):
        if coder == "huffman":
            assert stream.code_lengths is not None
            lengths = stream.code_lengths.copy()
            lengths[rng.integers(lengths.size)] = rng.integers(0, 17)
            bad = dataclasses.replace(stream, code_lengths=lengths)
        else:
            assert stream.frequencies is not None
            freq = stream.frequencies.copy()
            i, j = rng.integers(freq.size, size=2)
            step = min(int(freq[i]), int(rng.integers(1, 1 << 20)))
            freq[i] -= step
            freq[j] += step  # keeps the sum valid so decoding really runs
            bad = dataclasses.replace(stream, frequencies=freq)
        _decode_checked(bad, CORRUPTION_INPUT.size, CORRUPTION_K)


def test_huffman_detects_invalid_code_in_incomplete_table() -> None:
    """A single-symbol code (length 1) leaves half the table unused; a 1 bit must be rejected."""
    symbols = np.zeros(64, dtype=np.int64)
    stream = encode(symbols, 4, "huffman")
    assert stream.payload == bytes(8)
    bad = dataclasses.replace(stream, payload=b"\x80" + bytes(7))
    with pytest.raises(CorruptBlob):
        decode(bad, 64, 4)


@pytest.mark.parametrize("count", [1, 100, 4097, 30_000])
def test_huffman_small_stream_fast_path_equals_lockstep_loop(count: int, monkeypatch) -> None:
    from runtime.coders import _huffman

    rng = np.random.default_rng(count)
    symbols = np.minimum(rng.geometric(0.2, count) - 1, 40).astype(np.uint8)
    stream = encode(symbols, 41, "huffman")
    fast = decode(stream, count, 41)
    monkeypatch.setattr(_huffman, "SMALL_STREAM_BITS", -1)
    slow = decode(stream, count, 41)
    assert np.array_equal(fast, symbols) and np.array_equal(slow, symbols)


# --------------------------------------------------------------------------- runs (sparse)


def _pruned_stream(seed: int, density: float, dead_rows: float, rows: int = 256,
                   cols: int = 576) -> np.ndarray:
    """A pruned conv's indices (ResNet-20's layer3 shape), zero = index 0, some rows (filters)
    wholly pruned."""
    rng = _rng(seed)
    keep = rng.random((rows, cols)) < density
    keep[rng.random(rows) < dead_rows] = False
    return np.where(keep, rng.integers(1, 16, (rows, cols)), 0).reshape(-1)


def test_runs_beats_order0_entropy_when_zeros_cluster() -> None:
    symbols = _pruned_stream(0, 0.15, 0.1)
    runs, ans = encode(symbols, 16, "runs"), encode(symbols, 16, "ans")
    bound = entropy_bits(symbols, 16) * symbols.size / 8
    assert runs.nbytes < 0.99 * bound  # header and tables included
    assert runs.nbytes < 0.985 * ans.nbytes
    best, sizes = encode_best(symbols, 16)
    assert best.coder == "runs" and sizes["runs"] == min(sizes.values())


def test_runs_costs_what_order0_costs_on_independent_zeros() -> None:
    """A geometric run law is an i.i.d. mask: no gain, and no loss beyond a few bytes."""
    symbols = _pruned_stream(1, 0.1, 0.0)
    runs, ans = encode(symbols, 16, "runs"), encode(symbols, 16, "ans")
    assert abs(runs.nbytes - ans.nbytes) <= 0.01 * ans.nbytes


@pytest.mark.parametrize("seed", range(8))
def test_auto_picks_runs_only_when_strictly_smaller(seed: int) -> None:
    rng = _rng(seed)
    density = float(rng.choice([0.02, 0.1, 0.3, 0.7, 1.0]))
    symbols = _pruned_stream(seed, density, float(rng.choice([0.0, 0.3])))
    best, sizes = encode_best(symbols, 16)
    fast = min(v for c, v in sizes.items() if c == BYTE_WIDE or c in FAST_CODERS)
    if best.coder == "runs":  # smaller than every other, and over 1% below raw/zstd
        assert all(sizes["runs"] < v for c, v in sizes.items() if c != "runs")
        assert fast * 100 > sizes["runs"] * (100 + SLOW_MARGIN_PERCENT)
    else:  # not smaller, or a fast coder within the margin kept instead
        assert best.nbytes <= sizes["runs"] or (
            best.coder in FAST_CODERS
            and best.nbytes * 100 <= sizes["runs"] * (100 + SLOW_MARGIN_PERCENT))
    dense = _rng(seed).integers(0, 16, 20000)
    assert encode_best(dense, 16)[0].coder != "runs"


def test_runs_writer_rules() -> None:
    """z is the most frequent symbol (ties: lowest), tokens and counts as the header says."""
    symbols = np.array([5, 5, 2, 2, 7, 5, 2, 5, 2, 9], dtype=np.int64)  # 5 and 2 tie at 4
    stream = encode(symbols, 10, "runs")
    z, d, j, tokens, m, _, _, p = _runs.HEADER.unpack_from(stream.payload)
    assert (z, m, p) == (2, 6, 15)
    runs = _runs.run_lengths(symbols, 2)
    assert runs.tolist() == [0, 0, 2, 0, 1, 1, 0]
    assert tokens == _runs.run_tokens(runs, d, j).size
    # D=4, J=3: steps 4, 8, 16 are tokens 4, 5, 6; 9 = 8 + 1, 40 = 16 + 16 + 8 + 0
    assert _runs.run_tokens(np.array([0, 9, 3, 40, 1]), 4, 3).tolist() == [0, 5, 1, 3, 6, 6,
                                                                            5, 0, 1]
    assert _runs.token_steps(4, 3).tolist() == [1, 2, 3, 4, 4, 8, 16]


def test_runs_gains_from_pruned_filters() -> None:
    """Dead rows are a few tokens each: the gain over order-0 grows with them."""
    def gain(dead: float) -> float:
        symbols = _pruned_stream(3, 0.2, dead)
        return 1 - encode(symbols, 16, "runs").nbytes / encode(symbols, 16, "ans").nbytes

    assert gain(0.0) < 0.005 < 0.01 < gain(0.1) < gain(0.3)
