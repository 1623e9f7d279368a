# Source of colab/03_finetune_a_hf_model.ipynb; after editing: python colab/make_notebooks.py
# accelerator: GPU

# %% [markdown]
# {BADGE}
#
# # Fine-tune a Hugging Face model with LoRA, and export it
#
# This notebook imports a Hugging Face Qwen or Llama checkpoint into an llm_jax run
# directory (`llm_jax.convert.hf_import`), fine-tunes LoRA adapters on your chats with the
# base frozen (`config.lora.rank`, the same training loop as every job), chats with the
# result, and exports it back: a merged Hugging Face model that `transformers` loads with
# no custom code, and the adapter alone in PEFT's format. The default model is
# `Qwen/Qwen2.5-0.5B-Instruct` from the Hub; without Hub access (or with `HF_MODEL = ""`)
# it builds a tiny random Qwen2 instead, which is what CI fine-tunes. A GPU runtime is
# recommended for the 0.5B model.
#
# *Runtime*: GPU (Runtime > Change runtime type > T4 GPU)

# %% include: SETUP

# %% include: PARAMS_NOTE

# %% tags=["parameters"]
HF_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"  # Hub id, or a local dir (config.json, *.safetensors, tokenizer.json); "" = a tiny random Qwen2
CHATS = ""  # your SFT data: JSONL of {"messages": [{"role", "content"}, ...]} (also Alpaca / ShareGPT); "" = a sample from the embedded encyclopedia
EVAL_CHATS = ""  # held-out chats for the eval loss; "" = none (with CHATS = "": held-out people)
STEPS = 100  # fine-tuning steps
LORA_RANK = 8  # adapter rank; 0 = full fine-tuning of every parameter
LR = 2e-4  # peak learning rate (LoRA; full fine-tuning wants less, e.g. 2e-5)
RUNS_DIR = "runs"  # run directories and exports go here
MOUNT_DRIVE = False  # Colab: mount Google Drive and keep RUNS_DIR under MyDrive/
OVERRIDES = {}  # SFT config fields by dotted name: {"lora.targets": "q,v", "data.seq_len": 512}
PROMPTS = []  # questions before and after fine-tuning; [] = about people of the chats
MAX_NEW_TOKENS = 64  # longest answer

# %% include: RUNS

# %% [markdown]
# ## 1. Your chats
#
# One JSON object per line, in any of the shapes `docs/data.md` lists (OpenAI / minimind
# `messages`, ShareGPT `conversations`, Alpaca `instruction`/`output`). Without a file,
# this writes chats about the encyclopedia's people in the `messages` shape; point `CHATS`
# at your own file (upload it with the Files pane on the left) to train on that instead.

# %%
import json
from llm_jax.data.builtin import bios

sft_defaults = notebook.config("sft", None, OVERRIDES)
if not CHATS:
  data = bios.generate(sft_defaults.data.synthetic)
  CHATS, EVAL_CHATS = (os.path.join(RUNS_DIR, "my_chats.jsonl"),
                       os.path.join(RUNS_DIR, "my_chats_heldout.jsonl"))
  for path, records in ((CHATS, data["qa_train"]), (EVAL_CHATS, data["qa_heldout"])):
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
with open(CHATS, encoding="utf-8") as f:
  first = json.loads(f.readline())
print(CHATS, "- first record:")
print(json.dumps(first, ensure_ascii=False, indent=1))

# %% [markdown]
# ## 2. The Hugging Face model
#
# From the Hub (only `config.json`, the safetensors and the tokenizer files), from a local
# folder, or, offline, a tiny random Qwen2 built here with `transformers` and a byte-level
# BPE tokenizer trained on your chats the way Qwen's is built (CI has no network).

# %%
# Qwen2's pre-tokenizer: split like this, then map bytes to characters (byte-level BPE).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

def tiny_random_qwen2(out_dir):
  """A random 2-layer Qwen2 with a byte-level BPE tokenizer (Qwen's pipeline, 1,000 tokens)
  trained on CHATS: a stand-in for a Hub model when there is no network."""
  try:
    import torch
    import transformers
  except ImportError:
    raise RuntimeError("building the stand-in model needs torch and transformers: pip install "
                       "torch transformers, or set HF_MODEL to a local model folder") from None
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  from llm_jax.data import pipeline
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  chats = notebook.config("sft", None, {**OVERRIDES, "data.train": CHATS}).data
  tok.train_from_iterator(pipeline.corpus_texts(chats), trainers.BpeTrainer(
      vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "bos_token": None}, f)
  torch.manual_seed(0)
  config = transformers.Qwen2Config(
      vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=1024, tie_word_embeddings=True,
      initializer_range=0.1)  # large enough for a random model to answer something
  transformers.Qwen2ForCausalLM(config).save_pretrained(out_dir)

offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")
if HF_MODEL and os.path.isdir(HF_MODEL):
  HF_DIR = HF_MODEL
elif HF_MODEL and not offline:
  from huggingface_hub import snapshot_download
  HF_DIR = snapshot_download(HF_MODEL, allow_patterns=["*.json", "*.safetensors",
                                                       "tokenizer*", "*.txt"])
else:
  print("HF_MODEL is empty or the Hub is off (HF_HUB_OFFLINE): a tiny random Qwen2 instead")
  HF_DIR = os.path.join(RUNS_DIR, "tiny_random_qwen2")
  if not os.path.exists(os.path.join(HF_DIR, "config.json")):
    tiny_random_qwen2(HF_DIR)
print("Hugging Face model:", HF_DIR)

# %% [markdown]
# ## 3. Import
#
# The weights stream tensor by tensor into an llm_jax run directory (`config.json`, the
# tokenizer, a parameters checkpoint); the tests check the imported model's logits against
# `transformers` within 1e-4.

# %%
from configs import base
from llm_jax.convert import hf_import
from llm_jax import rundir

BASE_DIR = os.path.join(RUNS_DIR, "hf_base")
if not os.path.exists(os.path.join(BASE_DIR, "config.json")):
  hf_import.import_hf(HF_DIR, BASE_DIR, base.get_config())
m = rundir.read_config(BASE_DIR).model
print(f"{BASE_DIR}: dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv), "
      f"vocab {m.vocab_size}, {m.param_dtype} weights")

# %% [markdown]
# The imported model before fine-tuning:

# %%
from llm_jax.data import pipeline
from llm_jax.infer import session as session_lib
from llm_jax.infer.generate import Generator
from llm_jax.infer.sampling import SamplingConfig

def first_question(path):
  doc = pipeline.DocReader(path, sft_defaults.data)[0]  # read as training reads it
  return next((m["content"] for m in doc.get("messages", []) if m["role"] == "user"), None)

questions = PROMPTS or [q for q in (first_question(CHATS),
                                    EVAL_CHATS and first_question(EVAL_CHATS)) if q]
greedy = SamplingConfig(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)

def ask(workdir):
  run = rundir.load(workdir)
  session = session_lib.ChatSession(Generator(run.params, run.model_cfg), run.tokenizer, greedy,
                             context=min(run.context, 2048))
  answers = []
  for q in questions:
    session.reset()
    print(f"user: {q}\nassistant: ", end="")
    answers.append(session.reply(q, write=lambda s: print(s, end="", flush=True)))
    print("\n")
  return answers

before = ask(BASE_DIR)

# %% [markdown]
# ## 4. LoRA fine-tuning
#
# Adapters on the attention and MLP projections (`lora.targets`); the base is read from
# `init_from` and stays frozen, the optimizer holds moments for the adapters only, and the
# checkpoints hold only the adapters (the log says how much memory that saves). On a GPU
# or TPU the base computes in bfloat16. The held-out loss is measured before the first
# step and after the last.

# %%
import jax
from llm_jax.train import loop

LORA_DIR = os.path.join(RUNS_DIR, "hf_lora" if LORA_RANK else "hf_full")
accelerated = jax.default_backend() != "cpu"
sft_config = notebook.config("sft", None, {
    "init_from": BASE_DIR, "data.train": CHATS, "data.eval": EVAL_CHATS,
    "lora.rank": LORA_RANK, "train.lr": LR, "train.steps": STEPS,
    "train.warmup_steps": max(1, STEPS // 10), "train.eval_every": STEPS,
    "train.eval_batches": 4,
    "model.dtype": "bfloat16" if accelerated else "float32",
    "model.param_dtype": "bfloat16" if accelerated else "float32",
    "data.batch_size": 8, **OVERRIDES})
result = loop.train_and_evaluate(sft_config, LORA_DIR)
history = result["eval_history"]
if len(history) > 1:
  print(f"held-out loss: {history[0]['eval_loss']:.3f} before, "
        f"{history[-1]['eval_loss']:.3f} after {result['step']} steps")

# %% [markdown]
# ## 5. Chat with the fine-tuned model
#
# Every tool reads a LoRA run as its base with the adapters merged in.

# %%
after = ask(LORA_DIR)

# %% [markdown]
# ## 6. Export to Hugging Face
#
# `hf_export` writes the merged model (safetensors, `config.json`, a tokenizer whose chat
# template renders the ChatML the model was trained on); `peft_export` writes the adapter
# alone in PEFT's format beside its base. Then `transformers` loads the export and answers
# the first question greedily, next to llm_jax's answer.

# %%
from llm_jax.convert import hf_export, peft_export

EXPORT_DIR = os.path.join(RUNS_DIR, "export", "merged")
hf_export.export_hf(LORA_DIR, EXPORT_DIR)
print(EXPORT_DIR, sorted(os.listdir(EXPORT_DIR)))
if LORA_RANK:
  base_dir, adapter_dir = peft_export.export_peft(LORA_DIR, os.path.join(RUNS_DIR, "export", "peft"))
  print(adapter_dir, sorted(os.listdir(adapter_dir)))

# %%
try:
  import torch
  import transformers
except ImportError:
  print("pip install torch transformers to load the export in transformers")
else:
  model = transformers.AutoModelForCausalLM.from_pretrained(EXPORT_DIR, dtype=torch.float32)
  hf_tok = transformers.AutoTokenizer.from_pretrained(EXPORT_DIR)
  inputs = hf_tok.apply_chat_template([{"role": "user", "content": questions[0]}],
                                      add_generation_prompt=True, return_dict=True,
                                      return_tensors="pt")
  with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
  ids = out[0, inputs["input_ids"].shape[1]:].tolist()
  print("transformers:", hf_tok.decode(ids, skip_special_tokens=True))
  print("llm_jax:     ", after[0].text)
  ours = after[0].tokens
  same = ids[:len(ours)] == ours
  print("same greedy tokens" if same else
        "the answers part ways (bfloat16 rounding can flip a near-tie)", f"({len(ours)} tokens)")
