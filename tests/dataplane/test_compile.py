"""compile_config: listener grouping, backends, TLS, route attachment and validation errors."""

from __future__ import annotations

import contextlib
import dataclasses
import ssl
from collections.abc import Iterable

import pytest
import trustme
from google.protobuf.duration_pb2 import Duration

from dataplane.config.compile import ConfigRejected, ResourceError, compile_config
from dataplane.config.model import RuntimeConfig, UpstreamCluster
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, ROUTE, TARGET, ResourceMap

HTTP, HTTPS = pb.LISTENER_PROTOCOL_HTTP, pb.LISTENER_PROTOCOL_HTTPS


@dataclasses.dataclass(frozen=True)
class Pem:
    chain: bytes
    key: bytes


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cert(ca: trustme.CA) -> Pem:
    issued = ca.issue_cert("gateway.example.com")
    return Pem(b"".join(blob.bytes() for blob in issued.cert_chain_pems), issued.private_key_pem.bytes())


@pytest.fixture(scope="module")
def other_cert(ca: trustme.CA) -> Pem:
    issued = ca.issue_cert("other.example.com")
    return Pem(b"".join(blob.bytes() for blob in issued.cert_chain_pems), issued.private_key_pem.bytes())


def listener(name: str, port: int = 8080, *, protocol: int = HTTP, **fields: object) -> pb.Listener:
    return pb.Listener(name=name, gateway="ns/gw", port=port, protocol=protocol, **fields)


def https_listener(name: str, pem: Pem, port: int = 8443, **fields: object) -> pb.Listener:
    tls = pb.ServerTls(certificate_chain_pem=pem.chain, private_key_pem=pem.key)
    return listener(name, port, protocol=HTTPS, tls=tls, **fields)


def rule(name: str, listeners: Iterable[str] = ("ns/gw/http",), **fields: object) -> pb.Route:
    fields.setdefault("backends", [pb.BackendRef(backend="ns/web", weight=1)])
    key, _, index = name.rpartition("/")
    return pb.Route(name=name, listeners=list(listeners), route_key=key, rule_index=int(index), **fields)


def resources(*messages: pb.Listener | pb.Route | pb.Backend | pb.Target) -> dict[str, dict[str, object]]:
    by_type = {pb.Listener: LISTENER, pb.Route: ROUTE, pb.Backend: BACKEND, pb.Target: TARGET}
    out: dict[str, dict[str, object]] = {}
    for message in messages:
        out.setdefault(by_type[type(message)], {})[message.name] = message
    return out


def rejected(resource_map: ResourceMap) -> tuple[ResourceError, ...]:
    with pytest.raises(ConfigRejected) as caught:
        compile_config(resource_map, version="bad")
    return caught.value.errors


def fields_of(errors: Iterable[ResourceError]) -> set[tuple[str, str, str]]:
    return {(error.type_url.rsplit(".", 1)[-1], error.name, error.field) for error in errors}


# --- the runtime model -------------------------------------------------------------------------


def test_empty_config_has_nothing() -> None:
    empty = RuntimeConfig.empty()
    assert (empty.version, dict(empty.listeners), dict(empty.backends)) == ("", {}, {})
    assert compile_config({}, version="v0").listeners == {}


def test_config_is_immutable_and_keeps_raw_resources() -> None:
    raw = resources(listener("ns/gw/http"))
    config = compile_config(raw, version="v1")
    assert config.version == "v1"
    assert config.resources[LISTENER]["ns/gw/http"] is raw[LISTENER]["ns/gw/http"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.version = "v2"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.listeners[("0.0.0.0", 1)] = None  # type: ignore[index]
    # Later edits to the caller's dict do not leak into a compiled config.
    raw[LISTENER]["ns/gw/late"] = listener("ns/gw/late", 9090)
    assert "ns/gw/late" not in config.resources[LISTENER]


def test_unknown_type_urls_are_ignored() -> None:
    raw = resources(listener("ns/gw/http"))
    raw["type.googleapis.com/agentgate.config.v1.Future"] = {"x": pb.Listener()}
    assert list(compile_config(raw, version="v").listeners) == [("0.0.0.0", 8080)]


# --- listener groups -----------------------------------------------------------------------------


def test_listeners_on_one_port_share_a_group() -> None:
    config = compile_config(
        resources(
            listener("ns/gw/a", hostname="a.example.com"),
            listener("ns/gw/b", hostname="b.example.com"),
            listener("ns/gw/any"),
            listener("ns/gw/other-port", 9090),
            listener("ns/gw/loopback", 8080, address="127.0.0.1"),
        ),
        version="v",
    )
    assert set(config.listeners) == {("0.0.0.0", 8080), ("0.0.0.0", 9090), ("127.0.0.1", 8080)}
    shared = config.listeners[("0.0.0.0", 8080)]
    assert shared.listener_names == ("ns/gw/a", "ns/gw/any", "ns/gw/b")
    assert (shared.address, shared.port, shared.tls) == ("0.0.0.0", 8080, None)
    assert shared.bind_key == ("0.0.0.0", 8080, None)


def test_ipv6_bind_address_is_normalised() -> None:
    config = compile_config(resources(listener("ns/gw/v6", address="0:0::0:1")), version="v")
    assert list(config.listeners) == [("::1", 8080)]


@pytest.mark.parametrize(
    ("second", "field"),
    [
        (listener("ns/gw/b", 8443, hostname="b.example.com"), "protocol"),
        (listener("ns/gw/b", 8443, protocol=HTTPS, hostname="a.example.com"), "hostname"),
    ],
)
def test_listener_conflicts_on_one_bind(cert: Pem, second: pb.Listener, field: str) -> None:
    if second.protocol == HTTPS:
        second.tls.CopyFrom(pb.ServerTls(certificate_chain_pem=cert.chain, private_key_pem=cert.key))
    errors = rejected(resources(https_listener("ns/gw/a", cert, hostname="a.example.com"), second))
    assert fields_of(errors) == {("Listener", "ns/gw/b", field)}
    assert "ns/gw/a" in errors[0].message


def _served_certificate(server: ssl.SSLContext, ca: trustme.CA, server_name: str | None) -> str:
    """Run a TLS handshake in memory (no sockets) and return the subject the server presented."""
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    client_context.check_hostname = False
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_hostname=server_name)
    served = server.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):  # a TLS 1.3 handshake needs two round trips
        for side in (client, served):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            continue
    certificate = client.getpeercert()
    return next(value for rdn in certificate["subjectAltName"] for value in rdn[1:])  # type: ignore[index]


def test_https_listeners_sharing_a_port_select_their_certificate_by_sni(
    ca: trustme.CA, cert: Pem, other_cert: Pem
) -> None:
    config = compile_config(
        resources(
            https_listener("ns/gw/a", cert, hostname="gateway.example.com"),
            https_listener("ns/gw/b", other_cert, hostname="*.example.com"),
        ),
        version="v1",
    )
    (group,) = config.listeners.values()
    assert group.tls is not None and group.tls.sni_hosts
    context = group.tls.ssl_context
    assert _served_certificate(context, ca, "gateway.example.com") == "gateway.example.com"
    assert _served_certificate(context, ca, "x.example.com") == "other.example.com", "wildcard listener"
    assert _served_certificate(context, ca, None) == "gateway.example.com", "no SNI: the first listener"
    # Changing one certificate changes the group's fingerprint, so the socket is rebuilt.
    changed = compile_config(
        resources(
            https_listener("ns/gw/a", cert, hostname="gateway.example.com"),
            https_listener("ns/gw/b", cert, hostname="*.example.com"),
        ),
        version="v2",
    )
    assert next(iter(changed.listeners.values())).bind_key != group.bind_key


@pytest.mark.parametrize("port", [0, 65536, 100_000])
def test_listener_port_out_of_range(port: int) -> None:
    errors = rejected(resources(listener("ns/gw/http", port)))
    assert fields_of(errors) == {("Listener", "ns/gw/http", "port")}
    assert str(port) in errors[0].message


def test_duplicate_listener_names() -> None:
    raw = {LISTENER: {"ns/gw/a": listener("ns/gw/a"), "ns/gw/b": listener("ns/gw/a", 9090)}}
    assert ("Listener", "ns/gw/b", "name") in fields_of(rejected(raw))


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (listener("ns/gw/l", protocol=7), "protocol"),
        (listener("ns/gw/l", address="not-an-ip"), "address"),
        (listener("ns/gw/l", hostname="bad_host!"), "hostname"),
        (listener("ns/gw/l", tls=pb.ServerTls(certificate_chain_pem=b"x")), "tls"),
        (listener("ns/gw/l", protocol=HTTPS), "tls"),
    ],
)
def test_listener_validation(bad: pb.Listener, field: str) -> None:
    assert fields_of(rejected(resources(bad))) == {("Listener", "ns/gw/l", field)}


def test_unknown_enum_value_is_named() -> None:
    (error,) = rejected(resources(listener("ns/gw/l", protocol=7)))
    assert str(error) == "Listener ns/gw/l: protocol: unknown ListenerProtocol value 7"


# --- TLS -----------------------------------------------------------------------------------------


def test_https_listener_builds_a_server_context(cert: Pem) -> None:
    config = compile_config(resources(https_listener("ns/gw/https", cert)), version="v")
    group = config.listeners[("0.0.0.0", 8443)]
    assert group.tls is not None
    assert isinstance(group.tls.ssl_context, ssl.SSLContext)
    assert group.tls.alpn_protocols == ("h2", "http/1.1")
    assert group.tls.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert group.bind_key == ("0.0.0.0", 8443, group.tls.fingerprint)
    assert "PRIVATE KEY" not in repr(group.tls)


def test_bind_key_is_stable_for_the_same_material_and_changes_with_it(cert: Pem, other_cert: Pem) -> None:
    first = compile_config(resources(https_listener("ns/gw/https", cert)), version="1")
    again = compile_config(resources(https_listener("ns/gw/https", cert)), version="2")
    rotated = compile_config(resources(https_listener("ns/gw/https", other_cert)), version="3")
    bind = ("0.0.0.0", 8443)
    assert first.listeners[bind].bind_key == again.listeners[bind].bind_key
    assert first.listeners[bind].bind_key != rotated.listeners[bind].bind_key


def test_custom_alpn_is_kept(cert: Pem) -> None:
    lst = https_listener("ns/gw/https", cert)
    lst.tls.alpn_protocols[:] = ["http/1.1"]
    group = compile_config(resources(lst), version="v").listeners[("0.0.0.0", 8443)]
    assert group.tls is not None and group.tls.alpn_protocols == ("http/1.1",)


@pytest.mark.parametrize(
    ("chain", "key", "field"),
    [
        ("mine", "other", "tls"),  # a key that does not belong to the certificate
        ("mine", "garbage", "tls"),
        ("garbage", "mine", "tls"),
        ("mine", "", "tls.private_key_pem"),
        ("", "mine", "tls.certificate_chain_pem"),
    ],
)
def test_bad_certificate_or_key_is_a_listener_error(
    cert: Pem, other_cert: Pem, chain: str, key: str, field: str
) -> None:
    pick = {"mine": cert, "other": other_cert}
    chain_pem = pick[chain].chain if chain in pick else (b"garbage" if chain else b"")
    key_pem = pick[key].key if key in pick else (b"garbage" if key else b"")
    lst = listener(
        "ns/gw/https", 8443, protocol=HTTPS, tls=pb.ServerTls(certificate_chain_pem=chain_pem, private_key_pem=key_pem)
    )
    errors = rejected(resources(lst))
    assert fields_of(errors) == {("Listener", "ns/gw/https", field)}


def test_upstream_tls_with_ca_and_http2(ca: trustme.CA) -> None:
    backend = pb.Backend(
        name="ns/api",
        protocol=pb.UPSTREAM_PROTOCOL_HTTP2,
        tls=pb.UpstreamTls(ca_certificates_pem=ca.cert_pem.bytes(), server_name="api.internal"),
    )
    cluster = compile_config(resources(backend), version="v").backends["ns/api"]
    assert cluster.protocol == "http2"
    assert cluster.server_name == "api.internal"
    assert cluster.ssl_context is not None
    assert cluster.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert cluster.ssl_context.check_hostname


def test_upstream_tls_insecure_skip_verify() -> None:
    backend = pb.Backend(name="ns/api", tls=pb.UpstreamTls(insecure_skip_verify=True))
    context = compile_config(resources(backend), version="v").backends["ns/api"].ssl_context
    assert context is not None
    assert context.verify_mode == ssl.CERT_NONE
    assert not context.check_hostname


def test_bad_upstream_ca_is_a_backend_error() -> None:
    backend = pb.Backend(name="ns/api", tls=pb.UpstreamTls(ca_certificates_pem=b"not a pem"))
    assert fields_of(rejected(resources(backend))) == {("Backend", "ns/api", "tls.ca_certificates_pem")}


# --- backends and targets ----------------------------------------------------------------------


def test_backend_defaults() -> None:
    cluster = compile_config(resources(pb.Backend(name="ns/web")), version="v").backends["ns/web"]
    assert cluster == UpstreamCluster(name="ns/web")
    assert (cluster.protocol, cluster.connect_timeout, cluster.idle_timeout, cluster.max_connections) == (
        "http1",
        5.0,
        60.0,
        1024,
    )
    assert cluster.ssl_context is None and cluster.server_name is None and cluster.targets == ()


def test_backend_pool_settings() -> None:
    pool = pb.ConnectionPool(
        connect_timeout=Duration(seconds=1, nanos=500_000_000), idle_timeout=Duration(seconds=30), max_connections=8
    )
    cluster = compile_config(resources(pb.Backend(name="ns/web", pool=pool, mcp=pb.McpBackend())), version="v")
    web = cluster.backends["ns/web"]
    assert (web.connect_timeout, web.idle_timeout, web.max_connections, web.kind) == (1.5, 30.0, 8, "mcp")


def test_targets_attach_to_their_backend() -> None:
    config = compile_config(
        resources(
            pb.Backend(name="ns/web"),
            pb.Target(name="ns/web/b", backend="ns/web", weight=3, address=pb.SocketAddress(host="10.0.0.2", port=80)),
            pb.Target(name="ns/web/a", backend="ns/web", address=pb.SocketAddress(host="2001:db8::1", port=8080)),
            pb.Target(name="ns/gone/x", backend="ns/gone", address=pb.SocketAddress(host="10.0.0.9", port=80)),
        ),
        version="v",
    )
    targets = config.backends["ns/web"].targets
    assert [(t.name, t.weight, t.authority) for t in targets] == [
        ("ns/web/a", 1, "[2001:db8::1]:8080"),  # weight 0 means 1
        ("ns/web/b", 3, "10.0.0.2:80"),
    ]
    assert "ns/gone" not in config.backends


@pytest.mark.parametrize(
    ("address", "field"),
    [
        (pb.SocketAddress(host="10.0.0.1", port=0), "address.port"),
        (pb.SocketAddress(host="10.0.0.1", port=70000), "address.port"),
        (pb.SocketAddress(host="", port=80), "address.host"),
        (pb.SocketAddress(host="bad host", port=80), "address.host"),
        (None, "address"),
    ],
)
def test_target_validation(address: pb.SocketAddress | None, field: str) -> None:
    target = pb.Target(name="ns/web/t", backend="ns/web")
    if address is not None:
        target.address.CopyFrom(address)
    errors = rejected(resources(pb.Backend(name="ns/web"), target))
    assert fields_of(errors) == {("Target", "ns/web/t", field)}


def test_target_weights_overflow() -> None:
    targets = [
        pb.Target(name=f"ns/web/{i}", backend="ns/web", weight=2**32 - 1, address=pb.SocketAddress(host="h", port=1))
        for i in range(2)
    ]
    assert fields_of(rejected(resources(pb.Backend(name="ns/web"), *targets))) == {("Backend", "ns/web", "targets")}


# --- routes ------------------------------------------------------------------------------------


def test_missing_backend_resolves_to_none_at_compile_time() -> None:
    config = compile_config(
        resources(
            listener("ns/gw/http"),
            pb.Backend(name="ns/web"),
            rule(
                "ns/r/0",
                backends=[pb.BackendRef(backend="ns/web", weight=1), pb.BackendRef(backend="ns/missing", weight=1)],
            ),
        ),
        version="v",
    )
    found = config.listeners[("0.0.0.0", 8080)].route_table.match("h", "/", "", "GET", {})
    assert found is not None
    by_name = {choice.name: choice for choice in found.route.backends}
    assert by_name["ns/missing"].cluster is None
    assert by_name["ns/web"].cluster is config.backends["ns/web"]


def test_route_attaches_to_every_group_of_its_listeners_once() -> None:
    config = compile_config(
        resources(
            listener("ns/gw/a", hostname="a.example.com"),
            listener("ns/gw/b", hostname="b.example.com"),
            listener("ns/gw/admin", 9090),
            rule("ns/r/0", ["ns/gw/a", "ns/gw/b", "ns/gw/admin", "ns/gw/gone"]),
            rule("ns/orphan/0", ["ns/gw/gone"]),
        ),
        version="v",
    )
    assert config.listeners[("0.0.0.0", 8080)].route_table.rule_count == 1
    assert config.listeners[("0.0.0.0", 9090)].route_table.rule_count == 1


def test_route_settings_are_compiled() -> None:
    route = rule(
        "ns/r/0",
        timeouts=pb.RouteTimeouts(request=Duration(seconds=10), backend_request=Duration(seconds=2)),
        filters=[
            pb.RouteFilter(
                request_header_modifier=pb.HeaderModifier(set=[pb.HeaderModifier.Header(name="X-A", value="1")])
            ),
            pb.RouteFilter(response_header_modifier=pb.HeaderModifier(remove=["server"])),
            pb.RouteFilter(
                url_rewrite=pb.UrlRewrite(hostname="internal", path=pb.PathModifier(replace_prefix_match="/v2"))
            ),
        ],
        backends=[
            pb.BackendRef(
                backend="ns/web",
                weight=1,
                filters=[
                    pb.RouteFilter(request_header_modifier=pb.HeaderModifier(add=[{"name": "x-b", "value": "2"}]))
                ],
            )
        ],
        matches=[pb.RouteMatch(path=pb.PathMatch(kind=pb.PathMatch.KIND_PREFIX, value="/v1"))],
        creation_unix_seconds=5,
    )
    config = compile_config(resources(listener("ns/gw/http"), pb.Backend(name="ns/web"), route), version="v")
    found = config.listeners[("0.0.0.0", 8080)].route_table.match("h", "/v1/x", "", "GET", {})
    assert found is not None
    compiled = found.route
    assert (compiled.name, compiled.route_key, compiled.request_timeout, compiled.backend_timeout) == (
        "ns/r/0",
        "ns/r",
        10.0,
        2.0,
    )
    assert compiled.request_headers is not None and compiled.request_headers.apply([]) == [(b"x-a", b"1")]
    assert compiled.response_headers is not None
    assert compiled.response_headers.apply([(b"Server", b"x")]) == []
    assert compiled.url_rewrite is not None and compiled.url_rewrite.hostname == "internal"
    assert compiled.url_rewrite.rewrite_path("/v1/x", found.matched_prefix) == "/v2/x"
    choice = compiled.pick_backend()
    assert choice is not None and choice.request_headers is not None
    assert choice.request_headers.apply([]) == [(b"x-b", b"2")]


def test_redirect_and_direct_response_are_compiled() -> None:
    redirect = pb.RequestRedirect(scheme="https", status_code=301)
    config = compile_config(
        resources(
            listener("ns/gw/http"),
            rule("ns/r/0", filters=[pb.RouteFilter(request_redirect=redirect)], backends=[]),
            rule(
                "ns/s/0",
                direct_response_status=500,
                matches=[pb.RouteMatch(path=pb.PathMatch(kind=pb.PathMatch.KIND_EXACT, value="/broken"))],
            ),
        ),
        version="v",
    )
    table = config.listeners[("0.0.0.0", 8080)].route_table
    moved = table.match("h", "/x", "", "GET", {})
    broken = table.match("h", "/broken", "", "GET", {})
    assert moved is not None and moved.route.redirect is not None
    assert moved.route.redirect.status == 301
    assert moved.route.redirect.location("http", "h", 80, "/x", "", moved.matched_prefix) == "https://h/x"
    assert moved.route.pick_backend() is None
    assert broken is not None and broken.route.direct_response_status == 500


def test_zero_timeouts_disable_them() -> None:
    route = rule("ns/r/0", timeouts=pb.RouteTimeouts(request=Duration(seconds=0)))
    config = compile_config(resources(listener("ns/gw/http"), route), version="v")
    found = config.listeners[("0.0.0.0", 8080)].route_table.match("h", "/", "", "GET", {})
    assert found is not None and found.route.request_timeout is None


EXACT = pb.PathMatch.KIND_EXACT
ROUTE_ERRORS = [
    pytest.param(
        {"matches": [pb.RouteMatch(path=pb.PathMatch(kind=pb.PathMatch.KIND_REGEX, value="(unclosed"))]},
        "matches[0].path.value",
        id="bad-path-regex",
    ),
    pytest.param(
        {"matches": [pb.RouteMatch(path=pb.PathMatch(kind=9, value="/"))]}, "matches[0].path.kind", id="path-kind-enum"
    ),
    pytest.param(
        {"matches": [pb.RouteMatch(path=pb.PathMatch(kind=EXACT, value="no-slash"))]},
        "matches[0].path.value",
        id="relative-path",
    ),
    pytest.param(
        {"matches": [pb.RouteMatch(headers=[pb.HeaderMatch(name="bad name", value="x")])]},
        "matches[0].headers[0].name",
        id="bad-header-name",
    ),
    pytest.param(
        {"matches": [pb.RouteMatch(headers=[pb.HeaderMatch(name="h", value="[", kind=pb.STRING_MATCH_KIND_REGEX)])]},
        "matches[0].headers[0].value",
        id="bad-header-regex",
    ),
    pytest.param(
        {"matches": [pb.RouteMatch(query_params=[pb.QueryParamMatch(name="q", kind=5)])]},
        "matches[0].query_params[0].kind",
        id="query-kind-enum",
    ),
    pytest.param({"matches": [pb.RouteMatch(method="GE T")]}, "matches[0].method", id="bad-method"),
    pytest.param({"hostnames": ["*bad*.example.com"]}, "hostnames[0]", id="bad-hostname"),
    pytest.param({"direct_response_status": 600}, "direct_response_status", id="status-too-high"),
    pytest.param({"direct_response_status": 99}, "direct_response_status", id="status-too-low"),
    pytest.param(
        {"filters": [pb.RouteFilter(request_header_modifier=pb.HeaderModifier(set=[{"name": "a:b", "value": "1"}]))]},
        "filters[0].request_header_modifier.set[0].name",
        id="bad-set-header-name",
    ),
    pytest.param(
        {
            "filters": [
                pb.RouteFilter(response_header_modifier=pb.HeaderModifier(add=[{"name": "a", "value": "x\r\ny"}]))
            ]
        },
        "filters[0].response_header_modifier.add[0].value",
        id="header-value-injection",
    ),
    pytest.param(
        {"filters": [pb.RouteFilter(request_redirect=pb.RequestRedirect(status_code=404))]},
        "filters[0].request_redirect.status_code",
        id="redirect-status",
    ),
    pytest.param(
        {"filters": [pb.RouteFilter(request_redirect=pb.RequestRedirect(scheme="ftp"))]},
        "filters[0].request_redirect.scheme",
        id="redirect-scheme",
    ),
    pytest.param(
        {"filters": [pb.RouteFilter(request_redirect=pb.RequestRedirect(port=70000))]},
        "filters[0].request_redirect.port",
        id="redirect-port",
    ),
    pytest.param(
        {
            "matches": [pb.RouteMatch(path=pb.PathMatch(kind=EXACT, value="/x"))],
            "filters": [pb.RouteFilter(url_rewrite=pb.UrlRewrite(path=pb.PathModifier(replace_prefix_match="/y")))],
        },
        "filters[0].url_rewrite.path.replace_prefix_match",
        id="prefix-rewrite-needs-prefix-match",
    ),
    pytest.param(
        {
            "filters": [
                pb.RouteFilter(url_rewrite=pb.UrlRewrite(hostname="a")),
                pb.RouteFilter(request_redirect=pb.RequestRedirect(hostname="b")),
            ]
        },
        "filters",
        id="rewrite-and-redirect-together",
    ),
    pytest.param(
        {"filters": [pb.RouteFilter(url_rewrite=pb.UrlRewrite()), pb.RouteFilter(url_rewrite=pb.UrlRewrite())]},
        "filters[1].url_rewrite",
        id="duplicate-filter",
    ),
    pytest.param(
        {
            "backends": [
                pb.BackendRef(backend="ns/web", weight=1, filters=[pb.RouteFilter(url_rewrite=pb.UrlRewrite())])
            ]
        },
        "backends[0].filters[0].url_rewrite",
        id="rewrite-on-backend-ref",
    ),
    pytest.param(
        {"backends": [pb.BackendRef(backend="ns/a", weight=2**32 - 1), pb.BackendRef(backend="ns/b", weight=1)]},
        "backends",
        id="weights-overflow",
    ),
    pytest.param({"backends": [pb.BackendRef(weight=1)]}, "backends[0].backend", id="backend-name-required"),
    pytest.param(
        {"timeouts": pb.RouteTimeouts(request=Duration(seconds=1), backend_request=Duration(seconds=2))},
        "timeouts.backend_request",
        id="backend-timeout-over-request-timeout",
    ),
    pytest.param(
        {"timeouts": pb.RouteTimeouts(request=Duration(seconds=-1))}, "timeouts.request", id="negative-timeout"
    ),
]


@pytest.mark.parametrize(("fields", "field"), ROUTE_ERRORS)
def test_route_validation_names_resource_and_field(fields: dict, field: str) -> None:
    errors = rejected(resources(listener("ns/gw/http"), rule("ns/web/0", **fields)))
    assert fields_of(errors) == {("Route", "ns/web/0", field)}


def test_error_message_format() -> None:
    bad = rule("default/web/0", matches=[pb.RouteMatch(path=pb.PathMatch(kind=pb.PathMatch.KIND_REGEX, value="(("))])
    (error,) = rejected(resources(bad))
    assert str(error).startswith("Route default/web/0: matches[0].path.value: invalid regular expression: ")
    assert error.type_url == ROUTE


def test_all_errors_are_collected() -> None:
    with pytest.raises(ConfigRejected) as caught:
        compile_config(
            resources(
                listener("ns/gw/http", 0),
                pb.Backend(name="ns/web", protocol=9),
                rule("ns/a/0", direct_response_status=1000),
                rule("ns/b/0", matches=[pb.RouteMatch(path=pb.PathMatch(kind=pb.PathMatch.KIND_REGEX, value="["))]),
            ),
            version="v",
        )
    assert fields_of(caught.value.errors) == {
        ("Listener", "ns/gw/http", "port"),
        ("Backend", "ns/web", "protocol"),
        ("Route", "ns/a/0", "direct_response_status"),
        ("Route", "ns/b/0", "matches[0].path.value"),
    }
    lines = str(caught.value).splitlines()
    assert len(lines) == 4
    assert lines == [str(error) for error in caught.value.errors]


def test_resource_name_must_match_its_key() -> None:
    raw = {ROUTE: {"ns/r/0": rule("ns/other/0")}}
    assert fields_of(rejected(raw)) == {("Route", "ns/r/0", "name")}


def test_wrong_message_class_is_an_error_not_a_crash() -> None:
    raw = {ROUTE: {"ns/r/0": pb.Listener(name="ns/r/0")}}
    (error,) = rejected(raw)
    assert "expected agentgate.config.v1.Route" in str(error)


def test_thousand_routes_compile() -> None:
    routes = [
        rule(
            f"ns/r{i:04d}/0",
            hostnames=[f"svc{i % 50}.example.com"],
            matches=[
                pb.RouteMatch(path=pb.PathMatch(kind=pb.PathMatch.KIND_PREFIX, value=f"/api/{i}")),
                pb.RouteMatch(
                    path=pb.PathMatch(kind=pb.PathMatch.KIND_REGEX, value=f"/r/{i}/[0-9]+"),
                    headers=[pb.HeaderMatch(name="x-tenant", value=f"t{i}")],
                ),
            ],
        )
        for i in range(1000)
    ]
    config = compile_config(resources(listener("ns/gw/http"), pb.Backend(name="ns/web"), *routes), version="v")
    table = config.listeners[("0.0.0.0", 8080)].route_table
    assert table.rule_count == 1000
    found = table.match("svc7.example.com", "/api/457/x", "", "GET", {})
    assert found is not None and found.route.name == "ns/r0457/0"
    found = table.match("svc7.example.com", "/r/457/12", "", "GET", {"x-tenant": "t457"})
    assert found is not None and found.route.name == "ns/r0457/0"
    assert table.match("svc8.example.com", "/api/457", "", "GET", {}) is None


def test_unresolved_backend_share_is_a_direct_response_choice() -> None:
    route = rule(
        "ns/web/0",
        listeners=("ns/gw/http",),
        backends=[
            pb.BackendRef(backend="ns/web", weight=1),
            pb.BackendRef(weight=3, direct_response_status=500),
        ],
    )
    config = compile_config(resources(listener("ns/gw/http"), route), version="v1")
    (group,) = config.listeners.values()
    matched = group.route_table.match("any", "/", "", "GET", {})
    assert matched is not None
    choices = {c.direct_response_status: c for c in matched.route.backends}
    assert choices[500].cluster is None and choices[500].name == "" and choices[500].weight == 3
    assert matched.route.pick_backend(rand=lambda: 0.9).direct_response_status == 500
    assert matched.route.pick_backend(rand=lambda: 0.1).name == "ns/web"


def test_direct_response_share_must_not_name_a_backend() -> None:
    route = rule("ns/web/0", backends=[pb.BackendRef(backend="ns/web", weight=1, direct_response_status=500)])
    errors = rejected(resources(listener("ns/gw/http"), route))
    assert ("Route", "ns/web/0", "backends[0]") in fields_of(errors)
