#!/usr/bin/env bash
# The environment upstream Horovod's own Keras path needs, for bench/upstream.py to compare against:
# a virtual environment outside the repository with the project's TensorFlow, Horovod 0.28.1 built
# against it (scripts/setup.sh does both, and reuses its cached Horovod wheel), and legacy tf_keras
# of the same TensorFlow release (used with TF_USE_LEGACY_KERAS=1). Built once, then reused.
#
# The last line of stdout is the environment's python. Where it cannot be built (no compiler,
# no package index), it prints one "skipped: ..." line and exits 3; the build log stays in the cache.
# Environment: UPSTREAM_ENV_CACHE (default ~/.cache/recipes-upstream).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${UPSTREAM_ENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/recipes-upstream}
VENV=$CACHE/venv
LOG=$CACHE/build.log

ready() {
  TF_USE_LEGACY_KERAS=1 "$VENV/bin/python" -c \
    "import tensorflow as tf, tf_keras, horovod.tensorflow as hvd; assert tf.keras.__name__.startswith('tf_keras'); hvd.init()" \
    >/dev/null 2>&1
}

skip() {
  echo "skipped: the upstream Horovod + tf_keras environment could not be built ($1; log: $LOG)"
  exit 3
}

build() {
  mkdir -p "$CACHE"
  echo "building the upstream environment in $VENV (log: $LOG)" >&2
  SKIP_APT=1 VENV="$VENV" bash "$ROOT/scripts/setup.sh" >"$LOG" 2>&1 || skip "scripts/setup.sh failed"
  local tf_release
  tf_release=$("$VENV/bin/python" -c 'import tensorflow as tf; print(".".join(tf.__version__.split(".")[:2]))')
  # --no-deps: tf-keras asks for the full tensorflow wheel, which would overwrite tensorflow-cpu's files.
  "$VENV/bin/pip" install -q --no-deps "tf-keras==$tf_release.*" >>"$LOG" 2>&1 || skip "pip could not install tf-keras"
  ready || skip "tf_keras or Horovod does not import"
}

ready || build
echo "$VENV/bin/python"
