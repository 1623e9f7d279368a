#!/usr/bin/env bash
# Experiment 2 of docs/experiments.md: does fine-tuning inject knowledge?
#   bash docs/experiments/knowledge.sh [train|eval|all] [runs dir]
# Tiny-model runs on a 100-person English encyclopedia (20% of people's QA held out of SFT, 10% of
# people's biographies left out of pretraining), one shared tokenizer, then the knowledge task on
# each run and a comparison table. A run whose last checkpoint exists is not trained again.
set -euo pipefail
cd "$(dirname "$0")/../.."
PHASE=${1:-all}
R=${2:-runs/knowledge}
PY="nice -n 10 python -m llm_jax.main"
S="--config.data.synthetic.languages=en --config.data.synthetic.n_entities=100 \
   --config.data.synthetic.unseen_fraction=0.1 --config.data.synthetic.qa_phrasings=1"
COMMON="$S --config.data.seq_len=128 --config.data.batch_size=16 --config.train.eval_every=0 \
   --config.checkpoint.keep=1 --config.data.tokenizer.path=$R/tok/tokenizer.model"
# Biographies: "default" = 3 phrasings per person in shuffled sentence order (the default data,
# itself an augmentation); "single" = one fixed-order biography per person (augment=single,
# Physics of LM's bioS single). Try multi5+permute the same way.
AUG_default=""; AUG_single="--config.data.synthetic.augment=single"
PRE_STEPS=400; SFT_STEPS=60; MIX_STEPS=320
trained() { [[ -d $1/checkpoints/$2 ]]; }

if [[ $PHASE == train || $PHASE == all ]]; then
  # One tokenizer for every run, so their answers are comparable.
  [[ -f $R/tok/tokenizer.model ]] || $PY --config=configs/pretrain.py --config.job=tokenizer \
    --workdir=$R/tok $S --config.data.tokenizer.vocab_size=1024 \
    --config.data.train=builtin:bios,builtin:bios_qa_train,builtin:bios_qa_heldout
  # (a) pretrain on biographies, then SFT on the QA of 80% of people; default and single bios.
  for A in default single; do
    X=AUG_$A; X=${!X}
    trained $R/pretrain_$A $PRE_STEPS || $PY --config=configs/pretrain.py --workdir=$R/pretrain_$A \
      $COMMON $X --config.train.steps=$PRE_STEPS
    trained $R/a_pre_sft_$A $SFT_STEPS || $PY --config=configs/sft.py --workdir=$R/a_pre_sft_$A \
      $COMMON $X --config.init_from=$R/pretrain_$A --config.train.steps=$SFT_STEPS \
      --config.train.lr=1e-3 --config.train.warmup_steps=10
  done
  # (b) SFT only (no biographies at all).
  trained $R/b_sft_only $SFT_STEPS || $PY --config=configs/sft.py --workdir=$R/b_sft_only $COMMON \
    --config.train.steps=$SFT_STEPS --config.train.warmup_steps=10
  # (c) mixed: biographies (every token trained) and QA (answers trained) in one run.
  trained $R/c_mixed_default $MIX_STEPS || $PY --config=configs/sft.py --workdir=$R/c_mixed_default \
    $COMMON --config.train.steps=$MIX_STEPS --config.data.train=builtin:bios,builtin:bios_qa_train
fi

if [[ $PHASE == eval || $PHASE == all ]]; then
  for RUN in a_pre_sft_default a_pre_sft_single b_sft_only c_mixed_default; do
    $PY --config=configs/eval.py --workdir=$R/$RUN --config.eval.tasks=knowledge,choice \
      --config.eval.max_new_tokens=32 --config.eval.choice_format=cloze --config.eval.max_examples=0
  done
  nice -n 10 python -m llm_jax.eval.compare --runs=$R/a_pre_sft_single,$R/a_pre_sft_default,$R/b_sft_only,$R/c_mixed_default \
    --labels="(a) pretrain[single]+SFT,(a) pretrain[default]+SFT,(b) SFT only,(c) mixed[default]" \
    --metrics=knowledge.qa_heldout+bio_seen.contains,knowledge.qa_heldout+bio_seen.exact,knowledge.qa_trained+bio_seen.contains,knowledge.qa_heldout+bio_unseen.contains,choice.acc \
    --out=docs/experiments/knowledge --title="Held-out people's QA accuracy (knowledge task)"
fi
