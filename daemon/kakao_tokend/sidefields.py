"""Attributes kept in a side object that exists only while one of them is not its default."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def add_side_fields(owner: type, holder: str, defaults: Mapping[str, object]) -> None:
    """Give ``owner`` one property per name in ``defaults`` that reads and assigns the value in
    a slotted side object kept in ``owner``'s attribute ``holder`` (None while there is none).

    A fleet node holds 10,000 account managers and statuses, and most fields of each are set
    only while something happens to the account (a refresh in flight, a failure): as slots
    of their own they would cost every idle account their room. The side object is made at
    the first value that is not the default and dropped when all are back at their defaults.
    Defaults are compared by identity, so they must be singletons: None, False, 0 or ().
    """
    items = tuple(defaults.items())
    side_class = type(f"{owner.__name__}Side", (), {"__slots__": tuple(defaults)})

    def make() -> Any:
        side = side_class()
        for name, default in items:
            setattr(side, name, default)
        return side

    def idle(side: Any) -> bool:
        return all(getattr(side, name) is default for name, default in items)

    for name, default in items:
        setattr(owner, name, _side_field(holder, name, default, make, idle))


def _side_field(
    holder: str, name: str, default: object, make: Callable[[], Any], idle: Callable[[Any], bool]
) -> property:
    """The property reading and assigning ``name`` in the side object at ``holder``."""

    def get(owner: Any) -> Any:
        side = getattr(owner, holder)
        return default if side is None else getattr(side, name)

    def set_(owner: Any, value: Any) -> None:
        side = getattr(owner, holder)
        if side is None:
            if value is default:
                return  # nothing to keep: an idle owner stays without one
            side = make()
            setattr(owner, holder, side)
        setattr(side, name, value)
        if value is default and idle(side):
            setattr(owner, holder, None)

    return property(get, set_, doc=f"{name}, kept in the side object {holder} while set.")
