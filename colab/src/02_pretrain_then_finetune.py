# Source of colab/02_pretrain_then_finetune.ipynb; after editing: python colab/make_notebooks.py

# %% [markdown]
# {BADGE}
#
# # Pretrain, then fine-tune: what pretraining adds
#
# Pretraining reads text; supervised fine-tuning (SFT) teaches the question-answer format.
# This notebook pretrains a small model on text (the embedded encyclopedia's biographies,
# or a file you upload), fine-tunes it on chats, and fine-tunes a second model on the same
# chats without pretraining. Then it asks both about people whose questions neither saw in
# SFT: only the pretrained one can know them, from the biographies. The comparison is a
# table and a bar chart from `llm_jax.eval.compare`; training curves are drawn with
# matplotlib and shown in TensorBoard inline. With the defaults (600 + 300 + 300 steps of
# the `tiny` preset) it takes about 15 minutes on 2 CPU cores; both SFT runs share the
# pretraining run's tokenizer, so their losses compare directly.

# %% include: SETUP

# %% include: PARAMS_NOTE

# %% tags=["parameters"]
PRETRAIN_STEPS = 600  # pretraining steps (600: about 7 minutes on 2 CPU cores)
SFT_STEPS = 300  # SFT steps of each fine-tuned model
PRESET = "tiny"  # model preset of configs/models.py
PRETRAIN_DATA = "builtin:bios"  # text to pretrain on: builtin:bios, or files (.txt: a document per line; .jsonl/.json/.parquet: {"text": ...}), comma-separated
PRETRAIN_EVAL = "builtin:bios_eval"  # held-out text for the pretraining eval loss; "" = none
UPLOAD = False  # Colab: upload your own text file(s) and pretrain on them
RUNS_DIR = "runs"  # run directories go here
MOUNT_DRIVE = False  # Colab: mount Google Drive and keep RUNS_DIR under MyDrive/
OVERRIDES = {}  # config fields of all three runs by dotted name: {"model.n_layers": 6}
EVAL_OVERRIDES = {"eval.knowledge_people": 30}  # eval config fields (people probed per group)
TENSORBOARD = True  # show TensorBoard inline (else: print the command)

# %% include: RUNS

# %%
# Your own text: pick files in the dialog (Colab). Anything you upload replaces
# PRETRAIN_DATA; the knowledge comparison below still asks about the encyclopedia's people.
if UPLOAD and IN_COLAB:
  from google.colab import files
  uploaded = files.upload()
  PRETRAIN_DATA = ",".join(os.path.abspath(name) for name in uploaded)
  PRETRAIN_EVAL = ""
print("pretraining on", PRETRAIN_DATA)

# %% [markdown]
# ## 1. Pretrain
#
# Next-token loss on every token, documents packed into blocks of `data.seq_len` tokens.
# {RESUME_NOTE}

# %%
from llm_jax.train import loop

PRE_DIR = os.path.join(RUNS_DIR, "pretrain")
pre_config = notebook.config("pretrain", PRESET, {
    "train.steps": PRETRAIN_STEPS, "data.train": PRETRAIN_DATA, "data.eval": PRETRAIN_EVAL,
    "train.eval_every": max(1, PRETRAIN_STEPS // 4), **OVERRIDES})
pre_result = loop.train_and_evaluate(pre_config, PRE_DIR)

# %% [markdown]
# What the pretrained model writes after the start of a biography (plain-text completion,
# the `--raw` mode of the command-line chat):

# %%
import itertools
from llm_jax.data import pipeline
from llm_jax import rundir
from llm_jax.infer import session as session_lib
from llm_jax.infer.generate import Generator
from llm_jax.infer.sampling import SamplingConfig

run = rundir.load(PRE_DIR)
completer = session_lib.CompletionSession(Generator(run.params, run.model_cfg), run.tokenizer,
                                   SamplingConfig(temperature=0.0, max_new_tokens=40),
                                   context=run.context)
for doc in itertools.islice(pipeline.corpus_texts(run.config.data), 2):
  prefix = doc[:12]
  print(prefix, end="")
  completer.reply(prefix, write=lambda s: print(s, end="", flush=True))
  print("\n")

# %% [markdown]
# ## 2. Fine-tune, with and without pretraining
#
# Both SFT runs train on chats about 80% of the people (`builtin:bios_qa_train`) and are
# evaluated on the other 20%. `init_from` takes the pretrained parameters (a fresh
# optimizer and step count); the SFT-only run uses the same tokenizer.

# %%
SFT_DIR = os.path.join(RUNS_DIR, "pretrain_sft")
ONLY_DIR = os.path.join(RUNS_DIR, "sft_only")
sft_fields = {"train.steps": SFT_STEPS, "train.eval_every": max(1, SFT_STEPS // 3),
              **OVERRIDES}
with_pretraining = loop.train_and_evaluate(
    notebook.config("sft", PRESET, {**sft_fields, "init_from": PRE_DIR}), SFT_DIR)
without = loop.train_and_evaluate(
    notebook.config("sft", PRESET, {
        **sft_fields, "data.tokenizer.path": os.path.join(PRE_DIR, "tokenizer.model")}),
    ONLY_DIR)
for label, r in (("pretrain + SFT", with_pretraining), ("SFT only", without)):
  losses = [f"{e['eval_loss']:.3f}" for e in r["eval_history"]]
  print(f"{label}: held-out loss by eval {' -> '.join(losses) or '(trained before)'}")

# %% [markdown]
# ## 3. Curves
#
# The scalars each run logged to TensorBoard, read back with `llm_jax.eval.curves`.

# %%
from llm_jax.eval import curves

display(Image(curves.plot_runs({"pretrain": PRE_DIR},
                               ["loss", "eval_loss"] if PRETRAIN_EVAL else ["loss"],
                               os.path.join(RUNS_DIR, "pretrain_curves.png"),
                               title="pretraining")))
display(Image(curves.plot_runs({"pretrain + SFT": SFT_DIR, "SFT only": ONLY_DIR},
                               ["loss", "eval_loss", "accuracy"],
                               os.path.join(RUNS_DIR, "sft_curves.png"),
                               title="SFT (eval: held-out people)")))

# %%
%load_ext tensorboard
if TENSORBOARD:
  %tensorboard --logdir {RUNS_DIR}
else:
  print(f"TensorBoard: tensorboard --logdir {RUNS_DIR}")

# %% [markdown]
# ## 4. Knowledge with and without pretraining
#
# The eval job's knowledge probes ask every attribute of each person (birth date and city,
# university, major, employer, work city) in both languages and check the greedy answer.
# `qa_heldout` are the people whose questions no SFT run saw.

# %%
from llm_jax.eval import compare, job

eval_fields = {"eval.tasks": "loss,knowledge", "eval.steps": "latest", **EVAL_OVERRIDES}
for wd in (SFT_DIR, ONLY_DIR):
  job.run_eval(notebook.config("eval", None, eval_fields), wd, explicit=eval_fields)
out = os.path.join(RUNS_DIR, "knowledge_comparison")
table = compare.compare(
    [SFT_DIR, ONLY_DIR], ["pretrain + SFT", "SFT only"],
    ["loss.loss", "knowledge.qa_trained.contains", "knowledge.qa_heldout.contains"], out,
    title="Held-out loss and knowledge (contains the right value)")
display(Markdown(table))
display(Image(out + ".png"))

# %% [markdown]
# Some held-out answers side by side:

# %%
display(Markdown(notebook.knowledge_answers(
    {"pretrain + SFT": SFT_DIR, "SFT only": ONLY_DIR}, qa="heldout", n=6)))
