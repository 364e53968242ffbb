"""A fake OpenAI-compatible chat completions API: ``POST /v1/chat/completions``.

It validates requests as the real API does (400 with an OpenAI-style error body on a bad one)
and answers a well-formed ``chat.completion`` whose content is JSON classifying the contact::

    {"stage": "lead|qualified|proposal|negotiation|won|lost", "score": 0..1, "summary": "..."}

The classification depends only on the prompt (the non-system messages): keywords pick the
stage, a hash of the prompt the score's jitter. ``response_format`` is honoured: ``json_object``
(the messages must mention JSON, as the real API demands) and ``json_schema`` (the content is
an instance of the given schema: properties named like stage/score/summary get the
classification, the others a value of their type).

Limits (``capacity``, ``per_minute``: see ``FakeServer``) as a ``simulators.Provider``'s. A
request's tokens (what it takes from the "tokens" bucket) are the ``usage.total_tokens`` its
answer reports: the prompt's size (characters / 4) plus the answer's, both known before the
answer is sent (the answer is deterministic), so a client that settles its budget with the
reported usage charges exactly what the server counted. Every answer of the chat route carries
the ``x-ratelimit-*`` headers; a request beyond a limit is a 429 with ``Retry-After``
(``retry-after-ms`` too) and takes nothing.

``requests_seen`` / ``requests_served`` / ``calls(identity)`` count requests per identity: the
request's ``user`` field if it has one, else the ``"contact_id"`` the prompt names (as the
``LLMAnalyze`` adapter's prompt does), else the prompt's hash (the request key). ``GET
/_conveyor/calls`` answers ``{"seen": {...}, "served": {...}}``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from ._base import FakeServer, Response

__all__ = ["STAGES", "OpenAIServer", "classify"]

STAGES = ("lead", "qualified", "proposal", "negotiation", "won", "lost")
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Checked in this order; the first stage whose keywords appear wins.
_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("lost", ("not interested", "unsubscribe", "another vendor", "go with someone else")),
    ("won", ("signed", "onboarding", "purchase order")),
    ("negotiation", ("discount", "contract terms", "payment terms", "legal has")),
    ("proposal", ("proposal", "quote", "pricing")),
    ("qualified", ("demo", "budget")),
)
_BASE_SCORE = {
    "lead": 0.2,
    "qualified": 0.4,
    "proposal": 0.6,
    "negotiation": 0.75,
    "won": 0.95,
    "lost": 0.05,
}
_SUMMARY = {
    "lead": "Early contact asking for general information; nurture.",
    "qualified": "Has budget and asked for a demo; book it.",
    "proposal": "Asked for pricing after the demo; send a proposal.",
    "negotiation": "Negotiating discount and contract terms; loop in sales lead.",
    "won": "Signed the contract; hand over to onboarding.",
    "lost": "Chose another vendor or opted out; close the deal as lost.",
}
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CONTACT_ID = re.compile(r'"contact_id"\s*:\s*(?:"((?:[^"\\]|\\.)*)"|(-?\d+))')


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


def classify(messages: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The classification the server answers for ``messages`` (deterministic)."""
    prompt = "\n".join(
        _text(m.get("content")) for m in messages if m.get("role") not in ("system", "developer")
    )
    lowered = prompt.lower()
    stage = "lead"
    for name, words in _KEYWORDS:
        if any(w in lowered for w in words):
            stage = name
            break
    digest = hashlib.sha256(prompt.encode()).digest()
    jitter = (int.from_bytes(digest[:4], "big") / 2**32 - 0.5) / 10  # +-0.05
    score = round(min(1.0, max(0.0, _BASE_SCORE[stage] + jitter)), 3)
    return {"stage": stage, "score": score, "summary": _SUMMARY[stage]}


def _bad(message: str, param: str | None, code: str | None = None) -> Response:
    return Response(
        400,
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": code,
            }
        },
    )


class _Request:
    __slots__ = ("fmt", "messages", "model", "n", "schema", "schema_name", "user")

    def __init__(
        self,
        model: str,
        messages: list[Mapping[str, Any]],
        n: int,
        fmt: str,
        schema: Mapping[str, Any] | None,
        schema_name: str | None,
    ) -> None:
        self.model = model
        self.messages = messages
        self.n = n
        self.fmt = fmt
        self.schema = schema
        self.schema_name = schema_name
        self.user: str | None = None


class OpenAIServer(FakeServer):
    """``POST /v1/chat/completions`` (and ``GET /v1/models``) with injected latency and faults
    (see ``FakeServer``). Requests with the same prompt share a request key, so the n-th
    retry of a prompt draws the same latency and fault in every run with the same seed."""

    default_name = "openai"

    def error_body(self, status: int, message: str, kind: str) -> Any:
        return {"error": {"message": message, "type": kind, "param": None, "code": str(status)}}

    def route(self, method: str, path: str, body: bytes) -> tuple[str, Any] | Response:
        path = path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            return Response(200, {"ok": True})
        if path == "/_conveyor/calls" and method == "GET":
            with self._lock:
                return Response(200, {"seen": dict(self.requests_seen),
                                      "served": dict(self.requests_served)})
        if path == "/v1/models" and method == "GET":
            return Response(
                200,
                {
                    "object": "list",
                    "data": [
                        {
                            "id": "gpt-4o-mini",
                            "object": "model",
                            "created": 0,
                            "owned_by": "conveyor-fake",
                        }
                    ],
                },
            )
        if path != "/v1/chat/completions":
            return Response(
                404, self.error_body(404, f"Invalid URL ({method} {path})", "invalid_request_error")
            )
        if method != "POST":
            return Response(
                405,
                self.error_body(405, f"{method} not allowed", "invalid_request_error"),
                {"Allow": "POST"},
            )
        parsed = self._validate(body)
        if isinstance(parsed, Response):
            return parsed
        key = hashlib.sha256(
            json.dumps(parsed.messages, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        return key, parsed

    def _validate(self, body: bytes) -> _Request | Response:
        try:
            data = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _bad(f"We could not parse the JSON body of your request: {exc}", None)
        if not isinstance(data, dict):
            return _bad("The request body must be a JSON object.", None)
        model = data.get("model")
        if not isinstance(model, str) or not model:
            return _bad("you must provide a model parameter", "model")
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            return _bad("'messages' must be a non-empty array", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                return _bad(f"messages[{i}]: expected an object", f"messages[{i}]")
            role = m.get("role")
            if role not in _ROLES:
                return _bad(
                    f"Invalid value for 'messages[{i}].role': {role!r}", f"messages[{i}].role"
                )
            content = m.get("content")
            if content is None and role == "assistant":
                continue
            if isinstance(content, list):
                if not all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content):
                    return _bad(
                        f"messages[{i}].content: each part needs a 'type'", f"messages[{i}].content"
                    )
            elif not isinstance(content, str):
                return _bad(
                    f"messages[{i}].content: expected a string or an array of parts",
                    f"messages[{i}].content",
                )
        if data.get("stream"):
            return _bad("stream=true is not supported by this fake server", "stream")
        n = data.get("n", 1)
        if n is None:
            n = 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 8:
            return _bad(f"Invalid 'n': expected an integer in [1, 8], got {n!r}", "n")
        temperature = data.get("temperature")
        if temperature is not None and (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not 0 <= temperature <= 2
        ):
            return _bad(
                f"Invalid 'temperature': expected a number in [0, 2], got {temperature!r}",
                "temperature",
            )
        for name in ("max_tokens", "max_completion_tokens"):
            value = data.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                return _bad(f"Invalid '{name}': expected an integer >= 1, got {value!r}", name)
        fmt, schema, schema_name = "text", None, None
        rf = data.get("response_format")
        if rf is not None:
            if not isinstance(rf, dict) or rf.get("type") not in (
                "text",
                "json_object",
                "json_schema",
            ):
                return _bad(
                    "Invalid 'response_format.type': "
                    "expected 'text', 'json_object' or 'json_schema'",
                    "response_format",
                )
            fmt = rf["type"]
            if fmt == "json_object":
                if not any("json" in _text(m.get("content")).lower() for m in messages):
                    return _bad(
                        "'messages' must contain the word 'json' in some form, to use "
                        "'response_format' of type 'json_object'.",
                        "messages",
                    )
            elif fmt == "json_schema":
                js = rf.get("json_schema")
                if not isinstance(js, dict):
                    return _bad(
                        "Missing required parameter: 'response_format.json_schema'.",
                        "response_format.json_schema",
                    )
                schema_name = js.get("name")
                if not isinstance(schema_name, str) or not _SCHEMA_NAME.match(schema_name):
                    return _bad(
                        "Invalid 'response_format.json_schema.name': expected [A-Za-z0-9_-]{1,64}",
                        "response_format.json_schema.name",
                    )
                schema = js.get("schema")
                if not isinstance(schema, dict):
                    return _bad(
                        "Invalid 'response_format.json_schema.schema': expected an object",
                        "response_format.json_schema.schema",
                    )
        req = _Request(model, messages, n, fmt, schema, schema_name)
        user = data.get("user")
        if isinstance(user, str) and user:
            req.user = user
        return req

    def identity(self, key: str, request: Any) -> str:
        req: _Request = request
        if req.user is not None:
            return req.user
        for m in req.messages:
            if m.get("role") in ("system", "developer"):
                continue
            found = _CONTACT_ID.search(_text(m.get("content")))
            if found:
                return found.group(1) if found.group(1) is not None else found.group(2)
        return key

    def tokens_of(self, key: str, request: Any) -> float:
        return float(self._usage(request, self._content(request))["total_tokens"])

    @staticmethod
    def _content(req: _Request) -> str:
        verdict = classify(req.messages)
        if req.schema is not None:
            return json.dumps(_instance(req.schema, req.schema, verdict, ""))
        return json.dumps(verdict)

    @staticmethod
    def _usage(req: _Request, content: str) -> dict[str, int]:
        prompt_tokens = sum(len(_text(m.get("content"))) for m in req.messages) // 4 + 1
        completion_tokens = len(content) // 4 + 1
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def answer(self, key: str, request: Any) -> Response:
        req: _Request = request
        content = self._content(req)
        return Response(
            200,
            {
                "id": f"chatcmpl-{key}",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": req.model,
                "system_fingerprint": "fp_conveyor_fake",
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": content, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                    for i in range(req.n)
                ],
                "usage": self._usage(req, content),
            },
        )


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    seen = 0
    while "$ref" in schema and seen < 32:
        ref = schema["$ref"]
        node: Any = root
        if isinstance(ref, str) and ref.startswith("#/"):
            for part in ref[2:].split("/"):
                node = node.get(part, {}) if isinstance(node, Mapping) else {}
        schema = node if isinstance(node, Mapping) else {}
        seen += 1
    return schema


def _instance(
    schema: Mapping[str, Any],
    root: Mapping[str, Any],
    verdict: dict[str, Any],
    name: str,
    depth: int = 0,
) -> Any:
    """A value conforming to ``schema`` (the subset structured outputs use), filled from the
    classification where a property's name says what it is."""
    schema = _resolve(schema, root)
    lname = name.lower()
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        options = list(schema["enum"])
        if "stage" in lname or verdict["stage"] in options:
            return verdict["stage"] if verdict["stage"] in options else options[0]
        return options[0]
    for alt in ("anyOf", "oneOf"):
        if schema.get(alt):
            choices = [s for s in schema[alt] if _resolve(s, root).get("type") != "null"] or schema[
                alt
            ]
            return _instance(choices[0], root, verdict, name, depth)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None and "properties" in schema:
        kind = "object"
    if kind == "object":
        if depth > 8:
            return {}
        props = schema.get("properties", {})
        return {p: _instance(s, root, verdict, p, depth + 1) for p, s in props.items()}
    if kind == "array":
        items = schema.get("items")
        count = int(schema.get("minItems", 0) or 0)
        return [_instance(items or {}, root, verdict, name, depth + 1) for _ in range(count)]
    if kind in ("number", "integer"):
        if any(w in lname for w in ("score", "confidence", "probability")):
            value: float = verdict["score"]
        else:
            value = 0.0
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if isinstance(lo, int | float):
            value = max(value, lo)
        if isinstance(hi, int | float):
            value = min(value, hi)
        return round(value) if kind == "integer" else value
    if kind == "boolean":
        return verdict["stage"] not in ("lost",)
    if kind == "null":
        return None
    # strings (and anything untyped)
    if "stage" in lname:
        return verdict["stage"]
    if any(w in lname for w in ("summary", "reason", "explanation", "rationale")):
        return verdict["summary"]
    return ""
