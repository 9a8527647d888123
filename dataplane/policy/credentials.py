"""API keys and basic-auth passwords, stored only as hashes, and the two small types every
authenticator in this package shares (`AuthnConfigError`, `Rejection`).

Schemes, chosen for what each secret is:

- API keys are high-entropy random strings (`new_api_key` makes 256-bit ones), so one SHA-256 is as
  strong as any slow hash and costs about a microsecond; lookup is a dict probe on the digest, which
  leaks nothing usable by timing (learning a digest prefix does not help find a preimage).
- Passwords are low-entropy, so they are stored as scrypt (RFC 7914) in the PHC string format
  ``$scrypt$ln=15,r=8,p=1$<salt>$<hash>`` (32 MiB, about 110 ms on the 2-core build machine). That cost
  is paid off the event loop (`PasswordTable.check` runs in a worker thread) and once per
  (user, password) per worker: a verified pair is remembered under an HMAC with a per-process key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

from dataplane.policy.identity import Identity


class AuthnConfigError(ValueError):
    """An authentication config the data plane refuses, naming the field so the NACK can say where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a presented credential is refused.

    ``reason`` is a stable label for logs and metrics; ``description`` is a fixed sentence safe to send
    to the client (RFC 6750 ``error_description``): it never echoes what the client sent.
    """

    reason: str
    description: str


# ---------------------------------------------------------------------------------------------- API keys


@dataclass(frozen=True, slots=True)
class ApiKeyEntry:
    """One accepted key: ``name`` becomes the identity's principal, ``sha256`` is the key's hex digest."""

    name: str
    sha256: str


@dataclass(frozen=True, slots=True)
class ApiKeySpec:
    """Accepted API keys and where callers present them: a header of their own (``x-api-key``), or
    ``authorization`` with the Bearer scheme."""

    keys: tuple[ApiKeyEntry, ...]
    header: str = "x-api-key"


def new_api_key() -> tuple[str, str]:
    """A fresh 256-bit key and the digest to configure: (key to hand out, sha256 hex to store)."""
    key = secrets.token_urlsafe(32)
    return key, hash_api_key(key)


def hash_api_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


_HEX = frozenset("0123456789abcdef")
_KEY_UNKNOWN = Rejection("apikey_unknown", "The API key is not valid")


class ApiKeyTable:
    """Compiled API keys: digest -> identity, built once."""

    __slots__ = ("_by_digest",)

    def __init__(self, spec: ApiKeySpec, field: str = "api_keys") -> None:
        by_digest: dict[bytes, Identity] = {}
        names: set[str] = set()
        for index, entry in enumerate(spec.keys):
            where = f"{field}.keys[{index}]"
            if not entry.name:
                raise AuthnConfigError(f"{where}.name", "must not be empty")
            if entry.name in names:
                raise AuthnConfigError(f"{where}.name", f"duplicate key name {entry.name!r}")
            digest = entry.sha256.lower()
            if len(digest) != 64 or not set(digest) <= _HEX:
                raise AuthnConfigError(f"{where}.sha256", "must be the 64 hex digits of the key's SHA-256")
            raw = bytes.fromhex(digest)
            if raw in by_digest:
                raise AuthnConfigError(f"{where}.sha256", f"same key as {by_digest[raw].principal!r}")
            names.add(entry.name)
            by_digest[raw] = Identity(principal=entry.name, method="apikey")
        if not by_digest:
            raise AuthnConfigError(f"{field}.keys", "at least one key is required")
        self._by_digest = by_digest

    def lookup(self, key: bytes) -> Identity | Rejection:
        identity = self._by_digest.get(hashlib.sha256(key).digest())
        return _KEY_UNKNOWN if identity is None else identity


# ----------------------------------------------------------------------------------------- basic auth


@dataclass(frozen=True, slots=True)
class BasicUser:
    """One user: ``password_hash`` as made by `hash_password` (``$scrypt$ln=..,r=..,p=..$salt$hash``)."""

    name: str
    password_hash: str


@dataclass(frozen=True, slots=True)
class BasicAuthSpec:
    users: tuple[BasicUser, ...]


# Bounds on stored parameters, so a config cannot make one request take seconds or gigabytes.
_MAX_LOG2_N = 20
_MAX_MEMORY = 256 * 1024 * 1024
DEFAULT_SCRYPT = (15, 8, 1)  # log2(N), r, p: 32 MiB, RFC 7914's interactive-login order of cost.


@dataclass(frozen=True, slots=True)
class _ScryptHash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def matches(self, password: bytes) -> bool:
        n = 1 << self.log2_n
        derived = hashlib.scrypt(
            password,
            salt=self.salt,
            n=n,
            r=self.r,
            p=self.p,
            maxmem=2 * 128 * self.r * (n + self.p) + (1 << 20),
            dklen=len(self.digest),
        )
        return hmac.compare_digest(derived, self.digest)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(
    password: str, *, log2_n: int = DEFAULT_SCRYPT[0], r: int = DEFAULT_SCRYPT[1], p: int = DEFAULT_SCRYPT[2]
) -> str:
    """The stored form of a password (PHC string format for scrypt)."""
    salt = os.urandom(16)
    params = _ScryptHash(log2_n, r, p, salt, b"\0" * 32)
    _check_cost(params, "password_hash")
    n = 1 << log2_n
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * r * (n + p) + (1 << 20), dklen=32
    )
    return f"$scrypt$ln={log2_n},r={r},p={p}${_b64(salt)}${_b64(digest)}"


def _check_cost(parsed: _ScryptHash, field: str) -> None:
    if not 10 <= parsed.log2_n <= _MAX_LOG2_N or not 1 <= parsed.r <= 32 or not 1 <= parsed.p <= 16:
        raise AuthnConfigError(field, f"scrypt parameters out of bounds (ln 10..{_MAX_LOG2_N}, r 1..32, p 1..16)")
    if 128 * parsed.r * (1 << parsed.log2_n) > _MAX_MEMORY:
        raise AuthnConfigError(field, "scrypt memory cost above 256 MiB")


def _parse_password_hash(text: str, field: str) -> _ScryptHash:
    parts = text.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "scrypt":
        raise AuthnConfigError(field, "expected $scrypt$ln=<n>,r=<r>,p=<p>$<salt>$<hash> (see hash_password)")
    try:
        params = dict(item.split("=", 1) for item in parts[2].split(","))
        parsed = _ScryptHash(int(params["ln"]), int(params["r"]), int(params["p"]), _unb64(parts[3]), _unb64(parts[4]))
    except (ValueError, KeyError, binascii.Error) as exc:
        raise AuthnConfigError(field, f"malformed scrypt hash: {exc}") from None
    _check_cost(parsed, field)
    if len(parsed.salt) < 8 or len(parsed.digest) < 16:
        raise AuthnConfigError(field, "salt must be at least 8 bytes and hash at least 16")
    return parsed


BASIC_INVALID = Rejection("basic_invalid", "The user name or password is not valid")
_CACHE_LIMIT = 1024


class PasswordTable:
    """Compiled basic-auth users.

    `check` is the slow, pure, thread-safe verification (run it in a worker thread). `remembered` and
    `remember` are the fast path around it and must be called from one thread (the event loop): a
    verified (user, password) pair is kept as an HMAC under a key that never leaves this process, so
    the next request with the same credentials costs one HMAC. A changed config makes a new table, so
    a changed or removed password stops working at once.
    """

    __slots__ = ("_decoy", "_key", "_remembered", "_users")

    def __init__(self, spec: BasicAuthSpec, field: str = "basic") -> None:
        users: dict[bytes, tuple[_ScryptHash, Identity]] = {}
        for index, user in enumerate(spec.users):
            where = f"{field}.users[{index}]"
            if not user.name or ":" in user.name:
                raise AuthnConfigError(f"{where}.name", "must be non-empty and contain no ':' (RFC 7617)")
            name = user.name.encode()
            if name in users:
                raise AuthnConfigError(f"{where}.name", f"duplicate user {user.name!r}")
            parsed = _parse_password_hash(user.password_hash, f"{where}.password_hash")
            users[name] = (parsed, Identity(principal=user.name, method="basic"))
        if not users:
            raise AuthnConfigError(f"{field}.users", "at least one user is required")
        self._users = users
        # An unknown user still pays one hash of the costliest configured kind, so response time
        # does not reveal which user names exist.
        costliest = max((entry[0] for entry in users.values()), key=lambda h: (1 << h.log2_n) * h.r * h.p)
        self._decoy = _ScryptHash(costliest.log2_n, costliest.r, costliest.p, os.urandom(16), os.urandom(32))
        self._key = os.urandom(32)
        self._remembered: dict[bytes, Identity] = {}

    def _fingerprint(self, user: bytes, password: bytes) -> bytes:
        return hmac.digest(self._key, user + b"\0" + password, "sha256")

    def remembered(self, user: bytes, password: bytes) -> Identity | None:
        return self._remembered.get(self._fingerprint(user, password))

    def remember(self, user: bytes, password: bytes, identity: Identity) -> None:
        remembered = self._remembered
        if len(remembered) >= _CACHE_LIMIT:
            del remembered[next(iter(remembered))]
        remembered[self._fingerprint(user, password)] = identity

    def check(self, user: bytes, password: bytes) -> Identity | Rejection:
        """The full scrypt verification: tens of milliseconds, so never on the event loop."""
        entry = self._users.get(user)
        if entry is None:
            self._decoy.matches(password)
            return BASIC_INVALID
        return entry[1] if entry[0].matches(password) else BASIC_INVALID


BASIC_MALFORMED = Rejection("basic_malformed", "The basic credentials are malformed")


def parse_basic(credentials: bytes) -> tuple[bytes, bytes] | Rejection:
    """RFC 7617: base64 of ``user:password`` (UTF-8). Returns (user, password) as UTF-8 bytes."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True)
        decoded.decode()
    except (binascii.Error, ValueError):
        return BASIC_MALFORMED
    user, colon, password = decoded.partition(b":")
    if not colon or not user:
        return BASIC_MALFORMED
    return user, password


__all__ = [
    "DEFAULT_SCRYPT",
    "ApiKeyEntry",
    "ApiKeySpec",
    "ApiKeyTable",
    "AuthnConfigError",
    "BasicAuthSpec",
    "BasicUser",
    "PasswordTable",
    "Rejection",
    "hash_api_key",
    "hash_password",
    "new_api_key",
    "parse_basic",
]
