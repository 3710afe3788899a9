"""Write the golden files tests/golden/{tiny,sparse}-v1.fb and their expected digests.

Run only on purpose (a new format minor or coder version): the committed files are what every
future weightpack must keep reading. `python tools/make_golden.py [--check]`. tiny-v1.fb holds
every scheme and the first four coders; sparse-v1.fb (added with the `runs` coder) pruned
tensors coded with `runs`.
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
from tests.golden_data import (  # noqa: E402
    GOLDEN_CODERS,
    SPARSE_CODERS,
    digest,
    golden_tensors,
    sparse_tensors,
)

GOLDEN_DIR = ROOT / "tests" / "golden"
FILES = {"tiny-v1": (golden_tensors, GOLDEN_CODERS), "sparse-v1": (sparse_tensors, SPARSE_CODERS)}


def golden_bytes(name: str = "tiny-v1") -> bytes:
    make, coders = FILES[name]
    data = DataSection(64)
    encoder = Encoder(data)
    tensors = make()
    records = tuple(encoder.tensor(n, t, coders[n]).record for n, t in tensors.items())
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
    status = 0
    for name, (make, _) in FILES.items():
        blob, path = golden_bytes(name), GOLDEN_DIR / f"{name}.fb"
        if args.check:
            same = path.is_file() and path.read_bytes() == blob
            print(f"{name}: {'identical' if same else 'DIFFERENT'}")
            status |= not same
            continue
        path.write_bytes(blob)
        expected = {n: digest(t.dequantize()) for n, t in make().items()}
        path.with_suffix(".json").write_text(json.dumps(expected, indent=1, sort_keys=True)
                                             + "\n")
        print(f"wrote {path.relative_to(ROOT)} ({len(blob)} bytes) and its digests")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
