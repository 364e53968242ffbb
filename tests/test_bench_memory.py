"""The memory estimate that lets ``python -m bench`` refuse a scenario too large for the machine
(``items = 10000000000``) before anything runs: its constants cover a measured run."""
from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import pytest

from bench._build import run_once
from bench._memory import estimate_bytes, fits_message, machine_memory
from bench._metrics import validate
from bench._results import read_doc, run_data, write_doc
from bench._scenario import ScenarioError, builtin_path, load_scenario, parse_scenario


def _peak_bytes(sc_raw: dict, strategy: str, tmp_path: Path) -> int:
    """tracemalloc's peak of one virtual run written to a file, and of reading it back."""
    sc = parse_scenario(sc_raw, source="measured")
    gc.collect()
    tracemalloc.start()
    try:
        doc = run_once(sc, strategy, clock="virtual")
        path = tmp_path / f"{strategy}-{len(sc.stages)}.json"
        write_doc(doc, path)
        run_peak = tracemalloc.get_traced_memory()[1]
        del doc
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        doc = read_doc(path)
        run_data(doc, path)
        validate(doc)
        read_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return max(run_peak, read_peak)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n_stages", [1, 4])
def test_estimate_covers_a_measured_run(tmp_path: Path, n_stages: int) -> None:
    seed = load_scenario(builtin_path("seed"))
    stages = list(seed.raw["stages"])[:n_stages]

    def raw(items: int, strategy: str) -> dict:
        return dict(seed.raw, items=items, stages=stages,
                    strategies={strategy: seed.raw["strategies"][strategy]})

    small, large = 600, 2400
    for strategy in ("continuous", "batched"):
        _peak_bytes(raw(100, strategy), strategy, tmp_path)  # warm: imports, caches
        p_small = _peak_bytes(raw(small, strategy), strategy, tmp_path)
        p_large = _peak_bytes(raw(large, strategy), strategy, tmp_path)
        sc = parse_scenario(raw(large, strategy), source="measured")
        per_item = estimate_bytes(large, sc.stages) / large
        measured = (p_large - p_small) / (large - small)  # what each further item costs
        assert measured <= per_item, (strategy, measured, per_item)
        assert p_large <= estimate_bytes(large, sc.stages), (strategy, p_large)
        assert per_item <= 3 * measured, (strategy, measured, per_item)  # sound, not a guess


@pytest.mark.timeout(30)
def test_fits_message_names_the_limit() -> None:
    sc = load_scenario(builtin_path("seed"))
    assert fits_message(sc.items, sc.stages, memory=8 * 2**30) is None
    msg = fits_message(10_000_000_000, sc.stages, memory=8 * 2**30)
    assert msg is not None and "\n" not in msg
    assert msg.startswith("expected at most ") and "10,000,000,000 items need" in msg
    most = int(msg.split()[3].replace(",", ""))
    assert estimate_bytes(most, sc.stages) <= 8 * 2**30 < estimate_bytes(most + 1, sc.stages)
    mem = machine_memory()
    assert mem is None or mem > 0


@pytest.mark.timeout(30)
def test_a_scenario_too_large_for_the_machine_is_a_scenario_error() -> None:
    raw = dict(load_scenario(builtin_path("seed")).raw, items=10_000_000_000)
    with pytest.raises(ScenarioError) as info:
        parse_scenario(raw, source="huge.toml")
    assert info.value.field == "items"
    assert str(info.value).startswith("huge.toml: items: expected at most ")
