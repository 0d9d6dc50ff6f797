"""The command line of train.py: its flags, the two sets of defaults (paper / demo) and their checks.

Every flag whose default differs between the paper's setting (a real checkpoint, `--model`) and the
CPU demo (no `--model`) has None in argparse and both values in DEFAULTS; parse_args fills the one that
applies and `--help` shows both. Bad paths or flags end the run with one line and exit code 2 (fail).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpo
from readers import FORMATS
from reczero import REWARD_PRESETS, SHORT_SYSTEM_PROMPT, SYSTEM_PROMPT, PromptCaps

DESCRIPTION = "RecZero / RecOne training: command line, cold-start SFT, the GRPO loop, evaluation, checkpoints."

# Defaults: (the paper's setting for a real model, the CPU demo). None in argparse means "not given".
DEFAULTS = {
    "steps": (300, 60), "prompts_per_step": (8, 16), "samples": (8, 8), "lr": (2e-6, 2e-4),
    "temperature": (1.0, 1.0), "max_new_tokens": (1024, 96), "cold_start_size": (1000, 3000),
    "sft_epochs": (2, 3), "sft_lr": (1e-5, 3e-3), "sft_batch": (16, 4), "sft_prompt_weight": (0.0, 0.0),
    "eval_size": (1000, 300), "eval_every": (50, 10), "mode": ("recone", "recone"), "micro_batch": (8, 64),
    "max_user_history": (10, 6), "max_item_history": (10, 6), "select": ("last", "best"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults shown as 'paper / demo': the first applies with --model, the second without.")
    d = lambda k: f" (default: {DEFAULTS[k][0]} / {DEFAULTS[k][1]})"  # noqa: E731
    a = p.add_argument
    a("--model", help="Hugging Face checkpoint directory (safetensors); omit for the embedded demo")
    a("--data", help="ratings file or dataset directory; omit for the embedded synthetic data")
    a("--data-format", choices=FORMATS, help="format of --data")
    a("--meta", help="item metadata file (Amazon, Yelp) when not found next to --data")
    a("--synthetic-users", type=int, default=1200, help="users in the embedded synthetic dataset")
    a("--skip-bad-rows", action="store_true", help="skip malformed data rows (and report how many) instead of stopping")
    a("--mode", choices=("reczero", "recone"), help="reczero: RL only; recone: cold-start SFT, then RL" + d("mode"))
    a("--teacher", default="heuristic", help="RecOne teacher: 'heuristic' or a checkpoint directory (sampled greedily)")
    a("--sft-traces", help="JSONL of cold-start traces {user_id, item_id, time, text}; default: the heuristic teacher")
    a("--out", default="runs/demo", help="output directory (checkpoints, metrics.jsonl, samples, plot)")
    a("--seed", type=int, default=0, help="seed for data, model init, sampling and prompt order")
    a("--steps", type=int, help="GRPO steps" + d("steps"))
    a("--prompts-per-step", type=int, help="prompts per GRPO step (over all ranks)" + d("prompts_per_step"))
    a("--samples", type=int, help="completions per prompt, G" + d("samples"))
    a("--lr", type=float, help="GRPO AdamW learning rate" + d("lr"))
    a("--temperature", type=float, help="rollout temperature" + d("temperature"))
    a("--top-p", type=float, default=1.0, help="rollout top-p (1 = off; keep off so ratios start at 1)")
    a("--top-k", type=int, default=0, help="rollout top-k (0 = off)")
    a("--max-new-tokens", type=int, help="completion cap" + d("max_new_tokens"))
    a("--beta", type=float, default=0.0, help="KL coefficient; > 0 loads a frozen reference model (default 0, the paper)")
    a("--kl-estimator", choices=("k1", "k2", "k3"), default="k3", help="KL estimator when beta > 0")
    a("--clip-low", type=float, default=0.2, help="PPO clip: ratio >= 1 - clip_low")
    a("--clip-high", type=float, default=0.2, help="PPO clip: ratio <= 1 + clip_high (DAPO: 0.28)")
    a("--loss-agg", choices=grpo.LOSS_AGG_MODES, default="token-mean", help="loss aggregation (default token-mean, the paper's verl)")
    a("--adv-scale", choices=("group", "batch", "none"), default="group", help="advantage std: group (GRPO), batch, none (Dr. GRPO)")
    a("--mu", type=int, default=1, help="optimizer passes per rollout batch")
    a("--micro-batch", type=int, help="rows per forward/backward" + d("micro_batch"))
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    a("--drop-truncated", action="store_true", help="leave completions that hit --max-new-tokens out of the loss")
    a("--reward", choices=tuple(REWARD_PRESETS), default="paper", help="paper: +-0.5, 1-|e|/4; code: +-1, 1-|e|/2")
    a("--cold-start-size", type=int, help="examples the teacher is asked about (RecOne)" + d("cold_start_size"))
    a("--sft-epochs", type=int, help="cold-start SFT epochs" + d("sft_epochs"))
    a("--sft-lr", type=float, help="cold-start SFT learning rate" + d("sft_lr"))
    a("--sft-batch", type=int, help="cold-start SFT batch size" + d("sft_batch"))
    a("--sft-prompt-weight", type=float, help="weight of the prompt tokens' LM loss in SFT (the demo model has "
      "never read text, so it also learns the prompt's language)" + d("sft_prompt_weight"))
    a("--eval-size", type=int, help="test examples scored (greedy)" + d("eval_size"))
    a("--eval-every", type=int, help="evaluate on validation examples every N steps" + d("eval_every"))
    a("--select", choices=("last", "best"), help="weights scored on the test set at the end: the last step's, or "
      "those with the lowest validation MAE among the evaluations, step 0 included" + d("select"))
    a("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    a("--sample-every", type=int, default=10, help="write a few sample completions every N steps")
    a("--eval-only", action="store_true", help="score --model (or --resume) on the test set and exit")
    a("--resume", help="checkpoint directory to continue from (written by this script)")
    a("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
      help="compute dtype (autocast); auto: bf16 on CUDA, fp32 on CPU")
    a("--master-weights", choices=("fp32", "same"), default="fp32", help="dtype of the trained weights and AdamW "
      "state: fp32 (default; a 2e-6 step is below bf16's resolution) or the compute dtype (halves memory)")
    a("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    a("--grad-checkpointing", action="store_true", help="recompute each block in backward to save memory")
    a("--system-prompt", default="auto", help="'full' (the four-step prompt), 'short', or a file (auto: full / short)")
    a("--max-user-history", type=int, help="user history entries shown (the paper: 10)" + d("max_user_history"))
    a("--max-item-history", type=int, help="item history entries shown (the paper: 10)" + d("max_item_history"))
    a("--item-texts", choices=("on", "off"), help="show the target item's earlier reviews and summaries (default: on / off)")
    a("--history-fields", help="comma-separated item fields shown in each user-history block (default: all, "
      "as in the paper; demo: Categories, to keep CPU sequences short)")
    a("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    demo = args.model is None
    for k, (paper, dem) in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, dem if demo else paper)
    args.demo = demo
    return args


def fail(msg: str):
    """One clear line and exit code 2 for bad paths or flags."""
    print(f"train.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_args(args):
    """Refuse bad flag combinations and missing paths before any work starts (one line, exit 2)."""
    if args.data and not args.data_format:
        fail("--data needs --data-format")
    if args.data_format and not args.data:
        fail("--data-format needs --data")
    if args.teacher != "heuristic" and not (Path(args.teacher) / "config.json").exists():
        fail(f"--teacher {args.teacher}: not 'heuristic' or a checkpoint directory")
    for flag in ("model", "data", "meta", "sft_traces", "resume"):
        path = getattr(args, flag)
        if path and not Path(path).exists():
            fail(f"--{flag.replace('_', '-')} {path}: no such file or directory")
    if args.model and not (Path(args.model) / "config.json").exists():
        fail(f"--model {args.model}: not a checkpoint directory (no config.json)")
    if args.prompts_per_step % max(int(os.environ.get("WORLD_SIZE", 1)), 1):
        fail("--prompts-per-step must be divisible by the number of ranks")
    if args.temperature <= 0:
        fail("--temperature must be > 0 for training rollouts (evaluation is always greedy)")


def prompt_settings(args) -> tuple[PromptCaps, str]:
    """The prompt caps and system prompt the flags ask for."""
    caps = PromptCaps(max_user_history=args.max_user_history, max_item_history=args.max_item_history)
    caps.item_texts = (args.item_texts or ("off" if args.demo else "on")) == "on"
    fields = args.history_fields or ("Categories" if args.demo else None)
    if fields:
        caps.history_fields = tuple(f.strip() for f in fields.split(","))
    choice = args.system_prompt if args.system_prompt != "auto" else ("short" if args.demo else "full")
    if choice in ("full", "short"):
        return caps, SYSTEM_PROMPT if choice == "full" else SHORT_SYSTEM_PROMPT
    if not Path(choice).exists():
        fail(f"--system-prompt {choice}: not 'full', 'short' or a file")
    return caps, Path(choice).read_text()
