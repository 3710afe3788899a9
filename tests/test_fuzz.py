"""The loader fuzzer (tools/fuzz.py): a short campaign in CI, and its own machinery checked
on planted failures (a fuzzer that cannot see a crash would pass every campaign)."""

from __future__ import annotations

import pytest

from tools.fuzz import GOOD, SELF_TEST, run_campaign, run_cases
from tools.fuzz_cases import MUTATORS, build_seeds, make_case, seed_list


@pytest.fixture(scope="module")
def seeds() -> dict[str, bytes]:
    return build_seeds()


def test_short_campaign_finds_nothing() -> None:
    """A few hundred cases over every seed and mutator: each ends as a loaded model or the
    project's own exception, within the memory bound."""
    results, facts = run_campaign(360, workers=2, campaign=7)
    assert len(results) == 360
    assert {r.mutator for r in results} == set(MUTATORS)
    bad = [(r.number, r.mutator, r.seed, r.outcome, r.detail, r.message) for r in results
           if r.outcome not in GOOD]
    assert not bad
    over = [(r.number, r.peak_bytes, r.bound) for r in results if r.peak_bytes > r.bound]
    assert not over
    assert any(r.outcome == "loaded" for r in results)
    assert facts["baseline"] > 0


def test_every_seed_loads_unmutated(seeds: dict[str, bytes]) -> None:
    cases = [(i, name, "none", blob) for i, (name, blob) in enumerate(seeds.items())]
    results, _ = run_cases(cases, {}, workers=1)
    assert [(r.seed, r.outcome) for r in results] == [(n, "loaded") for n in seeds]


def test_cases_are_reproducible(seeds: dict[str, bytes]) -> None:
    parsed = seed_list(seeds)
    assert make_case(parsed, 3, 41) == make_case(parsed, 3, 41)
    assert make_case(parsed, 3, 41) != make_case(parsed, 3, 42)


def test_planted_failures_are_classified(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SELF_TEST, "1")
    planted = {"crash": b"PLANT:crash", "hang": b"PLANT:hang", "other_error": b"PLANT:other",
               "project_error": b"not a packed file", "memory": b"PLANT:memory"}
    cases = [(i, "plant", kind, blob) for i, (kind, blob) in enumerate(planted.items())]
    results, _ = run_cases(cases, {}, workers=2, time_limit=3)
    got = {r.mutator: r for r in results}
    for kind in ("crash", "hang", "other_error", "project_error"):
        assert got[kind].outcome == kind
    assert got["crash"].detail == "SIGABRT"
    memory = got["memory"]  # 512 MiB touched by a 12-byte file: far over its bound
    assert memory.peak_bytes >= 500 << 20 and memory.peak_bytes > memory.bound
