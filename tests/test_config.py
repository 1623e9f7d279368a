"""Configs: every field documented, presets valid, bad overrides refused naming the field."""

import ast
import glob
import os
import subprocess
import sys

import pytest

from configs import base, eval as eval_config, models, pretrain, sft
from llm_jax import config_check
from llm_jax.model.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  return subprocess.run([sys.executable, "-m", "llm_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_field_has_a_comment(path):
  src = open(path).read().splitlines()
  for node in ast.walk(ast.parse("\n".join(src))):
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
      if isinstance(node.value, ast.Call) and ast.unparse(node.value.func).endswith("ConfigDict"):
        continue  # a section header, not a field
      line = src[node.end_lineno - 1]
      # Job files only re-point documented base fields; base/data/models define them.
      if os.path.basename(path) in ("base.py", "data.py", "models.py"):
        assert "#" in line, f"{os.path.basename(path)}:{node.lineno} has no comment: {line.strip()}"


@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_presets_are_valid_models(name):
  cfg = ModelConfig.from_config(models.get(name), vocab_size=6400)
  assert cfg.n_heads % cfg.n_kv_heads == 0


def test_model_defaults_have_one_source():
  """configs/models.py writes every default out (with its comment) for users to read; each equals
  the ModelConfig dataclass's, which fills fields a config.json lacks (older runs), so a run reads
  back the same model whichever source a field came from."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from llm_jax.model.config import MoEConfig, RopeScaling  # pylint: disable=g-import-not-at-top
  preset = models._model()  # pylint: disable=protected-access (the values every preset starts from)
  for cls, section in ((ModelConfig, preset), (MoEConfig, preset.moe),
                       (RopeScaling, preset.rope_scaling)):
    for f in dataclasses.fields(cls):
      if f.default is dataclasses.MISSING or f.name == "lora":
        continue  # shape fields every preset sets; LoRA comes from config.lora
      default = f.default if not dataclasses.is_dataclass(f.default) else None
      if default is not None:
        assert section[f.name] == default, (cls.__name__, f.name, section[f.name], default)
  assert set(preset) - {f.name for f in dataclasses.fields(ModelConfig)} == set()


def test_preset_from_the_config_argument():
  # `--config=configs/sft.py:minimind-26m` calls get_config("minimind-26m").
  assert sft.get_config("minimind-26m").model.dim == 512
  assert pretrain.get_config().model.dim == models.get("tiny").dim
  with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
    sft.get_config("gpt5")


def test_minimind_preset_shape():
  m = models.get("minimind-26m")
  assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.tie_embeddings) == (512, 8, 8, 2, True)


@pytest.mark.parametrize("module", [sft, pretrain, eval_config])
def test_job_configs_validate(module):
  config_check.validate(module.get_config())


@pytest.mark.parametrize("field,value,message", [
    ("train.grad_accum", 3, "config.train.grad_accum=3: must divide config.data.batch_size=16"),
    ("train.schedule", "cosin", "config.train.schedule='cosin'"),
    ("train.lr", -1.0, "config.train.lr=-1.0: must be > 0"),
    ("mesh.tensor", 0, "config.mesh.tensor=0"),
])
def test_invalid_values_name_the_field(field, value, message):
  c = base.get_config()
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_check.validate(c)


def test_invalid_model_value_names_the_field():
  m = models.get("tiny")
  m.n_kv_heads = 3
  with pytest.raises(ValueError, match=r"config.model.n_kv_heads=3: must divide n_heads=4"):
    ModelConfig.from_config(m, vocab_size=100)


def test_cli_unknown_override_names_it(tmp_path):
  out = _main("--config=configs/sft.py", f"--workdir={tmp_path}", "--config.train.stepz=3")
  assert out.returncode == 2
  assert "--config.train.stepz names no field" in out.stderr and '"steps"' in out.stderr


def test_cli_invalid_value_names_it(tmp_path):
  out = _main("--config=configs/sft.py", f"--workdir={tmp_path}", "--config.train.steps=abc")
  assert out.returncode == 2 and "--config.train.steps=abc" in out.stderr
  out = _main("--config=configs/sft.py", f"--workdir={tmp_path}", "--config.train.schedule=cosin")
  assert out.returncode != 0 and "config.train.schedule='cosin'" in out.stderr
