"""A fake CRM messages API: ``GET /contacts/{id}/messages`` -> a JSON list of messages.

The messages of a contact depend only on (seed, contact id): a few (2..6) messages, alternating
in and out, whose wording hints at where the contact stands in the sales pipeline, so the fake
OpenAI server downstream has something to classify.
"""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from ._base import FakeServer, Response

__all__ = ["MessagesServer", "messages_for"]

_PATH = re.compile(r"^/contacts/([A-Za-z0-9_.\-]{1,64})/messages/?$")

_INBOUND: dict[str, tuple[str, ...]] = {
    "lead": (
        "Hi, I found you online. What do you do exactly?",
        "Can you send me some general information?",
    ),
    "qualified": (
        "We have budget approved for this quarter; can we book a demo?",
        "Our team of 40 needs this; who should I talk to about a demo?",
    ),
    "proposal": (
        "Thanks for the demo. Could you send a proposal with pricing?",
        "Please share a quote for the annual plan.",
    ),
    "negotiation": (
        "The proposal looks good but we need a discount on the contract terms.",
        "Legal has comments on the contract; can we negotiate the payment terms?",
    ),
    "won": (
        "We signed the contract this morning, looking forward to onboarding!",
        "Signed and returned. When can we start?",
    ),
    "lost": (
        "We decided to go with another vendor, not interested anymore.",
        "Please unsubscribe me, we are not interested.",
    ),
}
_OUTBOUND = (
    "Thanks for reaching out! Happy to help.",
    "Following up on my last message: does Thursday work for a call?",
    "Attached is the information you asked for.",
    "Let me know if you have any questions.",
)
_STAGES = tuple(_INBOUND)
_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


def messages_for(contact_id: str, seed: int = 0) -> list[dict[str, Any]]:
    """The messages the server returns for ``contact_id`` (deterministic per id and seed)."""
    rng = random.Random(f"{seed}:{contact_id}")
    stage = rng.choice(_STAGES)
    count = rng.randint(2, 6)
    when = _EPOCH + timedelta(days=rng.randint(0, 300), seconds=rng.randint(0, 86_399))
    out: list[dict[str, Any]] = []
    for i in range(count):
        inbound = i % 2 == 0
        # the last inbound message carries the stage's signal; earlier ones are lead chatter
        last_inbound = inbound and i >= count - 2
        if inbound:
            body = rng.choice(_INBOUND[stage] if last_inbound else _INBOUND["lead"])
        else:
            body = rng.choice(_OUTBOUND)
        out.append(
            {
                "id": f"{contact_id}-{i + 1}",
                "contact_id": contact_id,
                "direction": "inbound" if inbound else "outbound",
                "sent_at": when.isoformat().replace("+00:00", "Z"),
                "body": body,
            }
        )
        when += timedelta(hours=rng.randint(1, 72), minutes=rng.randint(0, 59))
    return out


class MessagesServer(FakeServer):
    """``GET /contacts/{id}/messages`` with injected latency and faults (see ``FakeServer``).

    Also ``GET /health`` -> ``{"ok": true}`` (no latency, no faults).
    """

    default_name = "messages"

    def route(self, method: str, path: str, body: bytes) -> tuple[str, Any] | Response:
        path = path.split("?", 1)[0]
        if path == "/health":
            return Response(200, {"ok": True})
        match = _PATH.match(path)
        if match is None:
            return Response(404, self.error_body(404, f"no route for {path}", "not_found"))
        if method != "GET":
            return Response(
                405,
                self.error_body(405, f"{method} not allowed", "method_not_allowed"),
                {"Allow": "GET"},
            )
        contact_id = match.group(1)
        return contact_id, contact_id

    def answer(self, key: str, request: Any) -> Response:
        return Response(200, messages_for(key, self.seed))
