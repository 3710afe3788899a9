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
from packer.methods.stage_finetune import stage_checkpoint
from runtime import load
from runtime.errors import ConfigError
from runtime.format.reader import open_packed
from runtime.tensors import ScalarCodebookTensor
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
        # the int8 stage saw the k-means result, both in `previous` and in the weights
        kmeans = job.previous[name]
        assert isinstance(kmeans, ScalarCodebookTensor)
        assert torch.equal(job.state_dict[name], kmeans.dequantize())
        # and snapped its codebook to one int8 grid: same indices (up to merged entries),
        # each entry q * s with |q| <= 127, within half a step of the k-means centroid
        snapped = out[name]
        assert isinstance(snapped, ScalarCodebookTensor) and snapped.codebook.numel() <= 4
        step = float(kmeans.codebook.abs().max()) / 127
        q = snapped.codebook / step
        assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 127.001
        assert (snapped.dequantize() - kmeans.dequantize()).abs().max() <= step / 2 + 1e-7


def test_a_later_stage_knows_the_earlier_stages_for_its_resume_checkpoint() -> None:
    """fbs at 0.5 then kmeans, and fbs at 0.7 then kmeans, must not share kmeans' fine-tuning
    checkpoint: the stage's settings name what came before, and so does the file."""
    model = cifar_resnet20()
    chain = resolve_method("kmeans+int8")
    seen = []
    int8 = chain.stages[1]
    original = int8.compress

    def spy(job: CompressJob):
        seen.append(job.settings())
        return original(job)

    int8.compress = spy  # type: ignore[method-assign]
    for k in (4, 8):
        cfg = chain.build_config(collect_settings({}, [f"k={k}"]))
        job = CompressJob(model, model.state_dict(), compressible_weights(model), cfg,
                          progress=False)
        chain.compress(job)
        assert job.upstream == [] and "after" not in job.settings()
    first, second = seen
    assert [s["method"] for s in first["after"]] == ["kmeans"]
    assert first["after"][0]["options"]["k"] == 4 and second["after"][0]["options"]["k"] == 8
    assert first != second  # a checkpoint of one is refused by the other
    names = {str(stage_checkpoint("ck/ft.pt", "int8", s["after"])) for s in seen}
    assert len(names) == 2 and all(n.startswith("ck/ft.int8.") for n in names)
    assert stage_checkpoint("ck/ft.pt", "int8", first["after"]) == stage_checkpoint(
        "ck/ft.pt", "int8", [dict(first["after"][0])])  # the same stages: the same file
    assert str(stage_checkpoint("ck/ft.pt", "prune")) == "ck/ft.prune.pt"


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


@pytest.mark.parametrize(("chain", "sets"), [("prune+uniform", ["bits=4"]),
                                             ("prune+kmeans", ["k=8"]), ("prune+int8", [])])
def test_later_stages_keep_the_pruned_zeros(chain: str, sets: list[str]) -> None:
    model = cifar_resnet20()
    method = resolve_method(chain)
    cfg = method.build_config(collect_settings({}, ["density=0.3", *sets]))
    job = CompressJob(model, model.state_dict(), compressible_weights(model), cfg,
                      progress=False)
    out = method.compress(job)
    pruned = job.previous
    for name in job.targets:
        zeros = pruned[name].dequantize() == 0
        assert torch.equal(out[name].dequantize() == 0, zeros) or (
            # a grid may round a few small kept weights to 0 as well, never the reverse
            bool((out[name].dequantize()[zeros] == 0).all()))
    kept = sum(int((pruned[n].dequantize() != 0).sum()) for n in job.targets)
    assert kept == round(0.3 * sum(pruned[n].dequantize().numel() for n in job.targets))


def test_int8_snaps_vector_codebooks_too() -> None:
    from packer.methods.uniform import snap_codebook
    from runtime.quant.weights import int8_weight
    from runtime.tensors import VectorCodebookTensor

    g = torch.Generator().manual_seed(0)
    pq = VectorCodebookTensor(torch.randn(16, 9, generator=g) * 0.1,
                              torch.randint(0, 16, (64,), generator=g), (8, 8, 3, 3))
    snapped = snap_codebook(pq)
    assert isinstance(snapped, VectorCodebookTensor) and snapped.codebook.shape == (16, 9)
    weight = int8_weight(snapped.dequantize(), snapped)
    assert weight.exact and len(set(weight.scales.tolist())) == 1
    step = float(pq.codebook.abs().max()) / 127
    assert (snapped.dequantize() - pq.dequantize()).abs().max() <= step / 2 + 1e-7
