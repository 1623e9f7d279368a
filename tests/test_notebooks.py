"""The Colab notebooks (colab/*.ipynb): each is committed clean (valid nbformat 4, no outputs,
what colab/make_notebooks.py writes) with its badge, IN_COLAB guard and parameters cell; and each
runs top to bottom in a fresh Jupyter kernel, offline, on the CPU, with its parameters cell
overridden to a tiny model and a few steps (as papermill would inject them). A failing cell fails
the test with the cell and its traceback, and each notebook must show what it promises.
"""

import ast
import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
sys.path.insert(0, COLAB)
import make_notebooks  # pylint: disable=g-import-not-at-top,wrong-import-position

NAMES = sorted(make_notebooks.NOTEBOOKS)

# The tiny model and data of tests/conftest.py's tiny_sft_config.
TINY = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
        "model.mlp_dim": 128, "data.seq_len": 128, "data.batch_size": 8,
        "data.synthetic.n_entities": 60, "data.tokenizer.vocab_size": 600,
        "train.warmup_steps": 2, "train.lr": 1e-2}
TINY_EVAL = {"eval.knowledge_people": 1, "eval.max_examples": 4, "eval.max_batches": 2,
             "eval.max_new_tokens": 12, "eval.rep_prefix": 8, "eval.rep_continuation": 12,
             "eval.batch_size": 8}
# RUNS_DIR is added per test (a fresh temporary folder).
PARAMETERS = {
    "01_quickstart": dict(STEPS=30, OVERRIDES=TINY, MAX_NEW_TOKENS=16, EVAL_OVERRIDES=TINY_EVAL),
    "02_pretrain_then_finetune": dict(PRETRAIN_STEPS=30, SFT_STEPS=20, OVERRIDES=TINY,
                                      EVAL_OVERRIDES=TINY_EVAL, TENSORBOARD=False),
    "03_finetune_a_hf_model": dict(STEPS=10, MAX_NEW_TOKENS=12, OVERRIDES={
        "data.seq_len": 128, "data.synthetic.n_entities": 30, "train.eval_batches": 1}),
    "04_tpu_and_gpu": dict(STEPS=6, OVERRIDES={
        **TINY, "data.seq_len": 64, "data.synthetic.n_entities": 30, "train.log_every": 2}),
}
# What each run must show: text of its outputs (stream, Markdown, plain) and at least N images.
SHOWS = {
    "01_quickstart": (["chars/token", "«", "step 30/30", "assistant: ", "(reference: ",
                       "**Repetition**", "**Knowledge**", "| step 30 |", "Fixed prompts"], 4),
    "02_pretrain_then_finetune": (["step 30/30", "step 20/20", "Starting from the parameters",
                                   "| pretrain + SFT |", "| SFT only |",
                                   "knowledge.qa_heldout.contains", "tensorboard --logdir",
                                   "| question | reference |"], 3),
    "03_finetune_a_hf_model": (["a tiny random Qwen2 instead", "imported", "LoRA rank 8",
                                "held-out loss:", "model.safetensors",
                                "adapter_model.safetensors", "transformers:", "llm_jax:",
                                # the export in transformers answers as llm_jax did (float32)
                                "same greedy tokens ("], 0),
    "04_tpu_and_gpu": (["8 virtual CPU devices", "mesh: {'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 2}",
                        "| `embed` | fsdp |", "PartitionSpec", "per device", "tokens/s, MFU",
                        "attention: xla", "compute bfloat16, parameters float32"], 0),
}


def _read(name):
  return nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=nbformat.NO_CONVERT)


def _parameters_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"{len(cells)} cells tagged 'parameters'; want one"
  return cells[0]


def test_every_notebook_is_covered():
  on_disk = sorted(f[:-len(".ipynb")] for f in os.listdir(COLAB) if f.endswith(".ipynb"))
  assert on_disk == NAMES == sorted(PARAMETERS) == sorted(SHOWS)


def test_notebooks_are_what_the_generator_writes():
  assert make_notebooks.main(["make_notebooks.py", "--check"]) == 0, (
      "colab/*.ipynb differ from their sources, colab/src/*.py: edit those and run "
      "python colab/make_notebooks.py")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_clean_valid_and_opens_in_colab(name):
  nb = _read(name)
  assert nb.nbformat == 4
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.id} has outputs"
  first = nb.cells[0]
  url = f"https://colab.research.google.com/github/{make_notebooks.GITHUB_REPO}/blob/main/colab/{name}.ipynb"
  assert first.cell_type == "markdown" and f"]({url})" in first.source
  assert "colab-badge.svg" in first.source
  setup = nb.cells[1].source
  assert "IN_COLAB = True" in setup and "\nif IN_COLAB:\n" in setup and "pip" in setup
  # Installing and cloning happen only under the guard.
  guarded = setup.split("\nif IN_COLAB:\n", 1)[1].split("\nelse:\n", 1)[0]
  assert "git" in guarded and "pip" in guarded
  # papermill-style parameters: plain assignments, and every name CI overrides is one of them.
  params = ast.parse(_parameters_cell(nb).source)
  assigned = {t.id for s in params.body for t in s.targets}
  assert all(isinstance(s, ast.Assign) for s in params.body)
  assert {"RUNS_DIR", "MOUNT_DRIVE", *PARAMETERS[name]} <= assigned
  # Notebooks call the library; no cell runs its own training step.
  for cell in nb.cells:
    assert "train_step(" not in cell.source and "value_and_grad" not in cell.source


def _kernel_manager(tmp_path):
  """A kernel of this very interpreter (whatever `python3` kernel spec the machine has, if any)."""
  from jupyter_client.kernelspec import KernelSpecManager  # pylint: disable=g-import-not-at-top
  from jupyter_client.manager import KernelManager  # pylint: disable=g-import-not-at-top
  spec_dir = tmp_path / "kernels" / "llm_jax_tests"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "llm_jax tests", "language": "python"}))
  ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return KernelManager(kernel_name="llm_jax_tests", kernel_spec_manager=ksm)


def _inject(nb, params: dict):
  """A cell right after the parameters cell that sets `params`, as papermill does."""
  at = nb.cells.index(_parameters_cell(nb)) + 1
  cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
  cell.metadata["tags"] = ["injected-parameters"]
  cell.id = "injected-parameters"
  nb.cells.insert(at, cell)


def _output_text(nb) -> tuple[str, int]:
  texts, images = [], 0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        texts.append(out.text)
      elif out.output_type in ("display_data", "execute_result"):
        data = out.get("data", {})
        images += "image/png" in data
        texts += [data[k] for k in ("text/markdown", "text/plain") if k in data]
  return "\n".join(texts), images


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom_offline_on_cpu(name, tmp_path, monkeypatch):
  for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    monkeypatch.setenv(var, "1")  # nothing may be downloaded
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device (04 asks for its own 8)
  monkeypatch.delenv("LLM_JAX_REPO", raising=False)  # found from the notebook's own folder
  nb = _read(name)
  _inject(nb, {**PARAMETERS[name], "RUNS_DIR": str(tmp_path / "runs")})
  before = sorted(os.listdir(COLAB))
  # Like Jupyter opening it: the kernel starts in the notebook's folder.
  client = nbclient.NotebookClient(nb, timeout=600, km=_kernel_manager(tmp_path),
                                   resources={"metadata": {"path": COLAB}})
  try:
    client.execute()  # raises CellExecutionError (cell source + traceback) on a failing cell
  finally:
    nbformat.write(nb, str(tmp_path / f"{name}.executed.ipynb"))  # for reading after a failure
  assert sorted(os.listdir(COLAB)) == before, "the notebook wrote into colab/"
  text, images = _output_text(nb)
  wanted, min_images = SHOWS[name]
  missing = [w for w in wanted if w not in text]
  assert not missing, f"{name} did not show {missing}; see {tmp_path}/{name}.executed.ipynb"
  assert images >= min_images, f"{name} showed {images} images, want >= {min_images}"
  assert "Traceback" not in text and "(0 tokens)" not in text
