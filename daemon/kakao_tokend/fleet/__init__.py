"""Fleet mode: several kakao-tokend nodes sharing one PostgreSQL store (see docs/fleet.md).

Nothing here is imported in file mode. The modules that need the ``postgres`` extra
(psycopg, psycopg_pool, cryptography) import it inside their functions, so that
``kakao-tokend run`` with the file store starts exactly as fast and as small as before.
"""

from __future__ import annotations

from ..errors import StoreError

#: The command that installs what fleet mode needs.
INSTALL_HINT = "install the postgres extra: pip install 'kakao-tokend[postgres]'"


def missing_extra(exc: ImportError) -> StoreError:
    """Turn the ImportError of a fleet dependency into one readable line."""
    name = exc.name or "a dependency"
    return StoreError(
        f"the PostgreSQL store needs {name}, which is not installed", hint=INSTALL_HINT
    )
