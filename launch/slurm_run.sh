#!/usr/bin/env bash
# The batch step of launch/slurm_gpu*.sbatch: starts the job step (srun, every process the
# same command), forwards preemption and time-limit signals to it, and requeues the job when the
# time limit (not the job's end) stopped it. Usage: slurm_run.sh per_gpu|per_node LLM_JAX_ARGS...
set -euo pipefail
mode=${1:?usage: slurm_run.sh per_gpu|per_node --config=... --workdir=... [overrides]}
shift
case $mode in per_gpu | per_node) ;; *) echo "slurm_run.sh: mode must be per_gpu or per_node, not $mode" >&2; exit 2 ;; esac
workdir=""
for a in "$@"; do case $a in --workdir=*) workdir=${a#--workdir=} ;; esac; done
if [[ -z $workdir ]]; then
  echo "slurm_run.sh: --workdir=... is required (on a filesystem every node mounts: checkpoints and resume live there)" >&2
  exit 2
fi
: "${SLURM_JOB_ID:?slurm_run.sh runs inside a SLURM job: submit with sbatch launch/slurm_gpu.sbatch ...}"
restart=${SLURM_RESTART_COUNT:-0}
log_dir=$workdir/logs/slurm-$SLURM_JOB_ID-$restart
mkdir -p "$log_dir"
echo "job $SLURM_JOB_ID (restart $restart) on ${SLURM_JOB_NODELIST:-?}: $mode, logs in $log_dir"

step_args=(--kill-on-bad-exit=1 --output="$log_dir/task_%t.log")
if [[ $mode == per_node ]]; then
  step_args+=(--ntasks-per-node=1 --ntasks="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}")
fi
srun "${step_args[@]}" launch/slurm_task.sh "$mode" "$@" &
step=$!

requeue=0
# srun passes SIGTERM on to every task: each saves a checkpoint and exits.
trap 'echo "time limit near: checkpointing, then requeueing"; requeue=1; kill -TERM "$step" 2>/dev/null || true' USR1
trap 'echo "SIGTERM (preemption or scancel): checkpointing"; kill -TERM "$step" 2>/dev/null || true' TERM

while :; do
  status=0
  wait "$step" || status=$?
  # A trapped signal interrupts `wait` (status > 128) while srun still runs: wait again.
  ((status > 128)) && kill -0 "$step" 2>/dev/null && continue
  break
done
if ((requeue)); then
  scontrol requeue "$SLURM_JOB_ID"
  echo "requeued job $SLURM_JOB_ID; it resumes from the last checkpoint in $workdir"
  exit 0
fi
exit "$status"
