"""The fake OpenAI-compatible API, driven by the real `openai` client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import openai
import pytest
import requests
from pydantic import BaseModel

from simulators.servers import STAGES, OpenAIServer, classify

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer(seed=0) as srv:
        yield srv


@pytest.fixture
def client(server: OpenAIServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0, timeout=10)
    yield c
    c.close()


def ask(text: str, **kw: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Classify the contact. Answer in JSON."},
            {"role": "user", "content": text},
        ],
        **kw,
    }


def test_completion_is_well_formed(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(**ask("Could you send a proposal with pricing?"))
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-") and r.model == "gpt-4o-mini" and r.created > 0
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    verdict = json.loads(choice.message.content or "")
    assert verdict["stage"] == "proposal"
    assert 0 <= verdict["score"] <= 1
    assert isinstance(verdict["summary"], str) and "\n" not in verdict["summary"]
    assert r.usage is not None
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0


@pytest.mark.parametrize(
    ("text", "stage"),
    [
        ("Hi, what do you do?", "lead"),
        ("We have budget; can we book a demo?", "qualified"),
        ("Please share a quote for the annual plan.", "proposal"),
        ("We need a discount on the contract terms.", "negotiation"),
        ("We signed the contract this morning!", "won"),
        ("Please unsubscribe me, not interested.", "lost"),
    ],
)
def test_classification_follows_the_prompt(client: openai.OpenAI, text: str, stage: str) -> None:
    r = client.chat.completions.create(**ask(text))
    content = json.loads(r.choices[0].message.content or "")
    assert content["stage"] == stage
    assert content == classify([{"role": "user", "content": text}])


def test_deterministic_from_the_prompt(client: openai.OpenAI) -> None:
    a = client.chat.completions.create(**ask("hello there"))
    b = client.chat.completions.create(**ask("hello there"))
    c = client.chat.completions.create(**ask("hello there!"))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != c.choices[0].message.content  # score jitter differs


class Verdict(BaseModel):
    stage: Literal["lead", "qualified", "proposal", "negotiation", "won", "lost"]
    score: float
    summary: str


def test_json_schema_response_format_with_parse(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "We signed, looking forward to onboarding"}],
        response_format=Verdict,
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Verdict) and parsed.stage == "won"


def test_json_schema_other_shapes(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["pipeline_stage", "confidence", "reason", "flags", "n", "ok", "kind"],
        "properties": {
            "pipeline_stage": {"type": "string", "enum": list(STAGES)},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "reason": {"type": "string"},
            "flags": {"type": "array", "items": {"type": "string"}},
            "n": {"type": "integer", "minimum": 3},
            "ok": {"type": "boolean"},
            "kind": {"anyOf": [{"type": "null"}, {"const": "crm"}]},
        },
    }
    r = client.chat.completions.create(
        **ask("book a demo"),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "verdict", "schema": schema, "strict": True},
        },
    )
    out = json.loads(r.choices[0].message.content or "")
    assert out == {
        "pipeline_stage": "qualified",
        "confidence": out["confidence"],
        "reason": classify([{"role": "user", "content": "book a demo"}])["summary"],
        "flags": [],
        "n": 3,
        "ok": True,
        "kind": "crm",
    }
    assert 0 <= out["confidence"] <= 1


def test_json_object_needs_the_word_json(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        **ask("demo please"), response_format={"type": "json_object"}
    )
    assert json.loads(r.choices[0].message.content or "")["stage"] == "qualified"
    with pytest.raises(openai.BadRequestError, match="must contain the word 'json'"):
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "demo"}],
            response_format={"type": "json_object"},
        )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "", "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"text": "x"}]}]},
            "messages[0].content",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
            "temperature",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "max_tokens",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}, "stream"),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "xml"},
            },
            "response_format",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema"},
            },
            "response_format.json_schema",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a b", "schema": {}},
                },
            },
            "response_format.json_schema.name",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "v", "schema": []},
                },
            },
            "response_format.json_schema.schema",
        ),
    ],
)
def test_bad_requests_get_openai_style_400(
    server: OpenAIServer, body: dict[str, Any], param: str
) -> None:
    r = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=5)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_bad_json_body(server: OpenAIServer) -> None:
    r = requests.post(
        f"{server.url}/v1/chat/completions",
        data=b"{not json",
        timeout=5,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_bad_request_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "wizard", "content": "x"}])  # type: ignore[misc,list-item]
    assert info.value.status_code == 400


def test_content_parts_and_n(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="m",
        n=3,
        messages=[{"role": "user", "content": [{"type": "text", "text": "send a quote"}]}],
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert json.loads(r.choices[2].message.content or "")["stage"] == "proposal"


def test_models_and_unknown_routes(client: openai.OpenAI, server: OpenAIServer) -> None:
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini"]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="m", input="x")
    assert requests.get(f"{server.url}/v1/chat/completions", timeout=5).status_code == 405
