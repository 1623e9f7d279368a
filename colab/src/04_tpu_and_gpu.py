# Source of colab/04_tpu_and_gpu.ipynb; after editing: python colab/make_notebooks.py
# accelerator: GPU

# %% [markdown]
# {BADGE}
#
# # TPUs and GPUs: the mesh, bf16, shardings, tokens/s and MFU
#
# llm_jax lays the devices out as a `data x fsdp x tensor` mesh and places every parameter
# and activation on it by its logical axis names (`config.sharding_rules`). On a Colab TPU
# or GPU runtime this notebook prints the mesh, the precision settings, the sharding rules
# and where each parameter lives, then trains a short pretraining run and reports its
# tokens/s and MFU (model FLOPs against the chips' bf16 peak). On a CPU runtime it splits
# the CPU into 8 virtual devices, so the mesh and shardings are the real ones, and says
# so: the speed is then a CPU's.
#
# *Runtime*: TPU or GPU (Runtime > Change runtime type); a CPU runtime works too

# %% include: SETUP

# %% include: PARAMS_NOTE

# %% tags=["parameters"]
STEPS = 60  # pretraining steps (the first compiles; tokens/s and MFU are from the rest)
PRESET = "auto"  # auto: minimind-26m on a GPU/TPU, tiny on a CPU; or any preset of configs/models.py
DTYPE = "bfloat16"  # compute dtype (config.model.dtype); parameters and AdamW stay float32
MESH = {}  # e.g. {"data": 2, "fsdp": 2, "tensor": 2}; {} = tensor 2 and fsdp 2 where the devices allow
VIRTUAL_DEVICES = 8  # without an accelerator: split the CPU into this many devices
RUNS_DIR = "runs"  # run directories go here
MOUNT_DRIVE = False  # Colab: mount Google Drive and keep RUNS_DIR under MyDrive/
OVERRIDES = {}  # config fields by dotted name: {"data.batch_size": 64, "model.remat_policy": "full"}

# %%
# Before JAX starts: without an accelerator, XLA splits the CPU into VIRTUAL_DEVICES
# devices (GPU and TPU runtimes ignore this flag).
if "jax" in sys.modules:
  print("JAX is already running: restart the runtime for VIRTUAL_DEVICES to apply")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={VIRTUAL_DEVICES}").strip()
import jax

# %% include: RUNS

# %% [markdown]
# ## 1. Devices and mesh

# %%
import numpy as np
from llm_jax import sharding

print("devices:", notebook.describe_devices())
n = jax.device_count()
on_accelerator = jax.default_backend() != "cpu"
preset = PRESET if PRESET != "auto" else ("minimind-26m" if on_accelerator else "tiny")
if MESH:
  mesh_fields = MESH
else:  # tensor parallelism 2 and FSDP 2 when there are devices for them; data takes the rest
  tensor = 2 if n >= 4 and n % 2 == 0 else 1
  fsdp = 2 if (n // tensor) % 2 == 0 else 1
  mesh_fields = {"data": -1, "fsdp": fsdp, "tensor": tensor}
fields = {"train.steps": STEPS, "train.eval_every": 0, "train.log_every": 10,
          "model.dtype": DTYPE, **{f"mesh.{k}": v for k, v in mesh_fields.items()}}
if on_accelerator:  # enough tokens per step to keep an accelerator busy
  fields.update({"data.batch_size": 32, "data.seq_len": 512})
config = notebook.config("pretrain", preset, {**fields, **OVERRIDES})
mesh = sharding.make_mesh(config.mesh)
print("mesh:", dict(mesh.shape))
print(f"device ids laid out as ({', '.join(mesh.axis_names)}):")
print(np.vectorize(lambda d: d.id)(mesh.devices))

# %% [markdown]
# ## 2. Precision
#
# | what | dtype |
# |---|---|
# | parameters, gradients, AdamW moments (`model.param_dtype`) | float32 |
# | matmul operands: projections, attention, logits, and their backward matmuls (`model.dtype`) | `DTYPE` (bfloat16) |
# | matmul accumulation, RMSNorm, RoPE, softmax, logits, log Z, loss | float32 |
# | residual stream, MLP activations | `DTYPE` |
#
# A T4 has no bfloat16 units (XLA runs bf16 there at float32 speed); L4, A100, H100 and
# every TPU do.

# %%
from llm_jax import devices
from llm_jax.model.kernels import dispatch
from llm_jax.train import run_setup

WORKDIR = os.path.join(RUNS_DIR, f"mesh_{preset}")
os.makedirs(WORKDIR, exist_ok=True)
tok = run_setup.resolve_tokenizer(config, WORKDIR)
model_cfg = run_setup.resolve_model(config, tok.vocab_size)
print(f"compute {model_cfg.dtype}, parameters {model_cfg.param_dtype}, remat "
      f"{model_cfg.remat_policy}")
print("attention:", dispatch.fused_impl(model_cfg, config.data.seq_len) or "xla",
      f"(config.model.attention={model_cfg.attention!r})")
peak, source = devices.peak_flops(model_cfg.dtype)
print("peak for MFU: %.1f TFLOP/s (%s)" % (peak / 1e12, source))

# %% [markdown]
# ## 3. Sharding rules and where each parameter lives
#
# Each rule maps a logical axis to mesh axes; weights use the plain names, activations the
# `act_` ones. The table below is computed with `jax.eval_shape`, the way the trainer
# places the state; nothing is allocated.

# %%
rules = tuple(tuple(r) for r in config.sharding_rules)
display(Markdown(notebook.rules_table(rules)))
display(Markdown(notebook.params_table(model_cfg, mesh, rules)))

# %% [markdown]
# ## 4. Train: tokens/s and MFU
#
# {RESUME_NOTE}

# %%
from llm_jax.train import loop

result = loop.train_and_evaluate(config, WORKDIR)
if "tokens_per_s" in result:
  print(f"{notebook.describe_devices()}\n"
        f"{result['tokens_per_s']:,.0f} tokens/s, MFU {result['mfu']:.1%}, "
        f"{result['step_time_s'] * 1e3:.1f} ms/step "
        f"({config.data.batch_size} x {config.data.seq_len} tokens per step, {model_cfg.dtype})")
else:
  print(f"{WORKDIR} had trained {result['step']} steps already; delete it to measure again")

# %% [markdown]
# ## Next
#
# - Plan a bigger model before renting devices: `python -m llm_jax.plan
#   --config=configs/pretrain.py:qwen2-0.5b --devices=8xH100` prints the memory per device
#   and the mesh and remat policy that fit (`docs/scaling.md`, the planner).
# - Benchmark one train step: `python -m llm_jax.train.bench --config=configs/pretrain.py`.
# - Pods and clusters: `launch/tpu_pod.sh`, `launch/slurm_gpu.sbatch` (`docs/scaling.md`).
