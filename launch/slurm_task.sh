#!/usr/bin/env bash
# One process of a SLURM job step (run by srun from launch/slurm_run.sh): chooses the GPUs this
# process drives, checks that the run directory is shared, then runs llm_jax.main.
#   per_gpu:  GPU SLURM_LOCALID of the node (or the one GPU SLURM bound to this task)
#   per_node: every GPU of the node
# jax.distributed then starts from the SLURM environment (llm_jax/sharding.py); it reads
# JAX_LOCAL_DEVICE_IDS for the local devices.
set -euo pipefail
mode=$1
shift
visible=${CUDA_VISIBLE_DEVICES:-}
if [[ -n $visible ]]; then
  IFS=, read -r -a gpus <<<"$visible"
  n_gpus=${#gpus[@]}
else
  n_gpus=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
fi
if [[ $mode == per_gpu ]]; then
  if ((n_gpus == 1)); then
    export JAX_LOCAL_DEVICE_IDS=0  # SLURM bound one GPU to this task: it is device 0 here
  else
    export JAX_LOCAL_DEVICE_IDS=${SLURM_LOCALID:?srun sets SLURM_LOCALID}
  fi
else
  ((n_gpus > 0)) || { echo "slurm_task.sh: no GPU visible on $(hostname)" >&2; exit 2; }
  JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((n_gpus - 1)))
  export JAX_LOCAL_DEVICE_IDS
fi
for a in "$@"; do
  case $a in
    --workdir=*)
      if [[ ! -d ${a#--workdir=} ]]; then
        echo "slurm_task.sh: ${a#--workdir=} (made by the batch step) is not visible on $(hostname):" \
          "--workdir must be on a filesystem every node mounts" >&2
        exit 2
      fi ;;
  esac
done
exec "${LLM_JAX_PYTHON:-python}" -m llm_jax.main "$@"
