"""Simulators for Conveyor (DESIGN.md section 4): latency distributions, fault injection,
simulated services for the live and virtual clocks, and local fake HTTP servers
(``simulators.servers``)."""

from ._distributions import (
    Constant,
    Distribution,
    Empirical,
    Exponential,
    LogNormal,
    Mixture,
    Normal,
    Pareto,
    Uniform,
    as_distribution,
    parse_latency,
)
from ._faults import (
    Faults,
    OutageError,
    RateLimitError,
    ServiceTimeout,
    SimulatedFault,
    TransientError,
    parse_faults,
)
from ._provider import Provider, ProviderResult, Usage
from ._sampling import stable_hash
from ._service import SimulatedService

__all__ = [
    "Constant",
    "Distribution",
    "Empirical",
    "Exponential",
    "Faults",
    "LogNormal",
    "Mixture",
    "Normal",
    "OutageError",
    "Pareto",
    "Provider",
    "ProviderResult",
    "RateLimitError",
    "ServiceTimeout",
    "SimulatedFault",
    "SimulatedService",
    "TransientError",
    "Uniform",
    "Usage",
    "as_distribution",
    "parse_faults",
    "parse_latency",
    "stable_hash",
]
