"""dataplane.a2a.card: the SDK peer's real card rewritten to the gateway's address, literal 0.2 / 0.3 / 1.0
cards, signed cards (signed and verified with a2a-sdk's own JWS code), and every bad input."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jwt
import pytest
from a2a.client.card_resolver import parse_agent_card
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.utils.signing import create_agent_card_signer, create_signature_verifier
from cryptography.hazmat.primitives.asymmetric import ec

from dataplane.a2a.card import (
    CardRewriter,
    ExternalBase,
    external_base,
    is_card_path,
    rewrite_card,
)
from dataplane.a2a.errors import A2aBadRequestHeader, A2aInvalidAgentCard
from tests.peers.a2a_agents import CARD_PATH, build_card, serve_agent

pytestmark = pytest.mark.anyio

GATEWAY = ExternalBase("https", "agents.example.com", "/agents/planner")
UPSTREAM = "http://10.0.0.5:9000/a2a"


def rewrite(card: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return json.loads(rewrite_card(json.dumps(card).encode(), external=GATEWAY, upstream_base=UPSTREAM, **kwargs))


async def test_the_sdk_peers_card_points_at_the_gateway() -> None:
    async with serve_agent("planner", base_path="/a2a") as agent, httpx.AsyncClient() as http:
        body = (await http.get(f"{agent.origin}/a2a{CARD_PATH}")).content
    external = external_base(
        listener_scheme="http",
        host="gw.internal:8080",
        forwarded_proto="https",
        forwarded_host="agents.example.com",
        public_prefix="/agents/planner/",
    )
    rewritten = CardRewriter(upstream_base=f"{agent.origin}/a2a").rewrite(body, external)
    card = json.loads(rewritten)
    gateway = "https://agents.example.com/agents/planner/"
    assert card["url"] == gateway
    assert [i["url"] for i in card["additionalInterfaces"]] == [gateway]
    assert [i["url"] for i in card["supportedInterfaces"]] == [gateway] * 4
    assert card["documentationUrl"] == "https://agents.example.com/agents/planner/docs"  # the agent's own page
    assert card["iconUrl"] == "https://cdn.example.com/icon.png"  # a third party's: untouched
    assert str(agent.port) not in rewritten.decode()
    # The SDK reads the rewritten card, and a client made from it would call the gateway.
    parsed = parse_agent_card(card)
    assert {i.url for i in parsed.supported_interfaces} == {gateway}
    assert parsed.name == "planner"


def test_0_2_card_url() -> None:
    card = {"name": "a", "url": "http://localhost:9000/a2a", "version": "1", "capabilities": {}}
    assert rewrite(card)["url"] == "https://agents.example.com/agents/planner"


def test_0_3_card_keeps_paths_under_the_base_and_query() -> None:
    card = {
        "url": "http://agent.local:9000/a2a/jsonrpc?x=1#frag",
        "preferredTransport": "JSONRPC",
        "additionalInterfaces": [
            {"url": "http://agent.local:9000/a2a/rest", "transport": "HTTP+JSON"},
            {"url": "https://user:pw@agent.public.example/a2a", "transport": "JSONRPC"},
            "not an object",
        ],
    }
    out = rewrite(card)
    assert out["url"] == "https://agents.example.com/agents/planner/jsonrpc?x=1#frag"
    assert out["additionalInterfaces"][0]["url"] == "https://agents.example.com/agents/planner/rest"
    assert out["additionalInterfaces"][1]["url"] == "https://agents.example.com/agents/planner"  # userinfo dropped
    assert out["additionalInterfaces"][2] == "not an object"
    assert out["preferredTransport"] == "JSONRPC"


def test_1_0_card_both_spellings_and_outside_the_base() -> None:
    card = {
        "supportedInterfaces": [
            {"url": "http://10.0.0.5:9000/a2a/", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
            {"url": "http://10.0.0.5:9000/a2ab/x", "protocolBinding": "HTTP+JSON"},  # not under /a2a
            {"url": "/relative/rpc", "protocolBinding": "JSONRPC"},
            {"url": 5, "protocolBinding": "JSONRPC"},
        ],
        "supported_interfaces": [{"url": "grpc://10.0.0.5:9001/a2a", "protocol_binding": "GRPC"}],
    }
    out = rewrite(card)
    urls = [i["url"] for i in out["supportedInterfaces"]]
    assert urls == [
        "https://agents.example.com/agents/planner/",
        "https://agents.example.com/agents/planner/a2ab/x",
        "/relative/rpc",
        5,
    ]
    assert out["supported_interfaces"][0]["url"] == "https://agents.example.com/agents/planner"


def test_root_base_and_root_prefix() -> None:
    body = json.dumps({"url": "http://a:1/rpc"}).encode()
    out = rewrite_card(body, external=ExternalBase("http", "gw:8080"), upstream_base="http://a:1")
    assert json.loads(out)["url"] == "http://gw:8080/rpc"


def test_other_urls_change_only_when_they_are_the_agents_own() -> None:
    card = {
        "url": "http://agent.local:9000/a2a",
        "documentationUrl": "https://docs.example.com/planner",
        "icon_url": "http://agent.local:9000/a2a/icon.png",  # origin of an interface URL
        "provider": {"organization": "Acme", "url": "http://10.0.0.5:9000/a2a/about"},  # upstream origin
        "securitySchemes": {
            "oauth": {
                "oauth2SecurityScheme": {
                    "flows": {
                        "clientCredentials": {
                            "tokenUrl": "http://10.0.0.5:80/a2a/token",  # same host, other port: not the agent
                            "refreshUrl": "http://10.0.0.5:9000/a2a/refresh",
                            "scopes": {"read": "http://10.0.0.5:9000/a2a/scope"},  # not a *Url key
                        }
                    },
                    "oauth2MetadataUrl": "https://idp.example.com/.well-known/oauth-authorization-server",
                }
            },
            "oidc": {"type": "openIdConnect", "openIdConnectUrl": "http://10.0.0.5:9000/other/.well-known"},
        },
        "capabilities": {"extensions": [{"uri": "http://10.0.0.5:9000/a2a/ext", "params": {}}]},
        "skills": [{"id": "s", "examples": ["http://10.0.0.5:9000/a2a/x"]}],
    }
    out = rewrite(card)
    assert out["documentationUrl"] == "https://docs.example.com/planner"
    assert out["icon_url"] == "https://agents.example.com/agents/planner/icon.png"
    assert out["provider"] == {"organization": "Acme", "url": "https://agents.example.com/agents/planner/about"}
    oauth = out["securitySchemes"]["oauth"]["oauth2SecurityScheme"]
    flow = oauth["flows"]["clientCredentials"]
    assert flow["tokenUrl"] == "http://10.0.0.5:80/a2a/token"
    assert flow["refreshUrl"] == "https://agents.example.com/agents/planner/refresh"
    assert flow["scopes"] == {"read": "http://10.0.0.5:9000/a2a/scope"}
    assert oauth["oauth2MetadataUrl"].startswith("https://idp.example.com/")
    assert out["securitySchemes"]["oidc"]["openIdConnectUrl"] == "http://10.0.0.5:9000/other/.well-known"
    assert out["capabilities"] == card["capabilities"] and out["skills"] == card["skills"]


def test_nothing_to_change_returns_the_same_bytes() -> None:
    body = json.dumps({"name": "x", "url": "/relative", "iconUrl": "https://cdn.example.com/i.png"}).encode()
    rewriter = CardRewriter(upstream_base=UPSTREAM)
    assert rewriter.rewrite(body, GATEWAY) is body
    already = json.dumps({"url": "https://agents.example.com/agents/planner/"}).encode()
    assert rewriter.rewrite(already, GATEWAY) is already


# Signed cards ----------------------------------------------------------------------------------------------


def signed_card_body() -> tuple[bytes, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    signer = create_agent_card_signer(key, {"alg": "ES256", "kid": "k1", "typ": "JOSE"})
    card = signer(build_card("signed", "http://10.0.0.5:9000/a2a/"))
    public = jwt.PyJWK.from_dict(json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())), "ES256")
    verifier = create_signature_verifier(lambda kid, jku: public, ["ES256"])
    return json.dumps(agent_card_to_dict(card)).encode(), verifier


def test_signed_card_preserved_byte_for_byte_and_still_verifies() -> None:
    body, verify = signed_card_body()
    out = CardRewriter(upstream_base=UPSTREAM, signed_cards="preserve").rewrite(body, GATEWAY)
    assert out is body
    verify(parse_agent_card(json.loads(out)))  # raises if the signature broke


def test_signed_card_stripped_and_rewritten() -> None:
    body, verify = signed_card_body()
    assert json.loads(body)["signatures"]
    out = json.loads(CardRewriter(upstream_base=UPSTREAM, signed_cards="strip").rewrite(body, GATEWAY))
    assert "signatures" not in out
    assert out["url"] == "https://agents.example.com/agents/planner/"
    with pytest.raises(Exception, match=r"(?i)signature"):
        verify(parse_agent_card(out))


def test_empty_signatures_is_unsigned() -> None:
    out = rewrite({"url": "http://a/a2a", "signatures": []}, signed_cards="preserve")
    assert out["url"] == "https://agents.example.com/agents/planner" and out["signatures"] == []


# Extended card over JSON-RPC ---------------------------------------------------------------------------------


def test_extended_card_result_is_rewritten_and_errors_pass() -> None:
    rewriter = CardRewriter(upstream_base=UPSTREAM)
    response = {"jsonrpc": "2.0", "id": 3, "result": {"url": "http://10.0.0.5:9000/a2a/"}}
    out = json.loads(rewriter.rewrite_jsonrpc_result(json.dumps(response).encode(), GATEWAY))
    assert out == {"jsonrpc": "2.0", "id": 3, "result": {"url": "https://agents.example.com/agents/planner/"}}
    error = json.dumps({"jsonrpc": "2.0", "id": 3, "error": {"code": -32007, "message": "no"}}).encode()
    assert rewriter.rewrite_jsonrpc_result(error, GATEWAY) is error
    with pytest.raises(A2aInvalidAgentCard):
        rewriter.rewrite_jsonrpc_result(b'{"jsonrpc": "2.0", "id": 3, "result": 5}', GATEWAY)


# Bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"<html>", b"", b"[]", b'"card"', b"null", b'{"url": "a", "url": "b"}', b"[" * 200 + b"]" * 200, b"\xff"],
)
def test_unusable_card_is_a_502(body: bytes) -> None:
    with pytest.raises(A2aInvalidAgentCard) as caught:
        CardRewriter(upstream_base=UPSTREAM).rewrite(body, GATEWAY)
    error = caught.value
    assert error.http_status == 502
    problem = json.loads(error.rest_body())["error"]
    assert problem["code"] == 502 and problem["details"][0]["reason"] == "INVALID_AGENT_RESPONSE"


def test_oversized_card_is_a_502() -> None:
    body = json.dumps({"name": "x" * 2000}).encode()
    with pytest.raises(A2aInvalidAgentCard, match="larger than 1024 bytes"):
        CardRewriter(upstream_base=UPSTREAM, max_card_bytes=1024).rewrite(body, GATEWAY)


def test_rewriter_config_errors() -> None:
    with pytest.raises(ValueError, match="absolute URL"):
        CardRewriter(upstream_base="/a2a")
    with pytest.raises(ValueError, match="signed_cards"):
        CardRewriter(upstream_base=UPSTREAM, signed_cards="resign")  # type: ignore[arg-type]


# External base ------------------------------------------------------------------------------------------------


def test_external_base_from_headers() -> None:
    assert external_base(listener_scheme="http", host=b"gw:8080").url == "http://gw:8080"
    assert external_base(listener_scheme="https", host="[::1]:8443", public_prefix="/a/").url == "https://[::1]:8443/a"
    forwarded = external_base(
        listener_scheme="http", host="gw", forwarded_proto="HTTPS, http", forwarded_host="pub.example.com, gw"
    )
    assert forwarded.url == "https://pub.example.com"
    ignored = external_base(
        listener_scheme="http", host="gw", forwarded_proto="https", forwarded_host="evil.example", trust_forwarded=False
    )
    assert ignored.url == "http://gw"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host": None}, "Host"),
        ({"host": ""}, "Host"),
        ({"host": "gw/path"}, "Host"),
        ({"host": "user@gw"}, "Host"),
        ({"host": "gw:99999"}, "Host"),
        ({"host": "gw:port"}, "Host"),
        ({"host": "gw", "forwarded_host": "bad host"}, "X-Forwarded-Host"),
        ({"host": "gw", "forwarded_proto": "ftp"}, "X-Forwarded-Proto"),
    ],
)
def test_external_base_refuses_bad_headers(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(A2aBadRequestHeader, match=message) as caught:
        external_base(listener_scheme="http", **kwargs)
    assert caught.value.http_status == 400


def test_card_paths() -> None:
    assert is_card_path("/.well-known/agent-card.json") and is_card_path("/.well-known/agent.json?x=1")
    assert not is_card_path("/.well-known/agent-card.json/x") and not is_card_path("/message:send")
