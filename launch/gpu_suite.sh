#!/usr/bin/env bash
# The GPU figures in one command, on a machine with one GPU and JAX already installed: a stock JAX
# GPU image (Python 3.12, jax with its CUDA plugin, flax, optax, orbax-checkpoint, sentencepiece,
# tensorboard) has no grain, array-record, ml-collections or clu, and often no network. So:
#
#   launch/gpu_suite.sh --download    # where there is network: their wheels (manylinux, for
#                                     # Python 3.12, 3.13 and 3.11: about 15 MB) into .whl/, which
#                                     # git ignores; carry it along
#   launch/gpu_suite.sh               # on the GPU machine: installs .whl/ offline (only what is
#                                     # missing), then runs the suite under a time limit
#   launch/gpu_suite.sh -- --parts=train --budget=train=300    # suite flags after --
#
# The suite (python -m llm_jax.train.bench --suite=gpu, llm_jax/train/bench_suite.py) prints its
# table and writes $SUITE_OUT/results.json (default runs/gpu_suite); run the same command again to
# resume after a time limit. Settings: PYTHON (python3), WHEELS (.whl), SUITE_OUT, SUITE_TIMEOUT
# (seconds for the whole suite, default 540), PYVERS (the wheels' Pythons for --download).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
out=${SUITE_OUT:-runs/gpu_suite}
limit=${SUITE_TIMEOUT:-540}
# The runtime packages a JAX image lacks (pins of requirements.txt), and their small dependencies
# that it may lack too; pip takes from these only what is not installed already.
packages=(grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 clu==0.0.12)
dependencies=(cloudpickle==3.1.3 portpicker==1.6.0 psutil==7.2.2 wrapt==2.1.2 PyYAML==6.0.3
              etils==1.15.0 fsspec==2026.9.0 zipp==4.1.2)

if [ "${1:-}" = --download ]; then
  mkdir -p "$wheels"
  # The image's Python is 3.12; 3.13 and 3.11 too, in case it is not (pip picks the one that fits).
  for pyver in ${PYVERS:-3.12 3.13 3.11}; do
    "$py" -m pip download --disable-pip-version-check --only-binary=:all: --no-deps \
      --python-version "$pyver" --implementation cp --abi "cp${pyver/./}" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux_2_28_x86_64 -d "$wheels" "${packages[@]}" "${dependencies[@]}" ||
      echo "$0: no complete set of wheels for Python $pyver" >&2
  done
  du -sh "$wheels"
  exit 0
fi
[ "${1:-}" = -- ] && shift

echo "== machine"
command -v nvidia-smi >/dev/null 2>&1 &&
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
"$py" --version
"$py" -m pip list --disable-pip-version-check 2>/dev/null |
  grep -i -E '^(jax|jaxlib|jax-cuda[0-9]*-(plugin|pjrt)|flax|optax|orbax-checkpoint|tensorflow) ' || true

echo "== packages"
if "$py" -c 'import grain, array_record, ml_collections, clu' 2>/dev/null; then
  echo "grain, array-record, ml-collections and clu are installed"
else
  [ -d "$wheels" ] || { echo "$0: no $wheels/: run $0 --download where there is network" >&2; exit 2; }
  "$py" -m pip install --disable-pip-version-check --no-index --find-links "$wheels" "${packages[@]}" || {
    echo "$0: installing from $wheels/ failed: its wheels must match this Python ($("$py" --version));" \
         "PYVERS=<version> $0 --download makes others" >&2
    exit 2
  }
fi

echo "== suite (limit ${limit} s)"
mkdir -p "$out"
status=0
timeout -k 15 "$limit" "$py" -m llm_jax.train.bench --suite=gpu --suite_dir="$out" "$@" || status=$?
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
  echo "$0: the suite ran past ${limit} s; $out/results.json keeps what finished: run again to resume"
fi
exit "$status"
