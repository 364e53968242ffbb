"""Reading the input (issue 10): an exception from the input iterator or the key function --
StopIteration included -- is the run's error, never a silently shorter input; and a slow input
iterator never keeps finished calls from being moved on and handed over."""
from __future__ import annotations

import threading
import time

import pytest

from engine import Batched, Continuous, ParallelBatches, Pipeline, Simulated, Stage

pytestmark = pytest.mark.timeout(30)

STRATS = [Continuous(), Continuous(max_in_flight=3), Batched(size=3),
          ParallelBatches(lanes=2, size=2)]


class Echo:
    def __call__(self, x):
        time.sleep(0.001)
        return x

    def simulate(self, call, value, *, now):
        return Simulated(0.5, value)


def key_stops_at_5(v):
    if v == 5:
        raise StopIteration  # e.g. next() on an exhausted iterator inside the key function
    return f"k{v}"


def key_fails_at_5(v):
    if v == 5:
        raise LookupError("no id field")
    return f"k{v}"


def _source(kind: str, n: int = 10):
    if kind == "list":
        return list(range(n))
    if kind == "generator":
        return (i for i in range(n))
    return iter(range(n))  # an iterator that is not a Sequence


SOURCES = ["list", "generator", "iterator"]
CLOCKS = ["live", "virtual"]


@pytest.mark.timeout(20, method="thread")
@pytest.mark.parametrize("clock", CLOCKS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("strategy", STRATS, ids=lambda s: f"{s.name}-{s.params}")
def test_key_raising_stop_iteration_is_the_runs_error(request, strategy, source, clock) -> None:
    """Not 5 of 10 items and no error: a RuntimeError chained to the StopIteration."""
    p = Pipeline([Stage("s", Echo(), 2)], key=key_stops_at_5)
    with pytest.raises(RuntimeError, match="StopIteration") as info:
        p.run(_source(source), strategy, clock=clock)
    assert isinstance(info.value.__cause__, StopIteration)


@pytest.mark.timeout(20, method="thread")
@pytest.mark.parametrize("clock", CLOCKS)
@pytest.mark.parametrize("source", SOURCES)
def test_key_raising_stop_iteration_in_stream(source, clock) -> None:
    p = Pipeline([Stage("s", Echo(), 2)], key=key_stops_at_5)
    got = []
    with pytest.raises(RuntimeError) as info:
        for r in p.stream(_source(source), clock=clock):
            got.append(r)
    assert isinstance(info.value.__cause__, StopIteration)
    assert {r.index for r in got} <= set(range(5))


@pytest.mark.timeout(20, method="thread")
@pytest.mark.parametrize("clock", CLOCKS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("strategy", STRATS, ids=lambda s: f"{s.name}-{s.params}")
def test_key_raising_anything_is_the_runs_error(request, strategy, source, clock) -> None:
    with pytest.raises(LookupError, match="no id field"):
        Pipeline([Stage("s", Echo(), 2)], key=key_fails_at_5).run(
            _source(source), strategy, clock=clock)


class BrokenIterator:
    """An input iterator that raises after ``n`` items (a paginated API's 500)."""

    def __init__(self, n: int, exc: BaseException) -> None:
        self.i, self.n, self.exc = 0, n, exc

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == self.n:
            raise self.exc
        self.i += 1
        return self.i - 1


@pytest.mark.timeout(20, method="thread")
@pytest.mark.parametrize("clock", CLOCKS)
@pytest.mark.parametrize("strategy", STRATS, ids=lambda s: f"{s.name}-{s.params}")
def test_input_iterator_raising_is_the_runs_error(request, strategy, clock) -> None:
    exc = ConnectionResetError("page 3 failed")
    with pytest.raises(ConnectionResetError) as info:
        Pipeline([Stage("s", Echo(), 2)]).run(BrokenIterator(7, exc), strategy, clock=clock)
    assert info.value is exc


def failing_pages(n: int, fail_at: int):
    for i in range(n):
        if i == fail_at:
            raise ConnectionResetError(f"page {i // 10} failed")
        yield i


def key_stops_at_150(v):
    if v == 150:
        raise StopIteration
    return v


@pytest.mark.timeout(20, method="thread")
@pytest.mark.parametrize("failure", ["input", "key"])
@pytest.mark.parametrize("strategy", [Continuous(), Continuous(max_in_flight=None),
                                      Batched(size=50), ParallelBatches(lanes=3, size=20)],
                         ids=lambda s: f"{s.name}-{s.params}")
@pytest.mark.parametrize("clock", CLOCKS)
def test_long_input_failing_half_way_is_the_runs_error(request, clock, strategy,
                                                      failure) -> None:
    """The issue's case at the default window: 300 items, the input or key fails at 150.
    The run must raise, never return a report of 150 items as if the input had ended."""
    items = failing_pages(300, 150) if failure == "input" else iter(range(300))
    p = Pipeline([Stage("s", Echo(), 4)], key=key_stops_at_150 if failure == "key" else None)
    expected = ConnectionResetError if failure == "input" else RuntimeError
    with pytest.raises(expected):
        report = p.run(items, strategy, clock=clock)
        print(f"no error: {len(report.items)} items")  # what the bug returns


@pytest.mark.timeout(20, method="thread")
@pytest.mark.parametrize("clock", CLOCKS)
def test_input_generator_raising_stop_iteration_is_an_error(clock) -> None:
    """A generator that lets a StopIteration escape (PEP 479 makes it a RuntimeError)."""
    def pages():
        yield 1
        yield 2
        next(iter(()))  # the bug: raises StopIteration inside the generator

    with pytest.raises(RuntimeError, match="StopIteration"):
        Pipeline([Stage("s", Echo(), 2)]).run(pages(), clock=clock)


@pytest.mark.timeout(20, method="thread")
@pytest.mark.parametrize("clock", CLOCKS)
def test_input_iterator_raising_in_stream_after_results(clock) -> None:
    got = []
    with pytest.raises(ConnectionResetError):
        for r in Pipeline([Stage("s", Echo(), 2)]).stream(
                BrokenIterator(4, ConnectionResetError("x")), clock=clock):
            got.append(r)
    assert sorted(r.index for r in got) == [0, 1, 2, 3]  # what was read is still handed over


@pytest.mark.timeout(20, method="thread")
def test_input_error_leaves_no_thread() -> None:
    before = threading.active_count()
    with pytest.raises(ConnectionResetError):
        Pipeline([Stage("s", Echo(), 4)], key=key_fails_at_5).run(
            BrokenIterator(3, ConnectionResetError("x")))
    with pytest.raises(LookupError):
        Pipeline([Stage("s", Echo(), 4)], key=key_fails_at_5).run(iter(range(10)))
    assert threading.active_count() == before


# -- a slow input iterator (a paginated API) ----------------------------------------------------
def paginated(n: int, page: int, pause: float, read_at: dict[int, float]):
    """``n`` items in pages of ``page``, each page taking ``pause`` seconds to fetch."""
    for i in range(n):
        if i % page == 0:
            time.sleep(pause)
        read_at[i] = time.perf_counter()
        yield i


@pytest.mark.timeout(30, method="thread")
@pytest.mark.parametrize("stages", [1, 3])
def test_slow_input_never_stalls_handing_results_over(stages: int) -> None:
    """Pages of 10 items taking 0.3 s each, calls of ~10 ms: a result is handed over ~10 ms
    per stage after its item was read, not when the next page arrives (the old design: the
    dispatcher blocked in next(), so results waited for the page, ~0.75 s on average in the
    issue's example)."""
    read_at: dict[int, float] = {}
    lag = []

    def work(x):
        time.sleep(0.01)
        return x

    p = Pipeline([Stage(f"s{k}", work, 4) for k in range(stages)])
    for r in p.stream(paginated(60, 10, 0.3, read_at)):
        lag.append(time.perf_counter() - read_at[r.index])
        assert r.ok
    assert len(lag) == 60
    mean = sum(lag) / len(lag)
    # ~0.03 s per stage expected (10 items per page on 4 slots); the old design's items waited
    # for the next page: ~0.3 s
    assert mean < 0.1 * stages + 0.05, (mean, sorted(lag)[-5:])
    assert sorted(lag)[len(lag) // 2] < 0.15 * stages  # the median too


@pytest.mark.timeout(30, method="thread")
def test_slow_input_stays_lazy_and_bounded() -> None:
    """Read off the dispatcher, but still lazily: a bounded read-ahead, not the whole input."""
    read_at: dict[int, float] = {}

    def work(x):
        time.sleep(0.005)
        return x

    gen = Pipeline([Stage("s", work, 2)]).stream(paginated(10**9, 50, 0.01, read_at),
                                                 Continuous(max_in_flight=5))
    for seen, _ in enumerate(gen, start=1):
        if seen == 50:
            break
    gen.close()
    assert len(read_at) <= 50 + 3 * 5 + 50  # handed over + window + read-ahead (+ a page)
