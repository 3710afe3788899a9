"""Method options: --config files, --set overrides, per-layer globs, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from packer.config import build_config, load_config_file, parse_value
from packer.methods import METHODS
from runtime.errors import ConfigError

KMEANS = METHODS["kmeans"].options
UNIFORM = METHODS["uniform"].options


def test_defaults_and_global_override() -> None:
    config = build_config("kmeans", KMEANS, {}, ["k=16"])
    assert config.for_tensor("layer1.0.conv1.weight")["k"] == 16
    assert build_config("kmeans", KMEANS, {}, []).options["k"] == 32


def test_layer_globs_apply_in_order_to_module_or_tensor_names() -> None:
    config = build_config("kmeans", KMEANS, {}, [
        "layer3.*.k=8", "layer3.2.conv2.k=64", "conv1.method=none", "linear.weight.fp16=true"])
    assert config.for_tensor("layer3.0.conv1.weight")["k"] == 8
    assert config.for_tensor("layer3.2.conv2.weight")["k"] == 64
    assert config.for_tensor("layer1.0.conv1.weight")["k"] == 32
    assert config.for_tensor("conv1.weight")["method"] == "none"
    assert "method" not in config.for_tensor("layer1.0.conv1.weight")
    assert config.for_tensor("linear.weight")["fp16"] is True


def test_yaml_and_json_files(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("bits: 4\nlayers:\n  conv1: {method: none, fp16: true}\n")
    (tmp_path / "c.json").write_text('{"bits": 6, "clip": "max"}')
    config = build_config("uniform", UNIFORM, load_config_file(tmp_path / "c.yaml"), ["bits=3"])
    assert config.options["bits"] == 3  # --set wins over the file
    assert config.for_tensor("conv1.weight")["method"] == "none"
    config = build_config("uniform", UNIFORM, load_config_file(tmp_path / "c.json"), [])
    assert config.options == {**config.options, "bits": 6, "clip": "max"}


def test_config_json_is_canonical() -> None:
    a = build_config("kmeans", KMEANS, {}, ["k=16", "conv1.method=none"]).to_json()
    b = build_config("kmeans", KMEANS, {"k": 16}, ["conv1.method=none"]).to_json()
    assert a == b


@pytest.mark.parametrize("override, message", [
    ("kk=3", "unknown option 'kk'"),
    ("k=abc", "expected int"),
    ("k=1", "between 2 and 65536"),
    ("k=2.5", "expected int"),
    ("method=none", "per layer only"),
    ("conv1.method=pqf", "use 'none'"),
    ("novalue", "KEY=VALUE"),
    ("conv1.coder=lzma", "not one of"),
])
def test_bad_overrides_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config("kmeans", KMEANS, {}, [override])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config_file(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config_file(tmp_path / "list.yaml")


def test_parse_value() -> None:
    assert parse_value("true") is True and parse_value("False") is False
    assert parse_value("16") == 16 and parse_value("0.5") == 0.5
    assert parse_value("mse") == "mse" and parse_value("null") is None
