"""The committed golden files: every future version must read them, and today's writer must
reproduce them byte for byte (so a coder or dependency change cannot slip in unnoticed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from runtime.coders import CODERS
from runtime.decode import decode_state_dict
from runtime.format.reader import open_packed
from tests.golden_data import GOLDEN_CODERS, SPARSE_CODERS, digest

GOLDEN_DIR = Path(__file__).parent / "golden"
FILES = {"tiny-v1": GOLDEN_CODERS, "sparse-v1": SPARSE_CODERS}


@pytest.mark.parametrize("name", sorted(FILES))
def test_golden_file_decodes_to_the_recorded_tensors(name: str) -> None:
    expected = json.loads((GOLDEN_DIR / f"{name}.json").read_text())
    with open_packed(GOLDEN_DIR / f"{name}.fb") as packed:
        assert (packed.preamble.major, packed.preamble.minor) == (1, 0)
        decoded = decode_state_dict(packed)
        coders = {t.name: t.streams()[0][1].coder for t in packed.model.tensors}
        assert packed.model.architecture.builder == "cifar_resnet20"
        assert packed.model.class_names == ("yes", "no")
    assert {n: digest(t) for n, t in decoded.items()} == expected
    assert coders == FILES[name]


def test_every_coder_is_in_a_golden_file() -> None:
    assert {c for coders in FILES.values() for c in coders.values()} == set(CODERS)


@pytest.mark.parametrize("name", sorted(FILES))
def test_writer_still_produces_the_golden_bytes(name: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_golden import golden_bytes

    assert golden_bytes(name) == (GOLDEN_DIR / f"{name}.fb").read_bytes(), (
        "the writer's output changed: bump the coder/format version, or regenerate the "
        "golden file with tools/make_golden.py only if old files still read")
