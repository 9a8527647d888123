"""Sealed Mcp-Session-Id tokens: round trip, rotation, tampering, backend binding, expiry, bounds."""

from __future__ import annotations

import base64
import itertools
import re
from collections.abc import Callable
from typing import Any

import pytest

from dataplane.mcp.session import (
    SessionClaims,
    SessionKeyring,
    SessionRejected,
    SessionRejection,
    SessionTokenCodec,
    SessionTokenTooLong,
    parse_key,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
T0 = 1_800_000_000
VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


def counting_bytes() -> Callable[[int], bytes]:
    """Deterministic stand-in for os.urandom, so tokens are reproducible."""
    counter = itertools.count()

    def random_bytes(n: int) -> bytes:
        return bytes((next(counter) + i) % 256 for i in range(n))

    return random_bytes


def codec(
    keys: list[tuple[str, bytes]] | None = None, backend: str = "default/mcp", **kwargs: Any
) -> SessionTokenCodec:
    return SessionTokenCodec(SessionKeyring(keys or [("a", KEY_A)]), backend, random_bytes=counting_bytes(), **kwargs)


UPSTREAMS = {"weather": "3f1c-upstream-session", "files": None, "héllo-ünïcode": "x" * 100}


def test_round_trip_keeps_every_claim() -> None:
    c = codec()
    claims = c.new_claims("2025-11-25", UPSTREAMS, now=T0 + 0.7)
    token = c.seal(claims)
    opened = c.open(token, now=T0 + 10)
    assert opened == claims
    assert isinstance(opened, SessionClaims)
    assert opened.created_at == T0
    assert opened.upstream("weather") == "3f1c-upstream-session"
    assert opened.upstream("files") is None
    assert opened.upstream("héllo-ünïcode") == "x" * 100
    assert len(opened.session_hex) == 32


def test_token_is_visible_ascii_and_shaped() -> None:
    token = codec().seal(codec().new_claims("2026-07-28", UPSTREAMS, now=T0))
    assert VISIBLE_ASCII.fullmatch(token)
    version, key_id, body = token.split(".")
    assert (version, key_id) == ("1", "a")
    assert "=" not in body


def test_empty_upstream_id_differs_from_absent() -> None:
    c = codec()
    claims = c.new_claims("2025-06-18", [("t1", ""), ("t2", None)], now=T0)
    opened = c.open(c.seal(claims), now=T0)
    assert isinstance(opened, SessionClaims)
    assert opened.upstream_sessions == (("t1", ""), ("t2", None))


def test_with_upstream_adds_and_replaces() -> None:
    claims = codec().new_claims("2025-11-25", {"a": None}, now=T0)
    updated = claims.with_upstream("a", "s1").with_upstream("b", "s2")
    assert updated.upstream("a") == "s1" and updated.upstream("b") == "s2"
    assert claims.upstream("a") is None  # immutable


def test_fresh_sessions_get_distinct_ids_and_nonces() -> None:
    c = SessionTokenCodec(SessionKeyring([("a", KEY_A)]), "b")
    first = c.new_claims("2025-11-25", {}, now=T0)
    second = c.new_claims("2025-11-25", {}, now=T0)
    assert first.session_id != second.session_id
    assert c.seal(first) != c.seal(first)  # fresh nonce each seal


def test_rotation_new_key_seals_old_key_still_opens() -> None:
    old = codec([("old", KEY_A)])
    old_token = old.seal(old.new_claims("2025-11-25", UPSTREAMS, now=T0))
    rotated = codec([("new", KEY_B), ("old", KEY_A)])
    new_token = rotated.seal(rotated.new_claims("2025-11-25", UPSTREAMS, now=T0))
    assert new_token.split(".")[1] == "new"
    assert isinstance(rotated.open(old_token, now=T0), SessionClaims)
    assert isinstance(rotated.open(new_token, now=T0), SessionClaims)
    # Once the old key is dropped, its tokens name an unknown key.
    retired = codec([("new", KEY_B)])
    rejected = retired.open(old_token, now=T0)
    assert isinstance(rejected, SessionRejected) and rejected.reason == SessionRejection.UNKNOWN_KEY


def test_same_key_id_with_different_material_does_not_open() -> None:
    token = codec([("k", KEY_A)]).seal(codec().new_claims("2025-11-25", {}, now=T0))
    rejected = codec([("k", KEY_B)]).open(token, now=T0)
    assert isinstance(rejected, SessionRejected) and rejected.reason == SessionRejection.UNDECRYPTABLE


def test_token_from_another_backend_does_not_open() -> None:
    token = codec(backend="team-a/mcp").seal(codec().new_claims("2025-11-25", UPSTREAMS, now=T0))
    rejected = codec(backend="team-b/mcp").open(token, now=T0)
    assert isinstance(rejected, SessionRejected) and rejected.reason == SessionRejection.UNDECRYPTABLE
    assert isinstance(codec(backend="team-a/mcp").open(token, now=T0), SessionClaims)


def test_every_single_character_change_is_rejected() -> None:
    c = codec([("a", KEY_A), ("b", KEY_B)])
    token = c.seal(c.new_claims("2025-11-25", {"t": "s"}, now=T0))
    alphabet = "ABab09-_.x"
    for position in range(len(token)):
        for replacement in alphabet:
            if replacement == token[position]:
                continue
            tampered = token[:position] + replacement + token[position + 1 :]
            result = c.open(tampered, now=T0)
            assert isinstance(result, SessionRejected), (position, replacement)


def test_every_ciphertext_bit_flip_is_undecryptable() -> None:
    c = codec()
    token = c.seal(c.new_claims("2025-11-25", {"t": "s"}, now=T0))
    prefix, body = token.rsplit(".", 1)
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    for index in range(len(raw)):
        flipped = bytearray(raw)
        flipped[index] ^= 0x01
        tampered = prefix + "." + base64.urlsafe_b64encode(bytes(flipped)).rstrip(b"=").decode()
        result = c.open(tampered, now=T0)
        assert isinstance(result, SessionRejected) and result.reason == SessionRejection.UNDECRYPTABLE, index


def test_truncation_and_extension_are_rejected() -> None:
    c = codec()
    token = c.seal(c.new_claims("2025-11-25", {"t": "s"}, now=T0))
    for cut in range(len(token)):
        assert isinstance(c.open(token[:cut], now=T0), SessionRejected)
    assert isinstance(c.open(token + "A", now=T0), SessionRejected)
    assert isinstance(c.open(token + "AAAA", now=T0), SessionRejected)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", SessionRejection.MALFORMED),
        ("garbage", SessionRejection.MALFORMED),
        ("1.a", SessionRejection.MALFORMED),
        ("1.a.b.c", SessionRejection.UNKNOWN_KEY),  # key ids may contain dots: "a.b"
        ("2.a.AAAA", SessionRejection.MALFORMED),
        ("1..AAAA", SessionRejection.MALFORMED),
        ("1.a b.AAAA", SessionRejection.MALFORMED),  # space is not visible ASCII
        ("1.a\x7f.AAAA", SessionRejection.MALFORMED),
        ("1." + "k" * 256 + ".AAAA", SessionRejection.MALFORMED),
        ("1.zz.AAAA", SessionRejection.UNKNOWN_KEY),
        ("1.a.", SessionRejection.MALFORMED),
        ("1.a.AAAA", SessionRejection.MALFORMED),  # too short to hold nonce and tag
        ("1.a.A", SessionRejection.MALFORMED),  # impossible base64 length
        ("1.a." + "A" * 60 + "=", SessionRejection.MALFORMED),  # padding is not part of the format
        ("1.a." + "A" * 30 + "+/" + "A" * 30, SessionRejection.MALFORMED),  # standard alphabet
        ("1.a." + "A" * 30 + " " + "A" * 30, SessionRejection.MALFORMED),
        ("1.a." + "é" * 60, SessionRejection.MALFORMED),
        ("1.a." + "A" * 100, SessionRejection.UNDECRYPTABLE),  # well formed, never sealed
        ("1.a." + "A" * 5000, SessionRejection.MALFORMED),  # over the length bound
    ],
)
def test_malformed_tokens(token: str, reason: SessionRejection) -> None:
    result = codec().open(token, now=T0)
    assert isinstance(result, SessionRejected)
    assert result.reason == reason
    assert result.detail


def test_absolute_lifetime_expiry_with_injected_clock() -> None:
    c = codec(max_lifetime=3600)
    claims = c.new_claims("2025-11-25", {}, now=T0)
    token = c.seal(claims)
    assert claims.expires_at == T0 + 3600
    assert isinstance(c.open(token, now=T0 + 3599.9), SessionClaims)
    expired = c.open(token, now=T0 + 3600)
    assert isinstance(expired, SessionRejected) and expired.reason == SessionRejection.EXPIRED


def test_token_length_is_bounded_when_sealing() -> None:
    c = codec(max_token_length=256)
    small = c.seal(c.new_claims("2025-11-25", {"t": "s" * 50}, now=T0))
    assert len(small) <= 256
    with pytest.raises(SessionTokenTooLong):
        c.seal(c.new_claims("2025-11-25", {"t": "s" * 500}, now=T0))
    with pytest.raises(SessionTokenTooLong):
        c.seal(c.new_claims("2025-11-25", {f"t{i}": None for i in range(256)}, now=T0))
    with pytest.raises(SessionTokenTooLong):
        c.seal(c.new_claims("2025-11-25", {"": "s"}, now=T0))


def test_many_targets_fit_in_the_default_bound() -> None:
    c = codec()
    upstreams = {f"target-{i}": "0123456789abcdef0123456789abcdef" for i in range(20)}
    token = c.seal(c.new_claims("2025-11-25", upstreams, now=T0))
    assert len(token) <= c.max_token_length
    opened = c.open(token, now=T0)
    assert isinstance(opened, SessionClaims) and len(opened.upstream_sessions) == 20


@pytest.mark.parametrize(
    "keys",
    [
        [],
        [("a", b"short")],
        [("a", KEY_A), ("a", KEY_B)],
        [("bad id", KEY_A)],
        [("x" * 256, KEY_A)],
        [("", KEY_A)],
        [("caf\u00e9", KEY_A)],
    ],
)
def test_keyring_rejects_bad_config(keys: list[tuple[str, bytes]]) -> None:
    with pytest.raises(ValueError):
        SessionKeyring(keys)


def test_keyring_first_key_seals() -> None:
    ring = SessionKeyring([("k2", KEY_B), ("k1", KEY_A)])
    assert ring.sealing_key_id == "k2"
    assert ring.key_ids == ("k2", "k1")


def test_parse_key_accepts_both_base64_alphabets() -> None:
    key = bytes([0xFB, 0xFF] * 16)
    assert parse_key(base64.b64encode(key).decode()) == key
    assert parse_key(base64.urlsafe_b64encode(key).decode().rstrip("=")) == key
    for bad in ["not base64!", base64.b64encode(b"x" * 16).decode()]:
        with pytest.raises(ValueError):
            parse_key(bad)


def test_codec_rejects_non_positive_lifetimes() -> None:
    ring = SessionKeyring([("a", KEY_A)])
    for lifetime in (0, -5, 0.5):
        with pytest.raises(ValueError):
            SessionTokenCodec(ring, "b", max_lifetime=lifetime)


@pytest.mark.parametrize("key_id", ["keys/current", "(process-local)", "ns.secret.key", "~!", "k" * 255])
def test_config_style_key_ids_round_trip(key_id: str) -> None:
    c = codec([(key_id, KEY_A)])
    token = c.seal(c.new_claims("2025-11-25", {"t": "s"}, now=T0))
    assert VISIBLE_ASCII.fullmatch(token)
    assert token.startswith(f"1.{key_id}.")
    assert isinstance(c.open(token, now=T0), SessionClaims)


def test_key_id_with_dots_is_bound_to_the_token() -> None:
    c = codec([("a.b", KEY_A), ("a", KEY_B)])
    token = c.seal(c.new_claims("2025-11-25", {}, now=T0))
    forged = token.replace("1.a.b.", "1.a.", 1)  # same body, relabelled with the other key id
    assert isinstance(c.open(forged, now=T0), SessionRejected)


def test_deterministic_with_injected_randomness() -> None:
    first = codec()
    second = codec()
    token_1 = first.seal(first.new_claims("2025-11-25", UPSTREAMS, now=T0))
    token_2 = second.seal(second.new_claims("2025-11-25", UPSTREAMS, now=T0))
    assert token_1 == token_2
