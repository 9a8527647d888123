"""KubeObject: the Kubernetes-shaped objects the control plane reads, whatever their source.

The folder source parses them from YAML files and the Kubernetes source from API watch
events; both build the same immutable KubeObject so the translator never knows which.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from controlplane.model.errors import ConfigError
from controlplane.model.formats import DNS_LABEL, DNS_SUBDOMAIN
from shared.config_rules import is_header_value

GATEWAY_GROUP = "gateway.networking.k8s.io"
AGENTGATE_GROUP = "agentgate.dev"
CORE_GROUP = ""

GATEWAY_CLASS = "GatewayClass"
GATEWAY = "Gateway"
HTTP_ROUTE = "HTTPRoute"
REFERENCE_GRANT = "ReferenceGrant"
NAMESPACE = "Namespace"
SECRET = "Secret"
CONFIG_MAP = "ConfigMap"
SERVICE = "Service"
BACKEND = "Backend"
POLICY = "Policy"

SECRET_TYPE_TLS = "kubernetes.io/tls"


@dataclass(frozen=True, slots=True)
class KindInfo:
    group: str
    kind: str
    versions: frozenset[str]
    namespaced: bool


# Keyed by (group, kind): another project's "Backend" kind (other group) is not ours.
KINDS: Mapping[tuple[str, str], KindInfo] = {
    (info.group, info.kind): info
    for info in (
        KindInfo(GATEWAY_GROUP, GATEWAY_CLASS, frozenset({"v1", "v1beta1"}), namespaced=False),
        KindInfo(GATEWAY_GROUP, GATEWAY, frozenset({"v1", "v1beta1"}), namespaced=True),
        KindInfo(GATEWAY_GROUP, HTTP_ROUTE, frozenset({"v1", "v1beta1"}), namespaced=True),
        KindInfo(GATEWAY_GROUP, REFERENCE_GRANT, frozenset({"v1", "v1beta1"}), namespaced=True),
        KindInfo(CORE_GROUP, NAMESPACE, frozenset({"v1"}), namespaced=False),
        KindInfo(CORE_GROUP, SECRET, frozenset({"v1"}), namespaced=True),
        KindInfo(CORE_GROUP, CONFIG_MAP, frozenset({"v1"}), namespaced=True),
        KindInfo(CORE_GROUP, SERVICE, frozenset({"v1"}), namespaced=True),
        KindInfo(AGENTGATE_GROUP, BACKEND, frozenset({"v1alpha1"}), namespaced=True),
        KindInfo(AGENTGATE_GROUP, POLICY, frozenset({"v1alpha1"}), namespaced=True),
    )
}
_KIND_BY_NAME: Mapping[str, KindInfo] = {info.kind: info for info in KINDS.values()}


class ObjectKey(NamedTuple):
    """Identity of an object: two definitions with the same key are the same object."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where an object was defined, for error messages: a file and the document index in it."""

    path: str
    document: int = 0
    line: int = 0


def split_api_version(api_version: str) -> tuple[str, str]:
    """'gateway.networking.k8s.io/v1' -> (group, 'v1'); 'v1' -> ('', 'v1')."""
    group, _, version = api_version.rpartition("/")
    return group, version


def kind_info(kind: str) -> KindInfo | None:
    return _KIND_BY_NAME.get(kind)


@dataclass(frozen=True, slots=True, kw_only=True, eq=True)
class KubeObject:
    """One Kubernetes object as the control plane needs it. Treat every mapping as read-only.

    `spec` holds the object's spec. Secrets and ConfigMaps have no spec: their payload is in
    `data` (Secret: base64 strings as in the manifest; ConfigMap: plain strings) and
    `string_data` (Secret stringData); a Secret's type is `secret_type`.
    """

    api_version: str
    kind: str
    name: str
    namespace: str = ""
    generation: int = 1
    creation_timestamp: datetime | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    spec: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, str] = field(default_factory=dict)
    string_data: Mapping[str, str] = field(default_factory=dict)
    secret_type: str = ""
    source: SourceRef | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        info = _KIND_BY_NAME.get(self.kind)
        if info is not None and info.namespaced and not self.namespace:
            object.__setattr__(self, "namespace", "default")

    def __hash__(self) -> int:
        # Mappings are not hashable; identity plus generation is consistent with equality.
        return hash((self.key, self.generation))

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.namespace, self.name)

    @property
    def group(self) -> str:
        return split_api_version(self.api_version)[0]

    @property
    def ref(self) -> str:
        """'namespace/name', or 'name' for cluster-scoped kinds."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def file(self) -> str:
        return self.source.path if self.source else ""

    def data_value(self, key: str) -> bytes | None:
        """Decoded payload under `key` of a Secret (stringData wins, as in Kubernetes) or ConfigMap."""
        if key in self.string_data:
            return str(self.string_data[key]).encode()
        value = self.data.get(key)
        if value is None:
            return None
        if self.kind == SECRET:
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return None
        return str(value).encode()

    def error(self, field_path: str, message: str) -> ConfigError:
        """A ConfigError located at `field_path` of this object."""
        return ConfigError(
            message=message,
            file=self.file,
            kind=self.kind,
            namespace=self.namespace,
            name=self.name,
            field=field_path,
        )


def object_from_manifest(doc: Any, source: SourceRef | None = None) -> tuple[KubeObject | None, list[ConfigError]]:
    """Build a KubeObject from one decoded manifest (YAML document or API object).

    Returns (None, []) for documents that are not objects of a kind we handle (a folder may hold
    other YAML), (None, errors) when the metadata is unusable, else (object, []).
    Spec-level checks are `validate()`'s job.
    """
    if not isinstance(doc, Mapping):
        return None, []
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return None, []
    group, version = split_api_version(api_version)
    info = KINDS.get((group, kind))
    if info is None:
        return None, []
    metadata = doc.get("metadata")
    raw_name = metadata.get("name") if isinstance(metadata, Mapping) else None
    raw_namespace = metadata.get("namespace") if isinstance(metadata, Mapping) else None
    name = raw_name if isinstance(raw_name, str) else ""
    namespace = raw_namespace if isinstance(raw_namespace, str) else ""
    if info.namespaced and not namespace:
        namespace = "default"
    if not info.namespaced:
        namespace = ""
    file = source.path if source else ""

    def error(field_path: str, message: str) -> ConfigError:
        return ConfigError(message=message, file=file, kind=kind, namespace=namespace, name=name, field=field_path)

    errors: list[ConfigError] = []
    if version not in info.versions:
        supported = ", ".join(f"{group + '/' if group else ''}{v}" for v in sorted(info.versions))
        message = f"unsupported apiVersion {api_version!r} for {kind} (supported: {supported})"
        errors.append(error("apiVersion", message))
    if not isinstance(metadata, Mapping):
        errors.append(error("metadata", "required mapping is missing"))
        return None, errors
    errors.extend(_check_name(error, raw_name, "metadata.name", label=kind == NAMESPACE))
    if raw_namespace is not None and info.namespaced:
        errors.extend(_check_name(error, raw_namespace, "metadata.namespace", label=True))
    labels = _string_map(error, metadata.get("labels"), "metadata.labels", errors)
    annotations = _string_map(error, metadata.get("annotations"), "metadata.annotations", errors)
    generation = metadata.get("generation", 1)
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        errors.append(error("metadata.generation", "must be a non-negative integer"))
        generation = 1
    created = _timestamp(error, metadata.get("creationTimestamp"), errors)

    spec: Mapping[str, Any] = {}
    data: Mapping[str, str] = {}
    string_data: Mapping[str, str] = {}
    secret_type = ""
    if kind in (SECRET, CONFIG_MAP):
        data = _string_map(error, doc.get("data"), "data", errors)
        if kind == SECRET:
            string_data = _string_map(error, doc.get("stringData"), "stringData", errors)
            raw_type = doc.get("type", "Opaque")
            if not isinstance(raw_type, str):
                errors.append(error("type", "must be a string"))
            else:
                secret_type = raw_type
    else:
        raw_spec = doc.get("spec", {})
        if raw_spec is None:
            raw_spec = {}
        if not isinstance(raw_spec, Mapping):
            errors.append(error("spec", "must be a mapping"))
        else:
            spec = without_nulls(raw_spec)
    if errors:
        return None, errors
    obj = KubeObject(
        api_version=api_version,
        kind=kind,
        name=name,
        namespace=namespace,
        generation=generation,
        creation_timestamp=created,
        labels=labels,
        annotations=annotations,
        spec=spec,
        data=data,
        string_data=string_data,
        secret_type=secret_type,
        source=source,
    )
    return obj, []


def secret_line(raw: bytes) -> str | None:
    """A Secret's value as one credential or header value: the text without the trailing newline
    `echo value > file` leaves; None when it is not UTF-8 or not one line a header can carry."""
    try:
        text = raw.decode().strip()
    except UnicodeDecodeError:
        return None
    return text if text and is_header_value(text) else None


def without_nulls(value: Any) -> Any:
    """`value` with every null-valued field of its mappings left out, at any depth: the API server
    prunes them from custom resources (no field of ours is nullable), so a folder's `key:` with no
    value means what it means in a cluster, an absent field."""
    if isinstance(value, Mapping):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


ErrorAt = Callable[[str, str], ConfigError]


def _check_name(error: ErrorAt, value: Any, field_path: str, *, label: bool) -> list[ConfigError]:
    if not isinstance(value, str) or not value:
        return [error(field_path, "required string is missing")]
    pattern, what, limit = (DNS_LABEL, "DNS label", 63) if label else (DNS_SUBDOMAIN, "DNS subdomain", 253)
    if len(value) > limit or not pattern.fullmatch(value):
        return [error(field_path, f"{value!r} is not a valid {what} (lowercase letters, digits, '-', at most {limit})")]
    return []


def _string_map(error: ErrorAt, value: Any, field_path: str, errors: list[ConfigError]) -> Mapping[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        errors.append(error(field_path, "must be a mapping of strings"))
        return {}
    result: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            errors.append(error(f"{field_path}.{key}", "keys and values must be strings (quote numbers and booleans)"))
            continue
        result[key] = item
    return result


def _timestamp(error: ErrorAt, value: Any, errors: list[ConfigError]) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    errors.append(error("metadata.creationTimestamp", "must be an RFC 3339 timestamp like 2024-01-02T03:04:05Z"))
    return None
