"""GGUF export, proven by gguf's own reader and by llama.cpp itself (llama-cpp-python).

The llama.cpp side is the independent implementation: its tokenizer, its forward pass and its
greedy sampler are compared with llm_jax's tokenizer, decoder and KV-cache generator. Models: the
session's trained tiny SFT run (conftest.trained_sft_run, a tied Llama shape) and randomly
initialised Llama (untied, q/k permuted), Qwen2 (q/k/v bias) and Qwen3 (q/k norm) shapes with a
SentencePiece tokenizer trained on the embedded encyclopedia.
"""

import os
import subprocess
import sys

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
  texts += ["  two leading spaces, trailing  ", "tabs\tand\nnew\n\nlines",
            "数字 2024年12月7日 3.14159",
            "emoji 🙂🚀 and rare 龘 characters", "<think>推理 reasoning</think> answer",
            "text with <|im_start|> typed by a user"]
  return texts


def _make_run(root, tok, family: str, seed: int = 0) -> str:
  config = base.get_config()
  # head_dim 24 (heads do not span dim) where llama.cpp's architecture allows it; Qwen2's has
  # no separate head size.
  config.model.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=16 if family == "qwen2" else 24, mlp_dim=96,
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
  rendered = head + "".join(
      body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
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
  wide = str(tmp_path / "wide_qwen2")
  config = rundir.read_config(runs["qwen2"])
  config.model.head_dim = 24
  rundir.write_config(wide, config)
  sp_tok.save(wide)
  refused(wide, "qwen2 sizes q as dim x dim")


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


def _tokenize(llm, text: str, special: bool = False) -> list[int]:
  # add_bos=True asks llama.cpp to add what the file says; the file says no BOS, as we trained.
  return llm.tokenize(text.encode("utf-8"), add_bos=True, special=special)


def _prompt_chats(records, n=10) -> list[list[dict]]:
  """The first n held-out conversations cut before their first answer."""
  out = []
  for r in records:
    msgs = r["messages"]
    k = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    out.append(msgs[:k])
    if len(out) == n:
      break
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_sft_run):
  """The trained SFT run exported in F32 and F16, its loaded run, and 10 held-out prompts."""
  root = tmp_path_factory.mktemp("gguf_trained")
  files = {t: gguf_export.export_gguf(trained_sft_run, str(root / f"model-{t}.gguf"), t).path
           for t in ("f32", "f16")}
  run = rundir.load(trained_sft_run)
  chats = _prompt_chats(builtin.records("builtin:bios_qa_heldout", run.config.data.synthetic))
  prompts = [encode_chat(run.tokenizer, m, add_generation_prompt=True)[0].tolist() for m in chats]
  return files, run, chats, prompts


def test_llama_cpp_tokenizes_like_us(llama_cpp, trained, data, runs, exports):
  """50 held-out Chinese and English texts and the ChatML-rendered chats: llama.cpp's ids are
  ours exactly, first token included (no BOS, no "▁" prefix), for the trained run's tokenizer and
  the one the random models share."""
  files, run, chats, prompts = trained
  cases = [(gguf_quality.load_llama(files["f16"], 64), run.tokenizer,
            heldout_texts(builtin.bios.generate(run.config.data.synthetic)))]
  tok = gguf_quality.load_llama(exports["llama"], 64)
  cases.append((tok, rundir.load_tokenizer(runs["llama"], rundir.read_config(runs["llama"])),
                heldout_texts(data)))
  for llm, ours, texts in cases:
    assert len(texts) == 50
    for text in texts:
      assert _tokenize(llm, text) == ours.encode(text), text
  llm = cases[0][0]
  for msgs, ids in zip(chats, prompts):
    text = render_chat_text(msgs) + "<|im_start|>assistant\n"
    assert _tokenize(llm, text, special=True) == ids, text
  # A user typing ChatML text gets ordinary pieces, as in our encode (parse_special off).
  assert run.tokenizer.im_start_id not in _tokenize(llm, "<|im_start|>user")


def _greedy_ours(run, prompts, n=32) -> tuple[list[list[int]], list[np.ndarray]]:
  """llm_jax's greedy continuation of each prompt (argmax of its decoder, the whole padded batch
  re-run per token: one compile, no cache) and, per prompt, the gap between our top two logits at
  each continued position: greedy answers can only be compared where no near-tie lets rounding
  pick the other token."""
  import jax  # pylint: disable=g-import-not-at-top
  from llm_jax.model.decoder import Decoder  # pylint: disable=g-import-not-at-top
  total = max(map(len, prompts)) + n
  apply = jax.jit(lambda p, i, q, s: Decoder(run.model_cfg).apply({"params": p}, i, q, s))
  seqs = [list(p) for p in prompts]
  positions = np.broadcast_to(np.arange(total), (len(seqs), total))

  def forward():
    ids, segments = np.zeros((len(seqs), total), np.int32), np.zeros((len(seqs), total), np.int32)
    for i, q in enumerate(seqs):
      ids[i, :len(q)], segments[i, :len(q)] = q, 1
    return np.asarray(apply(run.params, ids, positions, segments), np.float64)

  for _ in range(n):
    logits = forward()
    for i, q in enumerate(seqs):
      q.append(int(logits[i, len(q) - 1].argmax()))
  logits = forward()
  margins = []
  for i, p in enumerate(prompts):
    top2 = np.sort(logits[i, len(p) - 1:len(p) - 1 + n], axis=-1)[:, -2:]
    margins.append(top2[:, 1] - top2[:, 0])
  return [q[len(p):] for q, p in zip(seqs, prompts)], margins


def _greedy_llama_cpp(llm, prompt, n=32) -> list[int]:
  out = []
  for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
    out.append(int(t))
    if len(out) == n:
      break
  return out


def test_llama_cpp_greedy_equals_ours(llama_cpp, trained):
  """10 held-out prompts, 32 greedy tokens: llama.cpp's sampler continues exactly as llm_jax's
  decoder (the KV-cache generator of `python -m llm_jax.chat --temperature=0`: the slow test
  below and bench_gguf): the F32 file all 32
  tokens of every prompt (no step is within 1e-4 of a tie, far above F32 rounding); the F16 file
  up to a step where our top two are within 0.01 (F16 weights move logits by ~1e-3, so such a
  near-tie may flip), which most prompts never reach."""
  files, run, _, prompts = trained
  ours, margins = _greedy_ours(run, prompts)
  assert min(m.min() for m in margins) > 1e-4
  llm = gguf_quality.load_llama(files["f32"], 256)
  for p, o in zip(prompts, ours):
    assert _greedy_llama_cpp(llm, p) == o
  llm = gguf_quality.load_llama(files["f16"], 256)
  whole = 0
  for p, o, m in zip(prompts, ours, margins):
    safe = int(np.argmax(m < 0.01)) if (m < 0.01).any() else len(o)
    whole += safe == len(o)
    assert _greedy_llama_cpp(llm, p)[:safe] == o[:safe]
  assert whole >= 5, whole


@pytest.mark.slow
def test_llama_cpp_greedy_equals_our_generator(llama_cpp, trained):
  """The same 10 prompts through llm_jax's KV-cache generator (chat's, temperature 0) and
  llama.cpp's greedy sampler on the F32 file: the same 32 tokens each."""
  from llm_jax.infer.generate import Generator  # pylint: disable=g-import-not-at-top
  from llm_jax.infer.sampling import SamplingConfig  # pylint: disable=g-import-not-at-top
  files, run, _, prompts = trained
  gens = Generator(run.params, run.model_cfg).generate(
      prompts, SamplingConfig(temperature=0.0, max_new_tokens=32))
  llm = gguf_quality.load_llama(files["f32"], 256)
  for p, g in zip(prompts, gens):
    assert _greedy_llama_cpp(llm, p) == g.tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_logprobs_match_f32(llama_cpp, runs, exports, data, sp_tok, family):
  """Next-token log-probs of a held-out text (every vocabulary entry) from llama.cpp on the F32
  file agree with llm_jax's within 1e-3: the architecture, q/k permutation, biases, q/k norm,
  RoPE base, norm epsilon and tied / untied head are all read as we compute them."""
  params, config = rundir.load_params(runs[family])
  cfg = ModelConfig.from_config(config.model)
  ids = sp_tok.encode(" ".join(r["text"] for r in data["bios_eval"][:8]))[:200]
  ours = gguf_quality.llm_jax_logprobs(params, cfg, ids)
  theirs = gguf_quality.llama_cpp_logprobs(gguf_quality.load_llama(exports[family], len(ids)), ids)
  assert np.abs(ours - theirs).max() < 1e-3


def test_llama_cpp_logprobs_of_the_trained_run(llama_cpp, trained):
  """The trained run's F32 file: next-token log-probs of held-out text within 1e-3 of ours."""
  files, run, _, _ = trained
  ids, weights = gguf_quality.heldout_ids(run.tokenizer, run.config, run.context)
  ours = gguf_quality.llm_jax_logprobs(run.params, run.model_cfg, ids)
  theirs = gguf_quality.llama_cpp_logprobs(gguf_quality.load_llama(files["f32"], len(ids)), ids)
  assert np.abs(ours - theirs).max() < 1e-3


@pytest.mark.slow
def test_quantized_perplexity_gap_of_the_trained_run(llama_cpp, trained, tmp_path):
  """F16 / Q8_0 / Q4_0 files of the trained run: their held-out perplexity in llama.cpp next to
  llm_jax's is printed (bench_gguf measures it; docs/gguf.md has the figures) and in range."""
  _, run, _, _ = trained
  files = {t: gguf_export.export_gguf(run.workdir, str(tmp_path / f"m-{t}.gguf"), t).path
           for t in ("f16", "q8_0", "q4_0")}
  ids, weights = gguf_quality.heldout_ids(run.tokenizer, run.config, run.context)
  ours = gguf_quality.llm_jax_logprobs(run.params, run.model_cfg, ids)
  base_ppl = gguf_quality.perplexity(ours, ids, weights)
  gaps = {}
  for t, path in files.items():
    theirs = gguf_quality.llama_cpp_logprobs(gguf_quality.load_llama(path, len(ids)), ids)
    gaps[t] = gguf_quality.perplexity(theirs, ids, weights) / base_ppl - 1
  print(f"perplexity {base_ppl:.3f}; gaps {gaps}")
  assert abs(gaps["f16"]) < 1e-3 and abs(gaps["q8_0"]) < 0.01 and abs(gaps["q4_0"]) < 0.2


def _byte_level_tokenizer_json(texts, path, pre: str):
  """A byte-level BPE tokenizer.json shaped as Qwen2's (`pre` "qwen2": NFC, the Qwen2 split regex)
  or Llama 3's ("llama-bpe": no normalizer, digits split in threes), with ByteLevel, ChatML
  specials and <think> as a plain added token, trained on `texts`."""
  # pylint: disable=g-import-not-at-top
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
  from tokenizers import pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  if pre == "qwen2":
    tok.normalizer = normalizers.NFC()
  regex = next(r for r, name in gguf_vocab.BPE_PRE.items() if name == pre)
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(regex), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
  tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tok.save(path)


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_imported_byte_level_bpe_run_tokenizes_like_us_in_llama_cpp(llama_cpp, tmp_path, data, pre):
  """An imported run with a Qwen2- or Llama-3-style tokenizer.json (byte-level BPE) exports with
  llama.cpp's "qwen2" / "llama-bpe" pre-tokenizer, and llama.cpp encodes the held-out texts
  (their years split in threes by Llama 3's regex, digit by digit by Qwen2's) and chats to our
  ids."""
  from llm_jax.data.hf_tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "imported"
  _byte_level_tokenizer_json([r["text"] for r in data["bios"]],
                             str(workdir / "tokenizer" / "tokenizer.json"), pre)
  tok = HFTokenizer(str(workdir / "tokenizer"))
  config = base.get_config()
  config.model.update(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32, mlp_dim=64,
                      vocab_size=tok.vocab_size, qkv_bias=pre == "qwen2")
  config.data.seq_len = 128
  rundir.save_params(str(workdir), random_params(ModelConfig.from_config(config.model)), config)
  out = gguf_export.export_gguf(str(workdir), str(tmp_path / "m.gguf"), "f16")
  reader = gguf.GGUFReader(out.path)
  assert bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == pre
  llm = gguf_quality.load_llama(out.path, 64)
  for text in heldout_texts(data) + ["In 19999 and 2024: 1234567 items.", "共有1234567人。"]:
    assert _tokenize(llm, text) == tok.encode(text), text
  msgs = [{"role": "user", "content": "李明宇 was born where?"}]
  assert _tokenize(llm, render_chat_text(msgs) + "<|im_start|>assistant\n", special=True) == \
      encode_chat(tok, msgs, add_generation_prompt=True)[0].tolist()


def test_unsupported_tokenizer_json_is_refused(tmp_path, data):
  """A tokenizer.json llama.cpp would not reproduce (here a WordPiece one) is refused by name."""
  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  workdir = tmp_path / "wp"
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(["a b c d"] * 10, trainers.WordPieceTrainer(
      vocab_size=50, special_tokens=["[UNK]", "<|endoftext|>"]))
  os.makedirs(workdir / "tokenizer")
  tok.save(str(workdir / "tokenizer" / "tokenizer.json"))
  config = base.get_config()
  config.model.update(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=32,
                      vocab_size=tok.get_vocab_size())
  rundir.write_config(str(workdir), config)
  with pytest.raises(gguf_vocab.Unsupported, match="WordPiece"):
    gguf_export.export_gguf(str(workdir), str(tmp_path / "m.gguf"))
  assert not os.path.exists(tmp_path / "m.gguf")


@pytest.mark.slow
def test_lora_run_exports_merged_and_llama_cpp_computes_the_adapter_model(llama_cpp, tmp_path,
                                                                         sp_tok):
  """A LoRA run (adapters only, over its base) exports merged: llama.cpp's log-probs on the F32
  file equal those of our decoder running base + adapters unmerged (the LoRA collection)."""
  from tests.test_lora_convert import _logits, _make_runs  # pylint: disable=g-import-not-at-top
  _, lora_dir, _, lcfg, params, adapters = _make_runs(str(tmp_path), sp_tok, "llama",
                                                      "q,k,v,o,gate,up,down")
  out = gguf_export.export_gguf(lora_dir, str(tmp_path / "lora.gguf"), "f32")
  ids = sp_tok.encode("李明宇 was born in 杭州 and studied physics at a university.")
  logits = _logits(lcfg, {"params": params, "lora": adapters}, ids).astype(np.float64)[:-1]
  want = logits - gguf_quality._logsumexp(logits)  # pylint: disable=protected-access
  theirs = gguf_quality.llama_cpp_logprobs(gguf_quality.load_llama(out.path, len(ids)), ids)
  assert np.abs(want - theirs).max() < 1e-3


def test_quality_text_is_the_runs_own_held_out_or_training_set(trained_sft_run):
  """bench_gguf --split: held-out text by default, the run's training chats with "train" (a model
  that learned its data by heart only guesses on held-out text)."""
  run = rundir.load(trained_sft_run)
  assert gguf_quality.heldout_source(run.config) == "builtin:bios_qa_heldout"
  assert gguf_quality.heldout_source(run.config, "train") == "builtin:bios_qa_train"
  train = gguf_quality.heldout_sequences(run.tokenizer, run.config, 200, 128, "train")
  first = next(iter(builtin.records("builtin:bios_qa_train", run.config.data.synthetic)))
  assert train[0][0] == encode_chat(run.tokenizer, first["messages"])[0].tolist()[:128]
  assert sum(int(w[1:].sum()) for _, w in train) >= 200
  with pytest.raises(ValueError, match="split"):
    gguf_quality.heldout_source(run.config, "test")


def test_cli_says_size_type_time_and_the_expected_cost_of_quantising(trained_sft_run, tmp_path):
  out = subprocess.run([sys.executable, "-m", "llm_jax.convert.gguf_export",
                        f"--workdir={trained_sft_run}", f"--out={tmp_path / 'm.gguf'}",
                        "--type=q4_0"], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "type q4_0" in out.stdout and " MiB" in out.stdout, out.stdout
  assert f"q4_0 costs quality: {gguf_export.EXPECTED_COST['q4_0']}" in out.stdout, out.stdout
