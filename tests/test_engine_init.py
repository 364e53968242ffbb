"""Per-worker state: init builds one resource per worker; it is closed when the run ends."""
from __future__ import annotations

import threading

import pytest

from engine import Pipeline, Stage

pytestmark = pytest.mark.timeout(20)


class Resource:
    made: list[Resource] = []

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.closed = False
        self.uses = 0
        Resource.made.append(self)

    def close(self) -> None:
        self.closed = True


def use(value, res: Resource):
    assert res.thread == threading.get_ident()  # each worker its own
    res.uses += 1
    return value


def test_one_resource_per_worker_closed_at_end() -> None:
    Resource.made = []
    report = Pipeline([Stage("s", use, concurrency=3, init=Resource)]).run(range(60))
    assert report.ok == 60
    assert 1 <= len(Resource.made) <= 3
    assert sum(r.uses for r in Resource.made) == 60
    assert all(r.closed for r in Resource.made)


def test_resource_closed_after_stream_closed_early() -> None:
    Resource.made = []
    gen = Pipeline([Stage("s", use, concurrency=2, init=Resource)]).stream(range(1000))
    next(gen)
    gen.close()
    assert Resource.made and all(r.closed for r in Resource.made)
