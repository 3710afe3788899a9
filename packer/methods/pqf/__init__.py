"""PQF: permute, product-quantize, fine-tune (see method.py and docs/PQF.md)."""

from packer.methods.pqf.method import PQFMethod

__all__ = ["PQFMethod"]
