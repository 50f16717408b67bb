"""Tokens at rest: the key file format and AES-256-GCM sealing bound to account, row, column."""

from __future__ import annotations

import base64
import os
import uuid

import pytest

from kakao_tokend.errors import TokenDecryptError
from kakao_tokend.fleet.crypto import (
    KEY_BYTES,
    MIN_BLOB_BYTES,
    NONCE_BYTES,
    KeyFileError,
    Keyring,
    StoreKey,
    key_id_of,
    new_key_line,
)

ROW = uuid.UUID("6f1c2a9e-8d3b-4c55-9e0f-1a2b3c4d5e6f")
OTHER_ROW = uuid.UUID("0b9d8c7e-6f5a-4b3c-8d2e-1f0a9b8c7d6e")
TOKEN = b"refresh-token-that-must-stay-secret-0123456789"


def keyring(*lines: str) -> Keyring:
    """A keyring from key file lines."""
    return Keyring.parse("\n".join(lines) + "\n")


def test_new_key_line_is_one_base64_line_of_32_random_bytes() -> None:
    """`store new-key`'s format: one base64 line that decodes to 32 bytes, new every time."""
    first, second = new_key_line(), new_key_line()
    assert "\n" not in first
    assert len(base64.b64decode(first, validate=True)) == KEY_BYTES
    assert first != second


def test_key_file_newest_last_with_comments_and_blank_lines() -> None:
    """The last key encrypts; comments and blank lines are ignored; ids derive from the keys."""
    old, new = new_key_line(), new_key_line()
    ring = Keyring.parse(f"# rotated 2025-01\n{old}\n\n  {new}  \n")
    assert ring.ids == (key_id_of(base64.b64decode(old)), key_id_of(base64.b64decode(new)))
    assert ring.newest.key_id == ring.ids[1]
    assert ring.newest.line == 4
    # The id is stable (same key, same id anywhere) and 16 hex digits.
    assert key_id_of(base64.b64decode(new)) == ring.ids[1]
    assert len(ring.ids[1]) == 16 and int(ring.ids[1], 16) >= 0


def test_key_id_is_not_a_plain_hash_prefix_of_the_key() -> None:
    """The id is domain-separated: it does not match the SHA-256 another tool would print."""
    import hashlib

    secret = os.urandom(KEY_BYTES)
    assert key_id_of(secret) != hashlib.sha256(secret).hexdigest()[:16]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "holds no key"),
        ("# only a comment\n\n", "holds no key"),
        ("not base64 at all!\n", "line 1: not a base64 key"),
        (base64.b64encode(os.urandom(16)).decode(), "the key is 16 bytes, AES-256 needs 32"),
        (base64.b64encode(os.urandom(24)).decode(), "the key is 24 bytes"),
        (base64.b64encode(os.urandom(33)).decode(), "the key is 33 bytes"),
    ],
    # Fixed ids: the random keys would name the tests differently in each pytest-xdist worker,
    # and the workers must collect the same tests.
    ids=["empty", "comment-only", "not-base64", "16-bytes", "24-bytes", "33-bytes"],
)
def test_unusable_key_files_are_refused_by_line_without_echoing_them(
    text: str, expected: str
) -> None:
    """Empty files, garbage and keys of the wrong size (AESGCM would take 16/24) are refused."""
    with pytest.raises(KeyFileError) as caught:
        Keyring.parse(text, source="/etc/kakao-tokend/store.key")
    message = str(caught.value)
    assert expected in message
    assert "/etc/kakao-tokend/store.key" in message
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            assert line.strip() not in message


def test_a_repeated_key_is_refused_naming_both_lines() -> None:
    """The same key twice is a copy-paste slip: say which lines."""
    line = new_key_line()
    with pytest.raises(KeyFileError, match=r"line 3: repeats the key of line 1"):
        Keyring.parse(f"{line}\n{new_key_line()}\n{line}\n")


def test_a_hand_built_16_byte_key_is_refused_before_use() -> None:
    """StoreKey can be built by hand; the 32-byte rule still holds when it is used."""
    short = os.urandom(16)
    ring = Keyring([StoreKey(key_id_of(short), short)])
    with pytest.raises(KeyFileError, match="not 32 bytes"):
        ring.seal(TOKEN, account="default", row_id=ROW, column="refresh_token")


def test_seal_then_unseal_gives_the_plaintext_back() -> None:
    """The round trip works, with a fresh nonce each time (two seals differ)."""
    ring = keyring(new_key_line())
    first = ring.seal(TOKEN, account="default", row_id=ROW, column="refresh_token")
    second = ring.seal(TOKEN, account="default", row_id=ROW, column="refresh_token")
    assert first != second
    assert first[1 + 8 : 1 + 8 + NONCE_BYTES] != second[1 + 8 : 1 + 8 + NONCE_BYTES]
    assert len(first) == MIN_BLOB_BYTES + len(TOKEN)
    assert TOKEN not in first
    for blob in (first, second):
        assert ring.unseal(blob, account="default", row_id=ROW, column="refresh_token") == TOKEN


def test_older_keys_still_decrypt_and_the_newest_encrypts() -> None:
    """After a new key is appended, old blobs decrypt and new ones use the new key."""
    old_line = new_key_line()
    old = keyring(old_line)
    blob = old.seal(TOKEN, account="default", row_id=ROW, column="access_token")
    both = keyring(old_line, new_key_line())
    assert both.unseal(blob, account="default", row_id=ROW, column="access_token") == TOKEN
    fresh = both.seal(TOKEN, account="default", row_id=ROW, column="access_token")
    assert fresh[1:9].hex() == both.newest.key_id != old.newest.key_id


def test_wrong_key_names_the_missing_key_and_the_account() -> None:
    """A blob sealed with a key that is not in the file: one line naming account and key."""
    sealer = keyring(new_key_line())
    other = keyring(new_key_line())
    blob = sealer.seal(TOKEN, account="shop", row_id=ROW, column="refresh_token")
    with pytest.raises(TokenDecryptError) as caught:
        other.unseal(blob, account="shop", row_id=ROW, column="refresh_token")
    message = str(caught.value)
    assert "cannot decrypt the refresh_token of account 'shop'" in message
    assert f"encrypted with key {sealer.newest.key_id}, which is not in the key file" in message
    assert other.newest.key_id in message
    assert TOKEN.decode() not in message


@pytest.mark.parametrize(
    ("account", "row_id", "column"),
    [
        ("other", ROW, "refresh_token"),  # copied to another account
        ("shop", OTHER_ROW, "refresh_token"),  # to another row of the same name
        ("shop", ROW, "access_token"),  # to another column of the same row
    ],
)
def test_a_blob_moved_elsewhere_does_not_decrypt(
    account: str, row_id: uuid.UUID, column: str
) -> None:
    """The associated data binds account, row id and column: a moved blob fails clearly."""
    ring = keyring(new_key_line())
    blob = ring.seal(TOKEN, account="shop", row_id=ROW, column="refresh_token")
    with pytest.raises(TokenDecryptError) as caught:
        ring.unseal(blob, account=account, row_id=row_id, column=column)
    assert str(caught.value).startswith(
        f"cannot decrypt the {column} of account {account!r} with key {ring.newest.key_id}: "
        "wrong key or the ciphertext was moved between rows"
    )


@pytest.mark.parametrize("position", [0, 1, 9, 20, -1])
def test_any_flipped_bit_is_detected(position: int) -> None:
    """Header, nonce, ciphertext or tag: one flipped bit and the blob is refused."""
    ring = keyring(new_key_line())
    blob = bytearray(ring.seal(TOKEN, account="shop", row_id=ROW, column="refresh_token"))
    blob[position] ^= 0x01
    with pytest.raises(TokenDecryptError, match="cannot decrypt the refresh_token"):
        ring.unseal(bytes(blob), account="shop", row_id=ROW, column="refresh_token")


@pytest.mark.parametrize(
    ("blob", "shown"),
    [(b"", "empty"), (b"\x01short", "0x01, 6 bytes"), (b"\x02" + bytes(60), "0x02, 61 bytes")],
)
def test_something_that_is_no_blob_is_named_as_such(blob: bytes, shown: str) -> None:
    """Truncated values and unknown formats get their own message."""
    ring = keyring(new_key_line())
    with pytest.raises(TokenDecryptError, match="not a kakao-tokend ciphertext") as caught:
        ring.unseal(blob, account="shop", row_id=ROW, column="refresh_token")
    assert shown in str(caught.value)


def test_repr_of_a_keyring_shows_ids_only() -> None:
    """Logging a keyring (or a config holding one) never shows key material."""
    line = new_key_line()
    ring = keyring(line)
    text = repr(ring) + repr(ring.newest)
    assert ring.newest.key_id in text
    assert line not in text
    assert repr(base64.b64decode(line)) not in text
