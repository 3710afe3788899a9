"""The committed golden file: every future version must read it, and today's writer must
reproduce it byte for byte (so a coder or dependency change cannot slip in unnoticed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runtime.decode import decode_state_dict
from runtime.format.reader import open_packed
from tests.golden_data import GOLDEN_CODERS, digest

GOLDEN = Path(__file__).parent / "golden" / "tiny-v1.fb"
EXPECTED = json.loads((Path(__file__).parent / "golden" / "tiny-v1.json").read_text())


def test_golden_file_decodes_to_the_recorded_tensors() -> None:
    with open_packed(GOLDEN) as packed:
        assert (packed.preamble.major, packed.preamble.minor) == (1, 0)
        decoded = decode_state_dict(packed)
        coders = {t.name: t.streams()[0][1].coder for t in packed.model.tensors}
        assert packed.model.architecture.builder == "cifar_resnet20"
        assert packed.model.class_names == ("yes", "no")
    assert {name: digest(t) for name, t in decoded.items()} == EXPECTED
    assert coders == GOLDEN_CODERS  # every coder is exercised


def test_writer_still_produces_the_golden_bytes() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_golden import golden_bytes

    assert golden_bytes() == GOLDEN.read_bytes(), (
        "the writer's output changed: bump the coder/format version, or regenerate the "
        "golden file with tools/make_golden.py only if old files still read")
