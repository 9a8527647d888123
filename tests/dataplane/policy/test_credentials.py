"""API keys (SHA-256 digests) and basic-auth passwords (scrypt PHC strings)."""

from __future__ import annotations

import base64

import pytest

from dataplane.policy.credentials import (
    ApiKeyEntry,
    ApiKeySpec,
    ApiKeyTable,
    AuthnConfigError,
    BasicAuthSpec,
    BasicUser,
    PasswordTable,
    Rejection,
    hash_api_key,
    hash_password,
    new_api_key,
    parse_basic,
)
from dataplane.policy.identity import Identity

# The lowest cost the table accepts, so the tests stay fast; production hashes use the default.
CHEAP = {"log2_n": 10, "r": 8, "p": 1}


def test_api_key_good_and_bad() -> None:
    key, digest = new_api_key()
    assert len(key) >= 43 and digest == hash_api_key(key)
    table = ApiKeyTable(ApiKeySpec(keys=(ApiKeyEntry("ci-bot", digest), ApiKeyEntry("other", hash_api_key("k2")))))
    identity = table.lookup(key.encode())
    assert identity == Identity(principal="ci-bot", method="apikey")
    result = table.lookup(b"not-a-key")
    assert isinstance(result, Rejection) and result.reason == "apikey_unknown"
    assert isinstance(table.lookup(key.encode() + b"x"), Rejection)


def test_api_key_digest_is_case_insensitive_hex() -> None:
    table = ApiKeyTable(ApiKeySpec(keys=(ApiKeyEntry("a", hash_api_key("secret").upper()),)))
    assert isinstance(table.lookup(b"secret"), Identity)


@pytest.mark.parametrize(
    ("entries", "field"),
    [
        ((), "api_keys.keys"),
        ((ApiKeyEntry("a", "abc"),), "api_keys.keys[0].sha256"),
        ((ApiKeyEntry("a", "z" * 64),), "api_keys.keys[0].sha256"),
        ((ApiKeyEntry("", hash_api_key("x")),), "api_keys.keys[0].name"),
        ((ApiKeyEntry("a", hash_api_key("x")), ApiKeyEntry("a", hash_api_key("y"))), "api_keys.keys[1].name"),
        ((ApiKeyEntry("a", hash_api_key("x")), ApiKeyEntry("b", hash_api_key("x"))), "api_keys.keys[1].sha256"),
    ],
)
def test_api_key_config_errors_name_the_field(entries: tuple[ApiKeyEntry, ...], field: str) -> None:
    with pytest.raises(AuthnConfigError) as caught:
        ApiKeyTable(ApiKeySpec(keys=entries))
    assert caught.value.field == field


def test_password_hash_is_phc_scrypt_and_salted() -> None:
    first, second = hash_password("hunter2", **CHEAP), hash_password("hunter2", **CHEAP)
    assert first.startswith("$scrypt$ln=10,r=8,p=1$")
    assert first != second  # a fresh salt each time
    assert "hunter2" not in first


def test_password_check_good_wrong_and_unknown_user() -> None:
    table = PasswordTable(BasicAuthSpec(users=(BasicUser("alice", hash_password("correct horse", **CHEAP)),)))
    assert table.check(b"alice", b"correct horse") == Identity(principal="alice", method="basic")
    wrong = table.check(b"alice", b"Correct horse")
    unknown = table.check(b"mallory", b"correct horse")
    assert isinstance(wrong, Rejection) and isinstance(unknown, Rejection)
    assert wrong == unknown  # the refusal does not tell which part was wrong


def test_remembered_credentials_skip_the_slow_hash_and_are_exact() -> None:
    table = PasswordTable(BasicAuthSpec(users=(BasicUser("alice", hash_password("pw", **CHEAP)),)))
    assert table.remembered(b"alice", b"pw") is None
    identity = table.check(b"alice", b"pw")
    assert isinstance(identity, Identity)
    table.remember(b"alice", b"pw", identity)
    assert table.remembered(b"alice", b"pw") is identity
    assert table.remembered(b"alice", b"pw2") is None
    assert table.remembered(b"alice\0pw", b"") is None


def test_remembered_set_is_bounded() -> None:
    table = PasswordTable(BasicAuthSpec(users=(BasicUser("alice", hash_password("pw", **CHEAP)),)))
    identity = Identity(principal="alice", method="basic")
    for index in range(3000):
        table.remember(b"alice", b"%d" % index, identity)
    assert table.remembered(b"alice", b"0") is None
    assert table.remembered(b"alice", b"2999") is identity


@pytest.mark.parametrize(
    "stored",
    [
        "plaintext",
        "$2b$12$abcdefghijklmnopqrstuv",  # bcrypt: not a supported scheme
        "$scrypt$ln=10,r=8$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        "$scrypt$ln=30,r=8,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",  # 2^30: would take minutes
        "$scrypt$ln=20,r=32,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",  # 4 GiB
        "$scrypt$ln=10,r=8,p=1$!!$aGFzaGhhc2hoYXNoaGFzaA",
        "$scrypt$ln=10,r=8,p=1$c2Fs$aGFzaGhhc2hoYXNoaGFzaA",  # 3-byte salt
    ],
)
def test_bad_password_hashes_are_config_errors(stored: str) -> None:
    with pytest.raises(AuthnConfigError) as caught:
        PasswordTable(BasicAuthSpec(users=(BasicUser("alice", stored),)))
    assert caught.value.field == "basic.users[0].password_hash"


def test_basic_user_names_are_checked() -> None:
    stored = hash_password("pw", **CHEAP)
    for users, field in [
        ((BasicUser("a:b", stored),), "basic.users[0].name"),
        ((BasicUser("a", stored), BasicUser("a", stored)), "basic.users[1].name"),
        ((), "basic.users"),
    ]:
        with pytest.raises(AuthnConfigError) as caught:
            PasswordTable(BasicAuthSpec(users=users))
        assert caught.value.field == field


def test_parse_basic() -> None:
    def encode(text: bytes) -> bytes:
        return base64.b64encode(text)

    assert parse_basic(encode(b"alice:pa:ss")) == (b"alice", b"pa:ss")  # the password may hold colons
    assert parse_basic(encode("jörg:pässword".encode())) == ("jörg".encode(), "pässword".encode())
    for bad in (b"***", encode(b"no-colon"), encode(b":empty-user"), encode(b"\xff:\xfe"), b"YWxpY2U6cHc"):
        result = parse_basic(bad)
        assert isinstance(result, Rejection) and result.reason == "basic_malformed", bad
