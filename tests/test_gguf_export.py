"""GGUF export, proven by gguf's own reader and by llama.cpp itself (llama-cpp-python).

The llama.cpp side is the independent implementation: its tokenizer, its forward pass and its
greedy sampler are compared with llm_jax's tokenizer, decoder and KV-cache generator. Models: the
session's trained tiny SFT run (conftest.trained_sft_run, a tied Llama shape) and randomly
initialised Llama (untied, q/k permuted), Qwen2 (q/k/v bias) and Qwen3 (q/k norm) shapes with a
SentencePiece tokenizer trained on the embedded encyclopedia.
"""

import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from configs import base  # pylint: disable=g-import-not-at-top
from llm_jax import rundir
from llm_jax.convert import gguf_export, gguf_quality, gguf_vocab, hf_weights
from llm_jax.data import builtin
from llm_jax.data.chat_template import CHAT_TEMPLATE, encode_chat, render_chat_text
from llm_jax.data.tokenizer import train_sentencepiece
from llm_jax.model.config import ModelConfig
from tests.model_reference import random_params

FAMILIES = ("llama", "qwen2", "qwen3")


def _synthetic():
  c = base.get_config().data.synthetic
  c.n_entities = 60
  return c


@pytest.fixture(scope="module")
def data():
  return builtin.bios.generate(_synthetic())


@pytest.fixture(scope="module")
def sp_tok(data):
  return train_sentencepiece([r["text"] for r in data["bios"]], vocab_size=600)


def heldout_texts(data, n=50) -> list[str]:
  """Held-out Chinese and English biographies plus odd spacing, digits, emoji and <think>."""
  texts = [r["text"] for r in data["bios_eval"][:n - 6]]
  texts += ["  two leading spaces, trailing  ", "tabs\tand\nnew\n\nlines", "数字 2024年12月7日 3.14159",
            "emoji 🙂🚀 and rare 龘 characters", "<think>推理 reasoning</think> answer",
            "text with <|im_start|> typed by a user"]
  return texts


def _make_run(root, tok, family: str, seed: int = 0) -> str:
  config = base.get_config()
  config.model.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, mlp_dim=96,
                      vocab_size=tok.vocab_size, rope_theta=1e6, rms_eps=1e-5,
                      tie_embeddings=family != "llama", qkv_bias=family == "qwen2",
                      qk_norm=family == "qwen3")
  config.data.seq_len = 256
  cfg = ModelConfig.from_config(config.model)
  params = random_params(cfg, seed=seed, std=0.1)
  # Norm scales around 1 and every tensor random (biases too), so each one matters.
  params = _map_scales(params)
  workdir = os.path.join(root, f"run_{family}")
  rundir.save_params(workdir, params, config)
  tok.save(workdir)
  return workdir


def _map_scales(tree):
  if isinstance(tree, dict):
    return {k: (v + 1.0 if k == "scale" else _map_scales(v)) for k, v in tree.items()}
  return tree


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sp_tok):
  root = str(tmp_path_factory.mktemp("gguf_runs"))
  return {f: _make_run(root, sp_tok, f, seed=k) for k, f in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, runs):
  """F32 exports of the three random runs, each in its own directory (with its Modelfile)."""
  root = tmp_path_factory.mktemp("gguf_out")
  out = {}
  for family, workdir in runs.items():
    os.makedirs(root / family)
    out[family] = gguf_export.export_gguf(workdir, str(root / family / "model.gguf"), "f32").path
  return out


def _reader_tensors(path):
  reader = gguf.GGUFReader(path)
  return reader, {t.name: t for t in reader.tensors}


def _field(reader, key):
  f = reader.fields[key]
  if f.types[0] == gguf.GGUFValueType.ARRAY:
    return [f.contents(i) for i in range(len(f.data))] if len(f.data) < 5 else f.contents()
  return f.contents()


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_export_reads_back_bit_exact(runs, exports, family):
  """Every tensor of the run, read back by gguf.GGUFReader, equals the run's weight bit for bit
  (Hugging Face layout; q/k rows un-permuted for llama), and nothing else is in the file."""
  params, config = rundir.load_params(runs[family])
  cfg = ModelConfig.from_config(config.model)
  reader, tensors = _reader_tensors(exports[family])
  names = gguf.get_tensor_name_map({"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
                                    "qwen3": gguf.MODEL_ARCH.QWEN3}[family], cfg.n_layers)
  seen = set()
  for hf_name, _, want in hf_weights.iter_hf_tensors(cfg, params):
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    t = tensors[name]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
    got = np.asarray(t.data).reshape(want.shape)
    if family == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
      heads = cfg.n_heads if "attn_q" in name else cfg.n_kv_heads
      got = gguf_export.unpermute_qk(got, heads)
      # The permutation really moves rows (else a wrong RoPE layout would pass unnoticed).
      assert not np.array_equal(np.asarray(t.data).reshape(want.shape), want)
    np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
    seen.add(name)
  assert seen == set(tensors)
  assert ("output.weight" in tensors) == (family == "llama")  # tied heads are written once
  assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == family
  assert reader.fields["tokenizer.ggml.add_space_prefix"].parts[-1][0] == 0
  assert reader.fields["tokenizer.ggml.add_bos_token"].parts[-1][0] == 0
  assert bytes(reader.fields["tokenizer.chat_template"].parts[-1]).decode() == CHAT_TEMPLATE
  assert reader.fields[f"{family}.context_length"].parts[-1][0] == 256


def test_permutation_is_llama_cpp_s():
  """permute_qk is llama.cpp's convert_hf_to_gguf permute: within each head, row i (< d/2) goes to
  2i and row i + d/2 to 2i + 1, so rotate-half pairs become adjacent pairs."""
  heads, hd = 2, 6
  w = np.arange(heads * hd, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  p = gguf_export.permute_qk(w, heads)
  for h in range(heads):
    for i in range(hd // 2):
      assert p[h * hd + 2 * i, 0] == h * hd + i
      assert p[h * hd + 2 * i + 1, 0] == h * hd + i + hd // 2
  np.testing.assert_array_equal(gguf_export.unpermute_qk(p, heads), w)


def test_modelfile_renders_our_chatml(exports, runs):
  """The Go template, filled as Ollama fills it, is our ChatML with the generation prompt."""
  text = open(os.path.join(os.path.dirname(exports["qwen3"]), gguf_export.MODELFILE)).read()
  assert text.startswith("FROM ./model.gguf\n")
  assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
  assert "PARAMETER num_ctx 256" in text
  template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
  msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "李 Q"}]
  # Ollama's Go template: `{{- range .Messages }}...{{ end }}` over the messages.
  head, rest = template.split("{{- range .Messages }}", 1)
  body, tail = rest.split("{{ end }}", 1)
  rendered = head + "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
                            for m in msgs) + tail
  assert rendered == render_chat_text(msgs) + "<|im_start|>assistant\n"


def _moe_run(root, tok):
  config = base.get_config()
  config.model.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=64,
                      vocab_size=tok.vocab_size, qk_norm=True)
  config.model.moe.update(n_experts=4, top_k=2, expert_mlp_dim=32)
  workdir = os.path.join(root, "moe")
  rundir.write_config(workdir, config)  # refused from config.json alone: no weights needed
  tok.save(workdir)
  return workdir


def test_refusals_write_nothing(tmp_path, runs, sp_tok, data):
  """Unsupported runs are refused with one line naming the reason, before anything is written:
  --out keeps its old contents and no temporary file is left."""
  out = tmp_path / "out" / "model.gguf"
  os.makedirs(out.parent)
  out.write_bytes(b"old")

  def refused(workdir, match, out_type="f16"):
    with pytest.raises(gguf_vocab.Unsupported, match=match) as e:
      gguf_export.export_gguf(workdir, str(out), out_type)
    assert "\n" not in str(e.value) and str(e.value).startswith("GGUF export refused")
    assert out.read_bytes() == b"old" and sorted(os.listdir(out.parent)) == ["model.gguf"]

  refused(_moe_run(str(tmp_path), sp_tok), "mixture-of-experts")
  english = [f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(200)]
  uni = train_sentencepiece(english, vocab_size=320, model_type="unigram")
  wd = str(tmp_path / "unigram")
  config = rundir.read_config(runs["qwen3"])
  rundir.write_config(wd, config)
  uni.save(wd)
  refused(wd, "unigram")
  refused(runs["qwen3"], "--type", out_type="q5_k")
  yarn = str(tmp_path / "yarn")
  config = rundir.read_config(runs["qwen3"])
  config.model.rope_scaling.update(type="yarn", factor=4.0, original_max_position_embeddings=64)
  rundir.write_config(yarn, config)
  sp_tok.save(yarn)
  refused(yarn, "rope_scaling")


def test_failed_write_leaves_nothing(tmp_path, runs, monkeypatch):
  """A failure while the tensors are written (disk full, ...) removes the temporary file."""
  out = tmp_path / "model.gguf"

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(gguf_export, "_encode", boom)
  with pytest.raises(OSError, match="disk full"):
    gguf_export.export_gguf(runs["llama"], str(out), "q8_0")
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python, built from its source distribution; tests/requirements.txt)


@pytest.fixture(scope="module")
def llama_cpp():
  return pytest.importorskip("llama_cpp")
