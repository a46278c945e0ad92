"""API keys: every endpoint but health and metrics needs one; sessions belong to their key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from headstart.cli.main import build_parser
from headstart.model import HFBackend
from headstart.server.flags import api_keys
from tests.apiutil import Served, SSEReader, serve, settle

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
HI = [{"role": "user", "content": "Hello."}]


@pytest.fixture(scope="module")
def srv(tiny: HFBackend) -> Iterator[Served]:
    with serve(tiny, api_keys=frozenset({ALICE, BOB})) as served:
        yield served


def as_(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_keys_are_required_except_for_health_and_metrics(srv: Served) -> None:
    c = srv.client
    assert c.get("/health").status_code == 200
    assert c.get("/metrics").status_code == 200
    for method, path in [("GET", "/v1/sessions"), ("POST", "/v1/sessions"), ("GET", "/v1/models"),
                         ("POST", "/v1/chat/completions"), ("GET", "/openapi.json"),
                         ("POST", "/v1/sessions/x/push"), ("GET", "/v1/sessions/x/events")]:
        for headers in ({}, as_("wrong"), {"authorization": "Basic abc"}, {"x-api-key": "wrong"}):
            r = c.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert c.get("/v1/sessions", headers=as_(ALICE)).status_code == 200
    assert c.get("/v1/sessions", headers={"x-api-key": BOB}).status_code == 200


def test_one_key_cannot_see_use_or_delete_another_keys_session(srv: Served) -> None:
    c = srv.client
    assert c.post("/v1/sessions", headers=as_(ALICE), json={"id": "mine", "pre_position": False}).status_code == 200
    c.post("/v1/sessions/mine/queries", headers=as_(ALICE), json={"id": "q", "question": "Any news?",
                                                                  "max_tokens": 2})
    settle(srv, "mine")
    bob = [
        ("GET", "/v1/sessions/mine", None),
        ("DELETE", "/v1/sessions/mine", None),
        ("POST", "/v1/sessions/mine/push", {"entries": ["x"]}),
        ("POST", "/v1/sessions/mine/generate", {"prompt": "x", "max_tokens": 1}),
        ("POST", "/v1/sessions/mine/warm", {"messages": HI}),
        ("POST", "/v1/sessions/mine/queries", {"question": "x"}),
        ("GET", "/v1/sessions/mine/queries", None),
        ("GET", "/v1/sessions/mine/queries/q", None),
        ("DELETE", "/v1/sessions/mine/queries/q", None),
        ("GET", "/v1/sessions/mine/events", None),
    ]
    for method, path, body in bob:
        r = c.request(method, path, headers=as_(BOB), json=body)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["type"] == "not_found_error"
    r = c.post("/v1/chat/completions", headers={**as_(BOB), "x-session-id": "mine"},
               json={"messages": HI, "max_tokens": 1})
    assert r.status_code == 404
    assert "mine" not in {s["id"] for s in c.get("/v1/sessions", headers=as_(BOB)).json()["data"]}
    bob_client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=BOB)
    with pytest.raises(openai.NotFoundError):
        bob_client.get("/sessions/mine", cast_to=object)
    with pytest.raises(openai.NotFoundError):
        bob_client.delete("/sessions/mine", cast_to=object)
    with pytest.raises(openai.NotFoundError):
        bob_client.chat.completions.create(model="tiny-llama", messages=HI, max_tokens=1,
                                           extra_headers={"x-session-id": "mine"})
    # Nothing Bob did touched it: Alice still sees it whole, with her question.
    alice = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=ALICE)
    mine = alice.get("/sessions/mine", cast_to=object)
    assert mine["id"] == "mine" and mine["pushed"] == 0 and mine["queries"] == 1  # type: ignore[index]
    assert [s["id"] for s in alice.get("/sessions", cast_to=object)["data"]] == ["mine"]  # type: ignore[index]
    with SSEReader(f"{srv.url}/v1/sessions/mine/events", headers={"x-api-key": ALICE}) as sse:
        sse.next("heartbeat", timeout=10)
    assert alice.delete("/sessions/mine", cast_to=object)["deleted"] is True  # type: ignore[index]


def test_keys_from_flags_a_file_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADSTART_API_KEY", raising=False)
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nk-file-1\n\n  k-file-2  \n")
    args = build_parser().parse_args(["serve", "--api-key", "k1", "--api-key", "k2", "--api-key-file", str(keys)])
    assert api_keys(args) == {"k1", "k2", "k-file-1", "k-file-2"}
    assert api_keys(build_parser().parse_args(["serve"])) == frozenset()
    monkeypatch.setenv("HEADSTART_API_KEY", "k-env")
    assert api_keys(build_parser().parse_args(["serve"])) == {"k-env"}


def test_without_keys_everything_is_open(tiny: HFBackend) -> None:
    with serve(tiny) as srv:
        r = httpx.post(f"{srv.url}/v1/sessions", json={"id": "open", "pre_position": False})
        assert r.status_code == 200
        assert httpx.get(f"{srv.url}/v1/sessions/open", headers=as_("anything")).status_code == 200
