"""The Kakao emulator: kauth + kapi on one port, with a virtual clock, faults and a control API.

What it emulates, its choices where Kakao's behaviour is undocumented, and the control API are
described in ``docs/emulator.md``. The modules:

* ``state``   -- settings, users, codes, tokens, inbox, stats and the virtual clock;
* ``kauth``   -- ``/oauth/authorize`` and ``/oauth/token``;
* ``kapi``    -- the bearer check and the ``/v1``, ``/v2`` resource APIs;
* ``faults``  -- fault kinds, armed faults and their answers;
* ``control`` -- the ``/_emulator/`` HTTP control API;
* ``server``  -- :class:`KakaoEmulator` itself, :func:`running_emulator`, :func:`serve_emulator`.
"""

from .faults import ENDPOINTS, FAULT_KINDS
from .server import KakaoEmulator, running_emulator, serve_emulator
from .state import (
    DEFAULT_USER_ID,
    ConsentMode,
    EmulatedUser,
    EmulatorSettings,
    EmulatorStats,
    RefreshAttempt,
)

__all__ = [
    "DEFAULT_USER_ID",
    "ENDPOINTS",
    "FAULT_KINDS",
    "ConsentMode",
    "EmulatedUser",
    "EmulatorSettings",
    "EmulatorStats",
    "KakaoEmulator",
    "RefreshAttempt",
    "running_emulator",
    "serve_emulator",
]
