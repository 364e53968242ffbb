"""Local fake HTTP servers (127.0.0.1 only) with injected latency and faults.

* ``MessagesServer`` -- ``GET /contacts/{id}/messages``, for the requests-based fetch adapter;
* ``OpenAIServer`` -- ``POST /v1/chat/completions``, for the openai-based analyze adapter.

From the shell: ``python -m simulators.servers messages|openai --port N [--latency JSON]
[--seed N] [--error-rate X] [--rate-limit PER_S]``.
"""

from ._base import FakeServer, ServerFaults
from ._messages import MessagesServer, messages_for
from ._openai import STAGES, OpenAIServer, classify

__all__ = [
    "STAGES",
    "FakeServer",
    "MessagesServer",
    "OpenAIServer",
    "ServerFaults",
    "classify",
    "messages_for",
]
