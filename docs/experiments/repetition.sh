#!/usr/bin/env bash
# Experiment 1 of docs/experiments.md: does repetition fade as the loss falls?
#   bash docs/experiments/repetition.sh [train|eval|all] [run dir]
# SFT from scratch (no pretraining) on the embedded encyclopedia's QA chats, a checkpoint every
# 20 steps, then the loss and repetition tasks on every checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../.."
PHASE=${1:-all}
R=${2:-runs/repetition}
PY="nice -n 10 python -m llm_jax.main"

if [[ $PHASE == train || $PHASE == all ]]; then
  [[ -d $R/checkpoints/200 ]] || $PY --config=configs/sft.py --workdir=$R \
    --config.train.steps=200 --config.train.warmup_steps=20 --config.data.batch_size=8 \
    --config.checkpoint.every=20 --config.checkpoint.keep=100 --config.train.eval_every=0 \
    --config.data.synthetic.n_entities=1500 --config.data.synthetic.qa_phrasings=1 \
    --config.data.tokenizer.vocab_size=4096  # the encyclopedia as measured (sft.py's before 2026-12-07)
fi

if [[ $PHASE == eval || $PHASE == all ]]; then
  $PY --config=configs/eval.py --workdir=$R --config.eval.steps=all \
    --config.eval.tasks=loss,repetition --config.eval.max_batches=4 --config.eval.max_examples=32
  nice -n 10 python - "$R" <<'PY'
import sys
from llm_jax.eval import plots, summary
# Checkpoints whose greedy answers are all shorter than 4 tokens have no seq-rep-4 (null).
rows = [r for r in summary.load_results(sys.argv[1])
        if r["tasks"]["repetition"]["greedy"]["seq_rep_4"] is not None]
steps = [r["step"] for r in rows]
loss = [r["tasks"]["loss"]["loss"] for r in rows]
rep = [r["tasks"]["repetition"]["greedy"]["seq_rep_4"] for r in rows]
plots.twin(steps, ("eval loss", loss), ("seq-rep-4 of greedy answers", rep),
           "docs/experiments/repetition.png", title="SFT from scratch: loss and repetition")
print(f"Pearson r(loss, seq-rep-4) = {summary.pearson(loss, rep):+.3f}, "
      f"Spearman rho = {summary.spearman(loss, rep):+.3f} over {len(steps)} checkpoints")
PY
fi
