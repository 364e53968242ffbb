"""Lazy input: items are pulled only as capacity frees up; memory stays bounded."""
from __future__ import annotations

import itertools
import time

import pytest

from engine import Batched, Continuous, ParallelBatches, Pipeline, Stage

pytestmark = pytest.mark.timeout(30)


def counting(n: int | None, pulled: list[int]):
    it = range(n) if n is not None else itertools.count()
    for i in it:
        pulled.append(i)
        yield i


@pytest.mark.parametrize(
    ("strategy", "bound"),
    [(Continuous(max_in_flight=5), 5), (Batched(size=4), 4),
     (ParallelBatches(lanes=2, size=3), 6)],
    ids=["continuous", "batched", "parallel-batches"],
)
def test_admission_is_lazy(strategy, bound) -> None:
    pulled: list[int] = []
    gen = Pipeline([Stage("s", lambda x: time.sleep(0.002) or x, 2)]).stream(
        counting(None, pulled), strategy)
    for seen, _ in enumerate(gen, start=1):
        # pulled but not handed over: at most `bound` unfinished items, at most `bound`
        # finished ones waiting for the consumer (one step's worth) and the feeder's read-ahead
        # of one window (`bound`), so a slow input never stalls admission
        assert len(pulled) - seen <= 3 * bound
        if seen == 40:
            break
    gen.close()
    assert len(pulled) <= 40 + 3 * bound


def test_unbounded_continuous_admits_everything_at_once() -> None:
    pulled: list[int] = []
    gen = Pipeline([Stage("s", lambda x: time.sleep(0.001) or x, 2)]).stream(
        counting(200, pulled), Continuous(max_in_flight=None))
    next(gen)
    assert len(pulled) == 200
    gen.close()


def test_auto_window_reported() -> None:
    report = Pipeline([Stage("a", str, 10), Stage("b", str, 20)]).run(range(5))
    assert report.params == {"max_in_flight": 120}
    assert Pipeline([Stage("a", str)]).run([1]).params == {"max_in_flight": 64}


def test_generator_of_many_items_streams() -> None:
    n = 0
    for _ in Pipeline([Stage("a", str, 2), Stage("b", len, 2)]).stream(range(20_000)):
        n += 1
    assert n == 20_000
