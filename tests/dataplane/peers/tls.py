"""Certificates for TLS tests (trustme): one CA, a server certificate for 127.0.0.1/localhost."""

from __future__ import annotations

import ssl
from functools import cache

import trustme


@cache
def authority() -> trustme.CA:
    return trustme.CA()


@cache
def server_cert() -> trustme.LeafCert:
    return authority().issue_cert("127.0.0.1", "localhost", "upstream.test")


def server_pem() -> tuple[bytes, bytes]:
    """(certificate chain PEM, private key PEM) for a listener resource."""
    cert = server_cert()
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    return chain, cert.private_key_pem.bytes()


def ca_pem() -> bytes:
    return authority().cert_pem.bytes()


def server_context(alpn: list[str]) -> ssl.SSLContext:
    """A context for a test upstream peer."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_cert().configure_cert(context)
    context.set_alpn_protocols(alpn)
    return context


def client_context(alpn: list[str] | None = None) -> ssl.SSLContext:
    """A context for test clients that trusts the test CA."""
    context = ssl.create_default_context()
    authority().configure_trust(context)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context
