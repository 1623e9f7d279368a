"""XLA flag presets per platform, set in XLA_FLAGS before JAX starts its backend, each checked
against the running jaxlib first: a flag it does not know is dropped with one warning line.

Why the check: XLA parses XLA_FLAGS once, when the first backend starts, and an unknown flag
aborts the whole process there ("Unknown flags in XLA_FLAGS: ..."), with no Python exception to
catch. Flag names change between jaxlib releases (MaxText's `--xla_gpu_graph_level` is now
`--xla_gpu_enable_command_buffer`; `--xla_gpu_enable_triton_softmax_fusion` is gone), so a preset
written for one release can kill a run on the next. `check` therefore starts a short Python
process with the flags on the CPU backend (JAX_PLATFORMS=cpu: quick, no accelerator memory): it
exits cleanly when every flag is known, or aborts naming the unknown ones, which are dropped and
the rest checked once more (each flag alone if XLA's message cannot be read). XLA keeps every
backend's flags in one table (DebugOptions, xla/debug_options_flags.cc) that the CPU client parses
too, and the CUDA plugin is built from the same XLA as the jaxlib it must match, so GPU flags are
checked on the CPU. The answers are kept per jaxlib version in `cache_path()`: one check (2 to 4 s)
per machine, jaxlib and flag, not per run.

Presets (`config.xla.preset`): `auto` takes the platform's, found before the backend starts
(JAX_PLATFORMS, else an installed CUDA/ROCm or TPU plugin with its device present):

  gpu   MaxText's GPU flags (its A3 Llama 2 scripts): the latency-hiding scheduler, pipelined
        all-gather / reduce-scatter / all-reduce, collective combine thresholds, while-loop double
        buffering, cuBLAS GEMMs instead of Triton's, command buffers (CUDA graphs) off; and
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 (JAX's default leaves a quarter of the memory unused)
  tpu   none yet (MaxText's TPU settings go to LIBTPU_INIT_ARGS and are per generation)
  cpu   none

Flags already in XLA_FLAGS are the user's and win: a preset flag of the same name is left out, and
the user's own flags are never touched. `config.xla.flags` adds flags, checked the same way.
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys

from absl import logging

from llm_jax import paths

# Each entry: the spellings of one setting, newest first; the first this jaxlib knows is used.
GPU_PRESET = (
    ("--xla_gpu_enable_latency_hiding_scheduler=true",),
    ("--xla_gpu_enable_triton_gemm=false",),
    ("--xla_gpu_enable_command_buffer=", "--xla_gpu_graph_level=0"),
    ("--xla_gpu_enable_highest_priority_async_stream=true",),
    ("--xla_gpu_all_reduce_combine_threshold_bytes=134217728",),
    ("--xla_gpu_all_gather_combine_threshold_bytes=134217728",),
    ("--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",),
    ("--xla_gpu_enable_pipelined_all_gather=true",),
    ("--xla_gpu_enable_pipelined_reduce_scatter=true",),
    ("--xla_gpu_enable_pipelined_all_reduce=true",),
    ("--xla_gpu_enable_while_loop_double_buffering=true",),
    ("--xla_gpu_enable_all_gather_combine_by_dim=false",),
    ("--xla_gpu_enable_reduce_scatter_combine_by_dim=false",),
)
PRESETS = {"gpu": GPU_PRESET, "tpu": (), "cpu": ()}
# Environment defaults that go with a preset (set only where the user has not set them).
PRESET_ENV = {"gpu": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}}
CHOICES = ("auto", "none", "gpu", "tpu", "cpu")

_OK = "llm_jax: XLA flags parsed"
_PROBE = f"import jax; jax.devices(); print({_OK!r})"
_applied: dict = {}  # what `apply` did in this process (it runs once)


def flag_name(flag: str) -> str:
  """"--xla_foo=1" -> "xla_foo"."""
  return flag.lstrip("-").split("=", 1)[0]


def cache_path() -> str:
  """Where the flags each jaxlib knows are kept between processes (delete it to check again)."""
  return paths.cache_dir("xla_flags.json")


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def _probe(flags: list[str], timeout: float) -> tuple[bool, list[str] | None]:
  """(every flag parsed, the names XLA said it does not know or None if it said nothing readable)."""
  env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
  try:
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return False, None
  if out.returncode == 0 and _OK in out.stdout:
    return True, []
  m = re.search(r"Unknown flags? in XLA_FLAGS: (.*)", out.stderr)
  if not m:
    return False, None
  return False, [flag_name(t) for t in m.group(1).split() if t.startswith("-")]


def check(flags: list[str], timeout: float = 120.0) -> tuple[list[str], list[str]]:
  """(the flags this jaxlib knows, those it does not), in the order given. Asked of a separate
  process (an unknown flag aborts the process that parses it); answers are cached per jaxlib."""
  flags = list(dict.fromkeys(flags))
  if not flags:
    return [], []
  version = _jaxlib_version()
  path = cache_path()
  try:
    with open(path) as f:
      cache = json.load(f)
  except (OSError, ValueError):
    cache = {}
  cache = cache if isinstance(cache, dict) else {}
  known = cache.get(version, {})  # flag (with its value) -> whether this jaxlib parses it
  known = known if isinstance(known, dict) else {}
  todo = [f for f in flags if f not in known]
  if todo:
    ok, unknown = _probe(todo, timeout)
    if ok:
      verdict = {f: True for f in todo}
    elif unknown:  # XLA named them: the rest once more, to be sure
      rest = [f for f in todo if flag_name(f) not in unknown]
      rest_ok = _probe(rest, timeout)[0] if rest else True
      verdict = {f: flag_name(f) not in unknown for f in todo} if rest_ok else None
    else:
      verdict = None
    if verdict is None:  # no readable answer (a bad value, a crash): each flag alone
      verdict = {f: _probe([f], timeout)[0] for f in todo}
      if not _probe([], timeout)[0]:  # JAX itself does not start: nothing was learned
        logging.warning("could not check XLA flags (python -c 'import jax; jax.devices()' fails "
                        "on the CPU); none of %s is set", " ".join(todo))
        return [], flags
    known = {**known, **verdict}
    try:  # best effort, atomic: a concurrent process keeps either file whole
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = f"{path}.{os.getpid()}.tmp"
      with open(tmp, "w") as f:
        json.dump({**cache, version: known}, f, indent=1, sort_keys=True)
      os.replace(tmp, path)
    except OSError:
      pass
  return [f for f in flags if known.get(f)], [f for f in flags if not known.get(f)]


def backends_started() -> bool:
  """Whether JAX has started a backend in this process (then XLA_FLAGS is read already)."""
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # moved in a later jax: assume not (setting is harmless)
    return False


def _distributions() -> set[str]:
  names = set()
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower().replace("_", "-")
    names.add(name)
  return names


def platform() -> str:
  """"gpu", "tpu" or "cpu": the backend JAX will start, told without starting it."""
  if backends_started():
    import jax  # pylint: disable=g-import-not-at-top
    return {"cuda": "gpu", "rocm": "gpu"}.get(jax.default_backend(), jax.default_backend())
  first = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
  if first in ("cuda", "rocm", "gpu"):
    return "gpu"
  if first in ("tpu", "cpu"):
    return first
  dists = _distributions()
  if "libtpu" in dists and (os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio")):
    return "tpu"
  gpu_plugin = any(re.fullmatch(r"jax-(cuda|rocm)\d*-(pjrt|plugin)", d) for d in dists)
  if gpu_plugin and any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")):
    return "gpu"
  return "cpu"


def apply(preset: str = "auto", flags: str = "") -> dict:
  """Adds the preset's flags (and `flags`) that this jaxlib knows to XLA_FLAGS, before JAX starts
  its backend; once per process. Returns {"platform", "set", "dropped"} (the flags set and those
  this jaxlib does not know)."""
  if preset not in CHOICES:
    raise ValueError(f"config.xla.preset={preset!r}: must be one of {CHOICES}")
  request = (preset, flags)
  if _applied:
    if _applied["request"] != request:
      logging.warning("XLA flags are set once per process (before JAX starts): config.xla "
                      "preset=%r flags=%r is not applied", preset, flags)
    return _applied["result"]
  where = platform() if preset == "auto" else preset
  entries = list(PRESETS.get(where, ())) if preset != "none" else []
  entries += [(f,) for f in flags.split()]
  user = os.environ.get("XLA_FLAGS", "").split()
  taken = {flag_name(f) for f in user}
  entries = [e for e in entries if not any(flag_name(s) in taken for s in e)]
  result = {"platform": where, "set": [], "dropped": []}
  if entries and backends_started():
    logging.warning("XLA flags not set: JAX's backend started before this run (set XLA_FLAGS "
                    "before JAX starts): %s", " ".join(e[0] for e in entries))
  elif entries:
    known, _ = check([s for e in entries for s in e])
    for spellings in entries:
      usable = [s for s in spellings if s in known]
      (result["set"] if usable else result["dropped"]).append(usable[0] if usable else spellings[0])
    if result["dropped"]:
      logging.warning("XLA flags this jaxlib (%s) does not know, dropped: %s", _jaxlib_version(),
                      " ".join(result["dropped"]))
    if result["set"]:
      os.environ["XLA_FLAGS"] = " ".join(user + result["set"])
      logging.info("XLA flags for %s (%d, preset %s): %s", where, len(result["set"]), preset,
                   " ".join(result["set"]))
  if preset != "none" and not backends_started():
    for key, value in PRESET_ENV.get(where, {}).items():
      os.environ.setdefault(key, value)
  _applied.update(request=request, result=result)
  return result


def apply_config(config) -> dict:
  """`apply` with config.xla.preset and config.xla.flags (a config without them: "auto", "")."""
  xla = config.get("xla") if hasattr(config, "get") else None
  return apply(xla.get("preset", "auto") if xla else "auto", xla.get("flags", "") if xla else "")
