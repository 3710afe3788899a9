"""End to end on the shared ResNet-20: packer CLI -> file -> runtime, as a user runs it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runtime
from packer import cli as packer_cli
from packer.compress import PackRequest, pack
from packer.config import build_config
from packer.methods import METHODS, CompressJob
from packer.writer import layout
from runtime import cli as runtime_cli, zoo
from runtime.report import inspect_file


@pytest.fixture(scope="module")
def kmeans_file(r20: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "r20.fb"
    assert packer_cli.main(["compress", "--method", "kmeans", str(r20), "-o", str(out),
                            "--quiet"]) == 0
    return out


def run_json(main, argv: list[str], capsys) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_runtime_load_equals_the_packers_own_decoded_model(r20: Path, kmeans_file: Path) -> None:
    source = torch.load(r20, weights_only=True)
    model = zoo.build("cifar_resnet20", {}).eval()
    model.load_state_dict(source)
    method = METHODS["kmeans"]()
    targets = [n for n in source if n.endswith("weight") and source[n].dim() in (2, 4)]
    config = build_config("kmeans", method.options, {}, [])
    compressed = method.compress(CompressJob(model, source, targets, config, progress=False))
    expected_model = zoo.build("cifar_resnet20", {}).eval()
    expected_model.load_state_dict({**source, **{n: c.dequantize() for n, c in
                                                  compressed.items()}})
    loaded = runtime.load(kmeans_file)
    assert not loaded.training
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded(x), expected_model(x))


def test_inspect_reports_true_size_and_the_bars(kmeans_file: Path, capsys) -> None:
    report = run_json(packer_cli.main, ["inspect", str(kmeans_file), "--verify"], capsys)
    assert report["file_bytes"] == kmeans_file.stat().st_size
    assert report["ratio"] == pytest.approx(report["fp32_bytes"] / report["file_bytes"])
    assert report["ratio"] >= 7.0  # the bar for K=32
    assert report["method"] == "kmeans" and report["config"]["options"]["k"] == 32
    conv = next(t for t in report["tensors"] if t["name"] == "layer3.0.conv2.weight")
    assert conv["levels"] == "K=32" and conv["bits_per_weight"] < 5
    assert conv["coded_bytes"] <= 1.02 * conv["bound_bytes"] + 64  # near the entropy bound
    assert report["verified_blobs"] > 100
    text = capsys.readouterr().out
    del text


def test_eval_cli_agrees_with_baseline_on_a_subset(r20: Path, cifar: Path, kmeans_file: Path,
                                                  tmp_path: Path, capsys) -> None:
    baseline = tmp_path / "none.fb"
    assert packer_cli.main(["compress", "--method", "none", str(r20), "-o", str(baseline),
                            "--quiet"]) == 0
    args = ["--cifar10", str(cifar), "--limit", "500", "--workers", "0", "--no-progress"]
    base = run_json(runtime_cli.main, ["eval", str(baseline), *args], capsys)
    km = run_json(runtime_cli.main, ["eval", str(kmeans_file), *args], capsys)
    assert base["images"] == km["images"] == 500
    assert base["top1"] > 80  # 88.25% on the full set
    assert abs(base["top1"] - km["top1"]) <= 4.0
    assert 1.0 < base["ratio"] < 1.4  # lossless fp32: byte-shuffled zstd gains a little
    assert {"top5", "images_per_s", "file_bytes", "backend", "precision"} <= km.keys()


def test_every_method_packs_deterministically(r20: Path, tmp_path: Path) -> None:
    for method, sets in [("none", ["fp16=true"]), ("int8", []), ("uniform", ["bits=4"]),
                         ("kmeans", ["k=16", "conv1.method=none"])]:
        a, b = tmp_path / f"{method}-a.fb", tmp_path / f"{method}-b.fb"
        for out in (a, b):
            pack(PackRequest(r20, out, method, overrides=sets, progress=False))
        assert a.read_bytes() == b.read_bytes(), method
        model = runtime.load(a)
        assert isinstance(model, torch.nn.Module)


def test_pack_reports_the_sizes_inspect_reads_back(r20: Path, tmp_path: Path) -> None:
    out = tmp_path / "u.fb"
    report = pack(PackRequest(r20, out, "uniform", overrides=["bits=4"], progress=False))
    read_back = inspect_file(out)
    assert {key: report[key] for key in read_back} == read_back


def test_only_rank_zero_writes_under_torchrun(r20: Path, tmp_path: Path, monkeypatch,
                                            capsys) -> None:
    out = tmp_path / "m.fb"
    monkeypatch.setenv("RANK", "1")
    report = pack(PackRequest(r20, out, "int8", progress=False))
    assert report["file_bytes"] > 0 and not out.exists()  # packed and checked, not written
    assert packer_cli.main(["compress", str(r20), "--method", "int8", "-o", str(out),
                            "--json"]) == 0
    assert not out.exists() and capsys.readouterr().out == ""  # rank 0 reports
    monkeypatch.setenv("RANK", "0")
    assert pack(PackRequest(r20, out, "int8", progress=False))["file_bytes"] == out.stat().st_size


def test_small_alignment_shrinks_the_file_and_decodes_the_same(r20: Path, tmp_path: Path,
                                                              capsys) -> None:
    sizes = {}
    for align in (64, 8):
        out = tmp_path / f"a{align}.fb"
        assert packer_cli.main(["compress", str(r20), "--method", "kmeans", "--set", "k=16",
                                "--alignment", str(align), "-o", str(out), "--json"]) == 0
        sizes[align] = json.loads(capsys.readouterr().out)["file_bytes"]
        assert sizes[align] == out.stat().st_size
    assert sizes[8] < sizes[64] - 1000  # ~30 bytes of padding saved per tensor
    a, b = (runtime.load(tmp_path / f"a{n}.fb").state_dict() for n in (64, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_compress_leaves_no_file(r20: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "partial.fb"

    def interrupted(model, data):
        written = layout(model, data)

        def chunks():
            yield next(iter(written.chunks))
            raise KeyboardInterrupt

        return dataclasses.replace(written, chunks=chunks())

    monkeypatch.setattr("packer.writer.layout", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack(PackRequest(r20, out, "kmeans", progress=False))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["compress", "missing.pth", "-o", "x.fb"], "no such file"),
    (["compress", "{r20}", "--arch", "cifar_resnet56", "-o", "{tmp}/x.fb"], "does not match"),
    (["compress", "{r20}", "--set", "k=0", "-o", "{tmp}/x.fb"], "between 2 and 65536"),
    (["compress", "{r20}", "-o", "{tmp}/no/such/dir/x.fb"], "does not exist"),
    (["inspect", "{r20}"], "not a weightpack file"),
])
def test_packer_bad_input_is_one_line(argv, message, r20: Path, tmp_path: Path, capsys) -> None:
    argv = [a.format(r20=r20, tmp=tmp_path) for a in argv]
    assert packer_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("packer: error:") and message in err and "\n" not in err
    assert not list(tmp_path.glob("**/*.fb"))


@pytest.mark.parametrize("argv, message", [
    (["eval", "{fb}", "--cifar10", "{tmp}/nothing"], "{tmp}/nothing"),
    (["eval", "{fb}", "--imagenet", "{cifar}"], "ImageNet-1k has 1000"),
    (["eval", "{fb}", "--cifar10", "{cifar}", "--device", "cuda"], "no CUDA"),
    (["eval", "{tmp}/missing.fb", "--cifar10", "{cifar}"], "no such file"),
])
def test_runtime_bad_input_is_one_line(argv, message, kmeans_file: Path, cifar: Path,
                                       tmp_path: Path, capsys) -> None:
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    fill = {"fb": kmeans_file, "tmp": tmp_path, "cifar": cifar}
    argv = [a.format(**fill) for a in argv]
    assert runtime_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("runtime: error:") and message.format(**fill) in err
    assert "\n" not in err


def test_console_scripts_print_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.fb"
    bad.write_bytes(b"\x89WPK\r\n\x1a\n" + bytes(100))
    result = subprocess.run([sys.executable, "-m", "runtime.cli", "inspect", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
