"""The exception tree, classified by what the caller must do.

Our exception hierarchy::

    KakaoTokendError                 base of everything we raise on purpose
    ├── ConfigError                  the configuration is wrong; `details` lists (key path, problem)
    ├── ImportFileError              the file given to `import` is not a usable token file
    ├── ImportUnverified             Kakao could not be asked whether imported tokens still work
    ├── StoreError                   the token store (files or PostgreSQL) could not be used
    │   ├── StoreLocked              another process holds the account's lock
    │   ├── StateCorrupt             unreadable state file; moved aside, never overwritten
    │   ├── StateMissing             no state yet: run `kakao-tokend login` (or `import`)
    │   ├── StoreWriteError          a write failed (disk full, read-only fs); keep tokens in memory
    │   ├── StoreUnavailable         the PostgreSQL store cannot be reached right now: retry
    │   ├── StoreSchemaMismatch      the database's schema is newer than this code (or was edited)
    │   ├── TokenDecryptError        a stored token does not decrypt (wrong key, moved, tampered)
    │   ├── StoreMoved               `store migrate` moved the accounts to the other store: this
    │                                one is inert and refused (exit 78, like a bad config)
    │   └── UnsafePath               another user could change a directory or file we use, or it
    │                                is a symlink: refused, never used (exit 78 like a bad config)
    └── KakaoError                   Kakao answered with an error, or did not answer
        ├── KakaoUnavailable         try again later (KOE003, KOE237, 5xx, timeouts, bad bodies)
        │   └── PartialRefresh       Kakao rotated, but the access part of its answer was broken
        ├── ReloginRequired          a person must log in again (KOE322, KOE320, -401 after refresh)
        ├── KakaoConfigError         the app/client configuration is wrong (KOE010, KOE101, KOE303,
        │                            -401 "ip mismatched", ...): retrying will not help
        └── KakaoRequestRejected     this one request was refused (missing consent -402, message
                                     quota, bad template): the account itself is fine

Messages never contain a token; use :func:`kakao_tokend.tokens.fingerprint` to name one.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .i18n import N_, Message

if TYPE_CHECKING:
    from .tokens import TokenSet

#: What each of Kakao's configuration error codes means: the one table. kakao.py says it in
#: the KakaoConfigError it raises (English), an alert in the account's language (health.py);
#: "invalid_client" without a code is KOE010's OAuth error.
KAKAO_CONFIG_CODES: Mapping[str, Message] = {
    "KOE001": N_("malformed authorization request"),
    "KOE002": N_("wrong authorization URL or parameters"),
    "KOE004": N_("Kakao Login is not enabled for this app"),
    "KOE005": N_("the user is not a team member of this test-mode app"),
    "KOE006": N_("the redirect URI is not registered"),
    "KOE007": N_("the logout redirect URI is not registered"),
    "KOE008": N_("the app key is not a REST API key"),
    "KOE009": N_("the platform settings do not match this client"),
    "KOE010": N_("the client secret is missing or wrong"),
    "KOE101": N_("the REST API key (client_id) is unknown"),
    "KOE201": N_("unsupported response_type"),
    "KOE202": N_("implicit grant is not supported"),
    "KOE303": N_("the redirect URI differs from the one used to authorise"),
    "KOE319": N_("the refresh request carried no refresh token"),
    "invalid_client": N_("the client secret is missing or wrong"),
}


#: Not an OS errno: a commit the PostgreSQL store did not take (the database away, its
#: deadline passed). fleet/store.py sets it on the StoreWriteError, so the fix below points at
#: the database, not at the disk.
DATABASE_WRITE = -1
#: What fixes a fleet node that cannot reach its database (a commit, the account's row lock).
DATABASE_FIX = N_("check the database and this node's connection to it")

#: What to do about a write the OS refused, by its errno: the one table. The store adds it to
#: the StoreWriteError it raises (English), the write_failed alert says it in the account's
#: language (health.py: the status keeps the errno), and the commands that could not save
#: rotated tokens say it too (importer.py, cli.py).
WRITE_FIXES: Mapping[int, Message] = {
    errno.ENOSPC: N_("free some disk space"),
    errno.EDQUOT: N_("the disk quota is exhausted; free some space or raise the quota"),
    errno.EROFS: N_("the file system is read-only; remount it read-write"),
    errno.EACCES: N_("check that this user may write to the directory"),
    # The immutable flag refuses even root, with EPERM (never EACCES).
    errno.EPERM: N_("fix the permissions, or the immutable flag (chattr -i)"),
    errno.EFBIG: N_("the file size limit (ulimit -f / LimitFSIZE=) is too small"),
    DATABASE_WRITE: DATABASE_FIX,
}
#: The fix of a refused write whose errno is unknown or not in WRITE_FIXES (EIO ...).
ANY_WRITE_FIX = N_("free disk space or fix permissions")


def write_hint(error_number: int | None) -> Message | None:
    """Return what fixes a write refused with ``error_number`` (None: the table has nothing)."""
    return WRITE_FIXES.get(error_number or 0)


def write_fix(error_number: int | None) -> Message:
    """Return what fixes a write refused with ``error_number``, a general fix when unknown."""
    return WRITE_FIXES.get(error_number or 0, ANY_WRITE_FIX)


class KakaoTokendError(Exception):
    """Base class for every error kakao-tokend raises on purpose."""

    #: A short hint telling the user how to fix the problem, shown after the message.
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(KakaoTokendError):
    """The configuration is invalid; ``details`` holds every (key path, problem) found."""

    def __init__(self, message: str, details: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.details: list[tuple[str, str]] = list(details)

    def __str__(self) -> str:
        if not self.details:
            return self.message
        lines = [self.message]
        lines += [f"  {key}: {problem}" if key else f"  {problem}" for key, problem in self.details]
        return "\n".join(lines)


class ImportFileError(KakaoTokendError):
    """The file to import is not a usable token file (the CLI exits with EX_DATAERR, 65)."""


class ImportUnverified(KakaoTokendError):
    """Kakao could not be asked whether the file's tokens still work (the CLI exits 69)."""


class StoreError(KakaoTokendError):
    """A token or state file could not be read, written or locked."""


class StoreLocked(StoreError):
    """Another process holds the lock of this account (or of the whole state directory)."""


class StoreClaimed(StoreLocked):
    """Another fleet node holds the account's row: it is refreshing it, nothing failed."""


class StoreOvertaken(StoreError):
    """A claim was decided on a generation the store's copy has moved past: nothing was held.

    Another fleet node committed a newer one while the claim waited (for the store's
    re-read, a pooled connection, the row); the caller adopts it instead of locking the row.
    """


class StateCorrupt(StoreError):
    """The state file could not be parsed; it was moved to ``quarantined`` and left intact."""

    def __init__(self, message: str, *, path: Path, quarantined: Path | None) -> None:
        super().__init__(message)
        self.path = path
        self.quarantined = quarantined


class StateMissing(StoreError):
    """There is no state for this account yet."""


class UnsafePath(StoreError):
    """A directory others may write to or owned by a stranger, or a file that is a symlink.

    Using it would let another local user read or redirect the tokens, so it is refused; like
    a configuration error, restarting cannot fix it (the operator must).
    """


class StoreWriteError(StoreError):
    """Writing a file failed (disk full, read-only file system, permissions)."""

    #: The OS error number behind the failure (errno.ENOSPC ...), when there was one.
    errno: int | None = None


class StoreUnavailable(StoreError):
    """The PostgreSQL store cannot be reached or answered too slowly; try again later."""


class StoreSchemaMismatch(StoreError):
    """The database's schema is newer than this kakao-tokend, or an applied migration changed.

    Running on would risk writing rows the newer schema does not expect: a person must
    upgrade this node (or fix the migration files) first.
    """


class TokenDecryptError(StoreError):
    """A stored ciphertext does not decrypt: wrong or missing key, moved between rows, tampered."""


class StoreMoved(StoreError):
    """`kakao-tokend store migrate` moved this store's accounts to the other store.

    Using the old copy would make a second live copy of every refresh token (the first
    rotation on either side kills the other), so every entry point refuses it until the
    configuration points at the store the accounts went to (or they are migrated back).
    """


class KakaoError(KakaoTokendError):
    """Kakao refused a request, or could not be reached.

    ``code`` is Kakao's own code when there is one ("KOE322", "-401"), ``status`` the HTTP
    status (None when no response arrived) and ``endpoint`` the path that was called.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str = "",
        status: int | None = None,
        code: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.endpoint = endpoint
        self.status = status
        self.code = code

    @property
    def label(self) -> str:
        """Return a short class label for logs and metrics, e.g. ``KOE322`` or ``timeout``."""
        return self.code or (f"http{self.status}" if self.status else type(self).__name__)


class KakaoUnavailable(KakaoError):
    """Transient: try again later with backoff.

    ``ambiguous`` is True when the request may have reached Kakao and been processed even
    though no usable answer came back (a timeout after sending, a reset, a 5xx, a truncated
    body). For a refresh that matters: Kakao may have rotated the refresh token.
    ``retry_after`` carries a server-suggested delay in seconds when one was given, and
    ``rate_limited`` says Kakao refused because of a rate limit (KOE237, HTTP 429, -10).
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str = "",
        status: int | None = None,
        code: str | None = None,
        ambiguous: bool = False,
        retry_after: float | None = None,
        rate_limited: bool = False,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, endpoint=endpoint, status=status, code=code, hint=hint)
        self.ambiguous = ambiguous
        self.retry_after = retry_after
        self.rate_limited = rate_limited


class PartialRefresh(KakaoUnavailable):
    """Kakao's refresh answer held a valid new refresh token but an unusable access part.

    The old refresh token died with the rotation, so ``salvaged`` (a ``TokenSet`` with the new
    refresh token and the old access token) must be saved before anything else; then the
    access token is fetched again with it. Not ambiguous: we know the current refresh token.
    """

    def __init__(self, message: str, *, salvaged: TokenSet, endpoint: str = "") -> None:
        super().__init__(message, endpoint=endpoint, status=200, code="bad-body")
        self.salvaged = salvaged


class ReloginRequired(KakaoError):
    """Permanent for this token set: a person must run ``kakao-tokend login`` again."""


class KakaoConfigError(KakaoError):
    """Permanent until the configuration (REST API key, client secret, redirect URI) is fixed."""


class KakaoRequestRejected(KakaoError):
    """This request was refused (consent missing, message quota, bad input); the tokens are fine."""
