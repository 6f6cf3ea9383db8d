"""The GRPO follow-up stage: RL from the PSFT checkpoint with a math-grader reward."""
