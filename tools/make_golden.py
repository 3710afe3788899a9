"""Write tests/golden/tiny-v1.fb and its expected digests.

Run only on purpose (a new format minor or coder version): the committed file is what every
future weightpack must keep reading. `python tools/make_golden.py [--check]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from packer.encode import DataSection, Encoder  # noqa: E402
from packer.writer import layout  # noqa: E402
from runtime.format.records import ArchitectureRecord, ModelRecord  # noqa: E402
from runtime.zoo.specs import CIFAR_SPEC  # noqa: E402
from tests.golden_data import GOLDEN_CODERS, digest, golden_tensors  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "tiny-v1.fb"
EXPECTED = ROOT / "tests" / "golden" / "tiny-v1.json"


def golden_bytes() -> bytes:
    data = DataSection(64)
    encoder = Encoder(data)
    tensors = golden_tensors()
    records = tuple(encoder.tensor(n, t, GOLDEN_CODERS[n]).record for n, t in tensors.items())
    model = ModelRecord(
        producer="weightpack golden", method="golden", method_config_json='{"golden":true}',
        source_sha256="ab" * 32,
        architecture=ArchitectureRecord("builder", "cifar_resnet20", '{"num_classes":10}'),
        input=CIFAR_SPEC,
        num_classes=10, tensors=records, fp32_bytes=4 * 10_000, class_names=("yes", "no"),
    )
    return b"".join(layout(model, data).chunks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="only report whether the writer still reproduces the golden bytes")
    args = parser.parse_args()
    blob = golden_bytes()
    if args.check:
        same = GOLDEN.read_bytes() == blob
        print("identical" if same else "DIFFERENT")
        return 0 if same else 1
    GOLDEN.write_bytes(blob)
    expected = {n: digest(t.dequantize()) for n, t in golden_tensors().items()}
    EXPECTED.write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN.relative_to(ROOT)} ({len(blob)} bytes) and its digests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
