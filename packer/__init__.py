"""weightpack's producer side: compression methods, entropy coding, writing packed files."""

import os

__version__ = "0.1.0"


def _prefer_sleeping_openmp_threads() -> None:
    """Let idle OpenMP threads sleep instead of spin (`OMP_WAIT_POLICY=PASSIVE`, unless set).

    With the default policy, a thread that finishes its share of an op spins waiting for
    the others; on a CPU shared with other jobs, a descheduled sibling made every op wait
    for it. Fine-tuning ResNet-20 with 2 torch threads on a busy 2-core machine ran at
    ~50 images/s instead of ~220 (docs/PQF.md, "Fine-tuning speed"). libgomp reads the
    variable once, when torch is first imported, so this must run before that import;
    `packer`, `python -m packer.cli` and tools/bench/pqf.py import this package first.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_prefer_sleeping_openmp_threads()
