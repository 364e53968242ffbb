"""Which simulators code runs: ``_virtual`` compiled by mypyc (setup.py) or its source, chosen
as for the engine (``engine/_accel.py``: ``CONVEYOR_PURE=1``, or a build older than its source,
gives the source)."""
from __future__ import annotations

from pathlib import Path

from engine._accel import use_compiled

HOT = ("_virtual",)

COMPILED: bool = use_compiled(__name__.rpartition(".")[0], Path(__file__).parent, HOT)
"""True when the compiled per-call path of ``SimulatedService.simulate`` is in use."""
