"""What a run prints under a launcher: no TensorFlow start-up lines (and nothing else lost),
and a progress display of whole lines, seldom."""
import io
import os
import subprocess
import sys

from common.loop import progress_bar
from common.startup import kept_lines
from scripts.launchers import REPO

START_UP = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            b"I0000 00:00:1796179500.874991   29999 port.cc:153] oneDNN custom operations are on. You may see "
            b"slightly different numerical results due to floating-point round-off errors.\n"
            b"I0000 00:00:1796179527.009654   30383 cpu_feature_guard.cc:227] This TensorFlow binary is "
            b"optimized to use available CPU instructions in performance-critical operations.\n"
            b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow.\n")


def test_only_the_start_up_lines_are_dropped():
    other = b"W0000 some_op.cc:12] a real warning\nTraceback (most recent call last):\n"
    assert kept_lines(START_UP + other + START_UP) == other
    assert kept_lines(b"no newline at the end") == b"no newline at the end"


def test_loading_tensorflow_prints_nothing_but_what_else_was_written():
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    script = ("import os; from common.startup import load_tensorflow, start_up_lines_dropped; load_tensorflow()\n"
              "with start_up_lines_dropped(): os.write(2, b'kept\\n')")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, timeout=120)
    assert done.returncode == 0 and done.stderr == b"kept\n", done.stderr.decode()[-2000:]


def test_in_a_pipe_the_progress_display_is_a_whole_line_now_and_then(monkeypatch):
    pipe = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", pipe)
    progress = progress_bar(500, 100)
    for step in range(101, 501):
        progress.set_postfix(loss=f"{1 / step:.4f}", refresh=False)
        progress.update(1)
    progress.close()
    pipe.write("error: the next line\n")
    lines = pipe.getvalue().splitlines(keepends=True)
    assert "\r" not in pipe.getvalue() and all(line.endswith("\n") for line in lines), lines
    assert lines[0].startswith("train:  20%") and "500/500" in lines[-2] and "loss=0.0020" in lines[-2], lines
    assert len(lines) == 3 and lines[-1] == "error: the next line\n", lines  # first draw, last, the error


def test_the_error_line_is_the_last_line_while_another_thread_keeps_logging():
    script = ("import os, threading, time\n"
              "from common.errors import ConfigError, exit_with\n"
              "def log():\n"
              "    while True: os.write(2, b'E0000 a C++ thread logs\\n')\n"
              "threading.Thread(target=log, daemon=True).start()\n"
              "time.sleep(0.2)\n"
              "exit_with(ConfigError('--flag is bad: pass a good one'))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, timeout=60)
    lines = done.stderr.decode().splitlines()
    assert done.returncode == 2 and lines[-1] == "error: --flag is bad: pass a good one", lines[-3:]
    assert lines[:-1] and set(lines[:-1]) == {"E0000 a C++ thread logs"}  # whole lines, none split
