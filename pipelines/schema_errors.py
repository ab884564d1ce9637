"""pydantic validation errors as one line per problem, ``key.path: message``.

Kept apart from the race config so that the serving config can use it without importing the
race's models (and with them torch and sktime).
"""

from __future__ import annotations

from pydantic import ValidationError


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def describe(error: ValidationError) -> list[str]:
    """One line per pydantic error: ``key.path: message``."""
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        # checks across sections raise at the top level and name their key themselves
        location = _location(item["loc"])
        lines.append(f"{location}: {message}" if location else message)
    return lines
