"""Analyze stage over the ``openai`` client: classify a contact from its messages.

One ``OpenAI`` client is built in ``__init__`` and shared by every worker thread (its HTTP
client is thread-safe and pools connections; its pool is sized to ``concurrency`` so every
worker keeps its connection alive between calls). Nothing is constructed per call.

The client's own retries are off (``max_retries=0``): the engine's ``RetryPolicy`` is the only
retry loop, so attempts, backoff and ``Retry-After`` are counted and reported in one place.

The model is asked for JSON that fits ``ANALYSIS_SCHEMA`` (``response_format`` with a strict
JSON schema) and its answer is parsed into a frozen ``Analysis``. Errors (see ``_errors``):

* 429 -> ``TransientError`` with ``retry_after`` from ``retry-after-ms`` / ``Retry-After``;
  408, 409, 5xx, timeouts and connection failures -> ``TransientError``;
* other 4xx -> ``PermanentError``;
* output that is not JSON, or JSON that breaks the schema -> ``MalformedOutputError`` (a
  ``PermanentError``) whose message holds the raw text, truncated.

The API key is never put in an error message: text coming back from the server is scrubbed of it.

Budgets (DESIGN §9). The request goes through the client's raw-response API
(``chat.completions.with_raw_response.create``, then ``.parse()``: the same HTTP client, no
second one), so every response -- 200s and errors -- shows its ``x-ratelimit-remaining-*`` and
``x-ratelimit-reset-*`` headers; with ``budget=`` they resync it (``Budget.update``). Inside an
engine call the completion's ``usage.total_tokens`` is charged (``current_call().charge``), so
the stage's budget settles with what the provider counted; ``estimate`` is the cost to reserve
before the call. A 429's ``retry_after`` lets the engine pause the stage's budget.

``AsyncLLMAnalyze`` (``engine.adapters._async``) is the same stage over ``openai.AsyncOpenAI``.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any, cast

import openai

from .._budget import Budget
from .._context import current_call
from ._errors import PermanentError, TransientError, retry_after_from, truncate
from ._records import PIPELINE_STAGES, Analysis, Analyzed, Fetched, PipelineStage

__all__ = ["ANALYSIS_SCHEMA", "DEFAULT_OUTPUT_ESTIMATE", "LLMAnalyze", "MalformedOutputError",
           "parse_analysis"]

#: the answer's tokens counted by ``estimate`` (and sent as ``max_completion_tokens``) by
#: default: an ``Analysis`` is a short JSON object, well under this
DEFAULT_OUTPUT_ESTIMATE = 256

#: the JSON schema the model must answer with
ANALYSIS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "stage": {"type": "string", "enum": list(PIPELINE_STAGES)},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "summary": {"type": "string"},
    },
    "required": ["stage", "score", "summary"],
    "additionalProperties": False,
}

SYSTEM_PROMPT = (
    "You qualify CRM contacts for a sales team. From the contact and their messages, decide the "
    "sales-pipeline stage (lead, qualified, proposal, negotiation, won, lost), a score from 0 to 1 "
    "for how likely they are to buy, and a one-line summary. Answer with JSON only."
)

_TRANSIENT_STATUS = frozenset({408, 409, 429})


class MalformedOutputError(PermanentError):
    """The model's output is not JSON or breaks the schema; ``raw`` is the (full) text."""

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(message)
        self.raw = raw


def parse_analysis(raw: str, *, limit: int = 300) -> Analysis:
    """Parse and validate the model's answer; ``MalformedOutputError`` (raw text, truncated to
    ``limit`` chars, in the message) if it is not JSON or breaks ``ANALYSIS_SCHEMA``."""

    def bad(why: str) -> MalformedOutputError:
        return MalformedOutputError(f"model output {why}; raw output: {truncate(raw, limit)!r}",
                                    raw)

    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise bad(f"is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise bad(f"is a JSON {type(data).__name__}, expected an object")
    extra = sorted(set(data) - {"stage", "score", "summary"})
    missing = [k for k in ("stage", "score", "summary") if k not in data]
    if missing or extra:
        raise bad(f"breaks the schema (missing {missing}, unexpected {extra})")
    stage, score, summary = data["stage"], data["score"], data["summary"]
    if stage not in PIPELINE_STAGES:
        raise bad(f"breaks the schema (stage: expected one of {list(PIPELINE_STAGES)})")
    if (isinstance(score, bool) or not isinstance(score, int | float) or math.isnan(score)
            or not 0 <= score <= 1):
        raise bad("breaks the schema (score: expected a number in [0, 1])")
    if not isinstance(summary, str):
        raise bad("breaks the schema (summary: expected a string)")
    return Analysis(stage=cast(PipelineStage, stage), score=float(score),
                    summary=" ".join(summary.split()))


class _LLMBase:
    """What ``LLMAnalyze`` and ``AsyncLLMAnalyze`` share: the prompt, the request, the cost
    estimate, the budget feeding, the charge and the error mapping. Only the client and the
    awaiting differ."""

    def __init__(
        self,
        *,
        api_key: str,
        model: str,
        concurrency: int,
        max_input_chars: int,
        max_output_tokens: int | None,
        temperature: float | None,
        retry_after_scale: float,
        budget: Budget | None,
    ) -> None:
        name = type(self).__name__
        if not model:
            raise ValueError(f"{name}.model: expected a model name, got an empty string")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"{name}.concurrency: expected an int >= 1, got {concurrency!r}")
        if max_output_tokens is not None and (
                isinstance(max_output_tokens, bool) or not isinstance(max_output_tokens, int)
                or max_output_tokens < 1):
            raise ValueError(f"{name}.max_output_tokens: expected an int >= 1 or None, "
                             f"got {max_output_tokens!r}")
        if budget is not None and not isinstance(budget, Budget):
            raise TypeError(f"{name}.budget: expected an engine.Budget or None, got {budget!r}")
        self.model = model
        self.budget = budget
        self._api_key = api_key
        self._concurrency = concurrency
        self._max_input_chars = max_input_chars
        self._max_output_tokens = max_output_tokens
        self._output_estimate = (max_output_tokens if max_output_tokens is not None
                                 else DEFAULT_OUTPUT_ESTIMATE)
        self._retry_after_scale = retry_after_scale
        self._response_format: Any = {
            "type": "json_schema",
            "json_schema": {"name": "contact_analysis", "strict": True,
                            "schema": ANALYSIS_SCHEMA},
        }
        extra: dict[str, Any] = {}
        if temperature is not None:
            extra["temperature"] = temperature
        if max_output_tokens is not None:
            extra["max_completion_tokens"] = max_output_tokens
        self._extra = extra
        # the header names of the budget's dimensions, looked up once
        self._limit_headers: tuple[tuple[str, str, str], ...] = tuple(
            (d, f"x-ratelimit-remaining-{d}", f"x-ratelimit-reset-{d}")
            for d in (budget.per_minute if budget is not None else ()))

    # -- the request ----------------------------------------------------------------------------
    def prompt(self, fetched: Fetched) -> str:
        """The user message for a contact: its fields and its messages as JSON, capped."""
        c = fetched.contact
        head = json.dumps({"contact_id": c.id, "name": c.name, "email": c.email},
                          ensure_ascii=False)
        body = json.dumps(list(fetched.messages), ensure_ascii=False, default=str)
        if len(body) > self._max_input_chars:
            body = body[: self._max_input_chars] + " ...[truncated]"
        return f"Contact: {head}\nMessages: {body}"

    def estimate(self, fetched: Fetched) -> dict[str, int]:
        """The call's estimated cost before it is made, ``{"tokens": n}``, for a budgeted
        stage: ``Stage("analyze", llm, budget=b, cost=llm.estimate)``.

        ``n`` = the prompt's characters (system + user message) ÷ 4, + 1, + the most the model
        may answer (``max_output_tokens``, or ``DEFAULT_OUTPUT_ESTIMATE`` when that is None):
        the usual rule of thumb of ~4 characters a token, no tokenizer. It errs high by the
        unused part of the answer; the budget is settled with the actual usage when the call
        ends, so an error either way is corrected, not accumulated.
        """
        chars = len(SYSTEM_PROMPT) + len(self.prompt(fetched))
        return {"tokens": chars // 4 + 1 + self._output_estimate}

    def _create_kwargs(self, user_text: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": user_text}],
            "response_format": self._response_format,
            **self._extra,
        }

    def _analyzed(self, fetched: Fetched, analysis: Analysis) -> Analyzed:
        return Analyzed(contact=fetched.contact, analysis=analysis,
                        message_count=len(fetched.messages), model=self.model)

    # -- after the response -------------------------------------------------------------------
    def _feed(self, headers: Mapping[str, str]) -> None:
        """Resync the budget from a response's ``x-ratelimit-remaining-*`` / ``-reset-*``
        (every response: 200s and errors alike). Missing or nonsense values are ignored by
        ``Budget.update``."""
        budget = self.budget
        if budget is None:
            return
        remaining: dict[str, str] = {}
        reset: dict[str, str] = {}
        try:
            for dim, rem_name, reset_name in self._limit_headers:
                rem = headers.get(rem_name)
                if rem is not None:
                    remaining[dim] = rem
                    r = headers.get(reset_name)
                    if r is not None:
                        reset[dim] = r
        except Exception:  # a headers object that misbehaves says nothing
            return
        if remaining:
            budget.update(remaining=remaining, reset_s=reset, now=time.monotonic())

    @staticmethod
    def _charge(completion: Any) -> None:
        """Charge the call's actual usage to its stage's budget (inside an engine call)."""
        usage = getattr(completion, "usage", None)
        total = getattr(usage, "total_tokens", None)
        if isinstance(total, bool) or not isinstance(total, int | float) or not total >= 0:
            return
        try:
            call = current_call()
        except RuntimeError:  # called outside the engine: nothing to charge
            return
        call.charge(tokens=total)

    def _translate(self, exc: Exception) -> Exception:
        """The adapter error for the client's exception (``exc`` itself when it is none of
        the client's). The caller raises it *outside* its ``except`` block, so an error the
        server's text may have put the key in is neither the cause nor the context of what
        is raised: no traceback can print it."""
        error: Exception
        if isinstance(exc, openai.APIStatusError):
            self._feed(exc.response.headers)
            return self._status_error(exc)
        if isinstance(exc, openai.APITimeoutError):
            error = TransientError("chat completion timed out")
        elif isinstance(exc, openai.APIConnectionError):
            error = TransientError(f"chat completion: connection failed ({exc.message})")
        elif isinstance(exc, openai.APIError):  # e.g. a response that does not fit the models
            return PermanentError(f"chat completion: {self._scrub(str(exc))}")
        elif isinstance(exc, json.JSONDecodeError):  # a JSON content type, a body not JSON
            return MalformedOutputError(
                f"chat completion body is not JSON ({exc.msg}); raw body: "
                f"{truncate(self._scrub(exc.doc), 300)!r}", exc.doc)
        else:
            return exc
        error.__cause__ = exc  # timeouts and connection failures: the client's own reason
        return error

    def _result(self, completion: Any) -> Analysis:
        """Charge the usage, then check and parse the completion."""
        if isinstance(completion, str):  # the SDK hands back non-JSON content types as text
            raise MalformedOutputError(
                f"chat completion body is not JSON; raw body: "
                f"{truncate(self._scrub(completion), 300)!r}", completion)
        self._charge(completion)  # the tokens are spent even if the answer is unusable
        if not completion.choices:
            raise MalformedOutputError("chat completion has no choices", "")
        choice = completion.choices[0]
        content = choice.message.content
        if content is None:
            refusal = getattr(choice.message, "refusal", None)
            raise MalformedOutputError(
                f"model returned no content (finish_reason={choice.finish_reason!r}, "
                f"refusal={truncate(str(refusal), 200)!r})", str(refusal or ""))
        if choice.finish_reason == "length":
            raise MalformedOutputError(
                f"model output was cut at the length limit; raw output: "
                f"{truncate(content, 300)!r}", content)
        return parse_analysis(content)

    def _status_error(self, exc: openai.APIStatusError) -> Exception:
        status = exc.status_code
        detail = truncate(self._scrub(exc.message), 200)
        if status in _TRANSIENT_STATUS or status >= 500:
            retry_after = retry_after_from(exc.response.headers, scale=self._retry_after_scale)
            hint = f", retry after {retry_after:g}s" if retry_after is not None else ""
            return TransientError(f"chat completion: HTTP {status}{hint}: {detail}",
                                  retry_after=retry_after, status=status)
        return PermanentError(f"chat completion: HTTP {status}: {detail}", status=status)

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text


class LLMAnalyze(_LLMBase):
    """Stage callable ``Fetched -> Analyzed`` over an OpenAI-compatible chat completions API.

    ``timeout`` is seconds per request. ``concurrency`` (the stage limit) sizes the client's
    connection pool. ``max_input_chars`` caps the messages text sent per contact (a 1 MB message
    body is cut, not sent). ``max_output_tokens`` is sent as ``max_completion_tokens`` (None:
    not sent) and counted in :meth:`estimate`. ``retry_after_scale`` multiplies the server's
    retry hint. ``client`` replaces the built-in client (its retries are turned off all the
    same).

    ``budget`` (an ``engine.Budget``, the account's; give the stage the same one): every
    response's ``x-ratelimit-*`` headers resync it (``Budget.update``, on ``time.monotonic()``,
    the engine's live budget clock). Inside an engine call the actual usage is charged
    (``current_call().charge(tokens=usage.total_tokens)``) whether or not a budget is given; a
    429's ``retry_after`` lets the engine pause the stage's budget::

        llm = LLMAnalyze(base_url=..., api_key=..., model=..., budget=openai_budget)
        Stage("analyze", llm, budget=openai_budget, cost=llm.estimate)
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        model: str,
        timeout: float = 60.0,
        concurrency: int = 50,
        max_input_chars: int = 12_000,
        max_output_tokens: int | None = DEFAULT_OUTPUT_ESTIMATE,
        temperature: float | None = 0.0,
        retry_after_scale: float = 1.0,
        budget: Budget | None = None,
        client: openai.OpenAI | None = None,
    ) -> None:
        super().__init__(api_key=api_key, model=model, concurrency=concurrency,
                         max_input_chars=max_input_chars, max_output_tokens=max_output_tokens,
                         temperature=temperature, retry_after_scale=retry_after_scale,
                         budget=budget)
        if client is None:
            # httpx2's Limits, reached through the SDK's own default (the SDK re-exports it).
            limits = type(openai.DEFAULT_CONNECTION_LIMITS)(
                max_connections=concurrency, max_keepalive_connections=concurrency)
            client = openai.OpenAI(
                api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0,
                http_client=openai.DefaultHttpxClient(limits=limits, timeout=timeout),
            )
        else:  # a caller's client: keep its settings, but never let it retry on its own
            client = client.with_options(max_retries=0)
        self._client = client

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LLMAnalyze:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls ----------------------------------------------------------------------------------
    def __call__(self, fetched: Fetched) -> Analyzed:
        return self._analyzed(fetched, self.analyze(self.prompt(fetched)))

    def analyze(self, user_text: str) -> Analysis:
        """One chat completion; returns the parsed ``Analysis`` or raises an adapter error."""
        try:
            raw = self._client.chat.completions.with_raw_response.create(
                **self._create_kwargs(user_text))
            self._feed(raw.headers)
            completion = raw.parse()
        except Exception as exc:
            error = self._translate(exc)
            if error is exc:
                raise
        else:
            return self._result(completion)
        raise error  # outside the except block: see _translate
