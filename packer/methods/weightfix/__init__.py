"""Weight fixing to powers of two: WFN (deterministic) and PWFN (probabilistic)."""

from packer.methods.weightfix.pwfn import PWFNMethod
from packer.methods.weightfix.wfn import WFNMethod

__all__ = ["PWFNMethod", "WFNMethod"]
