"""Chained methods (`a+b`): order rules, the shared option namespace, stages in sequence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from packer.compress import PackRequest, compressible_weights, pack
from packer.config import collect_settings
from packer.methods import CompressJob, resolve_method
from packer.methods.chain import ChainMethod
from runtime import load
from runtime.errors import ConfigError
from runtime.format.reader import open_packed
from runtime.tensors import ScalarCodebookTensor, UniformTensor
from runtime.zoo.cifar_resnet import cifar_resnet20


@pytest.mark.parametrize(("name", "message"), [
    ("int8+kmeans", "impossible chain order 'int8+kmeans': kmeans"),
    ("kmeans+uniform", "both a weight representation stage"),
    ("none+kmeans", "'none' cannot be part of a chain"),
    ("kmeans+bogus", "unknown method 'bogus'"),
])
def test_impossible_chains_are_refused_with_the_reason(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        resolve_method(name)


def test_single_names_resolve_to_the_plain_method() -> None:
    assert not isinstance(resolve_method("kmeans"), ChainMethod)
    assert isinstance(resolve_method(" kmeans + int8 "), ChainMethod)


def test_one_namespace_plain_keys_reach_every_stage_that_has_them() -> None:
    chain = resolve_method("kmeans+int8")
    cfg = chain.build_config(collect_settings({}, ["k=8", "clip=mse", "conv1.method=none"]))
    kmeans_cfg, int8_cfg = cfg.stages
    assert kmeans_cfg.options["k"] == 8 and "k" not in int8_cfg.options
    assert int8_cfg.options["clip"] == "mse"
    assert kmeans_cfg.for_tensor("conv1.weight")["method"] == "none"
    assert int8_cfg.for_tensor("conv1.weight")["method"] == "none"
    assert cfg.for_tensor("conv1.weight")["method"] == "none"  # what the packer asks
    doc = json.loads(cfg.to_json())
    assert [s["method"] for s in doc["stages"]] == ["kmeans", "int8"]


def test_stage_qualified_keys_reach_one_stage_only() -> None:
    chain = resolve_method("kmeans+int8")
    cfg = chain.build_config(collect_settings({}, ["int8:granularity=layer",
                                                   "layer1.*.kmeans:k=4"]))
    assert cfg.stages[1].options["granularity"] == "layer"
    assert cfg.stages[0].options["k"] == 32
    assert cfg.stages[0].for_tensor("layer1.0.conv1.weight")["k"] == 4
    with pytest.raises(ConfigError, match="'uniform' is not a stage"):
        chain.build_config(collect_settings({}, ["uniform:bits=4"]))
    with pytest.raises(ConfigError, match="unknown option 'k' for method kmeans\\+int8"):
        chain.build_config(collect_settings({}, ["int8:k=4"]))
    with pytest.raises(ConfigError, match="unknown option 'nonsense'"):
        chain.build_config(collect_settings({}, ["nonsense=1"]))


def test_each_stage_starts_from_the_model_the_previous_one_left() -> None:
    model = cifar_resnet20()
    chain = resolve_method("kmeans+int8")
    cfg = chain.build_config(collect_settings({}, ["k=4"]))
    job = CompressJob(model, model.state_dict(), compressible_weights(model), cfg,
                      progress=False)
    out = chain.compress(job)
    assert job.config is cfg  # restored after the stages ran
    for name in job.targets:
        assert isinstance(out[name], UniformTensor) and out[name].bits == 8
        values = out[name].dequantize()
        # int8 snapped the 4-entry k-means weights: still at most 4 values per channel
        per_channel = [torch.unique(c).numel() for c in values.reshape(values.shape[0], -1)]
        assert max(per_channel) <= 4
        # the int8 stage saw the k-means result, both in `previous` and in the weights
        assert isinstance(job.previous[name], ScalarCodebookTensor)
        assert torch.equal(job.state_dict[name], job.previous[name].dequantize())


def test_a_chain_packs_end_to_end(tmp_path: Path, shared_dir: Path) -> None:
    source = shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth"
    out = tmp_path / "chain.fb"
    pack(PackRequest(source, out, method="kmeans+int8", overrides=["k=16"], progress=False))
    with open_packed(out) as packed:
        assert packed.model.method == "kmeans+int8"
        assert json.loads(packed.model.method_config_json)["stages"][0]["options"]["k"] == 16
    model = load(out)
    weight = model.state_dict()["layer2.0.conv1.weight"]
    assert max(torch.unique(c).numel() for c in weight.reshape(weight.shape[0], -1)) <= 16
