"""What flow control costs per call on the scheduler's hot path (figures, not asserts).

One stage, 20,000 calls on the virtual clock (so only the engine's own bookkeeping is
measured): a plain stage, then with a Budget (reserve an estimate, settle the actual cost),
an Adaptive limit, both, and a hedged stage (timers armed per call). The per-call difference
to the plain stage is the bookkeeping's cost (target: <= 2 us per call for budget + adaptive).
"""
from __future__ import annotations

import pytest

from engine import Adaptive, Budget, Continuous, Hedge, Pipeline, Simulated, Stage

N = 20_000


class Steady:
    """A service answering in 1 s (a tiny jitter), with the tokens it used."""

    def simulate(self, call, value, *, now):
        return Simulated(1.0 + (call.index % 7) * 1e-3, value, None, {"tokens": 100.0})

    def __call__(self, value):  # pragma: no cover - virtual only
        return value


def _budget() -> Budget:
    # generous: the bucket never makes a call wait, so only the bookkeeping is measured
    return Budget("acct", per_minute={"requests": 1e9, "tokens": 1e12})


def _cost(value: object) -> dict[str, float]:
    return {"tokens": 100.0}


VARIANTS = {
    "plain": lambda: Stage("s", Steady(), 50),
    "budget": lambda: Stage("s", Steady(), 50, budget=_budget(), cost=_cost),
    "adaptive": lambda: Stage("s", Steady(), Adaptive(50, min=1, max=50)),
    "budget+adaptive": lambda: Stage("s", Steady(), Adaptive(50, min=1, max=50),
                                     budget=_budget(), cost=_cost),
    "hedged": lambda: Stage("s", Steady(), 50, idempotent=True, hedge=Hedge(after=10.0)),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flow_control_cost_per_call(benchmark, variant: str) -> None:
    pipeline = Pipeline([VARIANTS[variant]()])
    benchmark.group = f"flow control bookkeeping, {N} calls, virtual clock"
    report = benchmark.pedantic(pipeline.run, args=(range(N), Continuous(max_in_flight=None)),
                                kwargs={"clock": "virtual"}, rounds=7, warmup_rounds=1)
    assert report.ok == N
    benchmark.extra_info["us_per_call"] = benchmark.stats.stats.min / N * 1e6
