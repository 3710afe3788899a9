"""The registry of compression methods, by the name users type after --method.

Each entry names the class that implements the method; its module (they import torch) is
imported the first time the method is used, so listing the names costs nothing and
`packer compress --help` answers at once (tools/bench/startup.py).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from importlib import import_module
from typing import TYPE_CHECKING, Any

from runtime.errors import ConfigError

if TYPE_CHECKING:
    from packer.methods.base import CompressJob, Method

_CLASSES: dict[str, str] = {
    "none": "packer.methods.none:NoneMethod",
    "uniform": "packer.methods.uniform:UniformMethod",
    "int8": "packer.methods.uniform:Int8Method",
    "kmeans": "packer.methods.kmeans:KMeansMethod",
    "pqf": "packer.methods.pqf:PQFMethod",
    "wfn": "packer.methods.weightfix:WFNMethod",
    "pwfn": "packer.methods.weightfix:PWFNMethod",
    "ttq": "packer.methods.lowbit:TTQMethod",
    "bwn": "packer.methods.lowbit:BWNMethod",
    "dorefa": "packer.methods.lowbit:DoReFaMethod",
    "prune": "packer.methods.prune:PruneMethod",
    "fbs": "packer.methods.fbs:FBSMethod",
}
"""Method name -> "module:class" of its implementation, in the order `packer methods` lists."""


class _Registry(MutableMapping[str, "type[Method]"]):
    """name -> Method class, importing each class when it is first looked up."""

    def __init__(self, where: dict[str, str]) -> None:
        self._where = dict(where)
        self._loaded: dict[str, type[Method]] = {}

    def __getitem__(self, name: str) -> type[Method]:
        if name not in self._loaded:
            module, cls = self._where[name].split(":")
            method = getattr(import_module(module), cls)
            if method.name != name:
                raise RuntimeError(f"{self._where[name]} is registered as {name!r} but is "
                                   f"named {method.name!r}")
            self._loaded[name] = method
        return self._loaded[name]

    def __setitem__(self, name: str, method: type[Method]) -> None:
        self._where.setdefault(name, "")
        self._loaded[name] = method

    def __delitem__(self, name: str) -> None:
        del self._where[name]
        self._loaded.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


METHODS: MutableMapping[str, type[Method]] = _Registry(_CLASSES)


def resolve_method(name: str) -> Method:
    """The method a user typed after --method: one name, or a chain `a+b+c`."""
    from packer.methods.chain import SEPARATOR, ChainMethod, split_chain

    parts = split_chain(name)
    unknown = [p for p in parts if p not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}, "
                          f"or chain them with '{SEPARATOR}' (see `packer methods`)")
    if len(parts) == 1:
        return METHODS[parts[0]]()
    return ChainMethod(SEPARATOR.join(parts), [METHODS[p] for p in parts])


def __getattr__(name: str) -> Any:
    if name in ("CompressJob", "Method"):  # packer.methods.base imports torch
        return getattr(import_module("packer.methods.base"), name)
    raise AttributeError(f"module 'packer.methods' has no attribute {name!r}")


__all__ = ["METHODS", "CompressJob", "Method", "resolve_method"]
