"""A user reward function for the GRPO tests (config.grpo.rewards="tests.grpo_rewards:digits"):
dense, so a random tiny model gets groups with different rewards."""


def digits(prompts, completions, **fields):
  assert len(fields["answer"]) == len(completions)  # record fields arrive, one per completion
  return [sum(ch.isdigit() for ch in c) / 4.0 for c in completions]
