"""The registry of compression methods, by the name users type after --method."""

from __future__ import annotations

from packer.methods.base import CompressJob, Method
from packer.methods.chain import SEPARATOR, ChainMethod, split_chain
from packer.methods.fbs import FBSMethod
from packer.methods.kmeans import KMeansMethod
from packer.methods.lowbit import BWNMethod, DoReFaMethod, TTQMethod
from packer.methods.none import NoneMethod
from packer.methods.pqf import PQFMethod
from packer.methods.uniform import Int8Method, UniformMethod
from packer.methods.weightfix import PWFNMethod, WFNMethod
from runtime.errors import ConfigError

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (NoneMethod, UniformMethod, Int8Method, KMeansMethod, PQFMethod,
                                   WFNMethod, PWFNMethod, TTQMethod, BWNMethod, DoReFaMethod,
                                   FBSMethod)
}


def resolve_method(name: str) -> Method:
    """The method a user typed after --method: one name, or a chain `a+b+c`."""
    parts = split_chain(name)
    unknown = [p for p in parts if p not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}, "
                          f"or chain them with '{SEPARATOR}' (see `packer methods`)")
    if len(parts) == 1:
        return METHODS[parts[0]]()
    return ChainMethod(SEPARATOR.join(parts), [METHODS[p] for p in parts])


__all__ = ["METHODS", "CompressJob", "Method", "resolve_method"]
