"""The objects the control plane reads (Gateway API, core kinds, our Backend) and their validation."""

from controlplane.model.duration import parse_duration
from controlplane.model.errors import ConfigError
from controlplane.model.objects import (
    AGENTGATE_GROUP,
    BACKEND,
    CONFIG_MAP,
    CORE_GROUP,
    GATEWAY,
    GATEWAY_CLASS,
    GATEWAY_GROUP,
    HTTP_ROUTE,
    KINDS,
    NAMESPACE,
    POLICY,
    REFERENCE_GRANT,
    SECRET,
    SECRET_TYPE_TLS,
    SERVICE,
    KindInfo,
    KubeObject,
    ObjectKey,
    SourceRef,
    object_from_manifest,
)
from controlplane.model.validation import BACKEND_VARIANTS, validate

__all__ = [
    "AGENTGATE_GROUP",
    "BACKEND",
    "BACKEND_VARIANTS",
    "CONFIG_MAP",
    "CORE_GROUP",
    "GATEWAY",
    "GATEWAY_CLASS",
    "GATEWAY_GROUP",
    "HTTP_ROUTE",
    "KINDS",
    "NAMESPACE",
    "POLICY",
    "REFERENCE_GRANT",
    "SECRET",
    "SECRET_TYPE_TLS",
    "SERVICE",
    "ConfigError",
    "KindInfo",
    "KubeObject",
    "ObjectKey",
    "SourceRef",
    "object_from_manifest",
    "parse_duration",
    "validate",
]
