"""The gateway's Mcp-Session-Id: a sealed token any worker or replica can open, so no session lives in memory.

The token carries everything needed to resume a federated session: a gateway session id (for
logs), the negotiated protocol version, each target's upstream session id (absent for targets
without sessions), the creation time and the expiry. It is sealed with AES-256-GCM:

    token = "1" "." key_id "." base64url_nopad(nonce[12] || ciphertext || tag[16])

The key id is 1-255 visible ASCII characters (it may itself contain dots: the version ends at the
first dot and the sealed body, whose alphabet has none, starts after the last).

- The key id travels in the clear so the right key is found without trial decryption. The
  keyring's first key seals and every key opens, so keys rotate: add the new key first, keep the
  old ones until the longest token lifetime has passed, then drop them.
- Associated data binds the token to the format version, the key id and the MCP backend it was
  issued for, so a token minted by another backend (or copied across gateways) does not open.
- Nonces are 96 random bits; NIST's bound for random nonces (2**32 seals per key) is far above
  what one key seals between rotations.
- Only visible ASCII (0x21-0x7E) appears in the token, as MCP requires of session ids, and the
  length is bounded both when sealing and before any work when opening.

Expiry: an absolute lifetime, `expires_at = created_at + max_lifetime`, written into the token.
A sliding idle expiry would need either shared state (which this design exists to avoid) or a
re-issued token on every response, and clients do not reliably adopt a changed id: the Python SDK
reads Mcp-Session-Id only from the initialize response, so a re-issued id would be ignored and
an active session would die one idle period after it started. Idle expiry therefore lives where
the state lives: each upstream server expires its own idle sessions (the gateway then answers
404, and the client re-initializes), and a worker drops its in-memory resources for a session
(connections, streams) after the configured idle timeout; the token's lifetime is the hard cap.
A DELETEd session keeps opening until it expires, but its upstream sessions are gone, so the
upstreams answer 404 and so does the gateway.

All functions are pure: time comes in as `now` (Unix seconds) and randomness through an
injectable `random_bytes`, so tests are deterministic.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TOKEN_VERSION: Final = "1"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
SESSION_ID_BYTES: Final = 16
DEFAULT_MAX_TOKEN_LENGTH: Final = 2048
DEFAULT_MAX_LIFETIME: Final = 24 * 3600

_PAYLOAD_FORMAT: Final = 1
_AAD_LABEL: Final = b"agentgate/mcp-session\x00"
_KEY_ID: Final = re.compile(r"[\x21-\x7e]{1,255}")
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]+")
_HEAD: Final = struct.Struct(f">B{SESSION_ID_BYTES}sQQ")
_U8: Final = struct.Struct(">B")
_U16: Final = struct.Struct(">H")


@dataclass(frozen=True, slots=True)
class SessionClaims:
    """What the token says. `upstream_sessions` is ordered (target name, upstream session id or None)."""

    session_id: bytes
    protocol_version: str
    upstream_sessions: tuple[tuple[str, str | None], ...]
    created_at: int
    expires_at: int

    @property
    def session_hex(self) -> str:
        """The gateway session id as logs show it."""
        return self.session_id.hex()

    def upstream(self, target: str) -> str | None:
        for name, upstream_id in self.upstream_sessions:
            if name == target:
                return upstream_id
        return None

    def with_upstream(self, target: str, upstream_id: str | None) -> SessionClaims:
        """A copy with `target`'s upstream session id set (added if the target is new)."""
        rest = tuple(item for item in self.upstream_sessions if item[0] != target)
        return replace(self, upstream_sessions=(*rest, (target, upstream_id)))


class SessionRejection(StrEnum):
    """Why a token did not open. The HTTP layer answers 404 for all of them; logs use the label."""

    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    UNDECRYPTABLE = "undecryptable"  # tampered, truncated, wrong key, or issued for another backend
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class SessionRejected:
    reason: SessionRejection
    detail: str


class SessionTokenTooLong(ValueError):
    """The claims do not fit in `max_token_length`: too many targets or very long upstream ids."""


def parse_key(text: str) -> bytes:
    """A 256-bit key from its Base64 (standard or URL-safe, padding optional) text form, as config holds it."""
    cleaned = text.strip().replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        key = base64.b64decode(cleaned, validate=True)
    except binascii.Error:
        raise ValueError("session key is not valid Base64") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"session key must be {KEY_BYTES} bytes, got {len(key)}")
    return key


class SessionKeyring:
    """Named AES-256 keys, built at config time. The first key seals; all keys open."""

    __slots__ = ("_ciphers", "sealing_key_id")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("a session keyring needs at least one key")
        ciphers: dict[str, AESGCM] = {}
        for key_id, key in keys:
            if not _KEY_ID.fullmatch(key_id):
                raise ValueError(f"session key id {key_id!r} must be 1-255 visible ASCII characters")
            if key_id in ciphers:
                raise ValueError(f"duplicate session key id {key_id!r}")
            if len(key) != KEY_BYTES:
                raise ValueError(f"session key {key_id!r} must be {KEY_BYTES} bytes, got {len(key)}")
            ciphers[key_id] = AESGCM(key)
        self._ciphers = ciphers
        self.sealing_key_id: str = keys[0][0]

    def cipher(self, key_id: str) -> AESGCM | None:
        return self._ciphers.get(key_id)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._ciphers)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _encode_payload(claims: SessionClaims) -> bytes:
    if len(claims.session_id) != SESSION_ID_BYTES:
        raise ValueError(f"session id must be {SESSION_ID_BYTES} bytes")
    version = claims.protocol_version.encode("ascii")
    if len(version) > 255 or len(claims.upstream_sessions) > 255:
        raise SessionTokenTooLong("protocol version or target count out of range")
    parts = [
        _HEAD.pack(_PAYLOAD_FORMAT, claims.session_id, claims.created_at, claims.expires_at),
        _U8.pack(len(version)),
        version,
        _U8.pack(len(claims.upstream_sessions)),
    ]
    for name, upstream_id in claims.upstream_sessions:
        name_bytes = name.encode("utf-8")
        if not name_bytes or len(name_bytes) > 255:
            raise SessionTokenTooLong(f"target name {name!r} must be 1-255 bytes")
        parts += (_U8.pack(len(name_bytes)), name_bytes)
        if upstream_id is None:
            parts.append(_U16.pack(0))
        else:
            id_bytes = upstream_id.encode("utf-8")
            if len(id_bytes) >= 0xFFFF:
                raise SessionTokenTooLong(f"upstream session id of {name!r} is too long")
            # Length + 1 so that 0 can mean "no upstream session" distinctly from "".
            parts += (_U16.pack(len(id_bytes) + 1), id_bytes)
    return b"".join(parts)


def _decode_payload(data: bytes) -> SessionClaims:
    """Inverse of `_encode_payload`. Raises ValueError/struct.error/UnicodeError on malformed input."""
    fmt, session_id, created_at, expires_at = _HEAD.unpack_from(data, 0)
    if fmt != _PAYLOAD_FORMAT:
        raise ValueError(f"unknown payload format {fmt}")
    pos = _HEAD.size
    (n,) = _U8.unpack_from(data, pos)
    pos += 1
    version = data[pos : pos + n].decode("ascii")
    pos += n
    (count,) = _U8.unpack_from(data, pos)
    pos += 1
    upstream: list[tuple[str, str | None]] = []
    for _ in range(count):
        (n,) = _U8.unpack_from(data, pos)
        pos += 1
        name = data[pos : pos + n].decode("utf-8")
        pos += n
        (m,) = _U16.unpack_from(data, pos)
        pos += 2
        upstream_id = None if m == 0 else data[pos : pos + m - 1].decode("utf-8")
        pos += max(m - 1, 0)
        upstream.append((name, upstream_id))
    if pos != len(data):
        raise ValueError("trailing or missing payload bytes")
    return SessionClaims(session_id, version, tuple(upstream), created_at, expires_at)


class SessionTokenCodec:
    """Issues, seals and opens session tokens for one MCP backend."""

    __slots__ = ("_aad_prefix", "_random_bytes", "keyring", "max_lifetime", "max_token_length")

    def __init__(
        self,
        keyring: SessionKeyring,
        backend: str,
        *,
        max_lifetime: float = DEFAULT_MAX_LIFETIME,
        max_token_length: int = DEFAULT_MAX_TOKEN_LENGTH,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if max_lifetime < 1:
            raise ValueError("the session lifetime must be at least one second")
        self.keyring = keyring
        self.max_lifetime = int(max_lifetime)
        self.max_token_length = max_token_length
        self._random_bytes = random_bytes
        self._aad_prefix = _AAD_LABEL + backend.encode("utf-8") + b"\x00" + TOKEN_VERSION.encode("ascii") + b"\x00"

    def new_claims(
        self,
        protocol_version: str,
        upstream_sessions: Iterable[tuple[str, str | None]] | Mapping[str, str | None],
        *,
        now: float,
    ) -> SessionClaims:
        """Claims for a fresh session (after initialize), with a random gateway session id."""
        pairs = upstream_sessions.items() if isinstance(upstream_sessions, Mapping) else upstream_sessions
        created = int(now)
        return SessionClaims(
            self._random_bytes(SESSION_ID_BYTES), protocol_version, tuple(pairs), created, created + self.max_lifetime
        )

    def seal(self, claims: SessionClaims) -> str:
        key_id = self.keyring.sealing_key_id
        cipher = self.keyring.cipher(key_id)
        assert cipher is not None
        nonce = self._random_bytes(NONCE_BYTES)
        sealed = cipher.encrypt(nonce, _encode_payload(claims), self._aad_prefix + key_id.encode("ascii"))
        token = f"{TOKEN_VERSION}.{key_id}.{_b64url(nonce + sealed)}"
        if len(token) > self.max_token_length:
            raise SessionTokenTooLong(f"session token would be {len(token)} characters (limit {self.max_token_length})")
        return token

    def open(self, token: str, *, now: float) -> SessionClaims | SessionRejected:
        """The claims of a token this backend sealed and that has not expired, else why not."""
        if not token or len(token) > self.max_token_length:
            return SessionRejected(SessionRejection.MALFORMED, f"length {len(token)} out of bounds")
        version, _, rest = token.partition(".")
        key_id, _, body = rest.rpartition(".")
        if version != TOKEN_VERSION:
            return SessionRejected(SessionRejection.MALFORMED, "unknown token version")
        if not _KEY_ID.fullmatch(key_id):
            return SessionRejected(SessionRejection.MALFORMED, "invalid key id")
        cipher = self.keyring.cipher(key_id)
        if cipher is None:
            return SessionRejected(SessionRejection.UNKNOWN_KEY, f"key id {key_id!r} not in the keyring")
        if not _B64URL.fullmatch(body) or len(body) % 4 == 1:
            return SessionRejected(SessionRejection.MALFORMED, "body is not base64url")
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        # Reject non-canonical encodings (stray low bits in the last character), so that one
        # sealed value has exactly one spelling and no character of the token is malleable.
        if _b64url(raw) != body:
            return SessionRejected(SessionRejection.MALFORMED, "non-canonical base64url")
        if len(raw) < NONCE_BYTES + TAG_BYTES + _HEAD.size:
            return SessionRejected(SessionRejection.MALFORMED, "token too short")
        try:
            payload = cipher.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], self._aad_prefix + key_id.encode("ascii"))
        except InvalidTag:
            return SessionRejected(SessionRejection.UNDECRYPTABLE, "authentication failed")
        try:
            claims = _decode_payload(payload)
        except (ValueError, struct.error) as exc:  # UnicodeDecodeError is a ValueError
            return SessionRejected(SessionRejection.MALFORMED, f"payload: {exc}")
        if now >= claims.expires_at:
            return SessionRejected(SessionRejection.EXPIRED, f"expired at {claims.expires_at}")
        return claims
