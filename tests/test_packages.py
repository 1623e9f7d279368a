"""A missing package ends a command in one line naming it and the pip command, not a traceback;
llm_jax/packages.py's pins are requirements.txt's."""

import os
import re
import subprocess
import sys

import pytest

from llm_jax import packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDE = os.path.join(ROOT, "tests", "hide_packages")  # its sitecustomize hides $HIDE_PACKAGES


def _requirements(path: str) -> dict[str, str]:
  pins = {}
  for line in open(os.path.join(ROOT, path), encoding="utf-8"):
    line = line.split("#")[0].strip()
    if line:
      name, version = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)", line).groups()
      pins[re.sub(r"\[.*\]", "", name).lower()] = version
  return pins


def test_pins_are_those_of_requirements_txt():
  runtime = _requirements("requirements.txt")
  tests_only = _requirements("tests/requirements.txt")
  listed = {dist.lower(): version for dist, version in packages.REQUIRED.values()}
  listed.update({dist.lower(): version for dist, version, _ in packages.OPTIONAL.values()})
  for dist, version in runtime.items():
    assert listed.get(dist) == version, f"requirements.txt pins {dist}=={version}; packages.py: {listed.get(dist)}"
  for dist, version in listed.items():
    assert runtime.get(dist, tests_only.get(dist)) == version, f"packages.py pins {dist}=={version}"
  # TensorFlow is no runtime requirement (train/writers.py writes TensorBoard events without it).
  assert "tensorflow-cpu" not in runtime and "tensorflow" not in runtime
  assert "tensorflow-datasets" not in runtime  # only `tfds:` sources need it: packages.require


def _command(args, hide, timeout=120):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([HIDE, ROOT]), HIDE_PACKAGES=hide,
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def test_missing_required_packages_are_named_in_one_line(tmp_path):
  out = _command(["llm_jax.main", "--config=configs/sft.py", f"--workdir={tmp_path}"], "grain,clu")
  assert out.returncode == 1
  assert out.stderr == ("error: llm_jax needs grain, clu, which are not installed here: pip install "
                        "grain==0.2.18 clu==0.0.12 (or pip install -r requirements.txt)\n")
  assert not os.listdir(tmp_path)  # nothing started


def test_a_missing_dependency_is_named_in_one_line(tmp_path):
  """ml-collections installed without its dependency PyYAML: the import fails inside main.py's own
  imports, and the command still ends in one line."""
  out = _command(["llm_jax.main", "--config=configs/sft.py", f"--workdir={tmp_path}"], "yaml")
  assert out.returncode == 1
  assert out.stderr == "error: PyYAML (imported as yaml) is not installed here: pip install PyYAML\n"


def test_an_optional_package_is_asked_for_where_its_feature_starts():
  """`tfds:` sources need tensorflow-datasets (and no TensorFlow); without it, one line."""
  out = _command(["llm_jax.data.inspect", "--config=configs/sft.py",
                  "--config.data.train=tfds:mnist:train", "--n=1"], "tensorflow_datasets")
  assert out.returncode == 1, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == (
      "error: tensorflow-datasets (for tfds: data sources) is not installed here: pip install "
      "tensorflow-datasets==4.9.10")
  assert "Traceback" not in out.stderr


def test_one_line_names_only_packages_it_knows():
  assert packages.one_line(ModuleNotFoundError("x", name="grain.python")).startswith(
      "llm_jax needs grain, which is not installed here: pip install grain==0.2.18")
  assert packages.one_line(ModuleNotFoundError("x", name="fastapi")) == (
      "fastapi (for the server, llm_jax.serve) is not installed here: pip install fastapi==0.165.0")
  assert packages.one_line(ModuleNotFoundError("x", name="my_own_module")) is None
  assert packages.one_line(ValueError("x")) is None
  with pytest.raises(packages.MissingPackage, match="pip install tensorflow-datasets==4.9.10"):
    packages.OPTIONAL["no_such_module_here"] = ("tensorflow-datasets", "4.9.10", "tfds: data sources")
    try:
      packages.require("no_such_module_here")
    finally:
      del packages.OPTIONAL["no_such_module_here"]
