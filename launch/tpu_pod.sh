#!/usr/bin/env bash
# Runs one llm_jax job on every worker of a Cloud TPU VM slice (a pod slice has one host per 4
# chips; every host runs the same command, as one JAX process).
#
#   launch/tpu_pod.sh --tpu=my-v5p --zone=us-east5-a --type=v5p-64 [options] -- \
#       --config=configs/pretrain.py:llama-1b --workdir=gs://my-bucket/runs/llama [overrides]
#
# In order: reuse the TPU if it exists, else create it (directly, or with --queued as a queued
# resource, which waits for capacity); copy this checkout to every worker; install the pinned
# requirements and jax[tpu]; free the TPU on every worker (kill whatever holds /dev/accel* or
# /dev/vfio/*, remove /tmp/libtpu_lockfile: a crashed run leaves them held); then start
# `python3 -m llm_jax.main ARGS` on every worker with the same arguments and the coordinator of
# worker 0. Each worker's output goes to LOG_DIR/worker_<i>.log (worker 0's is also shown here).
# The first worker to fail stops all the others, and this script exits with its status.
# Checkpoints must be on storage every worker sees (a gs:// bucket or a shared disk).
#
# Options:
#   --tpu=NAME --zone=ZONE    the TPU VM (required)
#   --type=TYPE               accelerator type for creating it, e.g. v5p-64, v4-32, v5litepod-16
#   --version=RUNTIME         TPU software version (default: v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite
#                             for v5e, v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base otherwise)
#   --project=PROJECT         gcloud project (default: gcloud's)
#   --queued                  create through `gcloud alpha compute tpus queued-resources`
#   --spot                    spot (preemptible) capacity
#   --workers=N               number of workers (default: asked from gcloud; from --type in a dry run)
#   --log_dir=DIR             where the per-worker logs go (default: logs/<tpu>-<time>)
#   --no_install              skip `pip install` (workers already set up)
#   --dry_run                 print every command, run none
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

tpu="" zone="" type="" version="" project="" queued=0 spot=0 workers="" log_dir="" install=1 dry=0
while (($#)); do
  case $1 in
    --tpu=*) tpu=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --type=*) type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --workers=*) workers=${1#*=} ;;
    --log_dir=*) log_dir=${1#*=} ;;
    --no_install) install=0 ;;
    --dry_run) dry=1 ;;
    -h | --help) usage ;;
    --) shift; break ;;
    *) die "unknown option $1 (the job's own arguments go after --)" ;;
  esac
  shift
done
job_args=("$@")
[[ -n $tpu && -n $zone ]] || die "--tpu=NAME and --zone=ZONE are required (--help for all options)"
((${#job_args[@]})) || die "give the job's arguments after --, e.g. -- --config=configs/pretrain.py --workdir=gs://bucket/run"
poll_s=${LLM_JAX_POLL_S:-5}  # how often the running workers are checked

# Prints a command as one shell-quoted line; runs it unless --dry_run.
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }
run() {
  show "$@"
  ((dry)) || "$@"
}
gcloud_flags=(--zone="$zone")
[[ -n $project ]] && gcloud_flags+=(--project="$project")
tpu_vm() { run gcloud compute tpus tpu-vm "$@" "${gcloud_flags[@]}"; }
ssh_all() { tpu_vm ssh "$tpu" --worker=all --command="$1"; }

# Hosts of a slice type: v4 / v5p types count TensorCores (2 per chip), v5e / v6e count chips;
# multi-host slices have 4 chips per host, single-host ones up to 4 (v4, v5p) or 8 (v5e, v6e).
hosts_of_type() {
  local gen=${1%-*} n=${1##*-} chips per_host_max
  case $gen in
    v4 | v5p) chips=$((n / 2)) per_host_max=4 ;;
    v5e | v5litepod | v6e) chips=$n per_host_max=8 ;;
    *) die "cannot tell the workers of --type=$1; pass --workers=N" ;;
  esac
  if ((chips <= per_host_max)); then echo 1; else echo $((chips / 4)); fi
}

# 1. The TPU: reuse, or create.
state=""
if ! ((dry)); then
  state=$(gcloud compute tpus tpu-vm describe "$tpu" "${gcloud_flags[@]}" --format='value(state)' 2>/dev/null || true)
fi
if [[ -n $state ]]; then
  echo "reusing TPU $tpu ($state)"
  [[ $state == READY ]] || die "TPU $tpu is $state, not READY; wait, or delete it: gcloud compute tpus tpu-vm delete $tpu --zone=$zone"
else
  [[ -n $type ]] || die "TPU $tpu does not exist here; give --type=... to create it"
  if [[ -z $version ]]; then
    case $type in
      v5p-*) version="v2-alpha-tpuv5" ;;
      v5e-* | v5litepod-*) version="v2-alpha-tpuv5-lite" ;;
      v6e-*) version="v2-alpha-tpuv6e" ;;
      *) version="tpu-ubuntu2204-base" ;;
    esac
  fi
  capacity=()
  ((spot)) && capacity=(--spot)
  if ((queued)); then
    run gcloud alpha compute tpus queued-resources create "$tpu" --node-id="$tpu" \
      --accelerator-type="$type" --runtime-version="$version" ${capacity[@]+"${capacity[@]}"} "${gcloud_flags[@]}"
    echo "waiting for the queued resource $tpu to become ACTIVE"
    while ! ((dry)); do
      qstate=$(gcloud alpha compute tpus queued-resources describe "$tpu" "${gcloud_flags[@]}" --format='value(state.state)')
      case $qstate in
        ACTIVE) break ;;
        FAILED | SUSPENDED) die "queued resource $tpu is $qstate" ;;
      esac
      sleep "$poll_s"
    done
  else
    tpu_vm create "$tpu" --accelerator-type="$type" --version="$version" ${capacity[@]+"${capacity[@]}"}
  fi
fi

if [[ -z $workers ]]; then
  if ((dry)); then
    [[ -n $type ]] || die "a dry run needs --type=... or --workers=N to know the workers"
    workers=$(hosts_of_type "$type")
  else
    workers=$(gcloud compute tpus tpu-vm describe "$tpu" "${gcloud_flags[@]}" --format='value(networkEndpoints.len())')
  fi
fi
[[ $workers =~ ^[1-9][0-9]*$ ]] || die "could not tell the number of workers (got '$workers'); pass --workers=N"
coordinator="WORKER_0_IP"
if ! ((dry)); then
  coordinator=$(gcloud compute tpus tpu-vm describe "$tpu" "${gcloud_flags[@]}" --format='value(networkEndpoints[0].ipAddress)')
fi

# 2. The code, on every worker.
repo=$(cd "$(dirname "$0")/.." && pwd)
tarball=${TMPDIR:-/tmp}/llm_jax_$$.tgz
run tar -czf "$tarball" --exclude=./.git --exclude=./runs --exclude=./logs --exclude='__pycache__' -C "$repo" .
tpu_vm scp "$tarball" "$tpu:llm_jax.tgz" --worker=all
((dry)) || rm -f "$tarball"
setup="mkdir -p ~/llm_jax && tar -xzf ~/llm_jax.tgz -C ~/llm_jax"
((install)) && setup+=" && cd ~/llm_jax && python3 -m pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
ssh_all "$setup"

# 3. A TPU held by a previous (crashed or stopped) run refuses to open: free it on every worker.
free_tpu="sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | xargs -r sudo kill -9; sudo rm -f /tmp/libtpu_lockfile"
ssh_all "$free_tpu"

# 4. The same command on every worker; one log per worker.
for a in "${job_args[@]}"; do
  case $a in
    --workdir=gs://* | --workdir=/*) ;;
    --workdir=*) ((workers > 1)) && echo "tpu_pod.sh: warning: ${a#*=} is a path on each worker's own disk;" \
      "checkpoints of a multi-host run need storage every worker shares (gs://bucket/...)" >&2 ;;
  esac
done
quoted_args=$(printf ' %q' "${job_args[@]}")
[[ -n $log_dir ]] || log_dir=logs/$tpu-$(date +%Y%m%d-%H%M%S)
((dry)) || mkdir -p "$log_dir"
pids=()
for ((i = 0; i < workers; i++)); do
  command="cd ~/llm_jax && JAX_COORDINATOR_ADDRESS=$coordinator:8476 JAX_NUM_PROCESSES=$workers JAX_PROCESS_ID=$i python3 -m llm_jax.main$quoted_args"
  worker_ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --worker="$i" --command="$command" "${gcloud_flags[@]}")
  show "${worker_ssh[@]}"
  echo "  > $log_dir/worker_$i.log"
  if ! ((dry)); then
    : >"$log_dir/worker_$i.log"
    "${worker_ssh[@]}" >"$log_dir/worker_$i.log" 2>&1 &  # $! is gcloud itself: killable
    pids+=($!)
  fi
done
((dry)) && exit 0

tail -n +1 -f "$log_dir/worker_0.log" &
tail_pid=$!
stop_all() {
  local pid
  for pid in "${pids[@]}" "$tail_pid"; do kill "$pid" 2>/dev/null || true; done
  # Killing the local ssh does not always stop the remote process: free the TPUs, which kills
  # every process holding one.
  ssh_all "$free_tpu" || true
}
trap 'echo "tpu_pod.sh: interrupted; stopping every worker" >&2; stop_all; exit 130' INT TERM

# 5. Watch: the first worker to exit non-zero stops the rest.
running=$workers
finished=()  # finished[i] is set once worker i has exited (indexed: works on macOS's bash 3)
while ((running)); do
  for ((i = 0; i < workers; i++)); do
    [[ -n ${finished[i]:-} ]] && continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    status=0
    wait "${pids[i]}" || status=$?
    finished[i]=$status
    running=$((running - 1))
    if ((status)); then
      echo "tpu_pod.sh: worker $i failed (exit $status, see $log_dir/worker_$i.log); stopping every worker" >&2
      trap - INT TERM
      stop_all
      exit "$status"
    fi
  done
  ((running)) && sleep "$poll_s"
done
kill "$tail_pid" 2>/dev/null || true
echo "all $workers workers finished; logs in $log_dir"
