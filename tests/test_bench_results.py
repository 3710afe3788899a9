"""The benchmark results files: written whole with their bars, parsed back by the index."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import _eval  # noqa: E402
import summary  # noqa: E402


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(summary, "RESULTS_DIR", tmp_path)
    return tmp_path


def test_bars_round_trip_through_a_results_file(results_dir):
    bars = [_common.Bar("resnet20 int8 within 0.2 pt at ratio >= 3.8", True,
                        "int8: delta +0.06 pts, ratio 4.10"),
            _common.Bar("load resnet56 kmeans K=32: runtime.load <= 2.0x the torch path", False,
                        "ratio 2.93 (median 119.5 ms vs 40.8 ms)")]
    path = _common.write_results("demo", "Demo", "python tools/bench/demo.py", "| a |\n", bars)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Demo\n")
    assert "Regenerate: `python tools/bench/demo.py`" in text
    assert "- code: commit " in text
    assert _common.parse_bars(text) == bars
    assert not list(results_dir.glob("*.tmp"))


def test_parse_bars_reads_only_the_bars_section():
    text = "\n".join(["# T", "", "## Bars", "", "- **PASS** a — 1", "", "## Other", "",
                      "- **FAIL** b — 2"])
    assert _common.parse_bars(text) == [_common.Bar("a", True, "1")]


def test_summary_indexes_every_bar_with_its_file(results_dir):
    _common.write_results("coders", "Coders", "python tools/bench/coders.py", "body",
                          [_common.Bar("ans near the bound", True, "1.002x")])
    _common.write_results("wfn", "WFN", "python tools/bench/wfn.py", "body",
                          [_common.Bar("a wfn point", False, "87.0%")])
    text = summary.render(summary.results_files())
    assert "## Bars (1 of 2 pass)" in text
    assert "- **PASS** ans near the bound — 1.002x ([coders](results/coders.md))" in text
    assert "- **FAIL** a wfn point — 87.0% ([wfn](results/wfn.md))" in text
    assert text.index("coders.md") < text.index("wfn.md")  # summary.ORDER
    not_measured = text[text.index("## Not measured yet"):]
    assert "- accuracy: `python tools/bench/accuracy.py`" in not_measured
    assert "- wfn:" not in not_measured


def test_refuse_dirty_tree(monkeypatch):
    monkeypatch.setattr(_common, "dirty_files", lambda: ["packer/x.py"])
    with pytest.raises(SystemExit, match="refusing to measure a dirty tree"):
        _common.refuse_dirty_tree(False)
    _common.refuse_dirty_tree(True)  # allowed, and marked by write_results


def test_standard_error_and_margin_note():
    assert _eval.standard_error(88.0, 10_000) == pytest.approx(0.325, abs=1e-3)
    assert _eval.margin_note(0.5, 88.0, 10_000) == ""
    assert "smaller than the standard error" in _eval.margin_note(0.1, 88.0, 10_000)


def test_summary_indexes_files_it_does_not_know_and_writes_only_the_index(results_dir,
                                                                         tmp_path, monkeypatch):
    (results_dir / "zeta.md").write_text("# Zeta\n\nRegenerate: `python tools/bench/zeta.py`\n"
                                         "\n- date: d\n- code: commit abc\n", encoding="utf-8")
    _common.write_results("accuracy", "Methods", "python tools/bench/accuracy.py", "body")
    out = tmp_path / "index" / "RESULTS.md"
    out.parent.mkdir()
    monkeypatch.setattr(summary, "OUT", out)
    before = {p.name: p.read_bytes() for p in results_dir.glob("*.md")}
    assert summary.main([]) == 0
    assert {p.name: p.read_bytes() for p in results_dir.glob("*.md")} == before
    text = out.read_text(encoding="utf-8")
    assert text.index("accuracy.md") < text.index("zeta.md")  # unknown files follow, by name
    assert "`python tools/bench/zeta.py`" in text
    assert summary.main(["--check"]) == 0
    out.write_text(text + "hand-written figure: 99%\n", encoding="utf-8")
    assert summary.main(["--check"]) == 1


DOCS = [BENCH.parents[1] / "README.md", *sorted((BENCH.parents[1] / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_link_only_results_files_that_exist(doc):
    """A page that quotes a figure names the results file holding it: that file must exist."""
    import re

    for target in re.findall(r"\]\(((?:docs/)?results/[^)#]+\.md)", doc.read_text("utf-8")):
        assert (doc.parent / target).is_file(), f"{doc.name} links {target}, which is missing"


def test_results_index_is_current():
    """docs/RESULTS.md is generated: `python tools/bench/summary.py` rewrites it."""
    assert summary.main(["--check"]) == 0


def test_budget_choice_keeps_the_earlier_variant_unless_clearly_beaten():
    import budget

    def rows(fp32_top1: float) -> list[dict]:
        out = [{"label": label, "target_ratio": r, "top1": top}
               for label in budget.NEAREST for r, top in ((10.9, 90.0), (15.0, 80.0))]
        first, second = list(budget.ADAROUND)[:2]
        out += [{"label": first, "target_ratio": 15.0, "top1": 94.0},
                {"label": second, "target_ratio": 15.0, "top1": fp32_top1}]
        return out

    se = _eval.standard_error(94.0, budget.HOLDOUT)
    assert budget.choose(rows(94.0 + se / 2))[1] == list(budget.ADAROUND.values())[0]
    assert budget.choose(rows(94.0 + 2 * se))[1] == list(budget.ADAROUND.values())[1]
    nearest, _, request, _ = budget.choose(rows(94.0))
    assert nearest == () and request == {}  # all nearest variants tie: the reference stays


def test_lowbit_bar_row_is_chosen_on_held_out_images_not_test():
    import lowbit

    def row(label: str, epochs: int, holdout: list[float], test: float) -> dict:
        return {"label": label, "epochs": epochs, "holdout_by_epoch": holdout, "test": test}

    bwn, bwn_f = row("bwn", 20, [40.0, 89.88], 86.28), row("bwn-f", 20, [40.0, 89.5], 99.0)
    untrained = row("bwn-f", 0, [], 39.4)
    judged = lowbit.bar_rows([row("bwn", 0, [], 39.4), bwn, untrained, bwn_f])
    assert judged["bwn"] is bwn  # the better held-out row, whatever its test figure
    bwn_f["holdout_by_epoch"] = [40.0, 90.5]
    assert lowbit.bar_rows([bwn, bwn_f])["bwn"] is bwn_f
    bwn_f["holdout_by_epoch"] = [40.0, 89.88]
    assert lowbit.bar_rows([bwn, bwn_f])["bwn"] is bwn  # a tie keeps the first listed
    longer = row("bwn-f", 30, [40.0, 89.9, 90.1], 80.0)  # a second length of one recipe
    assert lowbit.bar_rows([bwn, bwn_f, longer])["bwn"] is longer


def test_lowbit_training_variants_quantize_as_the_recipe_whose_untrained_row_they_share():
    import lowbit

    def quantizing(label: str) -> tuple[str, set[str]]:
        method, sets = lowbit.RECIPES[label]
        return method, {s for s in sets if not s.startswith("lr=")}

    for variant, base in lowbit.TRAINING_VARIANT_OF.items():
        assert base not in lowbit.TRAINING_VARIANT_OF
        assert quantizing(variant) == quantizing(base)
        assert lowbit.RECIPES[variant] != lowbit.RECIPES[base]
        assert lowbit.bar_of(variant) == lowbit.bar_of(base) == "bwn"
    assert lowbit._epochs("bwn-f lr=0.001=30") == ("bwn-f lr=0.001", 30)
    assert lowbit._epochs("bwn-f lr=0.0005 all images=20") == ("bwn-f lr=0.0005 all images", 20)


def test_lowbit_every_image_recipes_ignore_the_train_limit():
    import lowbit

    assert lowbit.EVERY_IMAGE and lowbit.EVERY_IMAGE.issubset(lowbit.TRAINING_VARIANT_OF)
    for label in lowbit.RECIPES:
        expected = None if label in lowbit.EVERY_IMAGE else 20000
        assert lowbit.images_per_epoch(label, 20000) == expected
    every = next(iter(lowbit.EVERY_IMAGE))
    point = lowbit.Point(every, *lowbit.RECIPES[every], 20, lowbit.images_per_epoch(every, 20000))
    assert not any(s.startswith("train_limit=") for s in point.overrides())
    assert point.slug().endswith("-e20-nall")
