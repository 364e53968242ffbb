"""Bad configuration is rejected before any work starts, naming the field."""
from __future__ import annotations

import functools

import pytest

from engine import Batched, Continuous, ParallelBatches, Pipeline, RateLimit, RetryPolicy, Stage

pytestmark = pytest.mark.timeout(10)
INF = float("inf")
NAN = float("nan")


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
        # issue 10: non-finite, absurd or mistyped values are rejected at the door
        (lambda: RetryPolicy(backoff=INF), ValueError, "RetryPolicy.backoff"),
        (lambda: RetryPolicy(backoff=NAN), ValueError, "RetryPolicy.backoff"),
        (lambda: RetryPolicy(backoff="0.5"), TypeError, "RetryPolicy.backoff"),
        (lambda: RetryPolicy(max_backoff=INF), ValueError, "RetryPolicy.max_backoff"),
        (lambda: RetryPolicy(backoff=INF, max_backoff=INF), ValueError, "backoff"),
        (lambda: RetryPolicy(backoff=5, max_backoff=1), ValueError, "RetryPolicy.max_backoff"),
        (lambda: RetryPolicy(jitter="no"), TypeError, "RetryPolicy.jitter"),
        (lambda: RetryPolicy(jitter=1), TypeError, "RetryPolicy.jitter"),
        (lambda: RetryPolicy(attempts=0), ValueError, "RetryPolicy.attempts"),
        (lambda: RetryPolicy(attempts=True), TypeError, "RetryPolicy.attempts"),
        (lambda: RetryPolicy(retry_on=()), TypeError, "RetryPolicy.retry_on"),
        (lambda: RetryPolicy(retry_on=(int,)), TypeError, "RetryPolicy.retry_on"),
        (lambda: RateLimit(rate=INF), ValueError, "RateLimit.rate"),
        (lambda: RateLimit(rate=NAN), ValueError, "RateLimit.rate"),
        (lambda: RateLimit(rate=-1), ValueError, "RateLimit.rate"),
        (lambda: RateLimit(rate="2"), TypeError, "RateLimit.rate"),
        (lambda: RateLimit(rate=0), ValueError, "RateLimit.rate"),
        (lambda: RateLimit(rate=1, burst=0), ValueError, "RateLimit.burst"),
        (lambda: RateLimit(rate=1, burst=1.5), TypeError, "RateLimit.burst"),
        (lambda: RateLimit.per_minute(INF), ValueError, "per_minute"),
        (lambda: Continuous(name="x"), TypeError, "name"),
        (lambda: Continuous(max_in_flight=2.5), TypeError, "max_in_flight"),
        (lambda: Stage("s", ident, concurrency=True), TypeError, "Stage 's': concurrency"),
        (lambda: Stage("s", ident, concurrency=INF), TypeError, "Stage 's': concurrency"),
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


# -- async functions are rejected until async stages exist (issue 10) --------------------------
async def async_fn(x):
    return x


async def async_init():
    return object()


class AsyncCallable:
    async def __call__(self, x):
        return x


class AsyncCallableWithSimulate(AsyncCallable):
    def simulate(self, call, value, *, now):
        from engine import Simulated

        return Simulated(1.0, value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Stage("fetch", async_fn),
        lambda: Stage("fetch", AsyncCallable()),
        lambda: Stage("fetch", AsyncCallableWithSimulate()),
        lambda: Stage("fetch", functools.partial(async_fn)),
    ],
    ids=["async-def", "async-call", "async-call-simulate", "partial"],
)
def test_async_stage_functions_are_accepted(make) -> None:
    assert make().name == "fetch"  # run on the run's event-loop thread (test_engine_async.py)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Stage("fetch", ident, init=async_init),
        lambda: Stage("fetch", ident, concurrency=2, init=AsyncCallable()),
        lambda: Stage("fetch", async_fn, executor="process"),
    ],
    ids=["async-init-on-a-sync-stage", "async-init-callable", "async-on-a-process-pool"],
)
def test_async_where_it_cannot_run_is_rejected_naming_the_stage(make) -> None:
    with pytest.raises(ValueError, match=r"Stage 'fetch'.*async"):
        make()


def test_async_stage_with_processes_is_rejected_naming_the_stage() -> None:
    with pytest.raises(ValueError, match=r"processes: Stage 'fetch'.*async"):
        Pipeline([Stage("fetch", async_fn)]).run([1], processes=2)


def test_sync_callable_object_accepted() -> None:
    class Plain:
        def __call__(self, x):
            return x

    assert Pipeline([Stage("s", Plain())]).run([1]).ok == 1
