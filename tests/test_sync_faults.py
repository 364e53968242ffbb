"""The sync job under faults: PostgreSQL restarted mid-run, storms from the fake services.

Every run must complete with each contact ok or failed with its reason, the counts reconciling
with the input, and no row duplicated or lost for an ok contact.
"""
from __future__ import annotations

import io
import threading
import time
from typing import Any

import pytest
from sync_helpers import counts, query, services

from examples.contact_sync import Console, build_pipeline, run_sync
from simulators.servers import ServerFaults

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]


def sync(cfg: Any, n: int, **job_kw: Any) -> tuple[int, str]:
    out = io.StringIO()
    with build_pipeline(cfg, **job_kw) as job:
        from engine import Continuous

        code = run_sync(job, range(1, n + 1), strategy=Continuous(), resume=False,
                        console=Console(cfg.secrets, out, io.StringIO()), total=n)
    return code, out.getvalue()


def reconcile(dsn: str, n: int) -> tuple[int, int]:
    """ok/failed from the run's record; checks they add up and match the rows."""
    ((ok, failed, total),) = query(dsn, "SELECT ok, failed, total FROM sync_runs")
    assert ok + failed == total == n
    assert counts(dsn)["pipeline_assignments"] == (ok, ok)
    reasons = query(dsn, "SELECT stage, error_type, message FROM sync_failures")
    assert len(reasons) == failed
    assert all(stage and kind and msg for stage, kind, msg in reasons)
    return ok, failed


def test_postgres_restart_mid_run_loses_nothing(pg_cluster: Any, pg_dsn: str) -> None:
    from engine import Continuous

    n = 600
    result: dict[str, Any] = {}
    with services(pg_dsn, latency={"dist": "uniform", "low": 0.02, "high": 0.08}) as cfg, \
            build_pipeline(cfg) as job:
        t = threading.Thread(target=lambda: result.update(
            report=job.pipeline.run(range(1, n + 1), strategy=Continuous())))
        t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _assigned(pg_dsn) < 100:
            time.sleep(0.01)
        before = _assigned(pg_dsn)
        pg_cluster.restart()  # terminates every connection the job's pool holds
        t.join(120)
    assert not t.is_alive()
    assert before < n, "the run finished before the restart: make it longer"
    report = result["report"]
    assert (report.ok, report.failed) == (n, 0)
    db = {s.name: s for s in report.stages if s.name in ("save", "assign")}
    assert db["save"].errors + db["assign"].errors > 0  # the restart was felt...
    assert db["save"].retries + db["assign"].retries > 0  # ...and ridden out by retries
    assert counts(pg_dsn) == {t: (n, n) for t in ("contacts", "analyses",
                                                  "pipeline_assignments")}


def test_429_storm_on_half_the_calls_is_ridden_out(pg_dsn: str) -> None:
    storm = ServerFaults(throttle_rate=0.5, retry_after=0.05)
    with services(pg_dsn, faults=storm) as cfg:
        code, out = sync(cfg, 200, attempts=14, time_scale=0.05)  # backoff 25 ms, doubling
    # seeded draws: every contact gets through within 14 attempts on this seed
    assert code == 0, out
    assert reconcile(pg_dsn, 200) == (200, 0)


def test_mixed_fault_storm_every_contact_ends_with_a_reason(pg_dsn: str) -> None:
    faults = ServerFaults(error_rate=0.2, throttle_rate=0.1, malformed_rate=0.05,
                          slow_drip_rate=0.05, drop_rate=0.05, retry_after=0.05,
                          drip_seconds=3.0)
    with services(pg_dsn, faults=faults) as cfg:
        code, out = sync(cfg, 200, attempts=3, http_timeout=(1.0, 0.25), llm_timeout=0.5)
    ok, failed = reconcile(pg_dsn, 200)
    assert failed > 0 and ok > 100, out
    assert code == 1
    kinds = {k for (k,) in query(pg_dsn, "SELECT DISTINCT error_type FROM sync_failures")}
    assert "MalformedOutputError" in kinds  # the LLM's garbage fails at once, with its text
    msgs = [m for (m,) in query(pg_dsn, "SELECT message FROM sync_failures")]
    assert any("timed out" in m or "HTTP 5" in m or "connection" in m for m in msgs)


def _assigned(dsn: str) -> int:
    try:
        return int(query(dsn, "SELECT count(*) FROM pipeline_assignments")[0][0])
    except Exception:
        return 0
