"""Object model and schema validation: every error names file, kind/name and field."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controlplane.model import (
    ConfigError,
    KubeObject,
    ObjectKey,
    SourceRef,
    object_from_manifest,
    parse_duration,
    validate,
)

FILE = "config/routes.yaml"


def build(doc: dict[str, Any]) -> KubeObject:
    obj, errors = object_from_manifest(doc, SourceRef(FILE, 0))
    assert errors == [], [str(e) for e in errors]
    assert obj is not None
    return obj


def route(rules: list[dict[str, Any]], **spec: Any) -> KubeObject:
    return build(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"parentRefs": [{"name": "gw"}], "rules": rules, **spec},
        }
    )


def errors_of(obj: KubeObject) -> dict[str, str]:
    """field -> message, after checking every error is located at the object."""
    found = validate(obj)
    for error in found:
        assert (error.file, error.kind, error.namespace, error.name) == (FILE, obj.kind, obj.namespace, obj.name)
    return {error.field: error.message for error in found}


# --- ConfigError ----------------------------------------------------------------------------


def test_config_error_renders_one_readable_line() -> None:
    error = ConfigError(
        file="path/to/file.yaml",
        kind="HTTPRoute",
        namespace="default",
        name="web",
        field="spec.rules[0].matches[0].path.value",
        message="invalid regular expression: missing )",
    )
    assert str(error) == (
        "path/to/file.yaml: HTTPRoute default/web: spec.rules[0].matches[0].path.value: "
        "invalid regular expression: missing )"
    )


def test_config_error_for_a_file_shows_line_and_column() -> None:
    error = ConfigError(file="a.yaml", line=4, column=7, message="invalid YAML: mapping values are not allowed here")
    assert str(error) == "a.yaml:4:7: invalid YAML: mapping values are not allowed here"
    cluster_scoped = ConfigError(file="x.yaml", kind="GatewayClass", name="gc", message="bad")
    assert str(cluster_scoped) == "x.yaml: GatewayClass gc: bad"


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1h", timedelta(hours=1)),
        ("10s", timedelta(seconds=10)),
        ("500ms", timedelta(milliseconds=500)),
        ("1m30s", timedelta(seconds=90)),
        ("0s", timedelta(0)),
        ("1h2m3s4ms", timedelta(hours=1, minutes=2, seconds=3, milliseconds=4)),
    ],
)
def test_gateway_api_durations_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "10", "1.5s", "1d", "-1s", "100000s", "1h1h1h1h1h", "1 s", "1S"])
def test_invalid_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_non_string_duration_is_rejected() -> None:
    with pytest.raises(ValueError, match="duration string"):
        parse_duration(10)  # type: ignore[arg-type]


# --- manifests ------------------------------------------------------------------------------


def test_manifest_builds_an_object_with_defaults_and_source() -> None:
    obj = build(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "gw", "labels": {"team": "a"}, "creationTimestamp": "2024-01-02T03:04:05Z"},
            "spec": {"gatewayClassName": "agentgate", "listeners": []},
        }
    )
    assert obj.key == ObjectKey("Gateway", "default", "gw")
    assert obj.namespace == "default"
    assert obj.generation == 1
    assert obj.group == "gateway.networking.k8s.io"
    assert obj.creation_timestamp == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert obj.labels == {"team": "a"}
    assert obj.source == SourceRef(FILE, 0)


def test_cluster_scoped_kinds_have_no_namespace() -> None:
    obj = build({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a", "namespace": "x"}})
    assert obj.namespace == ""
    assert obj.ref == "team-a"


def test_kube_object_defaults_namespace_for_namespaced_kinds() -> None:
    assert KubeObject(api_version="v1", kind="Service", name="s").namespace == "default"
    assert KubeObject(api_version="v1", kind="Namespace", name="n").namespace == ""


@pytest.mark.parametrize(
    "doc",
    [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
        {"apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "Backend", "metadata": {"name": "b"}},
        {"just": "some yaml"},
        ["a", "list"],
        None,
    ],
)
def test_other_documents_are_ignored_without_error(doc: Any) -> None:
    assert object_from_manifest(doc, SourceRef(FILE)) == (None, [])


def test_broken_metadata_is_reported_with_identity() -> None:
    obj, errors = object_from_manifest(
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "Bad_Name"}},
        SourceRef(FILE),
    )
    assert obj is None
    assert [(e.kind, e.name, e.field) for e in errors] == [("HTTPRoute", "Bad_Name", "metadata.name")]
    assert "DNS subdomain" in errors[0].message


def test_missing_name_and_unsupported_version_are_reported() -> None:
    _, errors = object_from_manifest(
        {"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "HTTPRoute", "metadata": {}}, SourceRef(FILE)
    )
    fields = {e.field: e.message for e in errors}
    assert "unsupported apiVersion" in fields["apiVersion"]
    assert fields["metadata.name"] == "required string is missing"


def test_label_values_must_be_strings() -> None:
    _, errors = object_from_manifest(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n", "labels": {"tier": 1}}}, SourceRef(FILE)
    )
    assert [e.field for e in errors] == ["metadata.labels.tier"]


def test_secret_payload_decodes_data_and_string_data() -> None:
    secret = build(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s"},
            "data": {"a": base64.b64encode(b"from data").decode(), "b": base64.b64encode(b"shadowed").decode()},
            "stringData": {"b": "from stringData"},
        }
    )
    assert secret.data_value("a") == b"from data"
    assert secret.data_value("b") == b"from stringData"
    assert secret.data_value("missing") is None
    assert secret.secret_type == "Opaque"


# --- validation -----------------------------------------------------------------------------


def test_valid_route_has_no_errors() -> None:
    obj = route(
        [
            {
                "matches": [
                    {
                        "path": {"type": "RegularExpression", "value": "/items/[0-9]+"},
                        "headers": [{"name": "X-Tenant", "value": "a"}],
                        "queryParams": [{"name": "q", "type": "RegularExpression", "value": "^a.*"}],
                        "method": "POST",
                    }
                ],
                "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"remove": ["X-Debug"]}}],
                "backendRefs": [{"name": "svc", "port": 80, "weight": 5}],
                "timeouts": {"request": "10s", "backendRequest": "2s"},
            }
        ],
        hostnames=["shop.example.com", "*.example.com"],
    )
    assert validate(obj) == []


def test_bad_regex_names_file_object_and_field() -> None:
    obj = route([{"matches": [{"path": {"type": "RegularExpression", "value": "/items/(unclosed"}}]}])
    [error] = validate(obj)
    assert str(error).startswith(
        f"{FILE}: HTTPRoute shop/web: spec.rules[0].matches[0].path.value: invalid regular expression: "
    )


@pytest.mark.parametrize(
    ("rule", "field", "message"),
    [
        (
            {"matches": [{"path": {"type": "Exact", "value": "no-slash"}}]},
            "spec.rules[0].matches[0].path.value",
            "absolute path",
        ),
        (
            {"matches": [{"path": {"type": "Prefix", "value": "/"}}]},
            "spec.rules[0].matches[0].path.type",
            "unsupported value 'Prefix'",
        ),
        (
            {"matches": [{"headers": [{"name": "bad header", "value": "x"}]}]},
            "spec.rules[0].matches[0].headers[0].name",
            "invalid value",
        ),
        (
            {"matches": [{"headers": [{"name": "x", "type": "RegularExpression", "value": "("}]}]},
            "spec.rules[0].matches[0].headers[0].value",
            "invalid regular expression",
        ),
        ({"matches": [{"method": "FETCH"}]}, "spec.rules[0].matches[0].method", "unsupported value"),
        ({"backendRefs": [{"name": "svc"}]}, "spec.rules[0].backendRefs[0].port", "required for a Service"),
        ({"backendRefs": [{"name": "svc", "port": 0}]}, "spec.rules[0].backendRefs[0].port", "out of range"),
        (
            {"backendRefs": [{"name": "svc", "port": 80, "weight": -1}]},
            "spec.rules[0].backendRefs[0].weight",
            "out of range",
        ),
        ({"timeouts": {"request": "10 seconds"}}, "spec.rules[0].timeouts.request", "invalid duration"),
        (
            {"timeouts": {"request": "1s", "backendRequest": "2s"}},
            "spec.rules[0].timeouts.backendRequest",
            "longer than the request timeout",
        ),
        ({"filters": [{"type": "Rewrite"}]}, "spec.rules[0].filters[0].type", "unsupported value"),
        ({"filters": [{"type": "URLRewrite"}]}, "spec.rules[0].filters[0].urlRewrite", "required"),
        (
            {"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 200}}]},
            "spec.rules[0].filters[0].requestRedirect.statusCode",
            "unsupported value 200",
        ),
        (
            {
                "filters": [{"type": "RequestRedirect", "requestRedirect": {}}],
                "backendRefs": [{"name": "s", "port": 1}],
            },
            "spec.rules[0].filters",
            "must not be used together with backendRefs",
        ),
        (
            {
                "matches": [{"path": {"type": "Exact", "value": "/a"}}],
                "filters": [
                    {
                        "type": "URLRewrite",
                        "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}},
                    }
                ],
            },
            "spec.rules[0].filters[0].urlRewrite.path",
            "exactly one match with a PathPrefix",
        ),
        (
            {"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x"}]}}]},
            "spec.rules[0].filters[0].requestHeaderModifier.set[0].value",
            "required",
        ),
    ],
)
def test_route_errors_name_the_field(rule: dict[str, Any], field: str, message: str) -> None:
    errors = errors_of(route([rule]))
    assert field in errors, errors
    assert message in errors[field]


def test_route_hostnames_must_be_dns_names() -> None:
    errors = errors_of(route([{}], hostnames=["Upper.example.com", "10.0.0.1", "*.ok.example.com"]))
    assert set(errors) == {"spec.hostnames[0]", "spec.hostnames[1]"}
    assert "IP address" in errors["spec.hostnames[1]"]


def test_wrong_types_are_reported_not_raised() -> None:
    obj = route("not a list", hostnames="x")  # type: ignore[arg-type]
    errors = errors_of(obj)
    assert errors["spec.rules"] == "must be a list, got string"
    assert errors["spec.hostnames"] == "must be a list, got string"


def gateway(listeners: list[dict[str, Any]], **spec: Any) -> KubeObject:
    return build(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "gw"},
            "spec": {"gatewayClassName": "agentgate", "listeners": listeners, **spec},
        }
    )


def test_gateway_listener_errors() -> None:
    errors = errors_of(
        gateway(
            [
                {"name": "a", "port": 70000, "protocol": "HTTP"},
                {"name": "a", "port": 443, "protocol": "HTTPS"},
                {"name": "c", "port": 80, "protocol": "HTTP", "hostname": "*.Bad", "tls": {"certificateRefs": []}},
                {"name": "d", "port": 81, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "Selector"}}},
            ],
            addresses=[{"type": "IPAddress", "value": "not-an-ip"}],
        )
    )
    assert "out of range" in errors["spec.listeners[0].port"]
    assert "already used" in errors["spec.listeners[1].name"]
    assert "required for protocol HTTPS" in errors["spec.listeners[1].tls"]
    assert "not a valid hostname" in errors["spec.listeners[2].hostname"]
    assert "must not be set for protocol HTTP" in errors["spec.listeners[2].tls"]
    assert errors["spec.listeners[3].allowedRoutes.namespaces.selector"] == "required field is missing"
    assert "not an IP address" in errors["spec.addresses[0].value"]


def test_gateway_needs_listeners() -> None:
    obj = build(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "g"},
            "spec": {"gatewayClassName": "c"},
        }
    )
    assert errors_of(obj) == {"spec.listeners": "required field is missing"}


def test_secret_with_bad_base64_and_missing_tls_keys() -> None:
    secret = build(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "cert"},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": "not base64!"},
        }
    )
    errors = errors_of(secret)
    assert "not valid base64" in errors["data.tls.crt"]
    assert "required for a Secret of type kubernetes.io/tls" in errors["data.tls.key"]


def backend(spec: dict[str, Any]) -> KubeObject:
    return build({"apiVersion": "agentgate.dev/v1alpha1", "kind": "Backend", "metadata": {"name": "b"}, "spec": spec})


def test_backend_valid_forms() -> None:
    assert validate(backend({"static": {"host": "127.0.0.1", "port": 80}})) == []
    assert (
        validate(
            backend(
                {
                    "static": {"hosts": [{"host": "a.internal", "port": 80}, {"host": "::1", "port": 80, "weight": 2}]},
                    "protocol": "HTTP2",
                    "tls": {"sni": "a.example.com", "caCertificateRefs": [{"name": "ca"}]},
                    "connectTimeout": "2s",
                    "idleTimeout": "1m",
                    "maxConnections": 10,
                }
            )
        )
        == []
    )


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({}, "spec", "one of static, mcp, a2a, llm is required"),
        ({"static": {"host": "h", "port": 80}, "protcol": "HTTP2"}, "spec.protcol", "unknown field"),
        ({"static": {"host": "h", "port": 80}, "protocol": "HTTP3"}, "spec.protocol", "unsupported value"),
        ({"static": {"host": "h"}}, "spec.static.port", "required"),
        ({"static": {"host": "bad host", "port": 1}}, "spec.static.host", "neither an IP address nor a hostname"),
        ({"static": {"hosts": []}}, "spec.static.hosts", "must not be empty"),
        (
            {"static": {"hosts": [{"host": "h", "port": 1}, {"host": "h", "port": 1}]}},
            "spec.static.hosts[1]",
            "repeats",
        ),
        ({"static": {"hosts": [{"host": "h", "port": 1, "weight": 0}]}}, "spec.static.hosts[0].weight", "out of range"),
        ({"static": {"host": "h", "port": 1}, "connectTimeout": "soon"}, "spec.connectTimeout", "invalid duration"),
        (
            {"static": {"host": "h", "port": 1}, "tls": {"insecureSkipVerify": "yes"}},
            "spec.tls.insecureSkipVerify",
            "true or false",
        ),
        ({"static": {"host": "h", "port": 1}, "tls": {"caCertificates": "hello"}}, "spec.tls.caCertificates", "PEM"),
        (
            {"static": {"host": "h", "port": 1}, "tls": {"caCertificateRefs": [{"kind": "Service", "name": "x"}]}},
            "spec.tls.caCertificateRefs[0].kind",
            "unsupported value",
        ),
    ],
)
def test_backend_errors_name_the_field(spec: dict[str, Any], field: str, message: str) -> None:
    errors = errors_of(backend(spec))
    assert field in errors, errors
    assert message in errors[field]


def test_reference_grant_and_gateway_class() -> None:
    grant = build(
        {
            "apiVersion": "gateway.networking.k8s.io/v1beta1",
            "kind": "ReferenceGrant",
            "metadata": {"name": "g"},
            "spec": {"from": [{"kind": "HTTPRoute", "namespace": "a"}]},
        }
    )
    errors = errors_of(grant)
    assert errors["spec.from[0].group"] == "required field is missing"
    assert errors["spec.to"] == "required field is missing"
    gateway_class = build(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GatewayClass",
            "metadata": {"name": "c"},
            "spec": {"controllerName": "no-path"},
        }
    )
    assert "spec.controllerName" in errors_of(gateway_class)


def test_service_checks() -> None:
    service = build(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "s"},
            "spec": {"type": "ExternalName", "ports": [{"port": 80}, {"port": 80}]},
        }
    )
    errors = errors_of(service)
    assert errors["spec.externalName"] == "required for type ExternalName"
    assert "repeats" in errors["spec.ports[1].port"]
