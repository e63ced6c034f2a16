"""TensorFlow's start-up lines kept out of a run's output.

Loading TensorFlow's libraries (and Horovod's, which link them) writes lines to standard error
that no setting silences: they are logged through Abseil before its logging is set up, which
TF_CPP_MIN_LOG_LEVEL does not reach ("All log messages before absl::InitializeLog() ...",
"oneDNN custom operations are on ..."). Under a launcher each process prints them, several
times. While those libraries load, standard error (the file descriptor, which C++ writes to) goes
to a temporary file; afterwards every line of it but the known start-up lines is written back,
so a real error or warning still shows.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterator

START_UP_LINES = re.compile(
    rb"All log messages before absl::InitializeLog\(\) is called|oneDNN custom operations are on"
    rb"|cpu_feature_guard\.cc.*This TensorFlow binary is optimized|^To enable the following instructions"
    rb"|Unable to register cu(DNN|FFT|BLAS) factory|computation_placer\.cc|TF-TRT Warning")


def kept_lines(captured: bytes) -> bytes:
    """What start-up wrote to standard error, less TensorFlow's known start-up lines."""
    return b"".join(line for line in captured.splitlines(keepends=True) if not START_UP_LINES.search(line))


@contextlib.contextmanager
def start_up_lines_dropped() -> Iterator[None]:
    """Standard error captured while the body runs (a library loading), then written back
    without TensorFlow's start-up lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = kept_lines(captured.read())
            if kept:
                os.write(2, kept)


def load_tensorflow() -> None:
    """Import TensorFlow and Keras without their start-up lines, and with TensorFlow's INFO
    log lines off (TF_CPP_MIN_LOG_LEVEL=1 unless the user set it). A recipe calls this once
    its flags are checked, before anything imports TensorFlow."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    with start_up_lines_dropped():
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
