"""Low-bit quantization-aware training: TTQ (ternary), BWN (binary), DoReFa (k-bit)."""

from packer.methods.lowbit.method import BWNMethod, DoReFaMethod, TTQMethod

__all__ = ["BWNMethod", "DoReFaMethod", "TTQMethod"]
