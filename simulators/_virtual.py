"""``SimulatedService.simulate``'s per-call path: what the virtual clock calls for every call.

A dict read and two list reads per call; everything else (building a block, time-dependent
faults, building an error) goes back to the service. Compiled by mypyc with the engine's hot
path when the package is built with a C compiler (see setup.py); ``simulators.COMPILED`` says
whether it is.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from engine._context import CallInfo, Simulated

from ._sampling import BLOCK_MASK, BLOCK_SHIFT

if TYPE_CHECKING:
    from ._service import SimulatedService

__all__ = ["VirtualCalls"]

_SHIFT: Final = BLOCK_SHIFT  # Final aliases: constants in compiled code
_MASK: Final = BLOCK_MASK
_new: Final = tuple.__new__  # skips the NamedTuple's Python-level __new__


class VirtualCalls:
    """The per-call path of one service (its block cache, read directly)."""

    def __init__(self, service: SimulatedService) -> None:
        self.service = service
        # values read as Any: compiled code then passes the stored floats on, unconverted
        self.blocks: dict[tuple[int, int], Any] = service._blocks
        self.timed: bool = service._time_dependent

    def simulate(self, call: CallInfo, value: Any, *, now: float | None = None) -> Simulated:
        """``SimulatedService.simulate`` (documented there): each service binds it as that."""
        index: int = call[0]
        attempt: Any = call[4]
        blk: Any = self.blocks.get((attempt, index >> _SHIFT))
        if blk is None:
            blk = self.service._block(index, attempt)
        if self.timed and now is not None:
            refused = self.service._refused(now)
            if refused is not None:
                return Simulated(0.0, None, refused)
        off = index & _MASK
        code: Any = blk[1][off]
        if code:
            return Simulated(blk[0][off], None, self.service._error(code, index, attempt))
        result: Simulated = _new(Simulated, (blk[0][off], value, None))
        return result
