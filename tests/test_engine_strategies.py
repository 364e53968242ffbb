"""The three strategies, on the thread and process backends: every item ends once, limits and
barriers hold, and the JSON passes the contract checker."""
from __future__ import annotations

import pytest

from engine import Pipeline
from engine_helpers import STRATEGIES, check_report, shared_check, stages_for

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("backend", ["thread", "process"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_item_once_under_limits(strategy: str, backend: str, tmp_path) -> None:
    stages = stages_for(backend)
    n = 23 if backend == "thread" else 11
    report = Pipeline(stages).run(range(n), STRATEGIES[strategy]())
    check_report(report, stages, n)
    assert report.failed == len([i for i in range(n) if (i * 2) % 5 == 0])
    assert report.ok + report.failed == n
    ok = [r for r in report.items if r.ok]
    assert all(r.value == r.index * 2 for r in ok)
    shared_check(report, tmp_path)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_stream_yields_every_result_once(strategy: str) -> None:
    stages = stages_for("thread", 2)
    seen = [r.index for r in Pipeline(stages).stream(range(17), STRATEGIES[strategy]())]
    assert sorted(seen) == list(range(17))


def test_continuous_is_visible_before_later_items_finish() -> None:
    """Continuous: a fast item is handed over while a slow earlier one is still running."""
    import time

    from engine import Continuous, Stage

    def work(x: int) -> int:
        time.sleep(0.3 if x == 0 else 0.001)
        return x

    order = [r.index for r in Pipeline([Stage("w", work, 4)]).stream(range(6), Continuous())]
    assert order[-1] == 0


def test_batched_items_visible_together() -> None:
    import time

    from engine import Batched, Stage

    def work(x: int) -> int:
        time.sleep(0.05 if x == 0 else 0.001)
        return x

    report = Pipeline([Stage("w", work, 4)]).run(range(8), Batched(size=4))
    first = {r.visible_at for r in report.items[:4]}
    second = {r.visible_at for r in report.items[4:]}
    assert len(first) == 1 and len(second) == 1
    assert min(second) > max(first)
    assert min(s.start for r in report.items[4:] for s in r.stages) >= max(first) - 0.01


def test_key_function() -> None:
    from engine import Stage

    report = Pipeline([Stage("s", str.upper, 2)], key=lambda v: f"id-{v}").run(["a", "b"])
    assert [(r.key, r.value) for r in report.items] == [("id-a", "A"), ("id-b", "B")]
