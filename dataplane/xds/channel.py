"""How a worker reaches the control plane: plaintext or TLS (optionally with a client certificate),
and the bearer token it presents (``authorization: Bearer <token>`` call metadata).

The token is a projected service-account token the kubelet rotates in place, so it is read from
its file again on every (re)connect of the ADS stream, and at most `TOKEN_MAX_AGE` seconds old on
KeyService calls (a unary interceptor adds it). TLS files are read whenever a channel is opened, so
a rotated client certificate is used from the next reconnect on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

TOKEN_MAX_AGE: Final = 30.0
MAX_TOKEN_BYTES: Final = 16 * 1024


class XdsCredentialsError(Exception):
    """A token or TLS file that cannot be used; the message names the file and the flag."""


@dataclass(frozen=True, slots=True)
class XdsClientSecurity:
    """The worker's --xds-token-file and --xds-tls* flags."""

    token_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""

    def problems(self) -> list[str]:
        """What is wrong with the combination of flags and files (empty: usable)."""
        out: list[str] = []
        if not self.tls and (self.ca_file or self.cert_file or self.key_file or self.server_name):
            out.append("--xds-ca-file, --xds-cert-file, --xds-key-file and --xds-server-name need --xds-tls")
        if (self.cert_file is None) != (self.key_file is None):
            out.append("--xds-cert-file and --xds-key-file go together (a client certificate and its key)")
        for flag, path in (
            ("--xds-token-file", self.token_file), ("--xds-ca-file", self.ca_file),
            ("--xds-cert-file", self.cert_file), ("--xds-key-file", self.key_file),
        ):
            if path is not None and not path.is_file():
                out.append(f"{flag} {path}: no such file")
        return out


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise XdsCredentialsError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


class BearerToken:
    """The token in a file, re-read when asked for a fresh one or when older than ``max_age``."""

    def __init__(
        self, path: Path, *, max_age: float = TOKEN_MAX_AGE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self.max_age = max_age
        self._clock = clock
        self._token = ""
        self._read_at = 0.0

    def read(self, *, fresh: bool = False) -> str:
        """The current token; raises `XdsCredentialsError` for an unreadable, empty or huge file."""
        now = self._clock()
        if fresh or not self._token or now - self._read_at >= self.max_age:
            token = _read(self.path, "--xds-token-file").strip()
            if not token:
                raise XdsCredentialsError(f"--xds-token-file {self.path} is empty")
            if len(token) > MAX_TOKEN_BYTES or b"\n" in token or b"\r" in token:
                raise XdsCredentialsError(f"--xds-token-file {self.path} does not hold one token")
            self._token, self._read_at = token.decode("latin-1"), now
        return self._token

    def metadata(self, *, fresh: bool = False) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.read(fresh=fresh)}"),)


class _BearerInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the bearer token to every unary call of a channel (KeyService)."""

    def __init__(self, token: BearerToken) -> None:
        self._token = token

    async def intercept_unary_unary(
        self, continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails, request: Any,
    ) -> Any:
        try:
            credentials = self._token.metadata()
        except XdsCredentialsError as exc:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAUTHENTICATED, grpc.aio.Metadata(), grpc.aio.Metadata(), details=str(exc)
            ) from None
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), *credentials)
        details = client_call_details._replace(metadata=metadata)  # a namedtuple
        return await continuation(details, request)


class XdsTransport:
    """Opens channels to the control plane at ``target`` with `XdsClientSecurity`, and says what
    metadata the ADS stream carries."""

    def __init__(self, target: str, security: XdsClientSecurity | None = None) -> None:
        self.target = target
        self.security = security or XdsClientSecurity()
        self.token = BearerToken(self.security.token_file) if self.security.token_file is not None else None

    def describe(self) -> str:
        security = self.security
        tls = "mtls" if security.tls and security.cert_file else "tls" if security.tls else "plaintext"
        return f"{tls}, {'token' if self.token is not None else 'no token'}"

    def channel(self) -> grpc.aio.Channel:
        """A new channel (TLS files read now); unary calls on it carry the token."""
        interceptors = [_BearerInterceptor(self.token)] if self.token is not None else None
        security = self.security
        if not security.tls:
            return grpc.aio.insecure_channel(self.target, interceptors=interceptors)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(security.ca_file, "--xds-ca-file") if security.ca_file else None,
            private_key=_read(security.key_file, "--xds-key-file") if security.key_file else None,
            certificate_chain=_read(security.cert_file, "--xds-cert-file") if security.cert_file else None,
        )
        options = [("grpc.ssl_target_name_override", security.server_name)] if security.server_name else None
        return grpc.aio.secure_channel(self.target, credentials, options=options, interceptors=interceptors)

    def stream_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Metadata of a new ADS stream: the token read from its file now."""
        return self.token.metadata(fresh=True) if self.token is not None else None


__all__ = ["BearerToken", "XdsClientSecurity", "XdsCredentialsError", "XdsTransport"]
