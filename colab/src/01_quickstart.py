# Source of colab/01_quickstart.ipynb; after editing: python colab/make_notebooks.py

# %% [markdown]
# {BADGE}
#
# # llm_jax quick start: tokenizer, SFT, chat, eval
#
# This notebook trains a small chat model from scratch on the fictional bilingual
# (Chinese/English) encyclopedia that ships inside llm_jax, so nothing is downloaded; then it
# talks to the model with streamed answers and scores it with the eval job (loss plot,
# repetition and knowledge tables). Every step is a library call: the config is
# `configs/sft.py`, training is `llm_jax.train.loop.train_and_evaluate`, the very function
# `python -m llm_jax.main --config=configs/sft.py` runs, chat is `llm_jax.infer.session` and
# the eval is `llm_jax.eval.job`. With the defaults (the 1.3M-parameter `tiny` preset, 300
# steps) training takes about 4 minutes on 2 CPU cores, the README's quick start.

# %% include: SETUP

# %% include: PARAMS_NOTE

# %% tags=["parameters"]
STEPS = 300  # SFT steps (300: about 4 minutes on 2 CPU cores)
PRESET = "tiny"  # model preset of configs/models.py: tiny | minimind-26m | qwen2-0.5b | llama-1b
RUNS_DIR = "runs"  # run directories go here (relative: to the current folder; Colab: /content)
MOUNT_DRIVE = False  # Colab: mount Google Drive and keep RUNS_DIR under MyDrive/
OVERRIDES = {}  # any config field by dotted name, as on the command line: {"train.lr": 1e-3}
PROMPTS = []  # your questions; [] asks about two people of the encyclopedia (one held out)
MAX_NEW_TOKENS = 64  # longest streamed answer
EVAL_TASKS = "loss,repetition,knowledge"  # eval job tasks (also: rouge, choice)
EVAL_OVERRIDES = {"eval.knowledge_people": 20, "eval.max_examples": 50}  # eval config fields

# %% include: RUNS

# %% [markdown]
# ## 1. The tokenizer
#
# A SentencePiece BPE tokenizer (byte fallback, digits split, ChatML special tokens) trained
# on the training data and kept in the run directory, as a command-line run does.
# {RESUME_NOTE}

# %%
from llm_jax.data import tokenizer as tok_lib
from llm_jax.train import run_setup

WORKDIR = os.path.join(RUNS_DIR, "quickstart")
every = max(1, STEPS // 3)  # three checkpoints, so the eval draws its figures against the step
config = notebook.config("sft", PRESET, {
    "train.steps": STEPS, "checkpoint.every": every, "train.eval_every": every, **OVERRIDES})
os.makedirs(WORKDIR, exist_ok=True)
tok = run_setup.resolve_tokenizer(config, WORKDIR)  # trains it, or reuses WORKDIR's
print(tok_lib.summarize(tok))
text = "李明宇于1965年3月12日出生在杭州。Li Mingyu studied physics."
ids = tok.encode(text)
print(f"{len(text)} characters -> {len(ids)} tokens:", [tok.decode([i]) for i in ids])

# %% [markdown]
# ## 2. What SFT trains on
#
# Question-answer chats about invented people, rendered with ChatML. The loss is on the
# assistant's replies only: the text between « and ».

# %%
from llm_jax.data import preview

for where, fmt, ids, weights in preview.examples(config, tok, "train", 2):
  print(f"{where} ({fmt}):\n{preview.render(tok, ids, weights, color=False)}\n")

# %% [markdown]
# ## 3. Train
#
# Loss, learning rate, gradient norm, tokens/s and MFU every 10 steps; the held-out loss at
# every checkpoint (people whose questions the model never trained on).

# %%
from llm_jax.eval import curves
from llm_jax.train import loop

result = loop.train_and_evaluate(config, WORKDIR)
if "eval_loss" in result:
  print(f"step {result['step']}: training loss {result['loss']:.3f}, held-out loss "
        f"{result['eval_loss']:.3f}")
else:
  print(f"{WORKDIR} had trained {result['step']} steps already")
display(Image(curves.plot_runs({"sft": WORKDIR}, ["loss", "eval_loss", "learning_rate"],
                               os.path.join(WORKDIR, "curves.png"), title="SFT")))

# %% [markdown]
# ## 4. Chat
#
# The run's latest checkpoint behind a KV-cache generator; answers stream token by token.
# `ChatSession` keeps the conversation (`session.reset()` clears it) and fits it into the
# context the model was trained on. Greedy decoding here; the command-line chat
# (`python -m llm_jax.chat --workdir=...`) samples with temperature 0.7 and top-p 0.9.

# %%
from llm_jax.data.builtin import bios
from llm_jax import rundir
from llm_jax.infer import session as session_lib
from llm_jax.infer.generate import Generator
from llm_jax.infer.sampling import SamplingConfig

run = rundir.load(WORKDIR)
session = session_lib.ChatSession(Generator(run.params, run.model_cfg), run.tokenizer,
                           SamplingConfig(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS),
                           context=run.context)

def first_exchange(chat_record):
  msgs = chat_record["messages"]
  k = next(i for i, m in enumerate(msgs) if m["role"] == "user")
  return msgs[k]["content"], msgs[k + 1]["content"]

if PROMPTS:
  questions = [(p, None) for p in PROMPTS]
else:
  data = bios.generate(run.config.data.synthetic)
  questions = [first_exchange(data["qa_train"][0]), first_exchange(data["qa_heldout"][0])]
for question, reference in questions:
  session.reset()
  print("user:", question)
  print("assistant: ", end="")
  session.reply(question, write=lambda s: print(s, end="", flush=True))
  print(f"\n(reference: {reference})\n" if reference else "\n")

# %% [markdown]
# ## 5. Evaluate
#
# The eval job on every kept checkpoint: held-out loss, repetition of greedy and sampled
# answers (and the fixed prompts' answers side by side), and knowledge probes about every
# attribute of the encyclopedia's people. It writes `eval_<step>.json`, `eval/summary.md`
# and `eval/plots/*.png` into the run directory, as
# `python -m llm_jax.main --config=configs/eval.py --workdir=...` does.

# %%
from llm_jax.eval import job

# The fields set here are the ones the eval job takes over the run's own config (as on a
# command line); everything else (data, model) is the run's.
eval_fields = {"eval.tasks": EVAL_TASKS, "eval.steps": "all", **EVAL_OVERRIDES}
results = job.run_eval(notebook.config("eval", None, eval_fields), WORKDIR, explicit=eval_fields)
display(Markdown(notebook.eval_tables(results)))
for task in EVAL_TASKS.split(","):
  png = os.path.join(WORKDIR, "eval", "plots", f"{task}.png")
  if os.path.exists(png):
    display(Image(png))

# %%
side_by_side = os.path.join(WORKDIR, "eval", "samples", "chat_prompts.md")
if os.path.exists(side_by_side):
  display(Markdown(open(side_by_side, encoding="utf-8").read()))

# %% [markdown]
# ## Next
#
# - `02_pretrain_then_finetune.ipynb`: pretraining first, and what it does for knowledge.
# - `03_finetune_a_hf_model.ipynb`: LoRA on a Hugging Face Qwen/Llama model and back.
# - `04_tpu_and_gpu.ipynb`: the device mesh, bf16, shardings, tokens/s and MFU.
# - The same from a terminal: `python -m llm_jax.main --config=configs/sft.py
#   --workdir=runs/sft`, then `python -m llm_jax.chat --workdir=runs/sft` (README).
