"""SSL contexts built from PEM bytes at compile time, so a bad certificate is a config error.

`ssl.SSLContext.load_cert_chain` only reads files, so the PEM material is written to a
private temporary directory for the duration of the load and removed right after.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable, Mapping, Sequence

from dataplane.config.errors import ErrorReporter
from shared.api.agentgate.config.v1 import resources_pb2 as pb

# (report, field, tls) -> client context for an upstream, None (with an error) when unusable.
ClientContextFor = Callable[[ErrorReporter, str, pb.UpstreamTls], ssl.SSLContext | None]


def server_context(
    report: ErrorReporter, field: str, chain_pem: bytes, key_pem: bytes, alpn: Sequence[str]
) -> ssl.SSLContext | None:
    """A TLS 1.2+ server context with ALPN; None (and an error) if the chain or key is unusable."""
    if not chain_pem:
        report(f"{field}.certificate_chain_pem", "required for an HTTPS listener")
    if not key_pem:
        report(f"{field}.private_key_pem", "required for an HTTPS listener")
    if not chain_pem or not key_pem:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="agentgate-tls-") as folder:
        chain_path = os.path.join(folder, "chain.pem")
        key_path = os.path.join(folder, "key.pem")
        for path, data in ((chain_path, chain_pem), (key_path, key_pem)):
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
        try:
            context.load_cert_chain(chain_path, key_path, password=_no_password)
        except (ssl.SSLError, ValueError, OSError) as exc:
            report(field, f"cannot load certificate chain and private key: {_reason(exc)}")
            return None
    try:
        context.set_alpn_protocols(list(alpn))
    except (ssl.SSLError, ValueError) as exc:
        report(f"{field}.alpn_protocols", f"invalid ALPN protocols: {_reason(exc)}")
        return None
    return context


def sni_selector(by_host: Mapping[str, ssl.SSLContext]) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None]:
    """An SNI callback that switches the connection to the context of the named host.

    Exact names first, then the longest wildcard suffix ("*.example.com" covers
    "a.example.com" and "a.b.example.com", not "example.com"); otherwise the
    connection keeps the default context. Built once per config, so a handshake costs a
    dict lookup.
    """
    exact = {host: context for host, context in by_host.items() if not host.startswith("*.")}
    wildcards = sorted(
        ((host[1:], context) for host, context in by_host.items() if host.startswith("*.")),
        key=lambda item: len(item[0]),
        reverse=True,
    )

    def select(connection: ssl.SSLObject, server_name: str | None, _default: ssl.SSLContext) -> None:
        if not server_name:
            return
        name = server_name.lower().rstrip(".")
        context = exact.get(name)
        if context is None:
            context = next((c for suffix, c in wildcards if name.endswith(suffix) and len(name) > len(suffix)), None)
        if context is not None:
            connection.context = context

    return select


def client_context(
    report: ErrorReporter, field: str, ca_pem: bytes, *, insecure_skip_verify: bool, alpn: Sequence[str]
) -> ssl.SSLContext | None:
    """An upstream TLS context: the given CAs (else the system store), hostname checks unless told not to."""
    try:
        context = ssl.create_default_context(cadata=ca_pem.decode("ascii") if ca_pem else None)
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
        report(f"{field}.ca_certificates_pem", f"cannot load CA certificates: {_reason(exc)}")
        return None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(list(alpn))
    return context


def _no_password() -> bytes:
    # An encrypted key must fail to load, not prompt on the terminal.
    raise ValueError("the private key is encrypted")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason} ({exc.library or 'ssl'})"
    return str(exc) or type(exc).__name__
