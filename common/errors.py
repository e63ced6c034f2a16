"""Errors a user can fix, and the one way they end a process.

A `RecipeError` message is one line that names the fix. Every rank that meets one prints it
and exits non-zero at once (`os._exit`, so no Horovod shutdown waits on a peer that will
never come); MPI launchers then stop the remaining ranks.
"""
import os
import sys
from typing import NoReturn


class RecipeError(Exception):
    """A problem with the user's input or environment; the message names the fix."""

    exit_code = 1


class ConfigError(RecipeError):
    """An unknown flag, a bad value, or a plan that does not fit the world size."""

    exit_code = 2


def exit_with(error: RecipeError) -> NoReturn:
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(error.exit_code)
