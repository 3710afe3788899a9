"""Size budgets, AdaRound and repair end to end on the shared ResNet-20 (few calibration
images, to stay fast), and the bad-input messages."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from packer import cli as packer_cli
from packer.compress import PackRequest, pack
from packer.methods.weightfix import WFNMethod
from runtime.format.reader import open_packed
from tests.packing import method_job


def _pack(r20: Path, out: Path, cifar: Path, method: str = "uniform", sets=(), **kw) -> dict:
    return pack(PackRequest(r20, out, method=method, overrides=list(sets), progress=False,
                            calib_data=cifar, calib_images=kw.pop("calib_images", 32),
                            alignment=8, **kw))


@pytest.mark.parametrize(("method", "ratio", "sets"), [
    ("uniform", 10.9, ()), ("uniform", 15.0, ("fp16=true",)), ("kmeans", 8.5, ()),
    ("pqf", 14.0, ("kmeans_iters=10", "sls_iterations=200", "finetune_epochs=0")),
])
def test_budget_lands_within_one_percent_under(r20: Path, cifar: Path, tmp_path: Path,
                                               method: str, ratio: float, sets) -> None:
    out = tmp_path / "r20.fb"
    report = _pack(r20, out, cifar, method, sets, target_ratio=ratio, calib_images=16)
    budget = report["budget"]
    target = int(report["fp32_bytes"] / ratio)
    size = os.path.getsize(out)
    assert budget["target_bytes"] == target and budget["file_bytes"] == size
    assert 0.99 * target <= size <= target, budget["attempts"]
    option = "step_rms" if method == "uniform" else "k"
    chosen = {row["name"]: row[option] for row in budget["layers"]}
    assert len(chosen) == (19 if method == "pqf" else 20)  # pqf keeps conv1
    assert len(set(chosen.values())) > 1  # really per layer
    with open_packed(out) as packed:  # the chosen settings are recorded in the file
        config = json.loads(packed.model.method_config_json)
    assert {e["match"]: e[option] for e in config["layers"]} == chosen
    cal = report["calibration"]
    assert cal["images"] == 16 and cal["seconds"]["sensitivity"] > 0
    assert report["repair"]["bn_reestimated"] == 19


def test_budget_with_adaround_is_deterministic(r20: Path, cifar: Path, tmp_path: Path) -> None:
    sets = ["rounding=adaround", "adaround_iters=40"]
    a, b = tmp_path / "a.fb", tmp_path / "b.fb"
    report = _pack(r20, a, cifar, sets=sets, target_size=120_000, calib_images=16)
    _pack(r20, b, cifar, sets=sets, target_size=120_000, calib_images=16)
    assert a.read_bytes() == b.read_bytes()
    assert 0.99 * 120_000 <= a.stat().st_size <= 120_000
    assert len(report["adaround_layers"]) == 20
    assert report["calibration"]["seconds"]["adaround"] > 0


def test_user_set_layers_are_kept_out_of_the_search(r20: Path, cifar: Path,
                                                    tmp_path: Path) -> None:
    report = _pack(r20, tmp_path / "m.fb", cifar, sets=["conv1.bits=3", "budget_knob=bits"],
                   target_ratio=9)
    rows = {r["name"]: r for r in report["budget"]["layers"]}
    assert rows["conv1.weight"]["bits"] == "bits=3"
    assert rows["conv1.weight"]["why"] == "set by the user"
    assert rows["conv1.weight"]["bytes"] < rows["layer1.0.conv1.weight"]["bytes"]


def test_max_drop_picks_a_file_within_the_drop(r20: Path, cifar: Path, tmp_path: Path) -> None:
    report = _pack(r20, tmp_path / "m.fb", cifar, max_drop=2.0, calib_holdout=300)
    budget = report["budget"]
    assert budget["met"] and budget["holdout_drop"] <= 2.0
    assert len(budget["evaluated"]) >= 2
    assert report["calibration"]["holdout_images"] == 300


def _compress(argv: list[str], capsys) -> tuple[int, str]:
    code = packer_cli.main(["compress", *argv, "--quiet", "--no-progress"])
    return code, capsys.readouterr().err


def test_budget_below_the_smallest_file_says_what_that_is(r20: Path, cifar: Path,
                                                          tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.fb"
    code, err = _compress(["--method", "uniform", str(r20), "-o", str(out), "--target-size",
                           "20k", "--calib-data", str(cifar), "--calib-images", "16"], capsys)
    assert code == 2 and "below the smallest possible file" in err
    assert "smallest step_rms" in err and not out.exists()
    smallest = int(err.split("file, ")[1].split(" bytes")[0].replace(",", ""))
    assert 20_000 < smallest < 60_000


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "int8", "--target-ratio", "5"], "int8 has no per-layer rate knob"),
    (["--method", "uniform", "--target-ratio", "5", "--no-calib"], "needs --calib-data"),
    (["--method", "uniform", "--target-size", "0"], "positive number of bytes"),
])
def test_budget_flag_errors(r20: Path, cifar: Path, tmp_path: Path, capsys, argv, message
                            ) -> None:
    out = tmp_path / "m.fb"
    calib = [] if "--no-calib" in argv else ["--calib-data", str(cifar)]
    argv = [a for a in argv if a != "--no-calib"]
    code, err = _compress([*argv, str(r20), "-o", str(out), *calib], capsys)
    assert code == 2 and message in err and not out.exists()


def test_calibration_data_errors(r20: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.fb"
    base = ["--method", "uniform", str(r20), "-o", str(out), "--calib-data"]
    code, err = _compress([*base, str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "does not exist" in err
    big = tmp_path / "big" / "cat"
    big.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (224, 160), (i, 2 * i, 3 * i)).save(big / f"{i}.png")
    code, err = _compress([*base, str(tmp_path / "big")], capsys)
    assert code == 2 and "are 160x224 but the model takes 32x32" in err
    junk = tmp_path / "junk" / "cat"
    junk.mkdir(parents=True)
    for i in range(3):
        (junk / f"{i}.jpg").write_bytes(b"not an image")
    code, err = _compress([*base, str(tmp_path / "junk")], capsys)
    assert code == 2 and "could be read" in err
    assert not out.exists()


def test_post_training_wfn_re_estimates_bn_with_calibration_data(r20: Path, cifar: Path,
                                                                 tmp_path: Path) -> None:
    sets = ["fixing_epochs=0", "percentages=[0.5,1.0]"]
    report = _pack(r20, tmp_path / "w.fb", cifar, "wfn", sets)
    assert report["repair"]["bn_reestimated"] == 19


def test_post_training_wfn_without_data_says_what_stale_batchnorm_costs(caplog) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Flatten(),
                          nn.LazyLinear(4))
    model(torch.zeros(1, 3, 6, 6))
    method, job = method_job(WFNMethod, model.eval(), "fixing_epochs=0", "first_epoch=0",
                             "percentages=[1.0]")
    with caplog.at_level(logging.WARNING, logger="packer.methods.weightfix.wfn"):
        method.compress(job)
    assert "cannot re-estimate BatchNorm" in caplog.text and "--calib-data" in caplog.text
