"""Writes the notebooks of colab/ from the cells below, so their JSON stays clean (no outputs, no
execution counts, stable cell ids) and the cells they share stay identical.

  python colab/make_notebooks.py          # rewrite colab/*.ipynb
  python colab/make_notebooks.py --check  # exit 1 if a committed notebook differs from this file

Edit the cells here, not in Jupyter; tests/test_notebooks.py checks that the committed notebooks
are what this script writes, and runs each of them top to bottom.
"""

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


def _src(text: str) -> str:
  return textwrap.dedent(text).strip("\n")


def md(text: str):
  return v4.new_markdown_cell(_src(text))


def code(text: str, *tags: str):
  cell = v4.new_code_cell(_src(text))
  if tags:
    cell.metadata["tags"] = list(tags)
  return cell


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


def header(name: str, title: str, summary: str, accelerator: str = ""):
  note = (f"\n\n*Runtime*: {accelerator}" if accelerator else "")
  return md(f"{badge(name)}\n\n# {title}\n\n{_src(summary)}{note}")


# ---------------------------------------------------------------------------------------------
# 01: tokenizer -> SFT -> chat -> eval

QUICKSTART = [
    header("01_quickstart", "llm_jax quick start: tokenizer, SFT, chat, eval", '''
        This notebook trains a small chat model from scratch on the fictional bilingual
        (Chinese/English) encyclopedia that ships inside llm_jax, so nothing is downloaded; then it
        talks to the model with streamed answers and scores it with the eval job (loss plot,
        repetition and knowledge tables). Every step is a library call: the config is
        `configs/sft.py`, training is `llm_jax.train.loop.train_and_evaluate`, the very function
        `python -m llm_jax.main --config=configs/sft.py` runs, chat is `llm_jax.infer.chat` and
        the eval is `llm_jax.eval.job`. With the defaults (the 1.3M-parameter `tiny` preset, 300
        steps) training takes about 4 minutes on 2 CPU cores, the README's quick start.
    '''),
    SETUP,
    PARAMS_NOTE,
    code('''
        STEPS = 300  # SFT steps (300: about 4 minutes on 2 CPU cores)
        PRESET = "tiny"  # model preset of configs/models.py: tiny | minimind-26m | qwen2-0.5b | llama-1b
        RUNS_DIR = "runs"  # run directories go here (relative: to the current folder; Colab: /content)
        MOUNT_DRIVE = False  # Colab: mount Google Drive and keep RUNS_DIR under MyDrive/
        OVERRIDES = {}  # any config field by dotted name, as on the command line: {"train.lr": 1e-3}
        PROMPTS = []  # your questions; [] asks about two people of the encyclopedia (one held out)
        MAX_NEW_TOKENS = 64  # longest streamed answer
        EVAL_TASKS = "loss,repetition,knowledge"  # eval job tasks (also: rouge, choice)
        EVAL_OVERRIDES = {"eval.knowledge_people": 20, "eval.max_examples": 50}  # eval config fields
    ''', "parameters"),
    RUNS,
    md(f'''
        ## 1. The tokenizer

        A SentencePiece BPE tokenizer (byte fallback, digits split, ChatML special tokens) trained
        on the training data and kept in the run directory, as a command-line run does.
        {RESUME_NOTE}
    '''),
    code('''
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
    '''),
    md('''
        ## 2. What SFT trains on

        Question-answer chats about invented people, rendered with ChatML. The loss is on the
        assistant's replies only: the text between « and ».
    '''),
    code('''
        from llm_jax.data import preview

        for where, fmt, ids, weights in preview.examples(config, tok, "train", 2):
          print(f"{where} ({fmt}):\\n{preview.render(tok, ids, weights, color=False)}\\n")
    '''),
    md('''
        ## 3. Train

        Loss, learning rate, gradient norm, tokens/s and MFU every 10 steps; the held-out loss at
        every checkpoint (people whose questions the model never trained on).
    '''),
    code('''
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
    '''),
    md('''
        ## 4. Chat

        The run's latest checkpoint behind a KV-cache generator; answers stream token by token.
        `ChatSession` keeps the conversation (`session.reset()` clears it) and fits it into the
        context the model was trained on. Greedy decoding here; the command-line chat
        (`python -m llm_jax.chat --workdir=...`) samples with temperature 0.7 and top-p 0.9.
    '''),
    code('''
        from llm_jax.data import synthetic_bios
        from llm_jax.infer import chat
        from llm_jax.infer.generate import Generator
        from llm_jax.infer.sampling import SamplingConfig

        run = chat.load_run(WORKDIR)
        session = chat.ChatSession(Generator(run.params, run.model_cfg), run.tokenizer,
                                   SamplingConfig(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS),
                                   context=run.context)

        def first_exchange(chat_record):
          msgs = chat_record["messages"]
          k = next(i for i, m in enumerate(msgs) if m["role"] == "user")
          return msgs[k]["content"], msgs[k + 1]["content"]

        if PROMPTS:
          questions = [(p, None) for p in PROMPTS]
        else:
          data = synthetic_bios.generate(run.config.data.synthetic)
          questions = [first_exchange(data["qa_train"][0]), first_exchange(data["qa_heldout"][0])]
        for question, reference in questions:
          session.reset()
          print("user:", question)
          print("assistant: ", end="")
          session.reply(question, write=lambda s: print(s, end="", flush=True))
          print(f"\\n(reference: {reference})\\n" if reference else "\\n")
    '''),
    md('''
        ## 5. Evaluate

        The eval job on every kept checkpoint: held-out loss, repetition of greedy and sampled
        answers (and the fixed prompts' answers side by side), and knowledge probes about every
        attribute of the encyclopedia's people. It writes `eval_<step>.json`, `eval/summary.md`
        and `eval/plots/*.png` into the run directory, as
        `python -m llm_jax.main --config=configs/eval.py --workdir=...` does.
    '''),
    code('''
        from llm_jax.eval import job

        eval_config = notebook.config("eval", None, {"eval.tasks": EVAL_TASKS, "eval.steps": "all",
                                                     **EVAL_OVERRIDES})
        results = job.run_eval(eval_config, WORKDIR, overrides=[])
        display(Markdown(notebook.eval_tables(results)))
        for task in EVAL_TASKS.split(","):
          png = os.path.join(WORKDIR, "eval", "plots", f"{task}.png")
          if os.path.exists(png):
            display(Image(png))
    '''),
    code('''
        side_by_side = os.path.join(WORKDIR, "eval", "samples", "chat_prompts.md")
        if os.path.exists(side_by_side):
          display(Markdown(open(side_by_side, encoding="utf-8").read()))
    '''),
    md('''
        ## Next

        - `02_pretrain_then_finetune.ipynb`: pretraining first, and what it does for knowledge.
        - `03_finetune_a_hf_model.ipynb`: LoRA on a Hugging Face Qwen/Llama model and back.
        - `04_tpu_and_gpu.ipynb`: the device mesh, bf16, shardings, tokens/s and MFU.
        - The same from a terminal: `python -m llm_jax.main --config=configs/sft.py
          --workdir=runs/sft`, then `python -m llm_jax.chat --workdir=runs/sft` (README).
    '''),
]


# ---------------------------------------------------------------------------------------------
# 02: pretrain, then SFT; knowledge with and without pretraining

PRETRAIN = [
    header("02_pretrain_then_finetune", "Pretrain, then fine-tune: what pretraining adds", '''
        Pretraining reads text; supervised fine-tuning (SFT) teaches the question-answer format.
        This notebook pretrains a small model on text (the embedded encyclopedia's biographies,
        or a file you upload), fine-tunes it on chats, and fine-tunes a second model on the same
        chats without pretraining. Then it asks both about people whose questions neither saw in
        SFT: only the pretrained one can know them, from the biographies. The comparison is a
        table and a bar chart from `llm_jax.eval.compare`; training curves are drawn with
        matplotlib and shown in TensorBoard inline. With the defaults (600 + 300 + 300 steps of
        the `tiny` preset) it takes about 15 minutes on 2 CPU cores; both SFT runs share the
        pretraining run's tokenizer, so their losses compare directly.
    '''),
    SETUP,
    PARAMS_NOTE,
    code('''
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
    ''', "parameters"),
    RUNS,
    code('''
        # Your own text: pick files in the dialog (Colab). Anything you upload replaces
        # PRETRAIN_DATA; the knowledge comparison below still asks about the encyclopedia's people.
        if UPLOAD and IN_COLAB:
          from google.colab import files
          uploaded = files.upload()
          PRETRAIN_DATA = ",".join(os.path.abspath(name) for name in uploaded)
          PRETRAIN_EVAL = ""
        print("pretraining on", PRETRAIN_DATA)
    '''),
    md(f'''
        ## 1. Pretrain

        Next-token loss on every token, documents packed into blocks of `data.seq_len` tokens.
        {RESUME_NOTE}
    '''),
    code('''
        from llm_jax.train import loop

        PRE_DIR = os.path.join(RUNS_DIR, "pretrain")
        pre_config = notebook.config("pretrain", PRESET, {
            "train.steps": PRETRAIN_STEPS, "data.train": PRETRAIN_DATA, "data.eval": PRETRAIN_EVAL,
            "train.eval_every": max(1, PRETRAIN_STEPS // 4), **OVERRIDES})
        pre_result = loop.train_and_evaluate(pre_config, PRE_DIR)
    '''),
    md('''
        What the pretrained model writes after the start of a biography (plain-text completion,
        the `--raw` mode of the command-line chat):
    '''),
    code('''
        import itertools
        from llm_jax.data import pipeline
        from llm_jax.infer import chat
        from llm_jax.infer.generate import Generator
        from llm_jax.infer.sampling import SamplingConfig

        run = chat.load_run(PRE_DIR)
        completer = chat.CompletionSession(Generator(run.params, run.model_cfg), run.tokenizer,
                                           SamplingConfig(temperature=0.0, max_new_tokens=40),
                                           context=run.context)
        for doc in itertools.islice(pipeline.corpus_texts(run.config.data), 2):
          prefix = doc[:12]
          print(prefix, end="")
          completer.reply(prefix, write=lambda s: print(s, end="", flush=True))
          print("\\n")
    '''),
    md('''
        ## 2. Fine-tune, with and without pretraining

        Both SFT runs train on chats about 80% of the people (`builtin:bios_qa_train`) and are
        evaluated on the other 20%. `init_from` takes the pretrained parameters (a fresh
        optimizer and step count); the SFT-only run uses the same tokenizer.
    '''),
    code('''
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
    '''),
    md('''
        ## 3. Curves

        The scalars each run logged to TensorBoard, read back with `llm_jax.eval.curves`.
    '''),
    code('''
        from llm_jax.eval import curves

        display(Image(curves.plot_runs({"pretrain": PRE_DIR},
                                       ["loss", "eval_loss"] if PRETRAIN_EVAL else ["loss"],
                                       os.path.join(RUNS_DIR, "pretrain_curves.png"),
                                       title="pretraining")))
        display(Image(curves.plot_runs({"pretrain + SFT": SFT_DIR, "SFT only": ONLY_DIR},
                                       ["loss", "eval_loss", "accuracy"],
                                       os.path.join(RUNS_DIR, "sft_curves.png"),
                                       title="SFT (eval: held-out people)")))
    '''),
    code('''
        %load_ext tensorboard
        if TENSORBOARD:
          %tensorboard --logdir {RUNS_DIR}
        else:
          print(f"TensorBoard: tensorboard --logdir {RUNS_DIR}")
    '''),
    md('''
        ## 4. Knowledge with and without pretraining

        The eval job's knowledge probes ask every attribute of each person (birth date and city,
        university, major, employer, work city) in both languages and check the greedy answer.
        `qa_heldout` are the people whose questions no SFT run saw.
    '''),
    code('''
        from llm_jax.eval import compare, job

        eval_config = notebook.config("eval", None, {"eval.tasks": "loss,knowledge",
                                                     "eval.steps": "latest", **EVAL_OVERRIDES})
        for wd in (SFT_DIR, ONLY_DIR):
          job.run_eval(eval_config, wd, overrides=[])
        out = os.path.join(RUNS_DIR, "knowledge_comparison")
        table = compare.compare(
            [SFT_DIR, ONLY_DIR], ["pretrain + SFT", "SFT only"],
            ["loss.loss", "knowledge.qa_trained.contains", "knowledge.qa_heldout.contains"], out,
            title="Held-out loss and knowledge (contains the right value)")
        display(Markdown(table))
        display(Image(out + ".png"))
    '''),
    md('Some held-out answers side by side:'),
    code('''
        display(Markdown(notebook.knowledge_answers(
            {"pretrain + SFT": SFT_DIR, "SFT only": ONLY_DIR}, qa="heldout", n=6)))
    '''),
]


# ---------------------------------------------------------------------------------------------
# 03: a Hugging Face model in, LoRA SFT, chat, and back out

HF = [
    header("03_finetune_a_hf_model", "Fine-tune a Hugging Face model with LoRA, and export it", '''
        This notebook imports a Hugging Face Qwen or Llama checkpoint into an llm_jax run
        directory (`llm_jax.convert.hf_import`), fine-tunes LoRA adapters on your chats with the
        base frozen (`config.lora.rank`, the same training loop as every job), chats with the
        result, and exports it back: a merged Hugging Face model that `transformers` loads with
        no custom code, and the adapter alone in PEFT's format. The default model is
        `Qwen/Qwen2.5-0.5B-Instruct` from the Hub; without Hub access (or with `HF_MODEL = ""`)
        it builds a tiny random Qwen2 instead, which is what CI fine-tunes. A GPU runtime is
        recommended for the 0.5B model.
    ''', accelerator="GPU (Runtime > Change runtime type > T4 GPU)"),
    SETUP,
    PARAMS_NOTE,
    code('''
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
    ''', "parameters"),
    RUNS,
    md('''
        ## 1. Your chats

        One JSON object per line, in any of the shapes `docs/data.md` lists (OpenAI / minimind
        `messages`, ShareGPT `conversations`, Alpaca `instruction`/`output`). Without a file,
        this writes chats about the encyclopedia's people in the `messages` shape; point `CHATS`
        at your own file (upload it with the Files pane on the left) to train on that instead.
    '''),
    code('''
        import json
        from llm_jax.data import synthetic_bios

        sft_defaults = notebook.config("sft", None, OVERRIDES)
        if not CHATS:
          data = synthetic_bios.generate(sft_defaults.data.synthetic)
          CHATS, EVAL_CHATS = (os.path.join(RUNS_DIR, "my_chats.jsonl"),
                               os.path.join(RUNS_DIR, "my_chats_heldout.jsonl"))
          for path, records in ((CHATS, data["qa_train"]), (EVAL_CHATS, data["qa_heldout"])):
            with open(path, "w", encoding="utf-8") as f:
              f.writelines(json.dumps(r, ensure_ascii=False) + "\\n" for r in records)
        with open(CHATS, encoding="utf-8") as f:
          first = json.loads(f.readline())
        print(CHATS, "- first record:")
        print(json.dumps(first, ensure_ascii=False, indent=1))
    '''),
    md('''
        ## 2. The Hugging Face model

        From the Hub (only `config.json`, the safetensors and the tokenizer files), from a local
        folder, or, offline, a tiny random Qwen2 built here with `transformers` and a byte-level
        BPE tokenizer trained on your chats the way Qwen's is built (CI has no network).
    '''),
    code('''
        # Qwen2's pre-tokenizer: split like this, then map bytes to characters (byte-level BPE).
        QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
                      r"| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")

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
    '''),
    md('''
        ## 3. Import

        The weights stream tensor by tensor into an llm_jax run directory (`config.json`, the
        tokenizer, a parameters checkpoint); the tests check the imported model's logits against
        `transformers` within 1e-4.
    '''),
    code('''
        from llm_jax.convert import hf_import
        from llm_jax.train import checkpoint

        BASE_DIR = os.path.join(RUNS_DIR, "hf_base")
        if not os.path.exists(os.path.join(BASE_DIR, "config.json")):
          hf_import.import_hf(HF_DIR, BASE_DIR)
        m = checkpoint.read_config(BASE_DIR).model
        print(f"{BASE_DIR}: dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv), "
              f"vocab {m.vocab_size}, {m.param_dtype} weights")
    '''),
    md('The imported model before fine-tuning:'),
    code('''
        from llm_jax.data import pipeline
        from llm_jax.infer import chat
        from llm_jax.infer.generate import Generator
        from llm_jax.infer.sampling import SamplingConfig

        def first_question(path):
          doc = pipeline.DocReader(path, sft_defaults.data)[0]  # read as training reads it
          return next((m["content"] for m in doc.get("messages", []) if m["role"] == "user"), None)

        questions = PROMPTS or [q for q in (first_question(CHATS),
                                            EVAL_CHATS and first_question(EVAL_CHATS)) if q]
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)

        def ask(workdir):
          run = chat.load_run(workdir)
          session = chat.ChatSession(Generator(run.params, run.model_cfg), run.tokenizer, greedy,
                                     context=min(run.context, 2048))
          answers = []
          for q in questions:
            session.reset()
            print(f"user: {q}\\nassistant: ", end="")
            answers.append(session.reply(q, write=lambda s: print(s, end="", flush=True)))
            print("\\n")
          return answers

        before = ask(BASE_DIR)
    '''),
    md('''
        ## 4. LoRA fine-tuning

        Adapters on the attention and MLP projections (`lora.targets`); the base is read from
        `init_from` and stays frozen, the optimizer holds moments for the adapters only, and the
        checkpoints hold only the adapters (the log says how much memory that saves). On a GPU
        or TPU the base computes in bfloat16. The held-out loss is measured before the first
        step and after the last.
    '''),
    code('''
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
    '''),
    md('''
        ## 5. Chat with the fine-tuned model

        Every tool reads a LoRA run as its base with the adapters merged in.
    '''),
    code('''
        after = ask(LORA_DIR)
    '''),
    md('''
        ## 6. Export to Hugging Face

        `hf_export` writes the merged model (safetensors, `config.json`, a tokenizer whose chat
        template renders the ChatML the model was trained on); `peft_export` writes the adapter
        alone in PEFT's format beside its base. Then `transformers` loads the export and answers
        the first question greedily, next to llm_jax's answer.
    '''),
    code('''
        from llm_jax.convert import hf_export, peft_export

        EXPORT_DIR = os.path.join(RUNS_DIR, "export", "merged")
        hf_export.export_hf(LORA_DIR, EXPORT_DIR)
        print(EXPORT_DIR, sorted(os.listdir(EXPORT_DIR)))
        if LORA_RANK:
          base_dir, adapter_dir = peft_export.export_peft(LORA_DIR, os.path.join(RUNS_DIR, "export", "peft"))
          print(adapter_dir, sorted(os.listdir(adapter_dir)))
    '''),
    code('''
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
    '''),
]


# ---------------------------------------------------------------------------------------------
# 04: devices, mesh, precision, shardings, tokens/s, MFU

DEVICES = [
    header("04_tpu_and_gpu", "TPUs and GPUs: the mesh, bf16, shardings, tokens/s and MFU", '''
        llm_jax lays the devices out as a `data x fsdp x tensor` mesh and places every parameter
        and activation on it by its logical axis names (`config.sharding_rules`). On a Colab TPU
        or GPU runtime this notebook prints the mesh, the precision settings, the sharding rules
        and where each parameter lives, then trains a short pretraining run and reports its
        tokens/s and MFU (model FLOPs against the chips' bf16 peak). On a CPU runtime it splits
        the CPU into 8 virtual devices, so the mesh and shardings are the real ones, and says
        so: the speed is then a CPU's.
    ''', accelerator="TPU or GPU (Runtime > Change runtime type); a CPU runtime works too"),
    SETUP,
    PARAMS_NOTE,
    code('''
        STEPS = 60  # pretraining steps (the first compiles; tokens/s and MFU are from the rest)
        PRESET = "auto"  # auto: minimind-26m on a GPU/TPU, tiny on a CPU; or any preset of configs/models.py
        DTYPE = "bfloat16"  # compute dtype (config.model.dtype); parameters and AdamW stay float32
        MESH = {}  # e.g. {"data": 2, "fsdp": 2, "tensor": 2}; {} = tensor 2 and fsdp 2 where the devices allow
        VIRTUAL_DEVICES = 8  # without an accelerator: split the CPU into this many devices
        RUNS_DIR = "runs"  # run directories go here
        MOUNT_DRIVE = False  # Colab: mount Google Drive and keep RUNS_DIR under MyDrive/
        OVERRIDES = {}  # config fields by dotted name: {"data.batch_size": 64, "model.remat_policy": "full"}
    ''', "parameters"),
    code('''
        # Before JAX starts: without an accelerator, XLA splits the CPU into VIRTUAL_DEVICES
        # devices (GPU and TPU runtimes ignore this flag).
        if "jax" in sys.modules:
          print("JAX is already running: restart the runtime for VIRTUAL_DEVICES to apply")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={VIRTUAL_DEVICES}").strip()
        import jax
    '''),
    RUNS,
    md('''
        ## 1. Devices and mesh
    '''),
    code('''
        import numpy as np
        from llm_jax import sharding

        print("devices:", notebook.describe_devices())
        n = jax.device_count()
        on_accelerator = jax.default_backend() != "cpu"
        preset = PRESET if PRESET != "auto" else ("minimind-26m" if on_accelerator else "tiny")
        if MESH:
          mesh_fields = MESH
        else:  # tensor parallelism 2 and FSDP 2 when there are devices for them; data takes the rest
          tensor = 2 if n >= 4 and n % 2 == 0 else 1
          fsdp = 2 if (n // tensor) % 2 == 0 else 1
          mesh_fields = {"data": -1, "fsdp": fsdp, "tensor": tensor}
        fields = {"train.steps": STEPS, "train.eval_every": 0, "train.log_every": 10,
                  "model.dtype": DTYPE, **{f"mesh.{k}": v for k, v in mesh_fields.items()}}
        if on_accelerator:  # enough tokens per step to keep an accelerator busy
          fields.update({"data.batch_size": 32, "data.seq_len": 512})
        config = notebook.config("pretrain", preset, {**fields, **OVERRIDES})
        mesh = sharding.make_mesh(config.mesh)
        print("mesh:", dict(mesh.shape))
        print(f"device ids laid out as ({', '.join(mesh.axis_names)}):")
        print(np.vectorize(lambda d: d.id)(mesh.devices))
    '''),
    md('''
        ## 2. Precision

        | what | dtype |
        |---|---|
        | parameters, gradients, AdamW moments (`model.param_dtype`) | float32 |
        | matmul operands: projections, attention, logits, and their backward matmuls (`model.dtype`) | `DTYPE` (bfloat16) |
        | matmul accumulation, RMSNorm, RoPE, softmax, logits, log Z, loss | float32 |
        | residual stream, MLP activations | `DTYPE` |

        A T4 has no bfloat16 units (XLA runs bf16 there at float32 speed); L4, A100, H100 and
        every TPU do.
    '''),
    code('''
        from llm_jax.model.kernels import dispatch
        from llm_jax.train import metrics as metrics_lib, run_setup

        WORKDIR = os.path.join(RUNS_DIR, f"mesh_{preset}")
        os.makedirs(WORKDIR, exist_ok=True)
        tok = run_setup.resolve_tokenizer(config, WORKDIR)
        model_cfg = run_setup.resolve_model(config, tok.vocab_size)
        print(f"compute {model_cfg.dtype}, parameters {model_cfg.param_dtype}, remat "
              f"{model_cfg.remat_policy}")
        print("attention:", dispatch.fused_impl(model_cfg, config.data.seq_len) or "xla",
              f"(config.model.attention={model_cfg.attention!r})")
        print("peak for MFU: %.1f TFLOP/s (%s)" % (metrics_lib.peak_flops(model_cfg.dtype)[0] / 1e12,
                                                  metrics_lib.peak_flops(model_cfg.dtype)[1]))
    '''),
    md('''
        ## 3. Sharding rules and where each parameter lives

        Each rule maps a logical axis to mesh axes; weights use the plain names, activations the
        `act_` ones. The table below is computed with `jax.eval_shape`, the way the trainer
        places the state; nothing is allocated.
    '''),
    code('''
        rules = tuple(tuple(r) for r in config.sharding_rules)
        display(Markdown(notebook.rules_table(rules)))
        display(Markdown(notebook.params_table(model_cfg, mesh, rules)))
    '''),
    md(f'''
        ## 4. Train: tokens/s and MFU

        {RESUME_NOTE}
    '''),
    code('''
        from llm_jax.train import loop

        result = loop.train_and_evaluate(config, WORKDIR)
        if "tokens_per_s" in result:
          print(f"{notebook.describe_devices()}\\n"
                f"{result['tokens_per_s']:,.0f} tokens/s, MFU {result['mfu']:.1%}, "
                f"{result['step_time_s'] * 1e3:.1f} ms/step "
                f"({config.data.batch_size} x {config.data.seq_len} tokens per step, {model_cfg.dtype})")
        else:
          print(f"{WORKDIR} had trained {result['step']} steps already; delete it to measure again")
    '''),
    md('''
        ## Next

        - Plan a bigger model before renting devices: `python -m llm_jax.plan
          --config=configs/pretrain.py:qwen2-0.5b --devices=8xH100` prints the memory per device
          and the mesh and remat policy that fit (`docs/scaling.md`, the planner).
        - Benchmark one train step: `python -m llm_jax.bench --config=configs/pretrain.py`.
        - Pods and clusters: `launch/tpu_pod.sh`, `launch/slurm_gpu.sbatch` (`docs/scaling.md`).
    '''),
]


NOTEBOOKS = {
    "01_quickstart": (QUICKSTART, ""),
    "02_pretrain_then_finetune": (PRETRAIN, ""),
    "03_finetune_a_hf_model": (HF, "GPU"),
    "04_tpu_and_gpu": (DEVICES, "GPU"),
}


def build(name: str) -> nbformat.NotebookNode:
  cells, accelerator = NOTEBOOKS[name]
  nb = v4.new_notebook()
  nb.cells = [nbformat.from_dict(c) for c in cells]
  for i, cell in enumerate(nb.cells):
    cell.id = f"{name[:2]}-{i:02d}"  # stable ids: regenerating changes nothing
  nb.metadata = {
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "colab": {"provenance": [], "toc_visible": True},
  }
  if accelerator:
    nb.metadata["accelerator"] = accelerator
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
  verb = "differ from colab/make_notebooks.py (run it)" if check else "written"
  for path in stale:
    print(f"{path}: {verb}")
  return 1 if check and stale else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
