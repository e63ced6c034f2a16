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
    """The line goes to the file descriptor in one write, after what is buffered: `print` writes
    the text and its newline apart, and a TensorFlow thread logging between the two glued its
    own lines onto ours."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(2, f"error: {error}\n".encode())
    os._exit(error.exit_code)
