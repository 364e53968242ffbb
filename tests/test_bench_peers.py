"""``peers`` runs the same workload through every peer, each in its own process, and writes
peers.json / peers.csv / peers.md / peers.png from what it saved."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_bench_synthetic import small_scenario

from bench._peers import PEERS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_peers_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "peers"
    res = subprocess.run([sys.executable, "-m", "bench", "peers", "--scenario",
                          str(small_scenario(tmp_path)), "--items", "60", "--time-scale",
                          "0.005", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=220, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "peers run without them" in res.stdout   # the small scenario has a rate limit
    doc = json.loads((out / "peers.json").read_text())
    assert [r["peer"] for r in doc["peers"]] == list(PEERS)
    for rec in doc["peers"]:
        assert len(rec["visible"]) == 60 and all(v is not None for v in rec["visible"])
    with (out / "peers.csv").open() as fh:
        rows = {r["peer"]: r for r in csv.DictReader(fh)}
    # the same items fail for every peer: same latencies, errors and attempts
    assert len({(r["ok"], r["failed"]) for r in rows.values()}) == 1
    # barriers cost time whoever implements them
    assert float(rows["ThreadPoolExecutor batches"]["makespan_s"]) > \
        float(rows["stagepipe"]["makespan_s"])
    assert (out / "peers.png").stat().st_size > 10_000 and (out / "peers.md").exists()
