"""Conveyor's engine: continuous per-item pipelines under per-stage concurrency limits.

    from engine import Pipeline, Stage, Continuous, RetryPolicy

    pipeline = Pipeline([Stage("fetch", fetch, concurrency=50, retry=RetryPolicy(attempts=3)),
                         Stage("save", save, concurrency=10)])
    for result in pipeline.stream(contacts, strategy=Continuous()):
        ...
"""
from ._accel import COMPILED  # first (keep it so): picks the compiled hot path or the sources
from ._adaptive import Adaptive, is_overload
from ._budget import Budget, parse_duration
from ._cancel import CancelToken
from ._context import CallInfo, CurrentCall, Simulated, SupportsSimulate, current_call
from ._core import Admission, Policy
from ._errors import StageInitError, WorkerLost
from ._hedge import Hedge
from ._ledger import CodecError, JsonCodec, Ledger, LedgerBusy, LedgerError, SqliteLedger
from ._otel import otel
from ._pipeline import Pipeline
from ._progress import Progress, StageProgress
from ._ratelimit import RateLimit
from ._records import (
    Attempt,
    ErrorInfo,
    ItemResult,
    RunReport,
    StageSpan,
    StageStats,
)
from ._retry import RetryPolicy
from ._stage import Stage
from ._strategies import AUTO, Batched, Continuous, ParallelBatches, Strategy, strategy_from_name
from ._summary import percentile, summarize
from ._virtual import SimulationError

__all__ = [
    "AUTO",
    "COMPILED",
    "Adaptive",
    "Admission",
    "Attempt",
    "Batched",
    "Budget",
    "CallInfo",
    "CancelToken",
    "CodecError",
    "Continuous",
    "CurrentCall",
    "ErrorInfo",
    "Hedge",
    "ItemResult",
    "JsonCodec",
    "Ledger",
    "LedgerBusy",
    "LedgerError",
    "ParallelBatches",
    "Pipeline",
    "Policy",
    "Progress",
    "RateLimit",
    "RetryPolicy",
    "RunReport",
    "Simulated",
    "SimulationError",
    "SqliteLedger",
    "Stage",
    "StageInitError",
    "StageProgress",
    "StageSpan",
    "StageStats",
    "Strategy",
    "SupportsSimulate",
    "WorkerLost",
    "current_call",
    "is_overload",
    "otel",
    "parse_duration",
    "percentile",
    "strategy_from_name",
    "summarize",
]
