"""Checks that llm_jax's `choice` task gives lm-evaluation-harness's numbers on the same file.

lm-eval scores the run exported to Hugging Face format with its own `hf` backend (torch), on a
custom task whose template is choice.py's; llm_jax scores the run itself. Both accuracies and
every per-choice log-likelihood are compared. lm-eval is not a dependency of llm_jax: run this in
an environment that has it (pip install lm-eval==0.4.13), e.g. a venv with system packages:

  python -m llm_jax.convert.hf_export --workdir=RUN --out=/tmp/hf_run
  python docs/experiments/lm_eval_parity.py --workdir=RUN --hf_dir=/tmp/hf_run --out=/tmp/parity

When the OpenAI-style server lands, the same task runs through it with lm-eval's
`local-completions` model (see the report); the accuracies must match this.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "llm_jax run directory")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "the same run exported with llm_jax.convert.hf_export")
_OUT = flags.DEFINE_string("out", "/tmp/lm_eval_parity", "scratch directory")
_N = flags.DEFINE_integer("n", 60, "questions from builtin:bios_choice")
_BASE_URL = flags.DEFINE_string(
    "base_url", "", "Score through an OpenAI-style completions server instead of the hf backend "
    "(e.g. http://127.0.0.1:8000/v1/completions): lm-eval's local-completions model, which needs "
    "echo + logprobs on prompt tokens (max_tokens=0). Not yet run: the server has not landed.")

TEMPLATES = {
    "letters": ("{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                "D. {{choices[3]}}\nAnswer:", '["A", "B", "C", "D"]'),
    "cloze": ("Question: {{question.strip()}}\nAnswer:", "{{choices}}"),
}


def main(argv):
  del argv
  from llm_jax.eval import choice  # pylint: disable=g-import-not-at-top
  from llm_jax import checkpoint, rundir  # pylint: disable=g-import-not-at-top
  from configs import data as data_config  # pylint: disable=g-import-not-at-top
  os.makedirs(_OUT.value, exist_ok=True)
  run = rundir.read_config(_WORKDIR.value)
  syn = data_config.get_config().synthetic
  syn.update(run.data.synthetic.to_dict())
  qs = choice.builtin_questions(syn, limit=_N.value)
  data = os.path.join(_OUT.value, "mc.jsonl")
  with open(data, "w", encoding="utf-8") as f:
    for q in qs:
      f.write(json.dumps({"question": q.question, "choices": q.choices, "answer": q.answer},
                         ensure_ascii=False) + "\n")
  report = {}
  for fmt, (text, choices) in TEMPLATES.items():
    task_dir = os.path.join(_OUT.value, f"task_{fmt}")
    os.makedirs(task_dir, exist_ok=True)
    with open(os.path.join(task_dir, "task.yaml"), "w", encoding="utf-8") as f:
      f.write(f"task: llm_jax_parity_{fmt}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
              f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
              f"doc_to_text: {json.dumps(text)}\ndoc_to_choice: '{choices}'\n"
              "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    import lm_eval  # pylint: disable=g-import-not-at-top
    from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
    if _BASE_URL.value:
      model, model_args = "local-completions", (f"base_url={_BASE_URL.value},model=llm_jax,"
                                                f"tokenizer={_HF_DIR.value},tokenized_requests=True")
    else:
      model, model_args = "hf", f"pretrained={_HF_DIR.value},dtype=float32"
    res = lm_eval.simple_evaluate(
        model=model, model_args=model_args, device="cpu",
        tasks=[f"llm_jax_parity_{fmt}"], task_manager=TaskManager(include_path=task_dir),
        num_fewshot=0, batch_size=8, log_samples=True)
    name = f"llm_jax_parity_{fmt}"
    theirs_acc = res["results"][name]["acc,none"]
    theirs_ll = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in res["samples"][name]}
    out_dir = os.path.join(_OUT.value, f"ours_{fmt}")
    subprocess.run([sys.executable, "-m", "llm_jax.main", "--config=configs/eval.py",
                    f"--workdir={_WORKDIR.value}", "--config.eval.tasks=choice",
                    f"--config.eval.choice_file={data}", f"--config.eval.choice_format={fmt}",
                    "--config.eval.choice_style=en", "--config.eval.max_examples=0",
                    f"--config.eval.out_dir={out_dir}", "--config.eval.plots=false"], check=True)
    step = max(checkpoint.steps(_WORKDIR.value))
    ours = json.load(open(os.path.join(out_dir, f"eval_{step}.json")))["tasks"]["choice"]
    samples = [json.loads(l) for l in open(os.path.join(out_dir, "samples",
                                                        f"step_{step}_choice.jsonl"))]
    diff = max(abs(a - b) for i, s in enumerate(samples) for a, b in zip(s["logliks"],
                                                                         theirs_ll[i]))
    report[fmt] = {"lm_eval_acc": theirs_acc, "llm_jax_acc": ours["acc"],
                   "max_loglik_diff": diff, "questions": len(samples)}
    print(fmt, report[fmt])
  with open(os.path.join(_OUT.value, "report.json"), "w") as f:
    json.dump(report, f, indent=2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "hf_dir"])
  app.run(main)
