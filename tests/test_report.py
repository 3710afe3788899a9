"""`packer report`: every figure for the shared ResNet-20 and a packed file of it, the HTML
page, the Python API, and one clear error for each kind of bad input."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402

from packer import cli as packer_cli  # noqa: E402
from packer.report import Report, ReportOptions, figures  # noqa: E402
from packer.report.activations import capture_relus  # noqa: E402
from packer.report.models import marks_of  # noqa: E402
from packer.report.output import INDEX, MARKER, report_folder  # noqa: E402
from packer.report.sizes import read_sizes  # noqa: E402
from runtime import zoo  # noqa: E402
from runtime.report import inspect_file  # noqa: E402
from runtime.tensors import (  # noqa: E402
    RawTensor,
    ScalarCodebookTensor,
    UniformTensor,
    VectorCodebookTensor,
)

FAST = ["--max-layers", "2", "--samples", "20000", "--no-progress"]


@pytest.fixture(scope="module")
def r20(shared_dir: Path) -> Path:
    return shared_dir / "models" / "cifar10" / "resnet20-cifar10jpg.pth"


@pytest.fixture(scope="module")
def cifar(shared_dir: Path) -> Path:
    return shared_dir / "data" / "cifar10"


@pytest.fixture(scope="module")
def packed(r20: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "r20.fb"
    assert packer_cli.main(["compress", "--method", "kmeans", str(r20), "-o", str(out),
                            "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def cli_report(packed: Path, r20: Path, cifar: Path, tmp_path_factory) -> tuple[Path, dict]:
    """One report through the CLI: the packed file against the original, image from --data."""
    out = tmp_path_factory.mktemp("cli") / "report"
    argv = ["report", str(packed), "--compare", str(r20), "--data", str(cifar), "--out",
            str(out), "--json", *FAST]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert packer_cli.main(argv) == 0
    return out, json.loads(stdout.getvalue())


def error_of(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert packer_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("packer: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_writes_every_figure_and_an_html_page_that_shows_them(cli_report) -> None:
    out, summary = cli_report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(summary["figures"])
    kinds = {re.sub(r"_(\d+|r20_fb)$", "", Path(name).stem) for name in pngs}
    assert kinds == {"sizes_layers", "sizes_bits", "sizes_sections", "weights_hist",
                     "weights_unique", "kernels", "activations_input", "activations"}
    assert len([p for p in pngs if p.startswith("kernels_")]) == 2  # --max-layers 2
    assert len([p for p in pngs if p.startswith("weights_hist")]) == 2  # 20 layers, 12 a page
    for name in pngs:
        with Image.open(out / name) as img:
            img.verify()  # decodes as a PNG
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 200
    html = (out / "index.html").read_text(encoding="utf-8")
    assert set(re.findall(r'<img src="([^"]+)"', html)) == set(pngs)
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing from a network
    assert "r20.fb (kmeans)" in html and "resnet20-cifar10jpg.pth (original)" in html
    assert [p.name for p in out.parent.iterdir()] == ["report"]  # no temp folder left
    assert "Kernel heatmaps of the first 2 of 19 spatial convolutions." in summary["notes"]


def test_api_figures_have_the_pixel_sizes_they_declare(packed: Path, cifar: Path,
                                                       tmp_path: Path) -> None:
    image = cifar / "test" / "cat" / "0000.jpg"
    options = ReportOptions(samples=20_000, max_kernel_layers=1, dpi=40)
    report = Report(packed, image=image, options=options)
    names = []
    for entry in report.entries():
        assert isinstance(entry.figure, Figure)
        width, height = entry.figure.get_size_inches() * options.dpi
        entry.figure.savefig(tmp_path / f"{entry.name}.png", dpi=options.dpi)
        with Image.open(tmp_path / f"{entry.name}.png") as img:
            assert img.size == (round(width), round(height)), entry.name
        names.append(entry.name)
    # a packed file alone: size plots from the file, weights as stored, activations
    assert {"sizes_layers_r20_fb", "sizes_bits_r20_fb", "sizes_sections_r20_fb",
            "weights_hist_01", "weights_unique", "kernels_01", "activations_input",
            "activations_01"} <= set(names)


def test_figures_returns_named_matplotlib_figures(packed: Path, r20: Path) -> None:
    figs = figures(r20, compare=packed, options=ReportOptions(
        samples=5_000, max_kernel_layers=1, activations=False))
    assert all(isinstance(f, Figure) for f in figs.values())
    assert "weights_unique" in figs and "kernels_01" in figs and "sizes_bits_r20_fb" in figs
    hist = figs["weights_hist_01"]
    assert "resnet20-cifar10jpg.pth (original) vs r20.fb (kmeans)" in hist._suptitle.get_text()
    titles = [ax.get_title(loc="left") for ax in hist.axes]
    assert any(t.startswith("layer1.0.conv1.weight\n16x16x3x3 · K=32 codebook") for t in titles)


def test_size_split_adds_up_to_the_inspect_report(packed: Path) -> None:
    report, rows, layers = read_sizes(packed)
    inspected = inspect_file(packed)
    assert [r["coded_bytes"] for r in rows] == [r["coded_bytes"] for r in inspected["tensors"]]
    assert sum(x.total for x in layers) == sum(r["coded_bytes"] for r in rows)
    conv = next(x for x in layers if x.name == "layer3.0.conv2")
    assert conv.indices > 10 * conv.codebook > 0 and conv.raw == 0
    bn = next(x for x in layers if x.name == "layer3.0.bn2")
    assert bn.raw > 0 and bn.indices == bn.codebook == 0
    assert report["file_bytes"] == packed.stat().st_size


def test_relus_are_found_however_they_are_called() -> None:
    # the CIFAR ResNets call F.relu; torchvision reuses one nn.ReLU module per block
    relus, logits = capture_relus(zoo.build("cifar_resnet20", {}).eval(),
                                  torch.zeros(1, 3, 32, 32))
    assert len(relus) == 19 and logits.shape == (1, 10)
    assert [n for n, _ in relus[:3]] == ["CifarResNet relu", "layer1.0 relu #1",
                                         "layer1.0 relu #2"]
    relus, _ = capture_relus(zoo.build("torchvision.resnet18", {}).eval(),
                             torch.zeros(1, 3, 64, 64))
    assert len(relus) == 17 and relus[0][0] == "relu"
    assert relus[1][0] == "layer1.0.relu #1" and relus[1][1].shape == (64, 16, 16)
    assert all(float(t.min()) >= 0 for _, t in relus)


def test_codebook_marks_for_every_scheme() -> None:
    book = torch.tensor([0.5, -0.25, 0.0, 0.125])
    marks = marks_of(ScalarCodebookTensor(book, torch.zeros(3, 3, dtype=torch.int64)))
    assert marks.values.tolist() == [-0.25, 0.0, 0.125, 0.5] and marks.note == "K=4 codebook"
    grid = marks_of(UniformTensor(torch.zeros(2, 2, dtype=torch.int32), torch.tensor([0.5]),
                                  None, 3, None))
    assert grid.values.tolist() == [-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]
    per_channel = marks_of(UniformTensor(torch.zeros(2, 2, dtype=torch.int32),
                                         torch.tensor([0.5, 0.25]), None, 8, 0))
    assert per_channel.values.size == 0 and "per channel" in per_channel.note
    wide = marks_of(UniformTensor(torch.zeros(2, 2, dtype=torch.int32), torch.tensor([0.1]),
                                  None, 8, None))
    assert wide.values.size == 0 and "255 levels, not drawn" in wide.note
    pq = marks_of(VectorCodebookTensor(torch.zeros(256, 9), torch.zeros(4, dtype=torch.int64),
                                       (4, 1, 3, 3)))
    assert pq.values.size == 0 and pq.note == "K=256 codewords of 9 values"
    assert marks_of(RawTensor(torch.zeros(2), torch.float32)).note == "raw float32"


def test_a_different_architecture_to_compare_is_refused(packed: Path, tmp_path: Path,
                                                        capsys) -> None:
    other = tmp_path / "r32.pth"
    torch.save(zoo.build("cifar_resnet32", {}).state_dict(), other)
    out = tmp_path / "out"
    err = error_of(["report", str(packed), "--compare", str(other), "--out", str(out),
                    "--no-activations"], capsys)
    assert "r20.fb (cifar_resnet20) and r32.pth (cifar_resnet32) are different models" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r32.pth"]


def test_an_unreadable_image_is_refused(packed: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "not-an-image.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a JPEG")
    out = tmp_path / "out"
    err = error_of(["report", str(packed), "--image", str(bad), "--out", str(out)], capsys)
    assert f"{bad}: not an image PIL can read" in err
    err = error_of(["report", str(packed), "--image", str(tmp_path / "missing.png"), "--out",
                    str(out)], capsys)
    assert "missing.png: no such image" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-an-image.jpg"]


def test_activations_without_an_image_name_the_flags(packed: Path, tmp_path: Path,
                                                    capsys) -> None:
    err = error_of(["report", str(packed), "--out", str(tmp_path / "out")], capsys)
    assert "pass --image IMG, or --data DIR" in err and "--no-activations" in err
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_that_cannot_be_written_is_refused(packed: Path, tmp_path: Path,
                                                            capsys) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    err = error_of(["report", str(packed), "--out", str(a_file), "--no-activations"], capsys)
    assert "exists and is not a folder" in err
    err = error_of(["report", str(packed), "--out", str(a_file / "sub"), "--no-activations"],
                   capsys)
    assert "cannot write the report" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("keep me")
    err = error_of(["report", str(packed), "--out", str(busy), "--no-activations"], capsys)
    assert "not empty and holds no earlier report" in err
    assert (busy / "thesis.tex").read_text() == "keep me"


def test_a_failure_midway_leaves_no_partial_output(packed: Path, tmp_path: Path,
                                                  monkeypatch, capsys) -> None:
    from packer.report import sizes
    from runtime.errors import WeightpackError

    def broken(*args, **kwargs):
        raise WeightpackError("disk full (simulated)")
        yield

    monkeypatch.setattr(sizes, "size_figures", broken)
    err = error_of(["report", str(packed), "--out", str(tmp_path / "out"), "--no-activations"],
                   capsys)
    assert "disk full (simulated)" in err
    assert list(tmp_path.iterdir()) == []


def test_an_earlier_report_is_replaced_whole(tmp_path: Path) -> None:
    out = tmp_path / "report"
    for run, names in enumerate((["a.png", "b.png"], ["c.png"])):
        with report_folder(out) as tmp:
            assert tmp.parent == tmp_path and tmp != out
            for name in names:
                (tmp / name).write_bytes(b"png")
            (tmp / INDEX).write_text(f"{MARKER}\nrun {run}\n")
        assert sorted(p.name for p in out.iterdir()) == sorted([*names, INDEX])
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # nothing left beside it


def test_runtime_and_packer_cli_import_without_matplotlib() -> None:
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # any import of it now fails
            "import runtime, runtime.cli, packer.cli, packer.report\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_report_without_matplotlib_says_how_to_install_it(packed: Path, tmp_path: Path,
                                                           monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    err = error_of(["report", str(packed), "--out", str(tmp_path / "o")], capsys)
    assert "needs matplotlib" in err and "pip install 'weightpack[report]'" in err
    assert list(tmp_path.iterdir()) == []
