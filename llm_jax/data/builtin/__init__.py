"""The embedded datasets that `builtin:<name>` names in config.data.train / data.eval: a fictional
bilingual encyclopedia of invented people (bios.py) and post-training sets about the same
people (post.py). Generated in memory from config.data.synthetic; nothing is downloaded.

  builtin:bios              biographies (pretraining)          bios.generate()["bios"]
  builtin:bios_eval         other biographies of the same people             ["bios_eval"]
  builtin:bios_qa_train     QA chats about the training people (SFT)         ["qa_train"]
  builtin:bios_qa_heldout   QA chats about the held-out people (evaluation)  ["qa_heldout"]
  builtin:bios_dpo_train    preference pairs (DPO)             post.generate()["dpo_train"]
  builtin:bios_dpo_heldout  held-out pairs                                   ["dpo_heldout"]
  builtin:bios_r1_train     reasoning traces (distillation)                  ["r1_train"]
  builtin:bios_r1_heldout   held-out traces                                  ["r1_heldout"]
  builtin:arith_sft         arithmetic word problems solved (SFT)  arith.generate()["sft"]
  builtin:arith_train       RL prompts {"prompt", "answer"} (GRPO)           ["train"]
  builtin:arith_heldout     RL prompts over held-out number pairs            ["heldout"]

`records(name, cfg)` is the one resolver; the pipeline and the eval tasks both read through it.
"""

from llm_jax.data.builtin import arith, bios, post

PREFIX = "builtin:"
# name after "builtin:" -> (generator module, split)
BUILTINS = {"bios": (bios, "bios"), "bios_eval": (bios, "bios_eval"),
            "bios_qa_train": (bios, "qa_train"), "bios_qa_heldout": (bios, "qa_heldout"),
            "bios_dpo_train": (post, "dpo_train"), "bios_dpo_heldout": (post, "dpo_heldout"),
            "bios_r1_train": (post, "r1_train"), "bios_r1_heldout": (post, "r1_heldout"),
            "arith_sft": (arith, "sft"), "arith_train": (arith, "train"),
            "arith_heldout": (arith, "heldout")}


def is_builtin(path: str) -> bool:
  return path.startswith(PREFIX)


def records(path: str, synthetic_cfg, field: str = "config.data") -> list[dict]:
  """The records of `builtin:<name>` for config.data.synthetic, as generated ({"text"},
  {"messages"} or a pair); an unknown name is one error naming `field` and the known ones."""
  name = path[len(PREFIX):] if is_builtin(path) else path
  if name not in BUILTINS:
    raise ValueError(f"{field}: unknown built-in source {path!r}; known: "
                     f"{[PREFIX + b for b in BUILTINS]}.")
  module, split = BUILTINS[name]
  return module.generate(synthetic_cfg)[split]
