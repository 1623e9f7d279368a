"""Launch scripts (launch/), run against fake `gcloud`, `sbatch`, `srun` and `scontrol` executables
on PATH that record their arguments and act out workers and tasks. No cloud, no cluster."""

import os
import shlex
import shutil
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = sorted(f for f in os.listdir(LAUNCH) if f.endswith((".sh", ".sbatch")))

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records every call (one shell-quoted line), answers `describe`, acts out `ssh --worker=N`.
line=$(printf '%q ' "$@"); echo "$line" >> "$FAKE_LOG"  # one write: concurrent workers never interleave
args="$*"
case $args in
  *"tpu-vm describe"*"value(state)"*) [[ -n ${FAKE_TPU_STATE:-} ]] || exit 1; echo "$FAKE_TPU_STATE" ;;
  *"tpu-vm describe"*"networkEndpoints.len()"*) echo "$FAKE_WORKERS" ;;
  *"tpu-vm describe"*"ipAddress"*) echo 10.0.0.2 ;;
  *"queued-resources describe"*) echo ACTIVE ;;
  *"tpu-vm ssh"*"--worker=all"*) ;;
  *"tpu-vm ssh"*)
    for a in "$@"; do case $a in --worker=*) w=${a#*=} ;; --command=*) cmd=${a#*=} ;; esac; done
    echo "worker $w running: $cmd"
    if [[ $w == "${FAKE_FAIL_WORKER:-none}" ]]; then sleep 0.5; echo "worker $w: error"; exit 3; fi
    trap 'echo "$w" >> "$FAKE_LOG.stopped"; kill "$sp" 2>/dev/null; exit 143' TERM
    sleep "${FAKE_RUN_S:-0}" & sp=$!
    wait "$sp"
    echo "worker $w finished" ;;
esac
"""

FAKE_SBATCH = r"""#!/usr/bin/env bash
# Records the call, then runs the batch script at once in the foreground, in the environment
# SLURM gives a batch step (the real sbatch queues it and returns).
line=$(printf '%q ' "$@"); echo "$line" >> "$FAKE_LOG"  # one write: concurrent workers never interleave
nodes=1 per_node="" gpus=8
while [[ $1 == --* ]]; do
  case $1 in --nodes=*) nodes=${1#*=} ;; --ntasks-per-node=*) per_node=${1#*=} ;; --gpus-per-node=*) gpus=${1#*=} ;; esac
  shift
done
script=$1; shift
[[ -n $per_node ]] || per_node=$(sed -n 's/^#SBATCH --ntasks-per-node=//p' "$script")
export SLURM_JOB_ID=4242 SLURM_SUBMIT_DIR=$PWD SLURM_JOB_NUM_NODES=$nodes SLURM_NNODES=$nodes
export SLURM_NTASKS=$((nodes * per_node)) SLURM_NTASKS_PER_NODE=$per_node SLURM_JOB_NODELIST="node[1-$nodes]"
export FAKE_GPUS_PER_NODE=$gpus SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}
exec bash "$script" "$@"
"""

FAKE_SRUN = r"""#!/usr/bin/env bash
# Records the call and starts the step's tasks here, with the SLURM variables of each task;
# forwards SIGTERM to them like srun; --kill-on-bad-exit=1 kills the rest when one fails.
line=$(printf '%q ' "$@"); echo "$line" >> "$FAKE_LOG"  # one write: concurrent workers never interleave
out=/dev/null kill_bad=0 ntasks=$SLURM_NTASKS per_node=$SLURM_NTASKS_PER_NODE
while [[ $1 == --* ]]; do
  case $1 in
    --output=*) out=${1#*=} ;; --kill-on-bad-exit=1) kill_bad=1 ;;
    --ntasks=*) ntasks=${1#*=} ;; --ntasks-per-node=*) per_node=${1#*=} ;;
  esac
  shift
done
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
for ((t = 0; t < ntasks; t++)); do
  SLURM_PROCID=$t SLURM_LOCALID=$((t % per_node)) SLURM_NODEID=$((t / per_node)) SLURM_NTASKS=$ntasks \
  SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((FAKE_GPUS_PER_NODE - 1))) \
    "$@" > "${out//%t/$t}" 2>&1 &
  pids+=($!)
done
status=0 left=$ntasks
declare -A gone=()
while ((left)); do
  for p in "${pids[@]}"; do
    [[ -n ${gone[$p]:-} ]] && continue
    kill -0 "$p" 2>/dev/null && continue
    rc=0; wait "$p" || rc=$?
    gone[$p]=1; left=$((left - 1))
    if ((rc)); then status=$rc; ((kill_bad)) && kill -TERM "${pids[@]}" 2>/dev/null; fi
  done
  sleep 0.05
done
exit $status
"""

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for `python -m llm_jax.main ...` in each task: records what it was given.
echo "task=$SLURM_PROCID local_ids=$JAX_LOCAL_DEVICE_IDS args=$*" >> "$FAKE_LOG.tasks"
case ${FAKE_TASK_MODE:-ok} in
  ok) exit 0 ;;
  wait)
    trap 'echo "task=$SLURM_PROCID saved a checkpoint" >> "$FAKE_LOG.tasks"; exit 0' TERM
    while :; do sleep 0.05; done ;;
esac
"""


@pytest.fixture
def fakes(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in (("gcloud", FAKE_GCLOUD), ("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN),
                     ("scontrol", "#!/usr/bin/env bash\nprintf '%q ' scontrol \"$@\" >> \"$FAKE_LOG\"; echo >> \"$FAKE_LOG\"\n"),
                     ("fake_python", FAKE_PYTHON)):
    (bin_dir / name).write_text(body)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / "calls.log"
  log.write_text("")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log),
             LLM_JAX_POLL_S="0.1", LLM_JAX_PYTHON=str(bin_dir / "fake_python"))
  return env, log, tmp_path


def _calls(log):
  return [shlex.split(line) for line in log.read_text().splitlines() if line.strip()]


def _tpu(env, *args, timeout=60):
  return subprocess.run([os.path.join(LAUNCH, "tpu_pod.sh"), *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


JOB = ["--", "--config=configs/pretrain.py", "--workdir=gs://bucket/run", "--config.train.steps=5"]


def test_tpu_pod_runs_the_same_command_on_every_worker_with_one_log_each(fakes):
  env, log, tmp = fakes
  env.update(FAKE_TPU_STATE="READY", FAKE_WORKERS="4", FAKE_RUN_S="0.2")
  out = _tpu(env, "--tpu=t1", "--zone=us-east5-a", f"--log_dir={tmp}/logs", *JOB)
  assert out.returncode == 0, out.stderr
  calls = _calls(log)
  assert not any("create" in c for c in calls)  # an existing READY TPU is reused
  assert any(c[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in c for c in calls)
  to_all = [c for c in calls if "ssh" in c and "--worker=all" in c]
  assert "pip install" in to_all[0][-2] and "/tmp/libtpu_lockfile" in to_all[1][-2]
  runs = {c[5]: c[6] for c in calls if "ssh" in c and c[5] != "--worker=all"}
  assert sorted(runs) == [f"--worker={i}" for i in range(4)]
  # Every worker: the same command, only its process id differs.
  same = {r.replace(f"JAX_PROCESS_ID={i}", "JAX_PROCESS_ID=*") for i, r in enumerate(runs[f"--worker={i}"] for i in range(4))}
  assert len(same) == 1
  command = same.pop()
  assert "JAX_COORDINATOR_ADDRESS=10.0.0.2:8476 JAX_NUM_PROCESSES=4" in command
  assert "python3 -m llm_jax.main --config=configs/pretrain.py --workdir=gs://bucket/run --config.train.steps=5" in command
  for i in range(4):
    text = (tmp / "logs" / f"worker_{i}.log").read_text()
    assert f"worker {i} running" in text and f"worker {i} finished" in text


def test_tpu_pod_first_failing_worker_stops_the_others(fakes):
  env, log, tmp = fakes
  env.update(FAKE_TPU_STATE="READY", FAKE_WORKERS="4", FAKE_RUN_S="60", FAKE_FAIL_WORKER="2")
  t = time.monotonic()
  out = _tpu(env, "--tpu=t1", "--zone=z", "--no_install", f"--log_dir={tmp}/logs", *JOB)
  assert out.returncode == 3, out.stderr
  assert time.monotonic() - t < 30  # the others were not waited for
  assert "worker 2 failed (exit 3" in out.stderr
  stopped = tmp / "calls.log.stopped"  # written by each fake worker's TERM handler
  deadline = time.monotonic() + 10
  while (not stopped.exists() or len(stopped.read_text().split()) < 3) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert sorted(stopped.read_text().split()) == ["0", "1", "3"]
  calls = _calls(log)
  last_launch = max(i for i, c in enumerate(calls) if "--worker=3" in c)
  freed = [c for c in calls[last_launch:] if "--worker=all" in c and "libtpu_lockfile" in c[-2]]
  assert freed  # and the TPUs were freed on every worker (remote processes killed)
  assert "worker 2: error" in (tmp / "logs" / "worker_2.log").read_text()


def test_tpu_pod_dry_run_prints_every_command_and_runs_nothing(fakes):
  env, log, tmp = fakes
  out = _tpu(env, "--tpu=t2", "--zone=z", "--type=v5p-32", "--queued", "--spot", "--dry_run",
             f"--log_dir={tmp}/logs", *JOB)
  assert out.returncode == 0, out.stderr
  assert log.read_text() == ""  # no gcloud call at all
  assert not (tmp / "logs").exists()
  lines = [shlex.split(l[2:]) for l in out.stdout.splitlines() if l.startswith("+ ")]
  assert lines[0][:6] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create"]
  assert "--accelerator-type=v5p-32" in lines[0] and "--spot" in lines[0]
  assert lines[1][0] == "tar" and "scp" in lines[2]
  workers = [l for l in lines if "ssh" in l and "--worker=all" not in l]
  assert len(workers) == 4  # v5p-32: 16 chips, 4 hosts
  assert not list(tmp.glob("*.tgz")) and not list((tmp / "bin").glob("*.tgz"))


def test_tpu_pod_creates_a_missing_tpu(fakes):
  env, log, tmp = fakes
  env.update(FAKE_WORKERS="2", FAKE_RUN_S="0")
  out = _tpu(env, "--tpu=t3", "--zone=z", "--type=v4-16", "--no_install", f"--log_dir={tmp}/logs", *JOB[:1],
             "--config=configs/pretrain.py", "--workdir=/shared/run")
  assert out.returncode == 0, out.stderr
  create = [c for c in _calls(log) if "create" in c]
  assert create == [["compute", "tpus", "tpu-vm", "create", "t3", "--accelerator-type=v4-16",
                     "--version=tpu-ubuntu2204-base", "--zone=z"]]
  assert "usage" not in out.stderr


def test_tpu_pod_needs_its_arguments(fakes):
  env, _, _ = fakes
  out = _tpu(env, "--zone=z", *JOB)
  assert out.returncode == 2 and "--tpu=NAME and --zone=ZONE are required" in out.stderr
  out = _tpu(env, "--tpu=t", "--zone=z", "--config=configs/sft.py")
  assert out.returncode == 2 and "after --" in out.stderr


def _sbatch(env, script, *args, **kw):
  return subprocess.Popen(["sbatch", *args[:-1], os.path.join("launch", script), *args[-1]], env=env,
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _tasks(log):
  path = log.parent / "calls.log.tasks"
  return path.read_text().splitlines() if path.exists() else []


def test_slurm_one_process_per_gpu(fakes):
  env, log, tmp = fakes
  workdir = tmp / "shared" / "run"
  job = ["--config=configs/pretrain.py", f"--workdir={workdir}", "--config.train.steps=5"]
  p = _sbatch(env, "slurm_gpu.sbatch", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", job)
  out, err = p.communicate(timeout=60)
  assert p.returncode == 0, err
  srun = [c for c in _calls(log) if c[0].startswith("--kill-on-bad-exit")]
  assert len(srun) == 1 and f"--output={workdir}/logs/slurm-4242-0/task_%t.log" in srun[0]
  tasks = sorted(_tasks(log), key=lambda l: int(l.split()[0].split("=")[1]))
  assert len(tasks) == 8
  assert len({t.split(" args=")[1] for t in tasks}) == 1  # the same command everywhere
  assert [t.split()[1] for t in tasks] == [f"local_ids={i % 4}" for i in range(8)]  # its own GPU
  assert sorted(os.listdir(workdir / "logs" / "slurm-4242-0")) == sorted(f"task_{i}.log" for i in range(8))


def test_slurm_one_process_per_node_sees_all_its_gpus(fakes):
  env, log, tmp = fakes
  workdir = tmp / "shared" / "run"
  p = _sbatch(env, "slurm_gpu_per_node.sbatch", "--nodes=2", "--gpus-per-node=4",
              ["--config=configs/pretrain.py", f"--workdir={workdir}"])
  _, err = p.communicate(timeout=60)
  assert p.returncode == 0, err
  srun = [c for c in _calls(log) if c[0].startswith("--kill-on-bad-exit")][0]
  assert "--ntasks-per-node=1" in srun and "--ntasks=2" in srun
  assert sorted(t.split()[1] for t in _tasks(log)) == ["local_ids=0,1,2,3"] * 2


@pytest.mark.parametrize("sig,requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)],
                         ids=["time_limit", "preemption"])
def test_slurm_signal_checkpoints_and_requeues_on_time_limit(fakes, sig, requeued):
  env, log, tmp = fakes
  env["FAKE_TASK_MODE"] = "wait"
  workdir = tmp / "run"
  p = _sbatch(env, "slurm_gpu.sbatch", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2",
              ["--config=configs/pretrain.py", f"--workdir={workdir}"])
  deadline = time.monotonic() + 30
  while len(_tasks(log)) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
  assert len(_tasks(log)) == 2, "tasks did not start"
  p.send_signal(sig)  # the fake sbatch exec'd the batch script: this is the batch shell
  _, err = p.communicate(timeout=30)
  assert sum("saved a checkpoint" in t for t in _tasks(log)) == 2  # every task got SIGTERM
  requeue = [c for c in _calls(log) if c[0] == "scontrol"]
  assert requeue == ([["scontrol", "requeue", "4242"]] if requeued else [])
  assert p.returncode == 0, err  # the step ended cleanly after saving


def test_slurm_refuses_a_missing_or_unshared_workdir(fakes):
  env, _, tmp = fakes
  p = _sbatch(env, "slurm_gpu.sbatch", ["--config=configs/pretrain.py"])
  _, err = p.communicate(timeout=30)
  assert p.returncode == 2 and "--workdir=... is required" in err
  out = subprocess.run([os.path.join(LAUNCH, "slurm_task.sh"), "per_node", f"--workdir={tmp}/nowhere"],
                       env=dict(env, CUDA_VISIBLE_DEVICES="0,1"), capture_output=True, text=True, timeout=30)
  assert out.returncode == 2 and "must be on a filesystem every node mounts" in out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_pass_shellcheck(script):
  path = os.path.join(LAUNCH, script)
  assert subprocess.run(["bash", "-n", path]).returncode == 0
  assert os.access(path, os.X_OK), f"{script} is not executable"
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed (.ci/run installs it)")
  out = subprocess.run(["shellcheck", "--shell=bash", path], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout
