"""What the command-line tools share: bad arguments as one error line, never a traceback."""

from __future__ import annotations

import argparse
import re


class UsageError(ValueError):
    """Arguments a tool cannot use; the message is the one line it prints before exiting with code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that raises ``UsageError`` instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, without terminal colour codes (its type name when it has none)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return text[0] if text else type(e).__name__
