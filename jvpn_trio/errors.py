"""Looking through Trio's exception groups, in one place.

Since trio 0.25 a nursery wraps whatever escapes it in an ExceptionGroup,
even a single exception, even the caller's own from an ``async with`` body.
The CLI wants the documented error inside to print it as one line; the
drivers that own a nursery want their callers to see their own exception
unchanged, whatever trio version runs.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator


def find_in_group(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc`` or, depth first, in the groups it holds."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_in_group(inner, kinds)
            if found is not None:
                return found
    return None


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception inside (possibly nested) groups; ``exc`` itself when it is no group."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def describe(exc: BaseException) -> str:
    """``"TypeName: message"`` (or the type name alone), for one log or error line."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@asynccontextmanager
async def lone_exception_unwrapped() -> AsyncIterator[None]:
    """Re-raise a group holding exactly one exception as that exception (several stay grouped).

    Wrap a nursery with it (``async with lone_exception_unwrapped(), trio.open_nursery()``)
    so the block's own error, or the one failure of a background task, reaches the
    caller as itself.  The exception is raised outside the handler, so its
    ``__context__`` is not replaced by the group.
    """
    lone: BaseException | None = None
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        lone = group.exceptions[0]
    if lone is not None:
        raise lone
