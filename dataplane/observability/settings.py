"""Tracing settings: read once from the standard OTEL_* variables, then overridden by explicit values
(the CLI's flags). Pure: nothing here touches the SDK, so a bad value fails at start-up with the
variable named, never on the request path.

Tracing is off unless an endpoint is set (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
OTEL_EXPORTER_OTLP_ENDPOINT), and off when OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final
from urllib.parse import unquote, urlsplit

DEFAULT_SERVICE_NAME: Final = "agentgate"
_TRACES_PATH: Final = "v1/traces"


class TracingSettingsError(ValueError):
    """A tracing setting that cannot be used; the message names the variable or field and the value."""


class Protocol(StrEnum):
    GRPC = "grpc"
    HTTP_PROTOBUF = "http/protobuf"


class SamplerKind(StrEnum):
    """OTEL_TRACES_SAMPLER values this gateway implements (the spec's built-in samplers)."""

    ALWAYS_ON = "always_on"
    ALWAYS_OFF = "always_off"
    TRACE_ID_RATIO = "traceidratio"
    PARENT_BASED_ALWAYS_ON = "parentbased_always_on"
    PARENT_BASED_ALWAYS_OFF = "parentbased_always_off"
    PARENT_BASED_TRACE_ID_RATIO = "parentbased_traceidratio"


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """The BatchSpanProcessor's knobs (OTEL_BSP_*; times in milliseconds as the spec has them)."""

    schedule_delay_ms: int = 5000
    export_timeout_ms: int = 30000
    max_queue_size: int = 2048
    max_export_batch_size: int = 512

    def __post_init__(self) -> None:
        for name in ("schedule_delay_ms", "export_timeout_ms", "max_queue_size", "max_export_batch_size"):
            if getattr(self, name) <= 0:
                raise TracingSettingsError(f"batch.{name} must be positive, got {getattr(self, name)}")
        if self.max_export_batch_size > self.max_queue_size:
            raise TracingSettingsError(
                f"batch.max_export_batch_size ({self.max_export_batch_size}) exceeds "
                f"batch.max_queue_size ({self.max_queue_size})"
            )


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """Everything the tracer needs. `endpoint` None means tracing is off.

    `endpoint` is used as given: for http/protobuf the full traces URL (…/v1/traces, see
    `traces_endpoint`), for grpc the collector's http(s)://host:port.
    """

    endpoint: str | None = None
    protocol: Protocol = Protocol.HTTP_PROTOBUF
    sampler: SamplerKind = SamplerKind.PARENT_BASED_ALWAYS_ON
    # The sampling probability of the ratio samplers (ignored by the others).
    ratio: float = 1.0
    service_name: str = DEFAULT_SERVICE_NAME
    resource_attributes: Mapping[str, str] = field(default_factory=dict)
    # Exporter request headers (credentials, so never shown in a repr).
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    # One export request's deadline, retries included (OTEL_EXPORTER_OTLP_TIMEOUT, milliseconds).
    export_timeout_ms: int = 10000
    batch: BatchSettings = field(default_factory=BatchSettings)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "protocol", Protocol(self.protocol))
        except ValueError:
            raise TracingSettingsError(
                f"protocol {self.protocol!r} is not supported: use grpc or http/protobuf"
            ) from None
        try:
            object.__setattr__(self, "sampler", SamplerKind(self.sampler))
        except ValueError:
            raise TracingSettingsError(
                f"sampler {self.sampler!r} is not supported: use one of {', '.join(SamplerKind)}"
            ) from None
        if not 0.0 <= self.ratio <= 1.0:
            raise TracingSettingsError(f"sampler ratio must be within [0, 1], got {self.ratio}")
        if self.endpoint is not None:
            _check_url("endpoint", self.endpoint)
        if not self.service_name:
            raise TracingSettingsError("service name must not be empty")
        if self.export_timeout_ms <= 0:
            raise TracingSettingsError(f"export timeout must be positive, got {self.export_timeout_ms} ms")

    @property
    def enabled(self) -> bool:
        return self.endpoint is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> TracingSettings:
        """Settings from the OTEL_* variables in `environ` (os.environ by default), then `overrides`
        (field names of this class) on top. Raises TracingSettingsError naming the bad variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        protocol_name = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
        protocol_value = _get(env, protocol_name)
        if protocol_value is None:
            protocol_name = "OTEL_EXPORTER_OTLP_PROTOCOL"
            protocol_value = _get(env, protocol_name)
        protocol = Protocol.HTTP_PROTOBUF
        if protocol_value is not None:
            try:
                protocol = Protocol(protocol_value)
            except ValueError:
                raise TracingSettingsError(
                    f"{protocol_name}={protocol_value!r} is not supported: use grpc or http/protobuf"
                ) from None
        values["protocol"] = protocol

        endpoint = _get(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if endpoint is not None:
            _check_url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
        else:
            base = _get(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
            if base is not None:
                _check_url("OTEL_EXPORTER_OTLP_ENDPOINT", base)
                endpoint = traces_endpoint(base, protocol)
        exporter = (_get(env, "OTEL_TRACES_EXPORTER") or "otlp").lower()
        if exporter not in ("otlp", "none"):
            raise TracingSettingsError(f"OTEL_TRACES_EXPORTER={exporter!r} is not supported: use otlp or none")
        if exporter == "none" or (_get(env, "OTEL_SDK_DISABLED") or "").lower() == "true":
            endpoint = None
        values["endpoint"] = endpoint

        sampler = _get(env, "OTEL_TRACES_SAMPLER")
        if sampler is not None:
            try:
                values["sampler"] = SamplerKind(sampler.lower())
            except ValueError:
                raise TracingSettingsError(
                    f"OTEL_TRACES_SAMPLER={sampler!r} is not supported: use one of {', '.join(SamplerKind)}"
                ) from None
        ratio = _get(env, "OTEL_TRACES_SAMPLER_ARG")
        if ratio is not None and values.get("sampler") in (
            SamplerKind.TRACE_ID_RATIO,
            SamplerKind.PARENT_BASED_TRACE_ID_RATIO,
        ):
            try:
                values["ratio"] = float(ratio)
            except ValueError:
                raise TracingSettingsError(f"OTEL_TRACES_SAMPLER_ARG={ratio!r} is not a number") from None
            if not 0.0 <= values["ratio"] <= 1.0:
                raise TracingSettingsError(f"OTEL_TRACES_SAMPLER_ARG={ratio!r} is not within [0, 1]")

        resource = _key_values(env, "OTEL_RESOURCE_ATTRIBUTES")
        service_name = _get(env, "OTEL_SERVICE_NAME") or resource.pop("service.name", None)
        if service_name:
            values["service_name"] = service_name
        resource.pop("service.name", None)
        values["resource_attributes"] = resource

        headers_name = "OTEL_EXPORTER_OTLP_TRACES_HEADERS"
        if _get(env, headers_name) is None:
            headers_name = "OTEL_EXPORTER_OTLP_HEADERS"
        values["headers"] = _key_values(env, headers_name)

        timeout_name = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
        if _get(env, timeout_name) is None:
            timeout_name = "OTEL_EXPORTER_OTLP_TIMEOUT"
        timeout = _int(env, timeout_name)
        if timeout is not None:
            values["export_timeout_ms"] = timeout

        batch: dict[str, int] = {}
        for name, key in (
            ("OTEL_BSP_SCHEDULE_DELAY", "schedule_delay_ms"),
            ("OTEL_BSP_EXPORT_TIMEOUT", "export_timeout_ms"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "max_queue_size"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "max_export_batch_size"),
        ):
            number = _int(env, name)
            if number is not None:
                batch[key] = number
        values["batch"] = BatchSettings(**batch)

        try:
            settings = cls(**values)
        except TracingSettingsError as error:
            raise TracingSettingsError(f"OTEL_* environment: {error}") from None
        if overrides:
            unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise TracingSettingsError(f"unknown tracing setting(s): {', '.join(sorted(unknown))}")
            settings = dataclasses.replace(settings, **overrides)
        return settings


def traces_endpoint(base: str, protocol: Protocol | str) -> str:
    """The traces URL for a base OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT's rule): http/protobuf
    appends v1/traces to the base path; grpc uses the base as it is."""
    if Protocol(protocol) is Protocol.GRPC:
        return base
    return base + _TRACES_PATH if base.endswith("/") else f"{base}/{_TRACES_PATH}"


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = _get(env, name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise TracingSettingsError(f"{name}={value!r} is not an integer") from None
    if number <= 0:
        raise TracingSettingsError(f"{name}={value!r} must be positive")
    return number


def _key_values(env: Mapping[str, str], name: str) -> dict[str, str]:
    """`k1=v1,k2=v2` with percent-encoded values (OTEL_RESOURCE_ATTRIBUTES, OTEL_*_HEADERS)."""
    value = _get(env, name)
    pairs: dict[str, str] = {}
    if value is None:
        return pairs
    for item in value.split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TracingSettingsError(f"{name}: {item.strip()!r} is not key=value")
        pairs[unquote(key)] = unquote(raw.strip())
    return pairs


def _check_url(name: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TracingSettingsError(f"{name}={url!r} is not an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise TracingSettingsError(f"{name}={url!r} has an invalid port") from None
