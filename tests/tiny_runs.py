"""Tiny end-to-end runs of train.py shared by test_train.py and test_lora.py: the flags, the metrics
reader, and rewards that give a tiny model's steps real gradients."""

from __future__ import annotations

import json
from pathlib import Path

import train

TINY = ["--synthetic-users", "150", "--cold-start-size", "24", "--sft-epochs", "1", "--eval-size", "6",
        "--valid-size", "6", "--prompts-per-step", "2", "--samples", "3", "--max-new-tokens", "20", "--eval-every", "2",
        "--sample-every", "1", "--threads", "1", "--select", "best"]


def metrics(out: Path, stage="grpo") -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl")) if r.get("stage") == stage}


def varied_rewards(mp):
    """The tiny demo model never writes the format, so every real reward is -0.5 and every gradient 0:
    a comparison of resumed steps would compare zeros. These rewards differ within each group (a
    deterministic function of the completion's text), so the steps really update the weights."""
    from reczero import Reward

    def reward(text, truth, cfg):
        r = (sum(text.encode()) % 13) / 13
        return Reward(r, 0.0, r, False, None)

    mp.setattr(train, "compute_reward", reward)
