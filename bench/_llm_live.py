"""A provider stage, live, through the real client: ``LLMAnalyze`` (the openai client) against
the fake OpenAI server (``simulators.servers.OpenAIServer``) with the provider's capacity and
per-minute limits, answering 429 + ``Retry-After`` + ``x-ratelimit-*`` headers
(DESIGN.md section 9, issue 12). Chosen per stage by ``provider.client = "openai"``; virtual
runs of the same scenario are the ``simulators.Provider`` they are predicted with.

What keeps the live run comparable with its virtual prediction:

* **Tokens.** The server charges a request the ``usage.total_tokens`` it answers: the prompt's
  characters / 4 + the answer's. Each item's contact gets one message of filler text sized so
  that this total is the Provider's ``usage_of(index).total_tokens`` for the item (to within a
  token or two), so the live run spends the tokens the virtual one does and the budget bound
  is the same.
* **Time.** The server runs in scenario time: it sleeps latency x ``time_scale`` and counts its
  per-minute buckets in scenario minutes (``(t - epoch) / time_scale``), so in real time it
  allows ``per_minute / time_scale`` a minute -- a run at time_scale 0.2 sees 5 times the
  account's rate per real minute, as it sees every latency 5 times shorter. Its
  ``Retry-After`` and ``x-ratelimit-reset-*`` are real durations (scenario x time_scale), which
  is what the client's engine clock runs on; the client ``Budget`` gets ``per_minute /
  time_scale`` per real minute (``bench._build._budget``), retry backoff x ``time_scale``.
* **Latency.** The server draws a request's latency per (request key, n-th request for it):
  the key is a hash of the prompt, not the item index, so an item's live latency is a draw
  from the same distribution as its virtual one, not the same draw. With 3,220 items a
  budget-bound run does not care (the spread is the comparison's noise).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from engine import Budget
from engine.adapters import LLMAnalyze
from engine.adapters._records import Contact, Fetched
from simulators import Provider
from simulators.servers import OpenAIServer

__all__ = ["ServerBackedLLM", "start_server"]

MODEL = "gpt-4o-mini"
API_KEY = "sk-conveyor-bench"  # the fake server accepts any key
_FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit "


def start_server(provider: Provider, *, seed: int, time_scale: float) -> OpenAIServer:
    """The fake OpenAI server standing in for ``provider``: its latency, capacity and limits."""
    return OpenAIServer(latency=provider.latency, seed=seed, time_scale=time_scale,
                        capacity=provider.capacity, per_minute=dict(provider.per_minute or {}),
                        name=provider.name).start()


class ServerBackedLLM:
    """The analyze stage callable: item index -> ``LLMAnalyze(Fetched)`` over HTTP.

    ``cost`` is the value's ``llm.estimate`` (the adapter's ~4 characters a token, + the
    most the model may answer), settled by the engine with the usage the adapter charges."""

    def __init__(self, provider: Provider, server: OpenAIServer, *, concurrency: int,
                 budget: Budget | None, timeout: float) -> None:
        self.provider = provider
        self.server = server
        self.llm = LLMAnalyze(base_url=f"{server.url}/v1", api_key=API_KEY, model=MODEL,
                              timeout=timeout, concurrency=concurrency,
                              max_input_chars=1_000_000, budget=budget)
        self._cache: dict[int, Fetched] = {}

    def fetched(self, index: int) -> Fetched:
        """Item ``index``'s contact with one message sized to the provider's tokens for it."""
        got = self._cache.get(index)
        if got is not None:
            return got
        want = self.provider.usage_of(index).total_tokens
        contact = Contact(id=index, name=f"Contact {index}", email=f"c{index}@example.com")
        base = Fetched(contact, ({"text": ""},))
        # the server counts sum(len(message contents)) // 4 + 1 for the prompt and
        # len(answer) // 4 + 1 for the answer (about 30 tokens): fill the rest
        overhead = len(self.llm.prompt(base)) + len(_system_prompt())
        answer = _ANSWER_TOKENS
        chars = max(0, 4 * (want - answer - 1) - overhead)
        text = (_FILLER * (chars // len(_FILLER) + 1))[:chars]
        got = Fetched(contact, ({"text": text},))
        self._cache[index] = got
        return got

    def __call__(self, value: Any) -> Any:
        return self.llm(self.fetched(_index(value)))

    def cost(self) -> Callable[[Any], dict[str, float]]:
        def cost(value: Any) -> dict[str, float]:
            return {"tokens": float(self.llm.estimate(self.fetched(_index(value)))["tokens"])}
        return cost

    def start(self) -> None:
        """A fresh run: the server forgets its counts and refills its buckets (its clock
        starts at the first request)."""
        self.server.reset()

    def close(self) -> None:
        self.llm.close()
        self.server.stop()


#: the answer's tokens as the server counts them (len(content) // 4 + 1): a short JSON object
_ANSWER_TOKENS = len(json.dumps({"stage": "negotiation", "score": 0.751, "summary": "x" * 60})) \
    // 4 + 1


def _system_prompt() -> str:
    from engine.adapters.llm import SYSTEM_PROMPT
    return SYSTEM_PROMPT


def _index(value: Any) -> int:
    """The item index a value stands for: the bench's items are their indices, carried
    unchanged by the simulated stages before this one."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(f"expected an item index, got {value!r}")
