"""The values that flow between the sync job's stages (frozen: safe to share between threads).

    Contact --fetch--> Fetched --analyze--> Analyzed --save--> Analyzed --assign--> Assignment
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

__all__ = ["PIPELINE_STAGES", "Analysis", "Analyzed", "Assignment", "Contact", "Fetched",
           "PipelineStage", "contact_id"]

PipelineStage = Literal["lead", "qualified", "proposal", "negotiation", "won", "lost"]
#: the sales-pipeline stages a contact can be assigned to, in order
PIPELINE_STAGES: tuple[str, ...] = get_args(PipelineStage)


@dataclass(frozen=True, slots=True)
class Contact:
    """A CRM contact. Only ``id`` is required; text fields are stored verbatim."""

    id: int
    name: str | None = None
    email: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Fetched:
    """A contact and its messages, as the messages API returned them (JSON objects)."""

    contact: Contact
    messages: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Analysis:
    """What the LLM concluded about a contact: a pipeline stage, a score in [0, 1], one line."""

    stage: PipelineStage
    score: float
    summary: str


@dataclass(frozen=True, slots=True)
class Analyzed:
    """A contact with its analysis (the messages are dropped: nothing large is kept)."""

    contact: Contact
    analysis: Analysis
    message_count: int
    model: str = ""


@dataclass(frozen=True, slots=True)
class Assignment:
    """The last stage's value: where a contact now sits in the sales pipeline."""

    contact_id: int
    stage: str
    score: float


def contact_id(item: Contact | int) -> int:
    """The id of a ``Contact`` or of a bare ``int`` id (bools are rejected)."""
    if isinstance(item, Contact):
        return item.id
    if isinstance(item, int) and not isinstance(item, bool):
        return item
    raise TypeError(f"expected a Contact or an int contact id, got {type(item).__name__}")
