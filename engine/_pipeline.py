"""Pipeline: the public entry point. Validates, builds a run, drives the scheduler's loop."""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

from ._cancel import CancelToken
from ._ledger import Ledger
from ._records import ItemResult, RunReport
from ._run import Clock, Options, Run
from ._stage import Stage
from ._strategies import Continuous, Strategy
from ._validate import check_bool, check_int, check_type

__all__ = ["Pipeline"]


class Pipeline:
    """A per-item pipeline: stages run in order for each item, under per-stage limits.

    ``key(item)`` names an item (default: its position); ``name`` names the pipeline. A run
    over a ledger (``ledger=``) needs both: its entries are keyed by (name, key, stage).
    """

    def __init__(self, stages: Sequence[Stage], *,
                 key: Callable[[Any], Hashable] | None = None,
                 name: str | None = None) -> None:
        if isinstance(stages, Stage) or not isinstance(stages, Sequence):
            raise TypeError(f"Pipeline.stages: expected a sequence of Stage, got {stages!r}")
        if not stages:
            raise ValueError("Pipeline.stages: expected at least one Stage, got an empty list")
        seen: set[str] = set()
        for i, st in enumerate(stages):
            if not isinstance(st, Stage):
                raise TypeError(f"Pipeline.stages[{i}]: expected a Stage, got {st!r}")
            if st.name in seen:
                raise ValueError(f"Pipeline.stages[{i}].name: duplicate stage name {st.name!r}")
            seen.add(st.name)
        if key is not None and not callable(key):
            raise TypeError(f"Pipeline.key: expected a callable or None, got {key!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"Pipeline.name: expected a non-empty string or None, got {name!r}")
        self.stages: tuple[Stage, ...] = tuple(stages)
        self.key = key
        self.name = name

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.name}({s.concurrency})" for s in self.stages)
        return f"Pipeline([{inner}])"

    def _prepare(self, items: Iterable[Any], strategy: Strategy | None,
                 options: Options) -> Run:
        if strategy is None:
            strategy = Continuous()
        if not isinstance(strategy, Strategy):
            raise TypeError(
                f"strategy: expected Continuous, Batched, ParallelBatches or another Strategy "
                f"(name, params, policy(sched)), got {strategy!r}")
        check_type("cancel", options.cancel, CancelToken, "a CancelToken", optional=True)
        if options.clock not in ("live", "virtual"):
            raise ValueError(f"clock: expected 'live' or 'virtual', got {options.clock!r}")
        if options.processes is not None:
            check_int("processes", options.processes)
            if options.clock == "virtual":
                raise ValueError("processes: the virtual clock runs no calls; drop processes")
            for st in self.stages:
                if st.is_async:
                    raise ValueError(f"processes: Stage {st.name!r} is async: its coroutines "
                                     "run on the run's event loop, not in worker processes")
            from ._procs import check_stages  # multiprocessing: only when asked for

            check_stages(self.stages)  # everything pickles, before any work
        check_bool("ordered", options.ordered)
        check_bool("retry_failed", options.retry_failed)
        check_type("ledger", options.ledger, Ledger, "an engine.Ledger (SqliteLedger, "
                   "engine.adapters.PostgresLedger)", optional=True)
        if options.ledger is not None and (self.key is None or self.name is None):
            missing = " and ".join(f for f, v in (("key", self.key), ("name", self.name))
                                   if v is None)
            raise ValueError(f"ledger: a run over a ledger needs Pipeline({missing}=...): its "
                             "entries are keyed by the pipeline's name and each item's key")
        if options.retry_failed and options.ledger is None:
            raise ValueError("retry_failed: replays the ledger's dead letters; give ledger=")
        try:
            iter(items)
        except TypeError:
            raise TypeError(f"items: expected an iterable, got {items!r}") from None
        return Run(self.stages, self.key, items, strategy, options)

    def stream(self, items: Iterable[Any], strategy: Strategy | None = None, *,
               cancel: CancelToken | None = None, clock: Clock = "live",
               processes: int | None = None, progress: Any = False, ordered: bool = False,
               ledger: Ledger | None = None, retry_failed: bool = False,
               observe: Sequence[Any] | None = None) -> Iterator[ItemResult]:
        """Yield each item's result the moment it is visible; ``items`` is consumed lazily.

        ``ordered=True`` yields them in input order instead, through a bounded reorder buffer
        (admission waits while it is full). See :meth:`run` for the other options.

        Closing the iterator early cancels the rest and joins every thread. After a Ctrl-C
        inside the engine, the running calls finish, then ``KeyboardInterrupt`` is raised with
        the results that became visible meanwhile as its ``results`` attribute.
        """
        run = self._prepare(items, strategy, Options(
            cancel, clock, processes, progress, ordered, ledger, retry_failed, self.name,
            observe))
        return self._stream(run)

    @staticmethod
    def _stream(run: Run) -> Iterator[ItemResult]:
        try:
            for batch in run.batches():
                yield from batch
        finally:
            run.close()
        run.raise_pending()
        if run.interrupted:
            interrupt = KeyboardInterrupt()
            interrupt.results = run.leftover  # type: ignore[attr-defined]
            raise interrupt

    def run(self, items: Iterable[Any], strategy: Strategy | None = None, *,
            on_result: Callable[[ItemResult], Any] | None = None,
            cancel: CancelToken | None = None, clock: Clock = "live",
            processes: int | None = None, progress: Any = False,
            ledger: Ledger | None = None, retry_failed: bool = False,
            observe: Sequence[Any] | None = None) -> RunReport:
        """Run to the end and return the complete report.

        ``processes=N`` runs every stage's calls in ``N`` worker processes (threads in each;
        the scheduler stays here, so limits and strategies are global). ``progress=True``
        draws a progress bar (tqdm) on stderr (a plain line now and then when stderr is not a
        terminal); ``progress=`` also takes a stream to draw on, ``"bar"``, ``"lines"``, a
        tqdm bar of yours or a callable (``engine._observe.observers``).
        ``observe=[engine.otel()]`` traces each item and call with OpenTelemetry.
        ``ledger=`` records checkpointed stages' outputs
        and how each item ended, and a later run over the same ledger restores them instead
        of calling again; ``retry_failed=True`` replays the ledger's failed items.

        ``on_result`` is called with each result as it becomes visible. If it raises (it is
        not called again), or the input iterator or the key function does, the run stops
        admitting, lets in-flight work settle, and re-raises that exception. On Ctrl-C the run
        is cancelled the same way, then KeyboardInterrupt is raised with the complete report as
        its ``report`` attribute.
        """
        if on_result is not None and not callable(on_result):
            raise TypeError(f"on_result: expected a callable or None, got {on_result!r}")
        run = self._prepare(items, strategy, Options(
            cancel, clock, processes, progress, False, ledger, retry_failed, self.name,
            observe))
        run.observed = on_result is not None or cancel is not None
        results: list[ItemResult] = []
        callback = on_result
        try:
            for batch in run.batches():
                results += batch
                if callback is not None:
                    for r in batch:
                        try:
                            callback(r)
                        except Exception as exc:
                            callback = None  # after the first raise, no more calls
                            run.sched.fail_run(exc)
                            break
                        except KeyboardInterrupt:  # Ctrl-C landed in the callback
                            run.interrupted = True
                            run.token.cancel("KeyboardInterrupt")
                            break
        finally:
            run.close()
        results += run.leftover
        results.sort(key=lambda r: r.index)
        wall = run.wall()
        report = RunReport(tuple(results), run.sched.stats(wall), run.strategy.name,
                           run.params, run.clock, wall, run.started_at, budgets=run.budgets())
        run.raise_pending()
        if run.interrupted:
            interrupt = KeyboardInterrupt()
            interrupt.report = report  # type: ignore[attr-defined]
            raise interrupt
        return report
