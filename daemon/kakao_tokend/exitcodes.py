"""Exit codes, in one place: what each means, and which error ends with which.

====  =================  ===========================================================
code  name               meaning
====  =================  ===========================================================
0     OK                 done; `status`: every account is fine
1     FAILURE / WARNING  generic failure; `status`: a warning (refresh token below the
                         first [alerts] threshold, or the access token expired while no
                         daemon refreshes it)
2     CRITICAL           `status` only: re-login needed, no tokens, refresh token below
                         [alerts] critical_below or expired (monitoring-plugin convention)
64    EX_USAGE           bad command line (unknown option, unknown account)
65    EX_DATAERR         the file given to `import` is not a usable token file
69    EX_UNAVAILABLE     Kakao could not be reached or answered with a transient error
70    EX_SOFTWARE        internal error (a bug); run with --debug for the traceback
75    EX_TEMPFAIL        the account is locked by another kakao-tokend process
77    EX_NOPERM          a person must log in again (`kakao-tokend login`)
78    EX_CONFIG          the configuration is invalid (every problem is listed), or another
                         user could change the account's directory or files (UnsafePath),
                         or `store migrate` moved the accounts to the other store (StoreMoved)
====  =================  ===========================================================

The codes from 64 on are the BSD sysexits.h values systemd and shells know: a unit with
``RestartPreventExitStatus=78`` does not restart a daemon whose configuration is wrong.
"""

from __future__ import annotations

from .errors import (
    ConfigError,
    ImportFileError,
    ImportUnverified,
    KakaoConfigError,
    KakaoTokendError,
    KakaoUnavailable,
    ReloginRequired,
    StateMissing,
    StoreLocked,
    StoreMoved,
    StoreSchemaMismatch,
    StoreUnavailable,
    TokenDecryptError,
    UnsafePath,
)

OK = 0
FAILURE = 1
#: `status` and `doctor`: the worst finding is a warning, or critical.
WARNING = 1
CRITICAL = 2
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78
#: A command interrupted with Ctrl+C (128 + SIGINT, as shells report it).
INTERRUPTED = 130


def exit_code_for(exc: KakaoTokendError) -> int:
    """Return the exit code for one of our errors (see the table above)."""
    if isinstance(exc, ConfigError | KakaoConfigError | UnsafePath | StoreMoved):
        return EX_CONFIG
    if isinstance(exc, ImportFileError):
        return EX_DATAERR
    if isinstance(exc, ImportUnverified):
        return EX_UNAVAILABLE
    if isinstance(exc, StoreLocked):
        return EX_TEMPFAIL
    if isinstance(exc, ReloginRequired | StateMissing):
        return EX_NOPERM
    if isinstance(exc, KakaoUnavailable | StoreUnavailable):
        return EX_UNAVAILABLE
    if isinstance(exc, StoreSchemaMismatch | TokenDecryptError):
        return EX_CONFIG  # a person must fix the install or the key file; no restart helps
    return FAILURE
