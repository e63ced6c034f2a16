"""Errors a user can fix, and the one way they end a process.

A `RecipeError` message is one line that names the fix. Every rank that meets one prints it
and exits non-zero at once (`os._exit`, so no Horovod shutdown waits on a peer that will
never come); MPI launchers then stop the remaining ranks.
"""
import os
import sys
import time
from typing import NoReturn

IN_FLIGHT_WRITES_SECONDS = 0.1


class RecipeError(Exception):
    """A problem with the user's input or environment; the message names the fix."""

    exit_code = 1


class ConfigError(RecipeError):
    """An unknown flag, a bad value, or a plan that does not fit the world size."""

    exit_code = 2


def exit_with(error: RecipeError) -> NoReturn:
    """The line is the last this process writes, whole: what is buffered goes first; then
    standard error is pointed at /dev/null, so that a TensorFlow thread still logging the
    failure behind it (a lost parameter server's gRPC errors) neither follows nor splits it;
    a write such a thread began before that still reaches the old standard error, so the
    line waits a moment for it (on a busy host the thread may be off its core for a few
    milliseconds); and the line goes to the saved descriptor in one write (`print` writes the
    text and its newline apart)."""
    sys.stdout.flush()
    sys.stderr.flush()
    stderr = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    time.sleep(IN_FLIGHT_WRITES_SECONDS)
    os.write(stderr, f"error: {error}\n".encode())
    os._exit(error.exit_code)
