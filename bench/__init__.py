"""Conveyor's benchmark harness: scenarios, runs, results files, reports and plots.

``python -m bench`` runs the default suite; ``python -m bench --help`` lists the sub-commands.
"""
from bench._scenario import (
    Scenario,
    ScenarioError,
    StageSpec,
    StrategySpec,
    builtin_names,
    load_scenario,
    parse_scenario,
    resolve_scenario,
)

__all__ = [
    "Scenario",
    "ScenarioError",
    "StageSpec",
    "StrategySpec",
    "builtin_names",
    "load_scenario",
    "parse_scenario",
    "resolve_scenario",
]
