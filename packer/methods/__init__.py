"""The registry of compression methods, by the name users type after --method."""

from __future__ import annotations

from packer.methods.base import CompressJob, Method
from packer.methods.kmeans import KMeansMethod
from packer.methods.lowbit import BWNMethod, DoReFaMethod, TTQMethod
from packer.methods.none import NoneMethod
from packer.methods.pqf import PQFMethod
from packer.methods.uniform import Int8Method, UniformMethod
from packer.methods.weightfix import PWFNMethod, WFNMethod

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (NoneMethod, UniformMethod, Int8Method, KMeansMethod, PQFMethod,
                                   WFNMethod, PWFNMethod, TTQMethod, BWNMethod, DoReFaMethod)
}

__all__ = ["METHODS", "CompressJob", "Method"]
