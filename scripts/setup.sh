#!/usr/bin/env bash
# One idempotent setup for a fresh Debian/Ubuntu machine:
#   1. Debian packages (Open MPI, the headers Horovod's build needs, the embedded data, and
#      what the cluster tests start: Slurm with munge, sshd, iproute2 for network namespaces),
#   2. a virtual environment in .venv with the project and its pinned dependencies,
#   3. Horovod 0.28.1 built with MPI + Gloo (+ NCCL on GPU hosts) against the installed
#      TensorFlow; the built wheel is cached keyed by the TF version, so a rerun takes seconds,
#   4. `horovodrun -cb`, which must list TensorFlow, MPI and Gloo.
# Environment: VENV (default .venv), HOROVOD_WHEEL_CACHE (default ~/.cache/recipes-horovod),
# FORCE_CPU=1 to take the CPU path on a GPU host, SKIP_APT=1 when the packages are installed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
HOROVOD_VERSION=0.28.1
WHEEL_CACHE=${HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/recipes-horovod}
APT_PACKAGES=(openmpi-bin libopenmpi-dev libhighwayhash-dev libfarmhash-dev
              cmake g++ python3-venv python3-dev dict-freedict-eng-deu dataset-fashion-mnist
              sword-text-web sword-text-sparv diatheke bible-kjv-text wordnet-base
              slurm-wlm munge openssh-server openssh-client iproute2)

log() { printf '[setup] %s\n' "$*"; }

has_gpu() {
  [ "${FORCE_CPU:-0}" != 1 ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

install_debian_packages() {
  [ "${SKIP_APT:-0}" = 1 ] && return
  local missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && { log "Debian packages present"; return; }
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  log "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}

install_python_packages() {
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  local extra=cpu
  has_gpu && extra=gpu
  log "installing the project with extras [$extra,test,bench] into $VENV"
  "$VENV/bin/pip" install -q -e "$ROOT[$extra,test,bench]"
}

# Horovod must be compiled against the TensorFlow it runs with; pip's wheel cache does not
# know that (upstream issue 4039), so the wheel is kept in a folder named after TF's version.
build_horovod() {
  local py="$VENV/bin/python" tf_version flavour cache_dir
  tf_version=$("$py" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null)
  flavour=cpu; has_gpu && flavour=nccl
  cache_dir="$WHEEL_CACHE/tf-$tf_version-$flavour-$("$py" -c 'import sys; print("py%d%d" % sys.version_info[:2])')"
  if "$py" -c "import horovod.tensorflow as h, tensorflow as tf; assert tf.__version__ == '$tf_version'; h.init()" >/dev/null 2>&1 \
     && "$VENV/bin/pip" show horovod 2>/dev/null | grep -q "^Version: $HOROVOD_VERSION"; then
    log "Horovod $HOROVOD_VERSION already built against TF $tf_version"
    return
  fi
  if ! ls "$cache_dir"/horovod-*.whl >/dev/null 2>&1; then
    log "building Horovod $HOROVOD_VERSION against TF $tf_version ($flavour), about 5 minutes on 2 cores"
    mkdir -p "$cache_dir"
    local -a env_flags=(HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
                        HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
                        "CPLUS_INCLUDE_PATH=$ROOT/scripts/horovod_compat${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
                        "MAKEFLAGS=-j$(nproc)")
    if [ "$flavour" = nccl ]; then
      # Untested here (no GPU on the development machines). Needs the CUDA toolkit (nvcc,
      # CUDA_HOME); NCCL comes from HOROVOD_NCCL_HOME if set, else from the nvidia-nccl
      # wheel that tensorflow[and-cuda] installs.
      local nccl_home=${HOROVOD_NCCL_HOME:-$("$py" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))')}
      env_flags+=(HOROVOD_GPU_OPERATIONS=NCCL "HOROVOD_NCCL_INCLUDE=$nccl_home/include"
                  "HOROVOD_NCCL_LIB=$nccl_home/lib" "HOROVOD_CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}")
    fi
    # --no-cache-dir: pip's own wheel cache would hand back a build made against another TF.
    env "${env_flags[@]}" "$VENV/bin/pip" wheel --no-cache-dir --no-build-isolation --no-deps --no-binary horovod \
      -w "$cache_dir" "horovod==$HOROVOD_VERSION"
  fi
  "$VENV/bin/pip" install -q --no-deps --force-reinstall "$cache_dir"/horovod-*.whl
}

check_horovod() {
  local caps
  caps=$("$VENV/bin/horovodrun" -cb)
  printf '%s\n' "$caps"
  for want in TensorFlow MPI Gloo; do
    printf '%s\n' "$caps" | grep -q "\[X\] $want" || { log "ERROR: horovodrun -cb does not list $want"; exit 1; }
  done
}

install_debian_packages
install_python_packages
build_horovod
check_horovod
log "done: activate with 'source $VENV/bin/activate'"
