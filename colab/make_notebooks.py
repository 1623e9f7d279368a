"""Writes the notebooks of colab/ from their sources in colab/src/, so their JSON stays clean (no
outputs, no execution counts, stable cell ids) and the cells they share stay identical.

  python colab/make_notebooks.py          # rewrite colab/*.ipynb
  python colab/make_notebooks.py --check  # exit 1 if a committed notebook differs from its source

To change notebook <name>, edit colab/src/<name>.py (not the .ipynb in Jupyter), then run this
script; tests/test_notebooks.py checks that the committed notebooks are what it writes, and runs
each of them top to bottom. A source is plain text in jupytext's "percent" form, read by
read_source below (jupytext is not needed):

  # %%                       a code cell: the lines up to the next `# %%` line, as they are
  # %% tags=["parameters"]   a code cell with tags (a JSON list)
  # %% [markdown]            a markdown cell, every line commented: `# text`, or `#` when blank
  # %% include: SETUP        a cell every notebook shares, written once below (SHARED)

Blank lines around a cell's text are dropped. In markdown cells {BADGE} becomes the notebook's
"Open in Colab" badge and {RESUME_NOTE} the sentence below. Lines before the first `# %%` are a
comment, except `# accelerator: GPU`, which sets the notebook's Colab accelerator. Sources are not
runnable Python: IPython magics (`%load_ext`) stay as they are in the notebook.
"""

import glob
import json
import os
import sys
import textwrap

import nbformat
from nbformat import v4

# Where the "Open in Colab" badges and the Colab setup cell fetch the project from.
GITHUB_REPO = "llm-jax/llm_jax"
BRANCH = "main"
HERE = os.path.dirname(os.path.abspath(__file__))


def badge(name: str) -> str:
  url = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/{BRANCH}/colab/{name}.ipynb"
  return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def md(text: str):
  return v4.new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str):
  return v4.new_code_cell(textwrap.dedent(text).strip("\n"))


# ---------------------------------------------------------------------------------------------
# Cells every notebook shares

SETUP = code(f'''
    # Setup. In Colab: fetch llm_jax and install its pinned requirements (a few minutes, once per
    # session), with JAX for the runtime's GPU or TPU. Anywhere else (Jupyter on your machine, CI)
    # it uses the checkout this notebook sits in and installs nothing.
    import glob
    import os
    import re
    import shutil
    import subprocess
    import sys

    try:
      import google.colab  # noqa: F401  (importable only inside Colab)
      IN_COLAB = True
    except ImportError:
      IN_COLAB = False

    if IN_COLAB:
      REPO = "/content/llm_jax"
      if not os.path.isdir(REPO):
        subprocess.run(["git", "clone", "--depth=1", "https://github.com/{GITHUB_REPO}", REPO],
                       check=True)
      if not os.path.exists(f"{{REPO}}/.colab_installed"):
        pip = [sys.executable, "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["-r", f"{{REPO}}/requirements.txt"], check=True)
        jax_version = re.search(r"^jax==(\\S+)", open(f"{{REPO}}/requirements.txt").read(), re.M)[1]
        if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):  # a TPU runtime
          subprocess.run(pip + [f"jax[tpu]=={{jax_version}}"], check=True)
        elif shutil.which("nvidia-smi"):  # a GPU runtime
          subprocess.run(pip + [f"jax[cuda12]=={{jax_version}}"], check=True)
        open(f"{{REPO}}/.colab_installed", "w").close()
        print("Installed. If Colab asks to restart the session, restart and run all cells again "
              "(this cell then skips the install).")
    else:
      # The checkout holding this notebook: the first folder upwards that contains llm_jax/.
      REPO = os.environ.get("LLM_JAX_REPO") or os.getcwd()
      while not os.path.isfile(os.path.join(REPO, "llm_jax", "__init__.py")):
        if os.path.dirname(REPO) == REPO:
          raise RuntimeError("llm_jax not found: open this notebook from the colab/ folder of an "
                             "llm_jax checkout, or set LLM_JAX_REPO to the checkout")
        REPO = os.path.dirname(REPO)
    if REPO not in sys.path:
      sys.path.insert(0, REPO)  # llm_jax and configs/ are imported from the checkout
    print("llm_jax from", REPO, "| in Colab" if IN_COLAB else "| not in Colab: nothing installed")
''')

PARAMS_NOTE = md('''
    ## Parameters

    Change these and run the notebook again. (CI runs every notebook with this cell overridden to
    a tiny model and a few steps, the way papermill injects parameters.)
''')

RUNS = code('''
    # Where the run directories go. MOUNT_DRIVE keeps them in Google Drive, so they outlive the
    # Colab session: a later session resumes each run from its last checkpoint.
    if MOUNT_DRIVE and IN_COLAB:
      from google.colab import drive
      drive.mount("/content/drive")
      RUNS_DIR = os.path.join("/content/drive/MyDrive", RUNS_DIR)
    elif MOUNT_DRIVE:
      print("MOUNT_DRIVE works in Colab only; the runs stay in", RUNS_DIR)
    RUNS_DIR = os.path.abspath(RUNS_DIR)
    os.makedirs(RUNS_DIR, exist_ok=True)

    from IPython.display import Image, Markdown, display
    from llm_jax import notebook
    notebook.show_logs()  # llm_jax's progress lines in the cell output; other libraries' warnings only
    print("runs go to", RUNS_DIR)
''')

RESUME_NOTE = ("Running the notebook again resumes each run from its last checkpoint (with "
               "nothing left to train it goes straight on); delete its folder, or change "
               "`RUNS_DIR`, to start over.")

SHARED = {"SETUP": SETUP, "PARAMS_NOTE": PARAMS_NOTE, "RUNS": RUNS}

# The notebooks, by name: one source each in colab/src/, written to colab/<name>.ipynb.
NOTEBOOKS = {os.path.basename(p)[:-len(".py")]: p
             for p in sorted(glob.glob(os.path.join(HERE, "src", "*.py")))}


def read_source(name: str) -> tuple[list, dict]:
  """The cells of colab/src/<name>.py (in the form the module docstring describes), and the
  notebook metadata its first lines set."""
  path = NOTEBOOKS[name]
  chunks = [["preamble"]]  # each: the `# %%` line's rest, then the lines up to the next one
  for line in open(path, encoding="utf-8").read().split("\n"):
    if line == "# %%" or line.startswith("# %% "):
      chunks.append([line[len("# %%"):].strip()])
    else:
      chunks[-1].append(line)
  metadata = {"accelerator": line[len("# accelerator: "):] for line in chunks[0]
              if line.startswith("# accelerator: ")}
  cells = []
  for kind, *lines in chunks[1:]:
    where = f"{path}: `# %% {kind}`"
    if kind.startswith("include:"):
      shared = kind[len("include:"):].strip()
      if shared not in SHARED or "".join(lines).strip():
        raise ValueError(f"{where}: includes one of {', '.join(SHARED)}, with no lines of its own")
      cells.append(SHARED[shared])
    elif kind == "[markdown]":
      if any(line and line != "#" and not line.startswith("# ") for line in lines):
        raise ValueError(f"{where}: every markdown line starts with `# ` (or is `#`)")
      text = "\n".join(line[2:] for line in lines)
      for key, value in (("BADGE", badge(name)), ("RESUME_NOTE", RESUME_NOTE)):
        text = text.replace("{" + key + "}", value)
      cells.append(v4.new_markdown_cell(text.strip("\n")))
    elif kind == "" or kind.startswith("tags="):
      cells.append(v4.new_code_cell("\n".join(lines).strip("\n")))
      if kind:
        cells[-1].metadata["tags"] = json.loads(kind[len("tags="):])
    else:
      raise ValueError(f"{where}: not a cell marker this script reads")
  return cells, metadata


def build(name: str) -> nbformat.NotebookNode:
  cells, metadata = read_source(name)
  nb = v4.new_notebook()
  nb.cells = [nbformat.from_dict(c) for c in cells]  # copies: the shared cells get their own ids
  for i, cell in enumerate(nb.cells):
    cell.id = f"{name[:2]}-{i:02d}"  # stable ids: regenerating changes nothing
  nb.metadata = {
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "colab": {"provenance": [], "toc_visible": True},
      **metadata,
  }
  nbformat.validate(nb)
  return nb


def text(name: str) -> str:
  return nbformat.writes(build(name)) + "\n"


def main(argv) -> int:
  check = "--check" in argv[1:]
  stale = []
  for name in NOTEBOOKS:
    path = os.path.join(HERE, f"{name}.ipynb")
    want = text(name)
    have = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    if have != want:
      stale.append(path)
      if not check:
        with open(path, "w", encoding="utf-8") as f:
          f.write(want)
  verb = "differs from its colab/src/ source (run colab/make_notebooks.py)" if check else "written"
  for path in stale:
    print(f"{path}: {verb}")
  return 1 if check and stale else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
