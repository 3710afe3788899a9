"""Method options: defaults, a --config file, --set overrides, per-layer settings by glob.

A key `OPTION` sets a method option for every layer; `GLOB.OPTION` (the part before the
last dot is a glob over module or tensor names, e.g. `conv1.method=none`, `layer3.*.k=16`,
`fc.k=2048`) sets it for matching layers only. Later settings win.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runtime.coders import CODERS
from runtime.errors import ConfigError

CODER_CHOICES = ("auto", *CODERS)
"""What `--coder` and the per-layer `coder` option accept: a coder, or `auto` (the smallest,
preferring the fast-decoding coders: `runtime.coders.encode_best`)."""


@dataclass(frozen=True)
class Option:
    default: Any
    help: str
    kind: type = str  # bool, int, float, str, or list (of floats)
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns a problem, or None
    per_layer: bool = True


def closed_interval(lo: float, hi: float, what: str) -> Callable[[Any], str | None]:
    """An `Option.check` for lo <= value <= hi (None, an unset option, passes)."""
    return lambda v: (None if v is None or lo <= v <= hi
                      else f"{what} must be between {lo} and {hi}")


def open_interval(lo: float, hi: float, what: str) -> Callable[[Any], str | None]:
    """An `Option.check` for lo < value < hi."""
    return lambda v: None if lo < v < hi else f"{what} must be > {lo} and < {hi}"


# Options every method understands, per layer.
COMMON_OPTIONS: dict[str, Option] = {
    "method": Option(None, "per-layer: 'none' leaves matching layers uncompressed", str),
    "fp16": Option(False, "store tensors kept raw at float16", bool),
    "coder": Option(None, f"per-layer entropy coder ({', '.join(CODER_CHOICES)})", str,
                    choices=CODER_CHOICES),
}


def parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "null":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _coerce(name: str, value: Any, opt: Option) -> Any:
    if value is None:
        return None
    kind = opt.kind
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError
        elif kind is int:
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            value = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif kind is list:
            if isinstance(value, str):
                value = [v for v in value.replace(" ", ",").split(",") if v]
            if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) for v in value):
                raise ValueError
            value = [float(v) for v in value]
        else:
            value = str(value)
    except (TypeError, ValueError):
        what = "a list of numbers" if kind is list else kind.__name__
        raise ConfigError(f"option {name}: expected {what}, got {value!r}") from None
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(f"option {name}: {value!r} is not one of "
                          f"{', '.join(map(str, opt.choices))}")
    if opt.check is not None and (problem := opt.check(value)):
        raise ConfigError(f"option {name}: {problem}")
    return value


@dataclass
class MethodConfig:
    method: str
    options: dict[str, Any]
    layers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    stages: list[MethodConfig] = field(default_factory=list)  # a chain's configs, in order

    def for_tensor(self, tensor_name: str) -> dict[str, Any]:
        module = tensor_name.rsplit(".", 1)[0]
        merged = dict(self.options)
        for glob, values in self.layers:
            if fnmatch.fnmatchcase(module, glob) or fnmatch.fnmatchcase(tensor_name, glob):
                merged.update(values)
        return merged

    def unmatched_globs(self, tensor_names: Iterable[str]) -> list[str]:
        """Layer globs that match no tensor (nor its module): settings that would do nothing."""
        names = list(tensor_names)
        candidates = set(names) | {n.rsplit(".", 1)[0] for n in names}
        return [glob for glob in dict.fromkeys(g for g, _ in self.layers)
                if not any(fnmatch.fnmatchcase(c, glob) for c in candidates)]

    def to_json(self) -> str:
        doc: dict[str, Any] = {"method": self.method, "options": self.options,
                               "layers": [{"match": g, **v} for g, v in self.layers]}
        if self.stages:
            doc["stages"] = [json.loads(stage.to_json()) for stage in self.stages]
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}"
                          f" ({str(exc).splitlines()[0]})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level")
    return doc


Setting = tuple[str | None, str, Any]
"""(layer glob or None for the whole model, option key, raw value), in the order given."""


def collect_settings(file_doc: dict[str, Any], overrides: Iterable[str]) -> list[Setting]:
    """The user's settings from a config file then `--set` overrides (later ones win)."""
    settings: list[Setting] = []
    for key, value in file_doc.items():
        if key == "layers":
            if not isinstance(value, dict):
                raise ConfigError("'layers' must map a name glob to its options")
            for glob, layer_opts in value.items():
                if not isinstance(layer_opts, dict):
                    raise ConfigError(f"layers.{glob}: expected a mapping of options")
                settings += [(str(glob), k, v) for k, v in layer_opts.items()]
        elif key != "method":
            settings.append((None, key, value))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. k=16, conv1.method=none)")
        key, _, text = item.partition("=")
        glob, _, name = key.strip().rpartition(".")
        settings.append((glob or None, name, parse_value(text)))
    return settings


def config_from_settings(method: str, method_options: dict[str, Option],
                         settings: Iterable[Setting], owner: str | None = None) -> MethodConfig:
    """One method's config: its defaults, then each setting in order. `owner` is the name
    the user typed when this method is one stage of a chain (for `GLOB.method=` values)."""
    owner = owner or method
    known = {**COMMON_OPTIONS, **method_options}
    options = {k: v.default for k, v in method_options.items()}
    options["fp16"] = False
    layers: list[tuple[str, dict[str, Any]]] = []
    for glob, key, value in settings:
        if key not in known:
            raise ConfigError(f"unknown option {key!r} for method {owner}; known: "
                              f"{', '.join(sorted(known))}")
        opt = known[key]
        if glob is None:
            if key == "method":
                raise ConfigError("'method' is set per layer only, e.g. conv1.method=none")
            options[key] = _coerce(key, value, opt)
            continue
        if not opt.per_layer:
            raise ConfigError(f"option {key} applies to the whole model, not per layer")
        if key == "method":
            if value not in ("none", owner, method):
                raise ConfigError(f"{glob}.method: use 'none' (keep uncompressed) or {owner!r}")
            value = "none" if value == "none" else method
        layers.append((glob, {key: _coerce(key, value, opt)}))
    return MethodConfig(method, options, layers)


def build_config(method: str, method_options: dict[str, Option], file_doc: dict[str, Any],
                 overrides: Iterable[str]) -> MethodConfig:
    return config_from_settings(method, method_options, collect_settings(file_doc, overrides))
