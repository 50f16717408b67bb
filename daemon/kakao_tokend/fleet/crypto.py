"""Tokens at rest: AES-256-GCM with keys from a key file, bound to the account, row and field.

The key file holds one base64 key per line, newest last; blank lines and ``#`` comments are
allowed. The newest key encrypts; every key in the file decrypts. Each key's id is derived
from the key itself (see :func:`key_id_of`), so no separate id can be mistyped or drift.

A sealed value (a "blob") is::

    0x01 | key id (8 bytes) | nonce (12 bytes) | ciphertext | GCM tag (16 bytes)

The associated data binds it to its place: the header above, the account name, the row id
and the column. A blob copied to another account, another row (even of the same name) or
another column fails to decrypt, exactly as a flipped bit or a wrong key does.

``cryptography`` is imported on first use only: file mode never loads it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import TokenDecryptError
from . import missing_extra

if TYPE_CHECKING:
    from uuid import UUID

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: AES-256. AESGCM also accepts 16- and 24-byte keys without a word: we refuse them.
KEY_BYTES = 32
#: 96-bit random nonces, the size GCM is built for (AESGCM accepts 8 to 128 bytes silently).
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ID_BYTES = 8
BLOB_VERSION = 1
_HEADER_BYTES = 1 + KEY_ID_BYTES
#: The smallest blob: header, nonce and tag around an empty plaintext.
MIN_BLOB_BYTES = _HEADER_BYTES + NONCE_BYTES + TAG_BYTES
_KEY_ID_DOMAIN = b"kakao-tokend/key-id/v1\0"
_AD_DOMAIN = b"kakao-tokend/sealed/v1\0"


class KeyFileError(ValueError):
    """The key file (or key text) is unusable; the message never contains key material."""


def key_id_of(secret: bytes) -> str:
    """Return a key's id: 16 hex digits of a domain-separated SHA-256 of the key.

    Derived, not chosen: the same key has the same id on every node and in every copy of the
    key file, reordering or renaming nothing can mislabel a key, and the id alone reveals
    nothing about the key (a 64-bit prefix of a hash of 256 random bits). The domain prefix
    keeps it from matching a plain SHA-256 of the key that some other tool might print.
    """
    return hashlib.sha256(_KEY_ID_DOMAIN + secret).digest()[:KEY_ID_BYTES].hex()


def new_key_line() -> str:
    """Return a fresh random key in the key file's format (one base64 line, no newline)."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


@dataclass(frozen=True)
class StoreKey:
    """One key of the key file: its id, its bytes (never shown) and its line number."""

    key_id: str
    secret: bytes = field(repr=False)
    line: int = 0


class Keyring:
    """The keys of one key file: the newest encrypts, all of them decrypt."""

    def __init__(self, keys: Iterable[StoreKey], *, source: str = "the key file") -> None:
        self.keys: tuple[StoreKey, ...] = tuple(keys)
        if not self.keys:
            raise KeyFileError(f"{source} holds no key; add one: kakao-tokend store new-key")
        self.source = source
        self._by_id = {key.key_id: key for key in self.keys}
        self._ciphers: dict[str, AESGCM] = {}

    def __repr__(self) -> str:
        return f"Keyring({', '.join(self.ids)}; newest {self.newest.key_id})"

    @classmethod
    def parse(cls, text: str, *, source: str = "the key file") -> Keyring:
        """Read key file text: one base64 32-byte key per line, newest last.

        Raises :class:`KeyFileError` naming the line, never echoing its content.
        """
        keys: list[StoreKey] = []
        seen: dict[str, int] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                secret = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
                raise KeyFileError(
                    f"{source}, line {number}: not a base64 key (content not shown); "
                    "each line must hold one key from `kakao-tokend store new-key`"
                ) from None
            if len(secret) != KEY_BYTES:
                raise KeyFileError(
                    f"{source}, line {number}: the key is {len(secret)} bytes, AES-256 needs "
                    f"{KEY_BYTES}; make one with `kakao-tokend store new-key`"
                )
            key_id = key_id_of(secret)
            if key_id in seen:
                raise KeyFileError(
                    f"{source}, line {number}: repeats the key of line {seen[key_id]} "
                    f"(id {key_id}); remove one of them"
                )
            seen[key_id] = number
            keys.append(StoreKey(key_id, secret, number))
        return cls(keys, source=source)

    @property
    def newest(self) -> StoreKey:
        """Return the key that encrypts: the last one in the file."""
        return self.keys[-1]

    @property
    def ids(self) -> tuple[str, ...]:
        """Return every key id, oldest first."""
        return tuple(key.key_id for key in self.keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._by_id

    def _cipher(self, key: StoreKey) -> AESGCM:
        cipher = self._ciphers.get(key.key_id)
        if cipher is None:
            try:
                from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            except ImportError as exc:
                raise missing_extra(exc) from None
            if len(key.secret) != KEY_BYTES:  # StoreKey can be built by hand
                raise KeyFileError(f"key {key.key_id} is not {KEY_BYTES} bytes")
            cipher = self._ciphers[key.key_id] = AESGCM(key.secret)
        return cipher

    def seal(self, plaintext: bytes, *, account: str, row_id: UUID, column: str) -> bytes:
        """Encrypt ``plaintext`` with the newest key for one column of one account row."""
        key = self.newest
        header = bytes([BLOB_VERSION]) + bytes.fromhex(key.key_id)
        nonce = os.urandom(NONCE_BYTES)  # random every time; never reused with a key
        sealed = self._cipher(key).encrypt(
            nonce, plaintext, _associated_data(header, account, row_id, column)
        )
        return header + nonce + sealed

    def unseal(self, blob: bytes, *, account: str, row_id: UUID, column: str) -> bytes:
        """Decrypt a blob made by :meth:`seal` for the same account, row and column.

        Raises :class:`TokenDecryptError` with one readable line: an unknown format, a key
        that is not in the key file, or a blob that does not authenticate (wrong key,
        tampered, or moved from another row).
        """
        what = f"the {column} of account {account!r}"
        key_id = blob_key_id(blob, what=what)
        key = self._by_id.get(key_id)
        if key is None:
            raise TokenDecryptError(
                f"cannot decrypt {what}: it was encrypted with key {key_id}, which is not in "
                f"{self.source} (it holds {', '.join(self.ids)})",
                hint=f"add key {key_id} back to the key file (newest last); if it is lost,"
                " `kakao-tokend logout` removes the row and a login starts it again",
            )
        header = blob[:_HEADER_BYTES]
        nonce = blob[_HEADER_BYTES : _HEADER_BYTES + NONCE_BYTES]
        try:
            from cryptography.exceptions import InvalidTag
        except ImportError as exc:
            raise missing_extra(exc) from None
        try:
            return self._cipher(key).decrypt(
                nonce,
                blob[_HEADER_BYTES + NONCE_BYTES :],
                _associated_data(header, account, row_id, column),
            )
        except InvalidTag:
            raise TokenDecryptError(
                f"cannot decrypt {what} with key {key_id}: wrong key or the ciphertext was "
                "moved between rows",
                hint="check that every node has the same key file; if the row was edited or "
                "restored by hand, log the account in again",
            ) from None


def blob_key_id(blob: bytes, *, what: str = "a value") -> str:
    """Return the id of the key that sealed ``blob``; TokenDecryptError if it is no blob."""
    if len(blob) < MIN_BLOB_BYTES or blob[0] != BLOB_VERSION:
        shown = f"format byte {blob[0]:#04x}" if blob else "empty"
        raise TokenDecryptError(
            f"cannot decrypt {what}: not a kakao-tokend ciphertext ({shown}, {len(blob)} bytes; "
            f"expected format {BLOB_VERSION:#04x} and at least {MIN_BLOB_BYTES} bytes)",
            hint="the row was written by something else; log the account in again",
        )
    return blob[1:_HEADER_BYTES].hex()


def _associated_data(header: bytes, account: str, row_id: UUID, column: str) -> bytes:
    # Account names cannot contain NUL (config.ACCOUNT_NAME_RE), nor can UUIDs or our column
    # names, so the NUL separators make the encoding unambiguous.
    return b"\0".join(
        (_AD_DOMAIN + header, account.encode(), str(row_id).encode(), column.encode())
    )
