"""Bad configuration is rejected before any work starts, naming the field."""
from __future__ import annotations

import pytest

from engine import Batched, Continuous, ParallelBatches, Pipeline, RateLimit, RetryPolicy, Stage

pytestmark = pytest.mark.timeout(10)


def ident(x):
    return x


@pytest.mark.parametrize(
    ("make", "exc", "words"),
    [
        (lambda: Stage("s", ident, concurrency=0), ValueError, "concurrency"),
        (lambda: Stage("s", ident, concurrency=-3), ValueError, "concurrency"),
        (lambda: Stage("s", ident, concurrency=2.5), TypeError, "concurrency"),
        (lambda: Stage("s", ident, concurrency=True), TypeError, "concurrency"),
        (lambda: Stage("s", "not callable"), TypeError, "fn"),
        (lambda: Stage("", ident), TypeError, "name"),
        (lambda: Stage("s", ident, retry=3), TypeError, "retry"),
        (lambda: Stage("s", ident, rate_limit=5), TypeError, "rate_limit"),
        (lambda: Stage("s", ident, executor="gpu"), TypeError, "executor"),
        (lambda: Stage("s", ident, init=5), TypeError, "init"),
        (lambda: Stage("s", ident, executor="process", init=dict), ValueError, "init"),
        (lambda: Batched(size=0), ValueError, "size"),
        (lambda: Batched(size="50"), TypeError, "size"),
        (lambda: ParallelBatches(lanes=0), ValueError, "lanes"),
        (lambda: ParallelBatches(size=0), ValueError, "size"),
        (lambda: ParallelBatches(lockstep="yes"), TypeError, "lockstep"),
        (lambda: Continuous(max_in_flight=0), ValueError, "max_in_flight"),
        (lambda: RetryPolicy(attempts=0), ValueError, "attempts"),
        (lambda: RetryPolicy(attempts=1.5), TypeError, "attempts"),
        (lambda: RetryPolicy(backoff=-1), ValueError, "backoff"),
        (lambda: RetryPolicy(max_backoff=-0.1), ValueError, "max_backoff"),
        (lambda: RetryPolicy(retry_on=("x",)), TypeError, "retry_on"),
        (lambda: RateLimit(rate=0), ValueError, "rate"),
        (lambda: RateLimit(rate=1, burst=0), ValueError, "burst"),
        (lambda: Pipeline([]), ValueError, "stages"),
        (lambda: Pipeline([ident]), TypeError, "stages[0]"),
        (lambda: Pipeline([Stage("a", ident), Stage("a", ident)]), ValueError, "duplicate"),
        (lambda: Pipeline([Stage("a", ident)], key=5), TypeError, "key"),
    ],
)
def test_bad_configuration_names_the_field(make, exc, words) -> None:
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        make()


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"strategy": "continuous"}, TypeError, "strategy"),
        ({"cancel": object()}, TypeError, "cancel"),
        ({"clock": "sundial"}, ValueError, "clock"),
        ({"on_result": 3}, TypeError, "on_result"),
    ],
)
def test_bad_run_arguments_rejected_before_work(kwargs, exc, words) -> None:
    calls = []
    p = Pipeline([Stage("s", calls.append)])
    with pytest.raises(exc, match=words):
        p.run(range(3), **kwargs)
    assert calls == []


def test_bad_items_rejected() -> None:
    with pytest.raises(TypeError, match="items"):
        Pipeline([Stage("s", ident)]).run(5)


def test_virtual_clock_needs_simulate() -> None:
    with pytest.raises(TypeError, match="simulate"):
        Pipeline([Stage("s", ident)]).run(range(3), clock="virtual")
