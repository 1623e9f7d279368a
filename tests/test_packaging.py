"""The package metadata (pyproject.toml): `pip install -e .` installs llm_jax with every subpackage
and the files it reads, its requirements are requirements.txt itself, and the commands run from
any directory (issue 24: `python -m llm_jax.chat` outside the checkout said `No module named
llm_jax.chat`)."""

import fnmatch
import os
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement  # pytest's own dependency

from llm_jax import console
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def pyproject():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _requirements(path):
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    lines = [line.split("#")[0].strip() for line in f]
  return [line for line in lines if line]


def test_requirements_are_requirements_txt_itself(pyproject):
  project, dynamic = pyproject["project"], pyproject["tool"]["setuptools"]["dynamic"]
  assert project["requires-python"] == ">=3.11"
  assert "dependencies" in project["dynamic"] and "dependencies" not in project
  assert dynamic["dependencies"] == {"file": ["requirements.txt"]}
  assert dynamic["optional-dependencies"]["test"] == {"file": ["tests/requirements.txt"]}
  # setuptools reads those files as bare requirement lines (no -r, no --options): each must parse,
  # and each runtime one is pinned (the reproducible install the README promises)
  for path in ("requirements.txt", "tests/requirements.txt"):
    for line in _requirements(path):
      req = Requirement(line)
      assert str(req.specifier).startswith("=="), f"{path}: {line} is not pinned"
  names = [Requirement(r).name for r in _requirements("requirements.txt")]
  assert "jax" in names and "tensorflow" not in names and "tensorflow-cpu" not in names


def test_every_subpackage_and_data_file_is_in_the_package(pyproject):
  setup = pyproject["tool"]["setuptools"]
  include = setup["packages"]["find"]["include"]
  package_data = setup["package-data"]
  tracked = subprocess.run(["git", "ls-files", "llm_jax"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
  for path in tracked:
    directory = os.path.dirname(path)
    if path.endswith(".py"):  # a module: its directory is a package the find includes
      assert os.path.exists(os.path.join(ROOT, directory, "__init__.py")), path
      package = directory.replace("/", ".")
      assert any(fnmatch.fnmatchcase(package, pattern) for pattern in include), package
      continue
    # a data file: some package's package-data globs reach it
    assert any(path.startswith(pkg.replace(".", "/") + "/") and any(
        fnmatch.fnmatchcase(path[len(pkg) + 1:], g) for g in globs)
               for pkg, globs in package_data.items()), f"{path} is not in package-data"
  assert not any(fnmatch.fnmatchcase(p, pattern) for p in ("configs", "tests", "colab")
                 for pattern in include)


def test_config_files_import_their_siblings_from_any_directory(tmp_path):
  """configs/sft.py does `from configs import base`: named by path from elsewhere, the directory
  above configs/ goes on sys.path; a file outside a package, or none, adds nothing."""
  sft = os.path.join(ROOT, "configs", "sft.py")
  assert console.config_package_roots(["x", f"--config={sft}:minimind-26m"]) == [ROOT]
  assert console.config_package_roots(["x", "--config", sft, "--workdir=w"]) == [ROOT]
  (tmp_path / "mine.py").write_text("def get_config(): pass\n")
  assert console.config_package_roots(["x", f"--config={tmp_path / 'mine.py'}"]) == []
  assert console.config_package_roots(["x", "--config=nowhere/x.py", "--workdir=w"]) == []


@pytest.mark.slow
def test_installed_commands_run_outside_the_checkout(tmp_path):
  """`pip install -e . --no-deps` into a fresh venv that sees this environment's packages, then
  the commands from a directory that is not the checkout."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
  py = str(venv / "bin" / "python")
  subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", ROOT],
                 check=True, cwd=tmp_path, timeout=600)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  chat = subprocess.run([py, "-m", "llm_jax.chat", "--help"], cwd=elsewhere, env=env,
                        capture_output=True, text=True, timeout=300)
  assert "No module named" not in chat.stderr and "--prompts" in chat.stdout, chat.stderr
  # a config named by path loads (it imports configs.base); the bad value is then the one error
  main = subprocess.run([py, "-m", "llm_jax.main", f"--config={ROOT}/configs/sft.py",
                         "--workdir=runs/x", "--config.train.steps=abc"], cwd=elsewhere, env=env,
                        capture_output=True, text=True, timeout=300)
  assert main.returncode == 2 and main.stderr.startswith("error: flag --config.train.steps=abc"), \
      main.stderr
  assert not os.listdir(elsewhere)
