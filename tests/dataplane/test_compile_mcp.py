"""compile_config for MCP backends: typed, immutable settings and errors that name resource and field."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import pytest
import trustme
from google.protobuf.duration_pb2 import Duration

from dataplane.config.compile import ConfigRejected, ResourceError, compile_config
from dataplane.config.mcp import PROCESS_SESSION_KEY
from dataplane.config.model import (
    DEFAULT_MCP_MAX_BODY_BYTES,
    DEFAULT_MCP_SESSION_IDLE_TIMEOUT,
    McpBackendSettings,
    McpSseTarget,
    McpStdioTarget,
    McpStreamableHttpTarget,
)
from dataplane.mcp.federation import FailureMode, FederationConfig, McpFederation, SendToTarget
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, TARGET

KEY = bytes(range(32))
BACKEND_NAME = "ns/tools"


def mcp_backend(**mcp: object) -> pb.Backend:
    mcp.setdefault("session_keys", [pb.McpSessionKey(id="keys/current", key=KEY)])
    return pb.Backend(name=BACKEND_NAME, mcp=pb.McpBackend(**mcp))  # type: ignore[arg-type]


def http(host: str = "10.0.0.1", port: int = 8080, **fields: object) -> pb.McpHttpTransport:
    return pb.McpHttpTransport(address=pb.SocketAddress(host=host, port=port), **fields)  # type: ignore[arg-type]


def server(name: str, **transport: object) -> pb.Target:
    return pb.Target(name=f"{BACKEND_NAME}/{name}", backend=BACKEND_NAME, mcp=pb.McpServer(name=name, **transport))  # type: ignore[arg-type]


def stdio(name: str, command: str = "server", **fields: object) -> pb.Target:
    return server(name, stdio=pb.McpStdioTransport(command=command, **fields))  # type: ignore[arg-type]


def resources(*messages: pb.Backend | pb.Target) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for message in messages:
        out.setdefault(BACKEND if isinstance(message, pb.Backend) else TARGET, {})[message.name] = message
    return out


def settings_of(*messages: pb.Backend | pb.Target) -> McpBackendSettings:
    cluster = compile_config(resources(*messages), version="v").backends[BACKEND_NAME]
    assert cluster.kind == "mcp" and cluster.targets == ()
    assert cluster.mcp is not None
    return cluster.mcp


def rejected(*messages: pb.Backend | pb.Target) -> dict[tuple[str, str, str], str]:
    with pytest.raises(ConfigRejected) as caught:
        compile_config(resources(*messages), version="bad")
    return by_field(caught.value.errors)


def by_field(errors: Iterable[ResourceError]) -> dict[tuple[str, str, str], str]:
    return {(e.type_url.rsplit(".", 1)[-1], e.name, e.field): e.message for e in errors}


def test_three_transports_compile_to_typed_frozen_targets() -> None:
    ca = trustme.CA()
    settings = settings_of(
        mcp_backend(
            prefix_mode=pb.McpBackend.PREFIX_MODE_NEVER,
            failure_mode=pb.McpBackend.FAILURE_MODE_FAIL_OPEN,
            max_request_body_bytes=65536,
            session_idle_timeout=Duration(seconds=90),
        ),
        server(
            "web_search",
            streamable_http=http(
                "search.example.com",
                443,
                path="/v1/mcp",
                tls=pb.UpstreamTls(ca_certificates_pem=ca.cert_pem.bytes(), server_name="sni.example.com"),
                headers=[pb.HttpHeader(name="Authorization", value="Bearer t")],
            ),
        ),
        server("legacy-files", sse=http("::1", 3001)),
        stdio(
            "git", "uvx", args=["mcp-server-git"], env=[pb.EnvironmentVariable(name="A", value="1")], working_dir="/srv"
        ),
    )
    assert (settings.prefix_mode, settings.failure_mode, settings.prefix_names) == ("never", "fail_open", False)
    assert (settings.max_body_bytes, settings.session_idle_timeout) == (65536, 90.0)
    assert [t.name for t in settings.targets] == ["git", "legacy-files", "web_search"]  # by resource name
    git, files, search = settings.targets
    assert git == McpStdioTarget(
        name="git", command="uvx", args=("mcp-server-git",), env=(("A", "1"),), working_dir="/srv"
    )
    assert isinstance(files, McpSseTarget)
    assert (files.path, files.authority, files.ssl_context) == ("/sse", "[::1]:3001", None)
    assert isinstance(search, McpStreamableHttpTarget)
    assert (search.path, search.server_name, search.headers) == (
        "/v1/mcp",
        "sni.example.com",
        (("authorization", "Bearer t"),),
    )
    assert search.ssl_context is not None and search.ssl_context.get_ca_certs()
    assert settings.target("git") is git and settings.target("nope") is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.prefix_mode = "always"  # type: ignore[misc]


def test_defaults_and_conditional_prefixing() -> None:
    one = settings_of(mcp_backend(), server("a", streamable_http=http()))
    assert (one.prefix_mode, one.failure_mode, one.prefix_names) == ("conditional", "fail_closed", False)
    assert (one.max_body_bytes, one.session_idle_timeout) == (
        DEFAULT_MCP_MAX_BODY_BYTES,
        DEFAULT_MCP_SESSION_IDLE_TIMEOUT,
    )
    assert one.targets[0].path == "/mcp"  # type: ignore[union-attr]
    two = settings_of(mcp_backend(), stdio("a"), stdio("b"))
    assert two.prefix_names is True
    always = settings_of(mcp_backend(prefix_mode=pb.McpBackend.PREFIX_MODE_ALWAYS), stdio("a"))
    assert always.prefix_names is True


def test_keyring_order_and_lookup_keep_key_out_of_repr() -> None:
    old = bytes(range(32, 64))
    settings = settings_of(
        mcp_backend(session_keys=[pb.McpSessionKey(id="new", key=KEY), pb.McpSessionKey(id="old", key=old)]),
        stdio("a"),
    )
    assert [(k.key_id, k.key) for k in settings.session_keys] == [("new", KEY), ("old", old)]
    assert settings.session_key("old") is settings.session_keys[1]
    assert settings.session_key("gone") is None
    assert repr(KEY) not in repr(settings)


def test_no_keys_means_a_process_local_key() -> None:
    settings = settings_of(pb.Backend(name=BACKEND_NAME, mcp=pb.McpBackend()), stdio("a"))
    assert settings.session_keys == (PROCESS_SESSION_KEY,)
    assert len(PROCESS_SESSION_KEY.key) == 32


def test_backend_without_targets_compiles() -> None:
    """Targets arrive after their Backend: an MCP backend may briefly have none."""
    assert settings_of(mcp_backend()).targets == ()


@pytest.mark.parametrize(
    ("backend", "field", "message"),
    [
        (mcp_backend(session_keys=[pb.McpSessionKey(id="k", key=b"short")]), "mcp.session_keys[0].key", "got 5"),
        (
            mcp_backend(session_keys=[pb.McpSessionKey(id="k", key=KEY), pb.McpSessionKey(id="k", key=KEY)]),
            "mcp.session_keys[1].id",
            "duplicate key id",
        ),
        (mcp_backend(session_keys=[pb.McpSessionKey(id="", key=KEY)]), "mcp.session_keys[0].id", "invalid key id"),
        (
            mcp_backend(session_keys=[pb.McpSessionKey(id=PROCESS_SESSION_KEY.key_id, key=KEY)]),
            "mcp.session_keys[0].id",
            "reserved",
        ),
        (mcp_backend(prefix_mode=7), "mcp.prefix_mode", "unknown PrefixMode value 7"),  # type: ignore[arg-type]
        (mcp_backend(failure_mode=9), "mcp.failure_mode", "unknown FailureMode value 9"),  # type: ignore[arg-type]
        (mcp_backend(max_request_body_bytes=(1 << 30) + 1), "mcp.max_request_body_bytes", "exceeds"),
        (mcp_backend(session_idle_timeout=Duration(seconds=0)), "mcp.session_idle_timeout", "greater than zero"),
        (mcp_backend(session_idle_timeout=Duration(seconds=-1)), "mcp.session_idle_timeout", "non-negative"),
        (mcp_backend(allowed_origins=["https://a.test/path"]), "mcp.allowed_origins", "not an origin"),
    ],
)
def test_backend_errors_name_the_field(backend: pb.Backend, field: str, message: str) -> None:
    errors = rejected(backend, stdio("a"))
    assert message in errors[("Backend", BACKEND_NAME, field)], errors


def test_allowed_origins_compile_once_and_default_to_none() -> None:
    assert settings_of(mcp_backend(), stdio("a")).allowed_origins is None
    origins = settings_of(mcp_backend(allowed_origins=["https://App.test:443", "http://localhost:*"]), stdio("a"))
    assert origins.allowed_origins is not None
    assert origins.allowed_origins.allows("https://app.test")
    assert origins.allowed_origins.allows("http://localhost:5173")
    assert not origins.allowed_origins.allows("https://evil.test")


def test_key_material_never_appears_in_errors() -> None:
    secret = b"s3cr3t-key-material"
    with pytest.raises(ConfigRejected) as caught:
        compile_config(resources(mcp_backend(session_keys=[pb.McpSessionKey(id="k", key=secret)])), version="v")
    assert "s3cr3t" not in str(caught.value)


def test_backend_level_tls_is_rejected() -> None:
    backend = mcp_backend()
    backend.tls.SetInParent()
    assert "set tls per target" in rejected(backend, stdio("a"))[("Backend", BACKEND_NAME, "tls")]


@pytest.mark.parametrize(
    ("target", "field", "message"),
    [
        (server("bad.name", streamable_http=http()), "mcp.name", "invalid MCP target name"),
        (server("", streamable_http=http()), "mcp.name", "invalid MCP target name"),
        (server("two__parts", streamable_http=http()), "mcp.name", "prefix separator"),
        (
            pb.Target(
                name=f"{BACKEND_NAME}/a", backend=BACKEND_NAME, mcp=pb.McpServer(name="b", stdio={"command": "x"})
            ),
            "mcp.name",
            "does not match the target key",
        ),
        (server("a"), "mcp.transport", "one of streamable_http, sse, stdio"),
        (server("a", streamable_http=http("bad host")), "mcp.streamable_http.address.host", "invalid host"),
        (server("a", sse=http(port=0)), "mcp.sse.address.port", "not a port"),
        (server("a", sse=http(port=70000)), "mcp.sse.address.port", "not a port"),
        (server("a", streamable_http=http(path="mcp")), "mcp.streamable_http.path", "invalid path"),
        (
            server("a", streamable_http=http(headers=[pb.HttpHeader(name="Mcp-Session-Id", value="x")])),
            "mcp.streamable_http.headers[0].name",
            "set by the gateway",
        ),
        (
            server("a", streamable_http=http(headers=[pb.HttpHeader(name="bad name", value="x")])),
            "mcp.streamable_http.headers[0].name",
            "invalid header name",
        ),
        (
            server(
                "a",
                streamable_http=http(
                    headers=[pb.HttpHeader(name="X-A", value="1"), pb.HttpHeader(name="x-a", value="2")]
                ),
            ),
            "mcp.streamable_http.headers[1].name",
            "appears twice",
        ),
        (
            server("a", streamable_http=http(headers=[pb.HttpHeader(name="X-A", value="a\r\nb")])),
            "mcp.streamable_http.headers[0].value",
            "invalid header value",
        ),
        (
            server("a", streamable_http=http(tls=pb.UpstreamTls(ca_certificates_pem=b"not pem"))),
            "mcp.streamable_http.tls.ca_certificates_pem",
            "cannot load CA certificates",
        ),
        (
            server("a", sse=http(tls=pb.UpstreamTls(server_name="bad name"))),
            "mcp.sse.tls.server_name",
            "invalid server name",
        ),
        (stdio("a", ""), "mcp.stdio.command", "required"),
        (stdio("a", "x\0y"), "mcp.stdio.command", "NUL"),
        (stdio("a", args=["ok", "b\0d"]), "mcp.stdio.args[1]", "NUL"),
        (stdio("a", env=[pb.EnvironmentVariable(name="1A", value="v")]), "mcp.stdio.env[0].name", "invalid variable"),
        (
            stdio("a", env=[pb.EnvironmentVariable(name="A", value="1"), pb.EnvironmentVariable(name="A", value="2")]),
            "mcp.stdio.env[1].name",
            "set twice",
        ),
        (stdio("a", working_dir="relative"), "mcp.stdio.working_dir", "not an absolute path"),
    ],
)
def test_target_errors_name_resource_and_field(target: pb.Target, field: str, message: str) -> None:
    errors = rejected(mcp_backend(), target)
    assert ("Target", target.name, field) in errors, errors
    assert message in errors[("Target", target.name, field)]


def test_duplicate_server_names_under_distinct_keys() -> None:
    """Keys are unique and must be "<backend>/<name>", so a second Target claiming a name is rejected."""
    errors = rejected(
        mcp_backend(),
        server("a", streamable_http=http()),
        pb.Target(name=f"{BACKEND_NAME}/a2", backend=BACKEND_NAME, mcp=pb.McpServer(name="a", stdio={"command": "x"})),
    )
    assert "does not match the target key" in errors[("Target", f"{BACKEND_NAME}/a2", "mcp.name")]


def test_mixing_target_kinds_is_rejected_on_the_target() -> None:
    address = pb.Target(
        name=f"{BACKEND_NAME}/10.0.0.1:80", backend=BACKEND_NAME, address=pb.SocketAddress(host="10.0.0.1", port=80)
    )
    errors = rejected(mcp_backend(), address)
    assert "its targets must be mcp" in errors[("Target", address.name, "address")]
    http_backend = pb.Backend(name="ns/web", http=pb.HttpBackend())
    stray = pb.Target(name="ns/web/a", backend="ns/web", mcp=pb.McpServer(name="a", stdio={"command": "x"}))
    errors = rejected(http_backend, stray)
    assert "not an MCP backend" in errors[("Target", "ns/web/a", "mcp")]


def test_target_of_unknown_backend_is_ignored() -> None:
    orphan = pb.Target(name="ns/gone/a", backend="ns/gone", mcp=pb.McpServer(name="a", stdio={"command": "x"}))
    config = compile_config(resources(mcp_backend(), orphan), version="v")
    assert "ns/gone" not in config.backends


def test_errors_are_all_reported_together() -> None:
    errors = rejected(
        mcp_backend(session_keys=[pb.McpSessionKey(id="k", key=b"")]),
        stdio("a", ""),
        server("b", sse=http(port=0)),
    )
    assert {field for _, _, field in errors} >= {"mcp.session_keys[0].key", "mcp.stdio.command", "mcp.sse.address.port"}



def test_compiled_settings_drive_the_federation_core() -> None:
    settings = settings_of(
        mcp_backend(failure_mode=pb.McpBackend.FAILURE_MODE_FAIL_OPEN),
        server("git-hub", streamable_http=http()),
        stdio("fs"),
    )
    config = FederationConfig.from_settings(settings)
    assert config.failure_mode is FailureMode.FAIL_OPEN
    assert config.naming.prefixed, "conditional prefixing with two targets"
    actions = McpFederation(config).receive_from_client(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "git-hub__create_issue"}}
    )
    # The core first learns the target's tools (so hidden and unknown tools answer alike) or
    # forwards the call: either way only to git-hub, and never an error for a valid prefix.
    assert actions and all(isinstance(a, SendToTarget) and a.target == "git-hub" for a in actions)


def test_never_prefix_mode_reaches_the_federation_core() -> None:
    settings = settings_of(
        mcp_backend(prefix_mode=pb.McpBackend.PREFIX_MODE_NEVER),
        server("a", streamable_http=http()),
        stdio("b"),
    )
    config = FederationConfig.from_settings(settings)
    assert not config.naming.prefixed and config.failure_mode is FailureMode.FAIL_CLOSED
