"""The GPU suite: the figures a user renting one GPU wants in the first minutes, in one command.

  python -m llm_jax.train.bench --suite=gpu                 # one H100: under 8 minutes
  python -m llm_jax.train.bench --suite=gpu --tiny          # every part, tiny shapes, on a CPU
  python -m llm_jax.train.bench --suite=gpu --parts=attention --budget=attention=200

Parts, each under its own time budget (seconds on one H100, BUDGET_S; --budget_scale,
--budget=PART=SECONDS):

  smoke      the quick-start model (configs/sft.py) trains 20 steps, stops at step 10 as if
             preempted (SIGTERM: it saves), resumes to 20 from the checkpoint, then generates an
             answer from the saved run: the loss and the text are printed
  train      a train step of the qwen2-0.5b and llama-1b presets (bf16 compute, float32 parameters
             and AdamW state, 16 x 2048 tokens of 4 packed documents per row) with the mesh, remat
             policy and loss chunking the planner (llm_jax.plan) picks for this GPU, and `auto`
             attention (the Pallas kernel): tokens/s, MFU against the chip's bf16 peak
             (devices.py), peak GPU memory, compile time
  attention  attention forward + backward at 2k, 8k and 32k tokens (one row of 4 documents; the
             0.5B shape's 14 query and 2 key/value heads of 64): the Pallas (Triton) kernel, cuDNN
             and XLA, in ms, and whether XLA ran out of memory
  decode     greedy decoding of the 0.5B shape (bf16 weights): time to first token and decode
             tokens/s at batch 1 and 64 (prompt 128, 128 new tokens); without the training XLA
             preset, as `llm_jax.chat` and `llm_jax.serve` decode

The other parts run with the platform's XLA preset (xla_flags.py), as training does.

Every group of items runs in its own process (train: one per model, so each peak memory is its
own; a crash or an out-of-memory ends only that process), started with the time its part has
left and killed when it runs out. Items are written to `<out>/results.json` as they finish; when a
budget ends the suite prints what the part reached, and the next run (same command) skips the
finished parts and items and resumes with the first unfinished one (`--fresh` starts over).
`--tiny` shrinks every shape so that the whole suite runs on a CPU in a few minutes
(tests/test_gpu_suite.py), with the Pallas kernel in interpret mode and cuDNN skipped.

Nothing here needs TensorFlow (train/writers.py writes TensorBoard events without it), and only
APIs that jax 0.11 kept are used: the suite is meant for a stock JAX GPU image with grain,
array-record, ml-collections and clu added (launch/gpu_suite.sh installs them from wheels).
"""

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform as platform_lib
import signal
import subprocess
import sys
import time

PARTS = ("smoke", "train", "attention", "decode")
# Seconds each part may take on one H100 (the suite's target: under 8 minutes in all).
BUDGET_S = {"smoke": 90, "train": 190, "attention": 85, "decode": 75}
# --tiny on a CPU: generous, the test checks the work, not the clock.
TINY_BUDGET_S = {"smoke": 300, "train": 300, "attention": 300, "decode": 300}
PRESETS = {"qwen2-0.5b": 151936, "llama-1b": 128256}  # train: preset -> vocabulary
LENGTHS = {"2k": 2048, "8k": 8192, "32k": 32768}
TINY_LENGTHS = {"64": 64, "128": 128}
DECODE_BATCHES = {"batch1": 1, "batch64": 64}
TINY_DECODE_BATCHES = {"batch1": 1, "batch4": 4}
ATTENTION_IMPLS = ("pallas_gpu", "cudnn", "xla")
GiB = 2**30


def groups(part: str, tiny: bool) -> list[list[str]]:
  """A part's items, grouped by the process that runs them."""
  if part == "smoke":
    return [["train_resume_generate"]]
  if part == "train":  # one process per model on a GPU: each peak memory is its own
    return [list(PRESETS)] if tiny else [[name] for name in PRESETS]
  if part == "attention":
    return [list(TINY_LENGTHS if tiny else LENGTHS)]
  return [list(TINY_DECODE_BATCHES if tiny else DECODE_BATCHES)]


# ---------------------------------------------------------------------------------------------
# The parent: budgets, child processes, results.json, the table.


def _read_json(path: str, default):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return default


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
  os.replace(tmp, path)


def _progress_path(out: str, part: str) -> str:
  return os.path.join(out, f"progress_{part}.json")


def _identity(tiny: bool) -> dict:
  """What must match for earlier results to be resumed (the device is checked by the children)."""
  from llm_jax import xla_flags  # pylint: disable=g-import-not-at-top
  versions = {}
  for dist in ("jax", "jaxlib"):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = "unknown"
  return {"suite": "gpu", "tiny": tiny, **versions, "platform": xla_flags.platform()}


def _merge_progress(results: dict, out: str) -> None:
  """Moves what children wrote (progress_<part>.json) into results."""
  for part in PARTS:
    path = _progress_path(out, part)
    progress = _read_json(path, None)
    if not progress:
      continue
    entry = results["parts"].setdefault(part, {"finished": False, "items": {}})
    entry["items"].update(progress.get("items", {}))
    if "xla_flags" in progress:
      entry["xla_flags"] = progress["xla_flags"]
    if progress.get("machine") and not results.get("machine"):
      results["machine"] = progress["machine"]
    os.remove(path)


def _parse_budgets(budgets: list[str]) -> dict:
  out = {}
  for spec in budgets:
    part, _, seconds = spec.partition("=")
    if part not in PARTS or not seconds:
      raise ValueError(f"--budget={spec}: give PART=SECONDS with PART one of {PARTS}")
    out[part] = float(seconds)
  return out


def _run_child(part: str, items: list[str], out: str, tiny: bool, deadline: float) -> str:
  """Runs one group in its own process until it ends or the deadline; '' or why it stopped."""
  from llm_jax import xla_flags  # pylint: disable=g-import-not-at-top
  if xla_flags.backends_started():  # it would hold the GPU's memory the children need
    raise RuntimeError("the suite's parent process started JAX's backend; only its children may")
  cmd = [sys.executable, "-m", "llm_jax.train.bench_suite", "--part", part, "--items",
         ",".join(items), "--out", out, "--deadline", f"{deadline:.3f}"] + (["--tiny"] if tiny else [])
  proc = subprocess.Popen(cmd, start_new_session=True)  # its own group: killed with its workers
  try:
    code = proc.wait(timeout=max(deadline - time.time(), 1.0))
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return "budget"
  return "" if code == 0 else f"exit status {code}"


def run(suite: str, out: str, tiny: bool = False, parts=(), fresh: bool = False,
        budget_scale: float = 1.0, budgets=()) -> int:
  """The whole suite (the parent process); 0 when every part asked for has finished."""
  if suite != "gpu":
    raise ValueError(f"--suite={suite!r}: the one suite is gpu")
  unknown = [p for p in parts if p not in PARTS]
  if unknown:
    raise ValueError(f"--parts={','.join(parts)}: {unknown} not among {PARTS}")
  wanted = [p for p in PARTS if not parts or p in parts]
  own = _parse_budgets(budgets)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "results.json")
  identity = _identity(tiny)
  results = {} if fresh else _read_json(path, {})
  if results and results.get("identity") != identity:
    print(f"gpu suite: {path} holds results of another setup ({results.get('identity')}); "
          "starting over")
    results = {}
  if not results:
    for part in PARTS:  # leftovers of an earlier setup
      if os.path.exists(_progress_path(out, part)):
        os.remove(_progress_path(out, part))
  results.setdefault("identity", identity)
  results.setdefault("parts", {})
  _merge_progress(results, out)  # a run cut short after a child wrote
  _write_json(path, results)
  print(f"gpu suite{' (tiny)' if tiny else ''}: parts {', '.join(wanted)}; results in {path}",
        flush=True)

  for part in wanted:
    entry = results["parts"].setdefault(part, {"finished": False, "items": {}})
    all_items = [i for g in groups(part, tiny) for i in g]
    if entry.get("finished") and all(i in entry["items"] for i in all_items):
      print(f"[{part}] finished earlier: kept ({', '.join(all_items)})", flush=True)
      continue
    budget = own.get(part, (TINY_BUDGET_S if tiny else BUDGET_S)[part] * budget_scale)
    start = time.time()
    deadline = start + budget
    entry.update(finished=False, budget_s=budget)
    stopped = ""
    for group in groups(part, tiny):
      todo = [i for i in group if i not in entry["items"]]
      if not todo:
        continue
      if time.time() >= deadline:
        stopped = "budget"
        break
      print(f"[{part}] {', '.join(todo)} (budget left {deadline - time.time():.0f} s)", flush=True)
      why = _run_child(part, todo, out, tiny, deadline)
      progress = _read_json(_progress_path(out, part), {})
      current = progress.get("current")
      _merge_progress(results, out)
      if why == "budget":
        stopped = "budget"
        break
      if why:  # a crash: what it was doing is recorded as its result, the part goes on
        failed = (current or {}).get("item") or next(i for i in todo if i not in entry["items"])
        entry["items"][failed] = {"error": f"the process ended with {why} during "
                                           f"{(current or {}).get('stage', 'start-up')}"}
        print(f"[{part}] {failed}: {entry['items'][failed]['error']}", flush=True)
      _write_json(path, results)
    entry["wall_s"] = round(time.time() - start, 1)
    missing = [i for i in all_items if i not in entry["items"]]
    entry["finished"] = not missing
    if missing:
      reached = [i for i in all_items if i in entry["items"]]
      current = (_read_json(_progress_path(out, part), {}) or {}).get("current") or {}
      entry["stopped"] = (f"{stopped or 'stopped'} after {entry['wall_s']:.0f} s"
                          + (f" during {current.get('item')} ({current.get('stage')})"
                             if current.get("item") else ""))
      print(f"[{part}] the budget of {budget:.0f} s ended: reached {', '.join(reached) or 'nothing'}; "
            f"not finished: {', '.join(missing)}; the same command resumes here", flush=True)
    else:
      entry.pop("stopped", None)
    _write_json(path, results)

  print("\n" + table(results), flush=True)
  print(f"\nJSON: {path}", flush=True)
  return 0 if all(results["parts"].get(p, {}).get("finished") for p in wanted) else 1


def _loss(x) -> str:
  return "n/a" if x is None else f"{x:.4f}"


def _ms(x) -> str:
  return f"{x * 1e3:,.1f} ms"


def _row_train(name, r) -> str:
  if "error" in r:
    return f"| train {name} | {r['error']} |"
  peak = r.get("peak_memory_bytes")
  return (f"| train {name}: {r['batch']} x {r['seq_len']} tokens, {r['dtype']} compute, remat "
          f"{r['remat_policy']}, attention {r['attention_kernel']}, loss chunk {r['loss_chunk_len']} | "
          f"{r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}% of "
          f"{r['peak_tflops_per_s']:,.3g} TFLOP/s, peak memory "
          f"{f'{peak / GiB:.1f} GiB' if peak else 'n/a'}, compile {r['compile_s']:.1f} s |")


def _cell_attention(r) -> str:
  if r.get("skipped"):
    return f"skipped ({r['skipped']})"
  if r.get("oom"):
    return "out of memory"
  if "error" in r:
    return f"error: {r['error'][:80]}"
  return f"{_ms(r['fwd_bwd_s'])} ({r['tflops_per_s']:.3g} TFLOP/s)"


def table(results: dict) -> str:
  """The README's GPU table (Markdown) of what results.json holds."""
  m = results.get("machine") or {}
  lines = [f"GPU suite on {m.get('device', '?')} ({m.get('platform', '?')}), jax {m.get('jax', '?')}, "
           f"{m.get('date', '?')}; XLA flags set: {len(m.get('xla_flags_set', []))}, dropped: "
           f"{' '.join(m.get('xla_flags_dropped', [])) or 'none'}", "",
           "| measurement | result |", "|---|---|"]
  parts = results.get("parts", {})
  for part in PARTS:
    entry = parts.get(part)
    if not entry:
      continue
    items = entry.get("items", {})
    if part == "smoke" and "train_resume_generate" in items:
      r = items["train_resume_generate"]
      lines.append(f"| smoke: quick-start model, {r.get('steps', '?')} steps, saved at "
                   f"{r.get('resumed_from', '?')} and resumed, then generated | "
                   + (r["error"] if "error" in r else
                      f"{r['wall_s']:.0f} s; loss {r['loss']:.3f}, eval loss {_loss(r['eval_loss'])}; "
                      f"{r['text'][:60]!r}") + " |")
    if part == "train":
      for name in PRESETS:
        if name in items:
          lines.append(_row_train(name, items[name]))
    if part == "attention":
      for name, r in items.items():
        if "error" in r and "impls" not in r:
          lines.append(f"| attention fwd+bwd {name} | {r['error']} |")
          continue
        cells = " · ".join(f"{impl} {_cell_attention(r['impls'][impl])}" for impl in ATTENTION_IMPLS
                           if impl in r["impls"])
        lines.append(f"| attention fwd+bwd {name} tokens ({r['docs']} documents) | {cells} |")
    if part == "decode":
      for name, r in items.items():
        lines.append(f"| decode {r.get('model', '')} {name} | " + (r["error"] if "error" in r else
                     f"{r['decode_tokens_per_s']:,.0f} tokens/s, time to first token "
                     f"{_ms(r['ttft_s'])}") + " |")
    if not entry.get("finished"):
      lines.append(f"| {part}: not finished | {entry.get('stopped', 'not run')} |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# A child: one group of items, in this process.


class _Progress:
  """progress_<part>.json: the items this child finished and what it is doing now."""

  def __init__(self, out: str, part: str, deadline: float):
    self.path, self.deadline = _progress_path(out, part), deadline
    self.data = _read_json(self.path, {}) or {}
    self.data.setdefault("items", {})

  def left(self) -> float:
    return self.deadline - time.time()

  def stage(self, item: str, stage: str) -> None:
    self.data["current"] = {"item": item, "stage": stage}
    _write_json(self.path, self.data)

  def done(self, item: str, result: dict) -> None:
    self.data["items"][item] = result
    self.data["current"] = None
    _write_json(self.path, self.data)

  def machine(self, info: dict) -> None:
    self.data["machine"] = info
    _write_json(self.path, self.data)


def _machine(flags_result: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
          "devices": jax.device_count(), "jax": jax.__version__,
          "jaxlib": importlib.metadata.version("jaxlib"), "python": platform_lib.python_version(),
          "date": datetime.date.today().isoformat(), "host": platform_lib.node(),
          "xla_flags_set": flags_result["set"], "xla_flags_dropped": flags_result["dropped"],
          "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")}


def _out_of_memory(e: BaseException) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _error(e: BaseException) -> dict:
  first = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return {"error": f"{type(e).__name__}: {first[:300]}", "oom": _out_of_memory(e)}


def smoke(progress: _Progress, tiny: bool, out: str) -> dict:
  """Quick-start model: 20 steps with a preemption (save) at 10, resume, then generation."""
  import shutil  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from configs import sft  # pylint: disable=g-import-not-at-top
  from llm_jax import checkpoint, fields, rundir  # pylint: disable=g-import-not-at-top
  from llm_jax.infer import session  # pylint: disable=g-import-not-at-top
  from llm_jax.infer.generate import Generator  # pylint: disable=g-import-not-at-top
  from llm_jax.infer.sampling import SamplingConfig  # pylint: disable=g-import-not-at-top
  from llm_jax.train import loop  # pylint: disable=g-import-not-at-top
  item = "train_resume_generate"
  start = time.perf_counter()
  workdir = os.path.abspath(os.path.join(out, "smoke_run"))
  shutil.rmtree(workdir, ignore_errors=True)
  steps = 4 if tiny else 20
  config = sft.get_config()
  overrides = {"train.steps": steps, "train.warmup_steps": 1 if tiny else 5,
               "train.log_every": 1 if tiny else 5, "train.eval_every": 0 if tiny else steps // 2,
               "train.eval_batches": 2, "checkpoint.every": steps // 2}
  if tiny:
    overrides.update({"model.dim": 32, "model.n_layers": 2, "model.n_heads": 4,
                      "model.n_kv_heads": 2, "model.mlp_dim": 64, "data.seq_len": 64,
                      "data.batch_size": 4, "data.synthetic.n_entities": 40,
                      "data.tokenizer.vocab_size": 600})
  for key, value in overrides.items():
    fields.set_path(config, key, value)
  stop_at = steps // 2

  def preempt(step, batch):  # SIGTERM during the step that ends at stop_at: save and stop
    del batch
    if step == stop_at - 1:
      os.kill(os.getpid(), signal.SIGTERM)

  progress.stage(item, f"training to step {stop_at} (then SIGTERM)")
  first = loop.train_and_evaluate(config, workdir, batch_hook=preempt)
  if not first["preempted"] or checkpoint.steps(workdir)[-1] != stop_at:
    raise RuntimeError(f"expected a save at step {stop_at}, got {first['step']} "
                       f"(checkpoints {checkpoint.steps(workdir)})")
  progress.stage(item, f"resuming from step {stop_at}")
  second = loop.train_and_evaluate(config, workdir)
  progress.stage(item, "generating")
  run = rundir.load(workdir)
  gen = Generator(run.params, run.model_cfg)
  question = "Who is the first person you know?"
  t = time.perf_counter()
  answer = gen.generate([session.prompt_ids(run.tokenizer, [{"role": "user", "content": question}])],
                        SamplingConfig(temperature=0.0, max_new_tokens=8 if tiny else 40),
                        stop_token_ids=session.end_of_turn_ids(run.tokenizer))[0]
  text = run.tokenizer.decode(answer.tokens)
  result = {"steps": second["step"], "resumed_from": stop_at, "loss": second["loss"],
            "eval_loss": second.get("eval_loss"), "question": question, "text": text,
            "generate_s": time.perf_counter() - t, "wall_s": time.perf_counter() - start,
            "parameters": int(sum(x.size for x in jax.tree.leaves(run.params)))}
  print(f"[smoke] {result['steps']} steps (saved at {stop_at}, resumed): loss {result['loss']:.4f}, "
        f"eval loss {_loss(result['eval_loss'])}; {question!r} -> {text!r} ({result['wall_s']:.1f} s in "
        "all)",
        flush=True)
  return result


def device_spec() -> str:
  """The devices.py GPU model of this machine's GPU (the planner's input); H100 stands in for a
  CPU (--tiny) or an unknown GPU."""
  import jax  # pylint: disable=g-import-not-at-top
  from llm_jax import devices as devices_lib  # pylint: disable=g-import-not-at-top
  kind = jax.devices()[0].device_kind.lower()
  exact = [m for m, (k, _) in devices_lib.GPUS.items() if k.lower() == kind]
  if exact:
    return exact[0]
  loose = sorted((m for m in devices_lib.GPUS if m.lower().split("-")[0] in kind), key=len)
  return loose[-1] if loose else "H100"


def train(progress: _Progress, item: str, tiny: bool) -> dict:
  """One preset's train step with the planner's mesh, remat policy and loss chunking."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  from llm_jax import devices as devices_lib  # pylint: disable=g-import-not-at-top
  from llm_jax.model.kernels import dispatch  # pylint: disable=g-import-not-at-top
  from llm_jax.plan import search  # pylint: disable=g-import-not-at-top
  from llm_jax.train import measure  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config(item)
  config.model.vocab_size = PRESETS[item]
  config.data.batch_size, config.data.seq_len = 16, 2048
  config.checkpoint.enabled = False
  if tiny:
    config.model.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128,
                        vocab_size=512)
    config.data.batch_size, config.data.seq_len = 2, 64
  spec = device_spec() if jax.device_count() == 1 else f"{jax.device_count()}x{device_spec()}"
  progress.stage(item, f"planning for {spec}")
  best, planned, _ = search.plan(config, devices_lib.parse(spec))
  if best is None:
    return {"error": f"the planner finds no layout that fits {spec}"}
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (best.mesh["data"], best.mesh["fsdp"],
                                                            best.mesh["tensor"])
  config.model.loss_chunk_len = best.loss_chunk_len
  config.train.grad_accum = best.grad_accum
  # The planner's activations are estimates: when its pick runs out of memory, the next policy
  # (less kept, more recomputed) is tried while there is time, and the miss is recorded.
  out_of_memory, result = [], None
  for policy in search.POLICY_ORDER[search.POLICY_ORDER.index(planned):]:
    config.model.remat_policy = policy
    progress.stage(item, f"compiling and timing (remat {policy})")
    try:
      result = measure.measure(config, steps=2 if tiny else 10, docs_per_row=4,
                               seconds=None if tiny else max(5.0, min(30.0, progress.left() - 20)))
      break
    except Exception as e:  # pylint: disable=broad-except  # out of memory, a kernel that fails
      error = _error(e)
    gc.collect()  # the failed attempt's arrays (held by the exception until here)
    if not error["oom"] or progress.left() < MIN_ITEM_S["train"]:
      return {**error, "planned_on": spec, "remat_policy": policy, "oom_policies": out_of_memory}
    out_of_memory.append(policy)
    print(f"[train] {item}: out of memory with remat {policy}; trying the next policy", flush=True)
  if result is None:
    return {**error, "planned_on": spec, "oom_policies": out_of_memory}
  model_cfg = search.model_config(config)
  result.update(preset=item, planned_on=spec, planned_mesh=best.mesh, planned_remat=planned,
                oom_policies=out_of_memory,
                attention_kernel=dispatch.fused_impl(model_cfg, config.data.seq_len) or "xla",
                planner_estimate_bytes=best.total(policy))
  peak = result["peak_memory_bytes"]
  print(f"[train] {item}: {result['tokens_per_s']:,.0f} tokens/s, MFU {100 * result['mfu']:.1f}% of "
        f"{result['peak_tflops_per_s']:,.3g} TFLOP/s, peak memory "
        f"{f'{peak / GiB:.1f} GiB' if peak else 'n/a'}, compile {result['compile_s']:.1f} s, step "
        f"{_ms(result['step_s'])} (remat {policy}, attention {result['attention_kernel']}, loss chunk "
        f"{best.loss_chunk_len}, planned on {spec})", flush=True)
  return result


def attention(progress: _Progress, item: str, tiny: bool) -> dict:
  """Forward + backward of one packed row at one length: Pallas kernel, cuDNN, XLA."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import models  # pylint: disable=g-import-not-at-top
  from llm_jax.model import attention as attention_lib, kernels  # pylint: disable=g-import-not-at-top
  from llm_jax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from llm_jax.train.measure import synthetic_batch  # pylint: disable=g-import-not-at-top
  length = (TINY_LENGTHS if tiny else LENGTHS)[item]
  n, k, h = (4, 2, 16) if tiny else (14, 2, 64)
  docs, reps = 4, 2 if tiny else 10
  on_gpu = jax.default_backend() == "gpu"
  rng = np.random.default_rng(0)
  q, dout = (jnp.asarray(rng.standard_normal((1, length, n, h)), jnp.bfloat16) for _ in range(2))
  kk, v = (jnp.asarray(rng.standard_normal((1, length, k, h)), jnp.bfloat16) for _ in range(2))
  seg = jnp.asarray(synthetic_batch(1, length, 2, docs)["segment_ids"])
  base = models.get("qwen2-0.5b")
  base.update(dim=n * h, n_heads=n, n_kv_heads=k, head_dim=h, attention="pallas_gpu",
              attention_interpret=not on_gpu)
  cfg = ModelConfig.from_config(base, vocab_size=8)
  impls = {
      "pallas_gpu": lambda q, k, v: kernels.attention(q, k, v, seg, cfg),
      "cudnn": lambda q, k, v: attention_lib.cudnn_attention(q, k, v, seg),
      "xla": lambda q, k, v: attention_lib.xla_attention(
          q, k, v, attention_lib.segment_causal_mask(seg), jnp.bfloat16, causal=True),
  }
  # Causal FLOPs (half the [L, L] products): 2 matmuls forward, 5 backward.
  flops = 7 * n * length * length * h
  out = {"length": length, "docs": docs, "heads": [n, k, h], "impls": {}}
  for impl, fn in impls.items():
    if impl == "cudnn" and not on_gpu:
      out["impls"][impl] = {"skipped": "needs a CUDA GPU"}
      continue
    progress.stage(item, f"{impl}: compiling")
    step = jax.jit(lambda q, k, v, d, fn=fn: jax.vjp(fn, q, k, v)[1](d))
    try:
      t = time.perf_counter()
      compiled = step.lower(q, kk, v, dout).compile()
      compile_s = time.perf_counter() - t
      progress.stage(item, f"{impl}: timing")
      jax.block_until_ready(compiled(q, kk, v, dout))
      times = []
      while len(times) < reps and (len(times) < 2 or sum(times) < 3.0):
        t = time.perf_counter()
        jax.block_until_ready(compiled(q, kk, v, dout))
        times.append(time.perf_counter() - t)
      best = float(np.median(times))
      r = {"fwd_bwd_s": best, "compile_s": compile_s, "reps": len(times),
           "tflops_per_s": flops / best / 1e12}
    except Exception as e:  # pylint: disable=broad-except  # XLA out of memory at 32k, a kernel error
      r = _error(e)
    out["impls"][impl] = r
    gc.collect()
  print(f"[attention] {length} tokens, {docs} documents: "
        + " · ".join(f"{i} {_cell_attention(r)}" for i, r in out["impls"].items()), flush=True)
  return out


class _Decoder:
  """The 0.5B shape with random bf16 weights and its Generator, built once per process."""

  def __init__(self, tiny: bool):
    from configs import models  # pylint: disable=g-import-not-at-top
    from llm_jax.infer.generate import Generator  # pylint: disable=g-import-not-at-top
    from llm_jax.infer.measure import random_params  # pylint: disable=g-import-not-at-top
    from llm_jax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
    m = models.get("tiny" if tiny else "qwen2-0.5b")
    m.update(dtype="bfloat16", param_dtype="bfloat16")
    self.model = "tiny" if tiny else "qwen2-0.5b"
    self.cfg = ModelConfig.from_config(m, vocab_size=512 if tiny else PRESETS["qwen2-0.5b"])
    self.params = random_params(self.cfg)
    self.generator = Generator(self.params, self.cfg)


def decode(progress: _Progress, item: str, tiny: bool, state: dict) -> dict:
  from llm_jax.infer.measure import measure_llm_jax  # pylint: disable=g-import-not-at-top
  if "decoder" not in state:
    progress.stage(item, "building the model")
    state["decoder"] = _Decoder(tiny)
  d = state["decoder"]
  batch = (TINY_DECODE_BATCHES if tiny else DECODE_BATCHES)[item]
  prompt, new = (8, 8) if tiny else (128, 128)
  progress.stage(item, "compiling and generating")
  r = measure_llm_jax(d.params, d.cfg, batch_sizes=(batch,), prompt_len=prompt, new_tokens=new,
                      generator=d.generator)[0]
  r.update(model=d.model, prompt_len=prompt, new_tokens=new, weights="bfloat16")
  print(f"[decode] {d.model} batch {batch}: {r['decode_tokens_per_s']:,.0f} tokens/s, time to first "
        f"token {_ms(r['ttft_s'])} (prompt {prompt}, {new} new tokens)", flush=True)
  return r


# Seconds an item needs at least (on one H100) to be worth starting before the deadline.
MIN_ITEM_S = {"smoke": 20, "train": 40, "attention": 10, "decode": 15}


def child(part: str, items: list[str], out: str, deadline: float, tiny: bool) -> int:
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  from llm_jax import console, xla_flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # argparse parsed this process's arguments; absl logs as in a command
  logging.use_absl_handler()
  console.setup()
  # Before JAX starts its backend. Decoding runs as chat and the server run it, without the
  # training preset (which turns command buffers, i.e. CUDA graphs, off).
  flags_result = xla_flags.apply("none" if part == "decode" else "auto")
  progress = _Progress(out, part, deadline)
  progress.data["xla_flags"] = flags_result["set"]
  progress.machine(_machine(flags_result))
  state = {}
  for item in items:
    if item in progress.data["items"]:
      continue
    if not tiny and progress.left() < MIN_ITEM_S[part]:
      print(f"[{part}] {item}: not started, {progress.left():.0f} s of the budget left", flush=True)
      return 0
    progress.stage(item, "starting")
    try:
      if part == "smoke":
        result = smoke(progress, tiny, out)
      elif part == "train":
        result = train(progress, item, tiny)
      elif part == "attention":
        result = attention(progress, item, tiny)
      else:
        result = decode(progress, item, tiny, state)
    except Exception as e:  # pylint: disable=broad-except  # recorded as the item's result
      result = _error(e)
      print(f"[{part}] {item}: {result['error']}", flush=True)
    progress.done(item, result)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="One group of the GPU suite's items (bench.py "
                                   "--suite=gpu starts it).")
  parser.add_argument("--part", choices=PARTS, required=True)
  parser.add_argument("--items", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--deadline", type=float, required=True)
  parser.add_argument("--tiny", action="store_true")
  args = parser.parse_args(argv)
  return child(args.part, args.items.split(","), args.out, args.deadline, args.tiny)


if __name__ == "__main__":
  sys.exit(main())
