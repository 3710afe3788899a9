"""Malformed files: the committed corpus, and random damage to the golden file.

Whatever the bytes, opening, verifying and decoding a file either works or raises a
WeightpackError subclass with a clear message; nothing else escapes.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from runtime import errors
from runtime.decode import decode_state_dict
from runtime.format.reader import open_packed

CORPUS = Path(__file__).parent / "corpus"
GOLDEN = Path(__file__).parent / "golden" / "tiny-v1.fb"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())


def read_everything(path: Path) -> None:
    with open_packed(path) as packed:
        packed.verify()
        decode_state_dict(packed)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_corpus_file_raises_its_error(name: str) -> None:
    expected = MANIFEST[name]
    error = getattr(errors, expected["error"])
    with pytest.raises(error, match=expected["match"] or None) as info:
        read_everything(CORPUS / f"{name}.fb")
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert str(CORPUS / f"{name}.fb") in message  # says which file


def test_corpus_covers_every_error_kind() -> None:
    kinds = {v["error"] for v in MANIFEST.values()}
    assert {"BadMagic", "TruncatedFile", "UnsupportedVersion", "ChecksumMismatch",
            "LimitExceeded", "FormatError", "CorruptBlob"} <= kinds


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_damage_never_escapes_as_another_exception(tmp_path_factory, data) -> None:
    blob = bytearray(GOLDEN.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            pos = data.draw(st.integers(0, len(blob) - 1))
            blob[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        pos = data.draw(st.integers(0, len(blob)))
        blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=64))
    path = tmp_path_factory.mktemp("fuzz") / "damaged.fb"
    path.write_bytes(bytes(blob))
    with contextlib.suppress(errors.WeightpackError):
        read_everything(path)
