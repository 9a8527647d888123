"""The runtime config the request path reads: immutable, fully compiled, swapped as one reference.

A request reads `RuntimeConfig` once and keeps that reference, so it sees either the old
config or the new one, never a mix. Everything here was validated and compiled by
`dataplane.config.compile.compile_config`; nothing on the request path parses or compiles.
"""

from __future__ import annotations

import hashlib
import random
import ssl
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from dataplane.config.policy import EMPTY_POLICY_INDEX, PolicyIndex
from shared.origins import OriginAllowList
from shared.resources import ResourceMap

if TYPE_CHECKING:
    from dataplane.routing.match import RouteTable

UpstreamProtocolName = Literal["http1", "http2"]

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_ALPN_PROTOCOLS: tuple[str, ...] = ("h2", "http/1.1")
_EMPTY: Mapping = MappingProxyType({})


def format_authority(host: str, port: int) -> str:
    """'host:port', bracketing IPv6 literals so the port stays unambiguous."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """One endpoint of a backend. `authority` is precomputed for the Host header and logs."""

    name: str
    host: str
    port: int
    weight: int
    authority: str = ""

    def __post_init__(self) -> None:
        if not self.authority:
            object.__setattr__(self, "authority", format_authority(self.host, self.port))


# --- MCP --------------------------------------------------------------------------------------

McpPrefixMode = Literal["conditional", "always", "never"]
McpFailureMode = Literal["fail_closed", "fail_open"]

DEFAULT_MCP_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MCP_SESSION_IDLE_TIMEOUT = 1800.0
MCP_SESSION_KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class McpSessionKey:
    """One AES-256-GCM key of a keyring; `key_id` travels in session ids to pick it back."""

    key_id: str
    # Kept out of repr so a log line or config dump never shows the key.
    key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class McpHttpTarget:
    """An MCP server reached over HTTP; the subclass says which transport.

    `ssl_context` is None for cleartext; `headers` (lowercase names) go with every request.
    """

    name: str
    host: str
    port: int
    path: str
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    # SNI and verification name; None means `host`.
    server_name: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    authority: str = ""

    def __post_init__(self) -> None:
        if not self.authority:
            object.__setattr__(self, "authority", format_authority(self.host, self.port))


@dataclass(frozen=True, slots=True)
class McpStreamableHttpTarget(McpHttpTarget):
    """Streamable HTTP: one endpoint (`path`) for POST, GET and DELETE."""


@dataclass(frozen=True, slots=True)
class McpSseTarget(McpHttpTarget):
    """Legacy HTTP+SSE (2024-11-05): GET `path` for the stream, POST where its endpoint event says."""


@dataclass(frozen=True, slots=True)
class McpStdioTarget:
    """A local process speaking newline-delimited JSON-RPC on stdin/stdout.

    `env` is set over the environment the process inherits; `working_dir` None means the proxy's.
    """

    name: str
    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str | None = None


McpTarget = McpStreamableHttpTarget | McpSseTarget | McpStdioTarget


@dataclass(frozen=True, slots=True)
class McpBackendSettings:
    """An MCP backend as the federation layer reads it: modes, limits, keyring and typed targets.

    Targets are in a stable order (by resource name). `prefix_names` is the prefix decision
    already made for this target count, so the request path does not re-derive it.
    """

    prefix_mode: McpPrefixMode = "conditional"
    failure_mode: McpFailureMode = "fail_closed"
    max_body_bytes: int = DEFAULT_MCP_MAX_BODY_BYTES
    session_idle_timeout: float = DEFAULT_MCP_SESSION_IDLE_TIMEOUT
    # The first key encrypts new session ids; every key decrypts.
    session_keys: tuple[McpSessionKey, ...] = ()
    targets: tuple[McpTarget, ...] = ()
    # Browser origins allowed to call the endpoint; None: only the request's own host.
    allowed_origins: OriginAllowList | None = None
    prefix_names: bool = field(init=False)
    _by_name: Mapping[str, McpTarget] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        prefix = self.prefix_mode == "always" or (self.prefix_mode == "conditional" and len(self.targets) > 1)
        object.__setattr__(self, "prefix_names", prefix)
        object.__setattr__(self, "_by_name", MappingProxyType({target.name: target for target in self.targets}))

    def target(self, name: str) -> McpTarget | None:
        """The target of that (unprefixed) server name, or None."""
        return self._by_name.get(name)

    def session_key(self, key_id: str) -> McpSessionKey | None:
        """The keyring entry a session id names, or None (an id from a retired key)."""
        return next((key for key in self.session_keys if key.key_id == key_id), None)


# --- A2A --------------------------------------------------------------------------------------

A2aSignedCards = Literal["strip", "preserve"]

DEFAULT_A2A_MAX_REQUEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class A2aBackendSettings:
    """An A2A backend as the A2A handler reads it; the agent itself is reached through `targets`.

    `agent_name` names the agent in authorization rules, x-target-agent and logs ("namespace/name"
    or one name). `base_path` starts with '/' and has no trailing '/' unless it is exactly '/', so
    the upstream path is a plain join. `max_request_bytes` bounds the body read to find the method.
    `signed_cards`: "strip" removes a card's JWS `signatures` and rewrites its URLs; "preserve"
    passes a signed card untouched (URLs not rewritten).
    """

    agent_name: str
    base_path: str = "/"
    max_request_bytes: int = DEFAULT_A2A_MAX_REQUEST_BYTES
    signed_cards: A2aSignedCards = "strip"


# --- LLM --------------------------------------------------------------------------------------

# What a provider speaks: "openai" also covers OpenAI-compatible servers (vLLM, Ollama).
LlmProviderType = Literal["openai", "anthropic", "azure", "openai_compatible"]

DEFAULT_LLM_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_LLM_CONSECUTIVE_FAILURES = 3
DEFAULT_LLM_EJECT_FOR = 30.0
ANY_MODEL = "*"


@dataclass(frozen=True, slots=True)
class LlmProviderSettings:
    """One provider as the LLM handler reads it: where it is, how to authenticate, what it serves.

    `base_path` has no trailing '/' ("" or "/v1"); the API's paths are appended to it.
    `auth_header` is the (lower-case name, value) the provider's API wants for `api_key`
    (authorization Bearer, x-api-key, api-key), None without a key; it replaces whatever the
    client sent. `headers` (lower-case names) go with every request. `anthropic_version` is the
    anthropic-version this provider is sent (None for other types), which decides what a
    translated request may carry.
    """

    name: str
    type: LlmProviderType
    host: str
    port: int
    base_path: str = ""
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    # SNI and verification name; None means `host`.
    server_name: str | None = None
    # Kept out of repr so a log line or config dump of the compiled config never shows the key.
    api_key: str = field(default="", repr=False)
    auth_header: tuple[str, str] | None = field(default=None, repr=False)
    headers: tuple[tuple[str, str], ...] = ()
    priority: int = 0
    # Models served; ("*",) serves any.
    models: tuple[str, ...] = (ANY_MODEL,)
    azure_api_version: str = ""
    azure_deployments: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    anthropic_version: str | None = None
    authority: str = ""
    serves_any: bool = field(init=False)

    def __post_init__(self) -> None:
        if not self.authority:
            object.__setattr__(self, "authority", format_authority(self.host, self.port))
        object.__setattr__(self, "serves_any", ANY_MODEL in self.models)

    @property
    def speaks_anthropic(self) -> bool:
        return self.type == "anthropic"

    def serves(self, model: str) -> bool:
        return self.serves_any or model in self.models

    def deployment(self, model: str) -> str:
        """Azure: the deployment serving `model` (a model not mapped is its own deployment name)."""
        return self.azure_deployments.get(model, model)


@dataclass(frozen=True, slots=True)
class LlmBackendSettings:
    """An LLM backend as the LLM handler reads it: providers in failover order, aliases, limits.

    `providers` is sorted by priority (stable: equal priorities keep the order written), so
    the failover order of any model is a filter of it. `aliases` maps a client model name to
    the provider models it stands for, tried in order. `stream_usage`: ask streaming OpenAI-type
    upstreams for a usage chunk (stream_options.include_usage).
    """

    providers: tuple[LlmProviderSettings, ...]
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _EMPTY)
    consecutive_failures: int = DEFAULT_LLM_CONSECUTIVE_FAILURES
    eject_for: float = DEFAULT_LLM_EJECT_FOR
    max_request_bytes: int = DEFAULT_LLM_MAX_REQUEST_BYTES
    stream_usage: bool = True
    # Model listed by name -> every provider serving it ("*" ones too), in failover order.
    _listing: Mapping[str, tuple[LlmProviderSettings, ...]] = field(init=False, repr=False, compare=False)
    _any: tuple[LlmProviderSettings, ...] = field(init=False, repr=False, compare=False)
    _by_name: Mapping[str, LlmProviderSettings] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        named = {model for provider in self.providers for model in provider.models if model != ANY_MODEL}
        listing = {model: tuple(p for p in self.providers if p.serves(model)) for model in named}
        object.__setattr__(self, "_listing", MappingProxyType(listing))
        object.__setattr__(self, "_any", tuple(p for p in self.providers if p.serves_any))
        object.__setattr__(self, "_by_name", MappingProxyType({p.name: p for p in self.providers}))

    def providers_for(self, model: str) -> tuple[LlmProviderSettings, ...]:
        """The providers serving `model` (no alias applied), in failover order; precomputed."""
        return self._listing.get(model, self._any)

    def provider(self, name: str) -> LlmProviderSettings | None:
        return self._by_name.get(name)

    def listed_models(self) -> tuple[str, ...]:
        """The model names /v1/models shows: aliases and models listed by name, sorted."""
        return tuple(sorted({*self.aliases, *self._listing}))


@dataclass(frozen=True, slots=True)
class UpstreamCluster:
    """A backend with its endpoints and the client settings to reach them."""

    name: str
    protocol: UpstreamProtocolName = "http1"
    # Client context (CA, ALPN, verification) built at compile time; None = cleartext.
    ssl_context: ssl.SSLContext | None = None
    # SNI and verification name; None means the target host.
    server_name: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    targets: tuple[UpstreamTarget, ...] = ()
    # Which protocol handler serves it: "http", "mcp", "a2a" or "llm".
    kind: str = "http"
    # Set when kind is "mcp" (its servers are there; `targets` is then empty).
    mcp: McpBackendSettings | None = None
    # Set when kind is "a2a"; the agent's endpoints are the ordinary `targets`.
    a2a: A2aBackendSettings | None = None
    # Set when kind is "llm" (its providers are there; `targets` is then empty).
    llm: LlmBackendSettings | None = None
    # Cumulative target weights, so a pick is one random draw and one bisect.
    _cumulative: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_cumulative", tuple(accumulate(max(t.weight, 0) for t in self.targets)))

    def pick_target(self, rand: Callable[[], float] = random.random) -> UpstreamTarget | None:
        """A target chosen by weight; None when the backend has no targets (or all weigh 0)."""
        targets = self.targets
        if len(targets) == 1:
            return targets[0] if self._cumulative[0] > 0 else None
        if not targets:
            return None
        total = self._cumulative[-1]
        if total <= 0:
            return None
        # An integer draw in [0, total) always lands below the last cumulative weight.
        return targets[bisect_right(self._cumulative, int(rand() * total))]


@dataclass(frozen=True, slots=True)
class ServerTlsSettings:
    """A TLS listener's certificate, key and ALPN, with the server context built from them.

    For a port shared by HTTPS listeners with different certificates, `ssl_context`
    selects each listener's certificate by SNI and `sni_hosts` lists (hostname,
    certificate fingerprint) so a change of any certificate changes `fingerprint`.
    """

    certificate_chain_pem: bytes = field(repr=False)
    # Kept out of repr so a log line or config dump never shows the key.
    private_key_pem: bytes = field(repr=False)
    alpn_protocols: tuple[str, ...]
    ssl_context: ssl.SSLContext = field(compare=False, repr=False)
    sni_hosts: tuple[tuple[str, str], ...] = ()
    # Identifies the material, so an update that keeps it can keep the listening socket.
    fingerprint: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256()
        parts = [self.certificate_chain_pem, self.private_key_pem, ",".join(self.alpn_protocols).encode()]
        parts += [f"{host}={fingerprint}".encode() for host, fingerprint in self.sni_hosts]
        for part in parts:
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        object.__setattr__(self, "fingerprint", digest.hexdigest())


@dataclass(frozen=True, slots=True)
class ListenerGroup:
    """Listeners sharing one bind (address, port): one socket, one route table."""

    address: str
    port: int
    listener_names: tuple[str, ...]
    tls: ServerTlsSettings | None
    route_table: RouteTable
    # Equal keys mean the socket can be kept across updates.
    bind_key: tuple[str, int, str | None] = field(init=False)

    def __post_init__(self) -> None:
        fingerprint = self.tls.fingerprint if self.tls is not None else None
        object.__setattr__(self, "bind_key", (self.address, self.port, fingerprint))


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Everything a proxy worker needs for one config version."""

    version: str
    # By bind (address, port).
    listeners: Mapping[tuple[str, int], ListenerGroup]
    backends: Mapping[str, UpstreamCluster]
    # The raw resources this was compiled from, for the config dump.
    resources: ResourceMap
    # Effective policies per (listener, rule), backend and (listener, rule, backend).
    policies: PolicyIndex = EMPTY_POLICY_INDEX

    @staticmethod
    def empty() -> RuntimeConfig:
        """The config before the first update: no listeners, no backends."""
        return RuntimeConfig(version="", listeners=_EMPTY, backends=_EMPTY, resources=_EMPTY)
