"""The first ten minutes of a new user: careless input, pipes, --help, and what gets stored.

Each test here reproduces something a new user ran into (issue 10, items 9-14).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import runtime
from packer import cli as packer_cli
from packer.compress import PackRequest, pack
from packer.methods import METHODS
from packer.training import DataSpec
from runtime import cli as runtime_cli
from runtime.data import CIFAR10_CLASSES, imagenet_classes
from runtime.errors import ConfigError, DataError
from tests.assets import REPO_ROOT

FAST = ["--method", "int8", "--coder", "raw"]  # packs ResNet-20 in well under a second


@pytest.fixture(scope="module")
def fb(r20: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("first") / "r20.fb"
    pack(PackRequest(r20, out, "int8", coder="raw", progress=False))
    return out


def one_error_line(err: str, prog: str) -> str:
    err = err.strip()
    assert err.startswith(f"{prog}: error:") and "\n" not in err, err
    return err


# --- 9, 11: methods that train say what to pass when there is no data ---------------------------


def test_pqf_without_data_refuses_and_says_what_to_pass(r20: Path, tmp_path: Path,
                                                       capsys) -> None:
    out = tmp_path / "p.fb"
    assert packer_cli.main(["compress", "--method", "pqf", str(r20), "-o", str(out)]) == 2
    err = one_error_line(capsys.readouterr().err, "packer")
    assert "--cifar10 DIR" in err and "finetune_epochs=0" in err
    assert not out.exists()


@pytest.mark.parametrize("method", ["pqf", "wfn", "pwfn"])
def test_no_data_errors_name_options_the_method_has(method: str, r20: Path,
                                                    tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        pack(PackRequest(r20, tmp_path / "x.fb", method, progress=False))
    named = re.findall(r"\b(\w+)=0\b", str(err.value))
    assert named, str(err.value)
    assert all(name in METHODS[method].options for name in named), (named, str(err.value))


# --- 10: the output path is checked before any work; a closed pipe is no traceback ------------


def _unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits; /proc takes no new files
        return Path("/proc")
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.mark.parametrize("where, message", [
    ("missing", "does not exist"),
    ("directory", "is a directory"),
    ("unwritable", "cannot write"),
    ("device", "not a regular file"),
])
def test_compress_checks_the_output_before_any_work(where: str, message: str, r20: Path,
                                                    tmp_path: Path, capsys,
                                                    monkeypatch) -> None:
    target = {"missing": tmp_path / "no" / "dir" / "x.fb", "directory": tmp_path,
              "unwritable": _unwritable_folder(tmp_path) / "x.fb",
              "device": Path(os.devnull)}[where]

    def work(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr("packer.compress.load_checkpoint", work)
    assert packer_cli.main(["compress", str(r20), "-o", str(target)]) == 2
    err = one_error_line(capsys.readouterr().err, "packer")
    assert message in err and str(target) in err


@pytest.mark.parametrize("flags", [["--cifar10", "{tmp}/none"], ["--calib-data", "{tmp}/none"],
                                   ["--class-names", "{tmp}/none.txt"]])
def test_compress_checks_its_inputs_before_the_method_runs(flags: list[str], r20: Path,
                                                           tmp_path: Path, capsys,
                                                           monkeypatch) -> None:
    def work(*args, **kwargs):
        raise AssertionError("the method ran before its inputs were checked")

    monkeypatch.setattr("packer.methods.pqf.PQFMethod.compress", work)
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert packer_cli.main(["compress", str(r20), "--method", "pqf", *flags,
                            "--set", "finetune_epochs=0", "-o", str(tmp_path / "x.fb")]) == 2
    assert "none" in one_error_line(capsys.readouterr().err, "packer")


@pytest.mark.parametrize("flags", [[], ["--int8"]])
def test_export_checks_the_output_before_any_work(flags: list[str], fb: Path, tmp_path: Path,
                                                  capsys, monkeypatch) -> None:
    def work(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr("runtime.onnx.export_onnx", work)  # imported when the command runs
    monkeypatch.setattr("runtime.quant.load_int8", work)
    assert runtime_cli.main(["export", str(fb), "--onnx", str(tmp_path), *flags]) == 2
    assert "is a directory" in one_error_line(capsys.readouterr().err, "runtime")


@pytest.mark.parametrize("argv", [["packer.cli", "methods"], ["runtime.cli", "inspect", "{fb}"]])
def test_a_closed_pipe_is_not_a_traceback(argv: list[str], fb: Path) -> None:
    """`packer methods | head -1`: the reader goes away, and nothing but silence follows."""
    argv = [a.format(fb=fb) for a in argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO_ROOT, env=env)
    proc.stdout.close()  # as `head` does once it has its lines
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    proc.stderr.close()
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception" not in err, err


# --- 12: settings that do nothing say so -------------------------------------------------------


@pytest.mark.parametrize("setting, shown", [("layer9.*.clip=mse", "linear"),
                                             ("layers3.0.conv1.method=none", "layer3.0.conv1")])
def test_a_set_glob_that_matches_no_layer_is_an_error(setting: str, shown: str, r20: Path,
                                                      tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.fb"
    assert packer_cli.main(["compress", str(r20), *FAST, "--set", setting,
                            "-o", str(out)]) == 2
    err = one_error_line(capsys.readouterr().err, "packer")
    glob = setting.partition("=")[0].rpartition(".")[0]
    assert repr(glob) in err and shown in err  # the glob, and real layer names
    assert not out.exists()


def test_a_config_file_glob_that_matches_no_layer_is_an_error(r20: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("layers:\n  fc: {method: none}\n")  # torchvision's name; here: linear
    with pytest.raises(ConfigError, match="'fc'.*linear"):
        pack(PackRequest(r20, tmp_path / "x.fb", "int8", config_file=config, progress=False))


def test_data_given_to_a_method_that_does_not_train_warns(r20: Path, cifar: Path,
                                                          tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.fb"
    assert packer_cli.main(["compress", str(r20), *FAST, "--cifar10", str(cifar),
                            "-o", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("packer: warning:") and "\n" not in err
    assert "int8" in err and "--cifar10" in err and "class names" in err


# --- 13: --help explains, with examples that parse ----------------------------------------------


def _subcommands() -> list[tuple[str, object, str]]:
    found = []
    for prog, module in (("packer", packer_cli), ("runtime", runtime_cli)):
        parser = module._parser()
        sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
        found += [(prog, module, name) for name in sub.choices]
    return found


@pytest.mark.parametrize("prog, module, command", _subcommands(),
                         ids=[f"{p}-{c}" for p, _, c in _subcommands()])
def test_every_subcommand_has_a_description_and_examples_that_parse(prog, module, command,
                                                                    capsys) -> None:
    parser = module._parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    subparser = sub.choices[command]
    assert subparser.description and len(subparser.description) > 20
    assert subparser.epilog and subparser.epilog.startswith("examples:")
    examples = [line.strip() for line in subparser.epilog.splitlines()[1:] if line.strip()]
    assert examples
    for line in examples:
        words = shlex.split(line, comments=True)
        assert words[:2] == [prog, command], line
        parser.parse_args(words[1:])  # raises SystemExit if an example has rotted
    with pytest.raises(SystemExit) as stop:
        module.main([command, "--help"])
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    assert "examples:" in shown and subparser.description.split()[0] in shown


def test_methods_table_wraps_under_long_option_names(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "90")
    assert packer_cli.main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 90 for line in lines), max(lines, key=len)
    keys = {key for m in METHODS.values() for key in m.options}
    assert "distill_temperature" in keys  # longer than the old 16-character column
    starts = set()
    for line in lines:
        first = line.split()[0] if line.strip() else ""
        if line.startswith("    ") and not line.startswith("     ") and first in keys:
            starts.add(len(line) - len(line[4 + len(first):].lstrip()))
        elif line.startswith(" "):
            starts.add(len(line) - len(line.lstrip()))  # a wrapped continuation
    assert len(starts) == 1, starts  # every help text starts in the same column


# --- 14: smaller things ---------------------------------------------------------------------------


def test_bad_alignment_is_one_line_without_internal_names(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        packer_cli.main(["compress", "m.pth", "--alignment", "abc"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "_alignment" not in err and "power of two" in err


def test_export_labels_its_size_comparison(fb: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.onnx"
    assert runtime_cli.main(["export", str(fb), "--onnx", str(out)]) == 0
    text = capsys.readouterr().out
    assert not re.search(r"\(\d+\.\d+x\)", text)  # no bare "(5.12x)" to read as a ratio
    assert "times the packed file" in text
    assert runtime_cli.main(["export", str(fb), "--onnx", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "ratio" not in report
    assert report["onnx_to_packed"] == pytest.approx(report["onnx_bytes"] / report["packed_bytes"],
                                                     rel=1e-3)


def _demo():
    path = REPO_ROOT / "tools" / "demo.py"
    spec = importlib.util.spec_from_file_location("weightpack_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_table_and_temporary_files(shared_dir: Path, tmp_path: Path, monkeypatch,
                                        capsys) -> None:
    """The demo's own logic, with the packer and runtime calls answered from a script."""
    demo = _demo()
    calls = []

    def answer(argv: list[str]) -> dict:
        calls.append(argv)
        if argv[:2] == ["packer", "compress"]:
            fp32 = "none" in argv
            return {"file_bytes": 250_000, "ratio": 1.1 if fp32 else 7.5,
                    "bits_per_weight": 0.0 if fp32 else 4.1,
                    "compressed_weights": 0 if fp32 else 268_000,
                    "bits_per_parameter": 29.3 if fp32 else 4.4}
        return {"top1": 88.0, "images": 10}

    monkeypatch.setattr(demo, "run_json", answer)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert demo.main(["--limit", "10"]) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.glob("weightpack-demo-*")) == []  # the scratch folder is gone
    rows = [line for line in out.splitlines() if line.startswith("none (fp32")]
    table_row = rows[-1]
    assert " 0.00 " not in table_row and "29.30" in table_row
    assert len(calls) == 2 * len(demo.CONFIGS)


def test_class_names_from_a_file(r20: Path, tmp_path: Path, capsys) -> None:
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    out = tmp_path / "x.fb"
    assert packer_cli.main(["compress", str(r20), *FAST, "--class-names", str(names),
                            "-o", str(out), "--quiet"]) == 0
    assert runtime.class_names(out) == [f"class {i}" for i in range(10)]
    capsys.readouterr()
    assert runtime_cli.main(["inspect", str(out)]) == 0
    assert "class 0, class 1" in capsys.readouterr().out
    assert runtime_cli.main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_names"][9] == "class 9"

    names.write_text("a\nb\n")
    assert packer_cli.main(["compress", str(r20), *FAST, "--class-names", str(names),
                            "-o", str(tmp_path / "y.fb")]) == 2
    assert "2 class names" in one_error_line(capsys.readouterr().err, "packer")
    assert not (tmp_path / "y.fb").exists()


def test_class_names_from_the_data_folders(r20: Path, cifar: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.fb"
    pack(PackRequest(r20, out, "int8", coder="raw", calib_data=cifar, calib_images=8,
                     workers=0, progress=False))
    assert runtime.class_names(out) == list(CIFAR10_CLASSES)
    folder = tmp_path / "flowers"
    for name in [f"kind{i:02d}" for i in range(10)]:
        (folder / "train" / name).mkdir(parents=True)
    with pytest.warns(UserWarning, match="gives the class names only"):
        report = pack(PackRequest(r20, out, "int8", coder="raw", progress=False,
                                  data=DataSpec("folder", folder)))
    assert report["class_names"] == [f"kind{i:02d}" for i in range(10)]


def test_imagenet_class_names(tmp_path: Path) -> None:
    from packer.class_names import names_from_data

    names, source = names_from_data(DataSpec("imagenet", tmp_path), None)
    assert names == tuple(name for _, name in imagenet_classes()) and len(names) == 1000
    assert "ImageNet" in source


def test_files_without_names_give_none_or_imagenet_names(fb: Path) -> None:
    assert runtime.class_names(fb) is None  # 10 classes, nothing stored


def test_wnid_folders_name_all_imagenet_classes(tmp_path: Path) -> None:
    """A calibration folder with a few ImageNet classes still labels the 1000-class output."""
    from packer.class_names import class_names_for

    wnids = [w for w, _ in imagenet_classes()][:3]
    for w in wnids:
        (tmp_path / "val" / w).mkdir(parents=True)
    names = class_names_for(None, None, tmp_path, 1000)
    assert names == tuple(name for _, name in imagenet_classes())
    assert class_names_for(None, None, tmp_path, 10) == ()  # calibration only: quietly none
