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
"""
from __future__ import annotations

import json
import math
from typing import Any, cast

import openai

from ._errors import PermanentError, TransientError, retry_after_from, truncate
from ._records import PIPELINE_STAGES, Analysis, Analyzed, Fetched, PipelineStage

__all__ = ["ANALYSIS_SCHEMA", "LLMAnalyze", "MalformedOutputError", "parse_analysis"]

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


class LLMAnalyze:
    """Stage callable ``Fetched -> Analyzed`` over an OpenAI-compatible chat completions API.

    ``timeout`` is seconds per request. ``concurrency`` (the stage limit) sizes the client's
    connection pool. ``max_input_chars`` caps the messages text sent per contact (a 1 MB message
    body is cut, not sent). ``retry_after_scale`` multiplies the server's retry hint.
    ``client`` replaces the built-in client (its retries are turned off all the same).
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
        temperature: float | None = 0.0,
        retry_after_scale: float = 1.0,
        client: openai.OpenAI | None = None,
    ) -> None:
        if not model:
            raise ValueError("LLMAnalyze.model: expected a model name, got an empty string")
        if concurrency < 1:
            raise ValueError(f"LLMAnalyze.concurrency: expected >= 1, got {concurrency!r}")
        self.model = model
        self._api_key = api_key
        self._max_input_chars = max_input_chars
        self._temperature = temperature
        self._retry_after_scale = retry_after_scale
        if client is None:
            # httpx2's Limits, reached through the SDK's own default (the SDK re-exports it).
            limits = type(openai.DEFAULT_CONNECTION_LIMITS)(
                max_connections=max(concurrency, 1), max_keepalive_connections=concurrency)
            client = openai.OpenAI(
                api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0,
                http_client=openai.DefaultHttpxClient(limits=limits, timeout=timeout),
            )
        else:  # a caller's client: keep its settings, but never let it retry on its own
            client = client.with_options(max_retries=0)
        self._client = client
        self._response_format: Any = {
            "type": "json_schema",
            "json_schema": {"name": "contact_analysis", "strict": True,
                            "schema": ANALYSIS_SCHEMA},
        }

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LLMAnalyze:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls ----------------------------------------------------------------------------------
    def __call__(self, fetched: Fetched) -> Analyzed:
        analysis = self.analyze(self.prompt(fetched))
        return Analyzed(contact=fetched.contact, analysis=analysis,
                        message_count=len(fetched.messages), model=self.model)

    def prompt(self, fetched: Fetched) -> str:
        """The user message for a contact: its fields and its messages as JSON, capped."""
        c = fetched.contact
        head = json.dumps({"contact_id": c.id, "name": c.name, "email": c.email},
                          ensure_ascii=False)
        body = json.dumps(list(fetched.messages), ensure_ascii=False, default=str)
        if len(body) > self._max_input_chars:
            body = body[: self._max_input_chars] + " ...[truncated]"
        return f"Contact: {head}\nMessages: {body}"

    def analyze(self, user_text: str) -> Analysis:
        """One chat completion; returns the parsed ``Analysis`` or raises an adapter error."""
        kwargs: dict[str, Any] = {}
        if self._temperature is not None:
            kwargs["temperature"] = self._temperature
        try:
            completion = self._client.chat.completions.create(
                model=self.model,
                messages=[{"role": "system", "content": SYSTEM_PROMPT},
                          {"role": "user", "content": user_text}],
                response_format=self._response_format,
                **kwargs,
            )
        except openai.APIStatusError as exc:  # not chained: the server's text may echo the key
            raise self._status_error(exc) from None
        except openai.APITimeoutError as exc:
            raise TransientError("chat completion timed out") from exc
        except openai.APIConnectionError as exc:
            raise TransientError(f"chat completion: connection failed ({exc.message})") from exc
        except openai.APIError as exc:  # e.g. a response that does not fit the SDK's models
            raise PermanentError(f"chat completion: {self._scrub(str(exc))}") from None
        except json.JSONDecodeError as exc:  # a JSON content type with a body that is not JSON
            raise MalformedOutputError(
                f"chat completion body is not JSON ({exc.msg}); raw body: "
                f"{truncate(self._scrub(exc.doc), 300)!r}", exc.doc) from None
        if isinstance(completion, str):  # the SDK hands back non-JSON content types as text
            raise MalformedOutputError(
                f"chat completion body is not JSON; raw body: "
                f"{truncate(self._scrub(completion), 300)!r}", completion)
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

