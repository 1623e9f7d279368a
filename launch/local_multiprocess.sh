#!/usr/bin/env bash
# Runs one llm_jax job as N JAX processes on this machine, the way a multi-host TPU slice or GPU
# cluster runs it (one process per host, jax.distributed over a coordinator). Use it to try a
# multi-host config before paying for the hosts:
#
#   launch/local_multiprocess.sh 2 --config=configs/sft.py --workdir=runs/mp
#
# Each process gets DEVICES_PER_PROCESS (default 2) virtual CPU devices; every process's output
# goes to <workdir>/process_<i>.log and process 0's is also shown here.
set -euo pipefail
n=${1:?usage: $0 NUM_PROCESSES --config=... --workdir=... [overrides]}
shift
workdir=""
for a in "$@"; do case $a in --workdir=*) workdir=${a#--workdir=} ;; esac; done
[ -n "$workdir" ] || { echo "$0: --workdir=... is required" >&2; exit 2; }
mkdir -p "$workdir"
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}" \
    python -m llm_jax.main "$@" > "$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$workdir/process_0.log" --pid="${pids[0]}" &
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
