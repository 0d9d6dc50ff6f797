"""train.py's command line: every flag is a field of RunConfig, with its two defaults and its checks.

A flag is declared once, as a RunConfig field: `--clip-low` is `clip_low`, and the config dataclasses
of the stages (grpo.GRPOConfig, train.SFTConfig, model.SamplingConfig) use the same field names, so
`from_flags(GRPOConfig, cfg)` builds them without renaming anything. A field whose default differs between
the paper's setting (a real checkpoint, `--model`) and the CPU demo (no `--model`) carries both;
parse_args applies the one that fits and `--help` shows both. A numeric field also says which values
make sense (`Range`); check_args refuses any other, and bad paths, before any work starts: one line
and exit code 2 (`fail`). Flags that the run would ignore (the cold start's under --mode reczero, the
teacher's with --sft-traces) are named in a warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from data import RATING_SCALE
from grpo import LOSS_AGG_MODES
from lora import TARGETS as LORA_TARGETS
from model import CheckpointError
from plumbing.checkpoints import read_trainer_state
from plumbing.readers import FORMATS
from plumbing.runs import lock_holder, recover
from reczero import REWARD_PRESETS, SHORT_SYSTEM_PROMPT, PromptCaps, full_system_prompt

_UNSET = object()


@dataclass(frozen=True)
class Range:
    """The values a numeric flag accepts: lo <= v <= hi, strict where *_open; floats must be finite."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def __contains__(self, v) -> bool:
        return (math.isfinite(v) and (self.lo < v if self.lo_open else self.lo <= v)
                and (v < self.hi if self.hi_open else v <= self.hi))

    def __str__(self) -> str:
        lo, hi = (f"{x:g}" if isinstance(x, float) else str(x) for x in (self.lo, self.hi))  # ints exactly
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {lo}"
        return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


def at_least(lo: float, why: str = "") -> Range:
    return Range(lo, why=why)


def above(lo: float, why: str = "") -> Range:
    return Range(lo, lo_open=True, why=why)


def option(help: str, default=None, demo=_UNSET, choices=None, valid: Range | None = None):
    """A RunConfig field and its flag. `default` applies with --model (the paper's setting) and
    `demo` without it (the embedded CPU demo), when the two differ; `valid`: the values that make sense."""
    return field(default=default, metadata={"help": help, "demo": demo, "choices": choices, "valid": valid})


@dataclass
class RunConfig:
    """Everything one run of train.py is asked to do; one field per command-line flag."""

    # what to train on
    model: str | None = option("Hugging Face checkpoint directory (safetensors); omit for the embedded demo")
    data: str | None = option("ratings file or dataset directory; omit for the embedded synthetic data")
    data_format: str | None = option("format of --data", choices=FORMATS)
    meta: str | None = option("item metadata file (Amazon, Yelp) when not found next to --data")
    split: str = option("user-last: each user's last rating is test, the one before valid; global: the latest "
                        "10%% of all ratings test, the 10%% before them valid (closer to Reason4Rec's chronological "
                        "split)", "user-last", choices=("user-last", "global"))
    synthetic_users: int = option("users in the embedded synthetic dataset", 1200, valid=at_least(1))
    drop_duplicates: bool = option("keep only the first of ratings with the same (user, item, time); without "
                                   "it they are kept, with a warning", False)
    skip_bad_rows: bool = option("skip malformed data rows (and report how many) instead of stopping", False)
    mode: str = option("reczero: RL only; recone: cold-start SFT, then RL", "recone", choices=("reczero", "recone"))
    out: str = option("output directory (checkpoints, metrics.jsonl, samples, plot): one run per folder; "
                      "--eval-only writes into OUT/eval/", "runs/demo")
    overwrite: bool = option("let a new run replace the earlier run's files in --out (removed first); without "
                             "it a folder that holds another run is refused", False)
    seed: int = option("seed for data, model init, sampling and prompt order", 0,
                       valid=Range(0, 2**64 - 1, why="torch's generators take 64-bit seeds"))
    # RecOne's cold start
    teacher: str = option("RecOne teacher: 'heuristic' or a checkpoint directory (sampled greedily)", "heuristic")
    sft_traces: str | None = option("JSONL of cold-start traces {user_id, item_id, time, text}; "
                                    "default: the heuristic teacher")
    cold_start_size: int = option("training examples the teacher is asked about, drawn at random (RecOne)",
                                  1000, 100000, valid=at_least(1))
    rationalise_rate: float = option("heuristic teacher: the chance it manages to argue its way to a true rating "
                                     "within one star of its own", 0.3, valid=Range(0, 1))
    sft_epochs: int = option("cold-start SFT epochs", 2, 2, valid=at_least(1))
    sft_lr: float = option("cold-start SFT learning rate", 1e-5, 1e-3, valid=above(0))
    sft_batch: int = option("cold-start SFT batch size", 16, 16, valid=at_least(1))
    sft_prompt_weight: float = option("weight of the prompt tokens' LM loss in SFT (the demo model has never "
                                      "read text, so it could also learn the prompt's language)", 0.0,
                                      valid=at_least(0))
    sft_save_every: int = option("checkpoint the cold-start SFT every N batches (and at its end)", 50,
                                 valid=at_least(1))
    # GRPO
    steps: int = option("GRPO steps", 300, 60, valid=at_least(0))
    prompts_per_step: int = option("prompts per GRPO step (over all ranks)", 8, 16, valid=at_least(1))
    samples: int = option("completions per prompt, G", 8,
                          valid=at_least(2, "GRPO compares a prompt's completions: a group of one has advantage 0"))
    lr: float = option("GRPO AdamW learning rate", 2e-6, 1e-4, valid=above(0))
    temperature: float = option("rollout temperature", 1.0,
                                valid=above(0, "for training rollouts; evaluation is always greedy"))
    top_p: float = option("rollout top-p (1 = off; keep off so ratios start at 1)", 1.0,
                          valid=Range(0, 1, lo_open=True))
    top_k: int = option("rollout top-k (0 = off)", 0, valid=at_least(0))
    max_new_tokens: int = option("completion cap", 1024, 96, valid=at_least(1))
    beta: float = option("KL coefficient; > 0 loads a frozen reference model (the paper: 0)", 0.0, 0.3,
                         valid=at_least(0))
    kl_estimator: str = option("KL estimator when beta > 0", "k3", choices=("k1", "k2", "k3"))
    clip_low: float = option("PPO clip: ratio >= 1 - clip_low", 0.2,
                             valid=Range(0, 1, hi_open=True, why="the ratio's lower bound 1 - clip_low must be > 0"))
    clip_high: float = option("PPO clip: ratio <= 1 + clip_high (DAPO: 0.28)", 0.2,
                              valid=Range(0, 100, why="a larger bound clips nothing more in practice"))
    loss_agg: str = option("loss aggregation (the paper's verl: token-mean)", "token-mean", choices=LOSS_AGG_MODES)
    adv_scale: str = option("advantage std: group (GRPO), batch, none (Dr. GRPO)", "group",
                            choices=("group", "batch", "none"))
    mu: int = option("optimizer passes per rollout batch", 1, valid=at_least(1))
    micro_batch: int = option("rows per forward/backward", 8, 64, valid=at_least(1))
    max_grad_norm: float = option("gradient clipping", 1.0, valid=above(0, "the global gradient norm is clipped to it"))
    drop_truncated: bool = option("leave completions that hit --max-new-tokens out of the loss", False)
    filter_groups: bool = option("DAPO's dynamic sampling: drop the groups whose rewards are all equal (no "
                                 "gradient) and draw more prompts until the step has --prompts-per-step groups "
                                 "that differ (the paper: off)", False)
    extra_draws: int = option("with --filter-groups: at most this many more draws of --prompts-per-step prompts "
                              "in one step", 4, valid=at_least(1))
    reward: str = option("paper: +-0.5, 1-|e|/span (4 on a 1-5 scale); code: +-1, 1-|e|/2", "paper",
                         choices=REWARD_PRESETS)
    # LoRA (lora.py): low-rank adapters instead of full fine-tuning, for SFT and GRPO
    lora_rank: int = option("LoRA rank r; 0 trains every weight", 0, valid=at_least(0))
    lora_alpha: float = option("LoRA scale alpha (the update is multiplied by alpha / r)", 32.0, valid=above(0))
    lora_targets: str = option("comma-separated linear layers that get adapters",
                               "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    # evaluation, logging, checkpoints
    eval_size: int = option("test examples scored (greedy), drawn at random when the test split has more; the demo "
                            "scores every test user", 1000, 1200, valid=at_least(1))
    valid_size: int = option("validation examples scored (greedy) every --eval-every steps; the evaluation plan "
                             "printed at the start says what share of the run they take", 200, 300,
                             valid=at_least(1))
    eval_every: int = option("evaluate on validation examples every N steps", 50, 10, valid=at_least(1))
    expected_rating: bool = option("also score every test row of the LLM by its expected rating: the probabilities "
                                   "of the rating tokens (1-5) where it writes its rating, weighted by their values "
                                   "(Reason4Rec's read-out); one more forward pass per example", False)
    select: str = option("weights scored on the test set at the end: the last step's, or those with the lowest "
                         "validation MAE among the evaluations, step 0 included", "last",
                         choices=("last", "best"))
    save_every: int = option("checkpoint every N steps (and at the end)", 50, valid=at_least(1))
    sample_every: int = option("write a few sample completions every N steps", 10, valid=at_least(1))
    dry_run: bool = option("print the memory plan (weights, gradients, AdamW, KV cache, activations) and exit "
                           "before loading any weights", False)
    eval_only: bool = option("score --model (or --resume) on the test set and exit", False)
    resume: str | None = option("checkpoint directory to continue from (written by this script); flags not "
                                "given are the checkpoint's, and only --steps, the evaluation and checkpoint "
                                "cadence, --select, --out and --threads may differ from it")
    resume_override: str | None = option("with --resume: comma-separated flags allowed to differ from the "
                                         "checkpoint's anyway (e.g. lr after a divergence)")
    # numerics and hardware
    dtype: str = option("compute dtype (autocast); auto: bf16 on CUDA, and for a real checkpoint on a CPU with "
                        "bf16 matrix units (AMX, AVX512-BF16: /proc/cpuinfo); fp32 otherwise, and for the demo "
                        "(its numbers stay the same on every machine)", "auto",
                        choices=("auto", "fp32", "bf16", "fp16"))
    master_weights: str = option("dtype of the trained weights and AdamW state: fp32 (a 2e-6 step is below "
                                 "bf16's resolution) or the compute dtype (halves memory)", "fp32",
                                 choices=("fp32", "same"))
    device: str = option("cpu, cuda, cuda:1 ... (auto: cuda when available)", "auto")
    grad_checkpointing: bool = option("recompute each block in backward to save memory", False)
    fsdp: bool = option("under torchrun, shard weights, gradients and AdamW state across the ranks (FSDP2's "
                        "fully_shard) instead of a whole copy on each", False)
    threads: int = option("CPU threads (0: torch's default)", 0, valid=at_least(0, "0: torch's default"))
    # the prompt
    system_prompt: str = option("'full' (the four-step prompt), 'short', or a file", "full", "short")
    max_user_history: int = option("user history entries shown (the paper: 10)", 10, 6,
                                   valid=Range(1, 10_000, why="entries shown in one prompt"))
    max_item_history: int = option("item history entries shown (the paper: 10)", 10, 6,
                                   valid=Range(1, 10_000, why="entries shown in one prompt"))
    item_texts: str = option("show the target item's earlier reviews and summaries", "on", "off",
                             choices=("on", "off"))
    mark_shared: str = option("mark user-history entries that share a category with the target item (ours: the "
                              "demo's from-scratch model cannot learn to find them in minutes)", "off", "on",
                              choices=("on", "off"))
    history_fields: str | None = option("comma-separated item fields shown in each user-history block (all, as "
                                        "in the paper, when not given)", None, "Categories")

    @property
    def demo(self) -> bool:
        """No --model: the embedded CPU demo (its own defaults, a tiny model trained from scratch)."""
        return self.model is None


def lora_targets(cfg: RunConfig) -> tuple[str, ...]:
    """--lora-targets as layer names ("q_proj, v_proj" -> ("q_proj", "v_proj"))."""
    return tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())


def from_flags(cls, cfg: RunConfig, **extra):
    """An instance of the dataclass `cls` with each field that RunConfig also has taken from cfg."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{n: getattr(cfg, n) for n in names if hasattr(cfg, n)}, **extra)


def _defaults_text(f: dataclasses.Field) -> str:
    demo = f.metadata["demo"]
    return f" (default: {f.default} / {demo})" if demo is not _UNSET else \
        (f" (default: {f.default})" if f.default is not None and f.default is not False else "")


# Flags a resumed run may change freely: how long it runs, how often it evaluates and saves, where it
# writes, whether it recomputes activations. Any other change alters what the run computes: --resume-override.
SAFE_ON_RESUME = ("steps", "eval_every", "save_every", "sample_every", "sft_save_every", "select", "out", "threads",
                  "eval_only", "dry_run", "grad_checkpointing", "fsdp", "overwrite",
                  "resume", "resume_override")


# How this process was launched, not what the run computes: never taken from the checkpoint (an --fsdp
# checkpoint is one whole folder, and resumes in one process, under torchrun, sharded or not; the
# --overwrite of a run's start must not delete that run when it is resumed).
LAUNCH_FLAGS = ("fsdp", "overwrite")

# Flags a resumed run can never change, not even with --resume-override: the adapters and AdamW's
# moments have the shapes of the run's LoRA layers.
FIXED_ON_RESUME = ("lora_rank", "lora_targets")

# What the prompt looks like: --eval-only of a training checkpoint takes these from the run that wrote it
PROMPT_FLAGS = ("system_prompt", "max_user_history", "max_item_history", "history_fields", "item_texts",
                "mark_shared", "max_new_tokens")
# ...and, unless --data is given, the data it was trained on and its own test examples
DATA_FLAGS = ("data", "data_format", "meta", "split", "synthetic_users", "drop_duplicates", "skip_bad_rows",
              "seed", "eval_size")


def _is_a(value, kind) -> bool:
    """Whether a JSON value fits a RunConfig field of type `kind` (an int is a float; a bool is neither)."""
    if isinstance(value, bool):  # JSON true is no number
        return kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def _check_saved_flags(state_file: Path, args: dict):
    """Every saved flag that is a RunConfig field must have that field's type (a hand-edited or
    damaged trainer_state.json would otherwise fail much later, or run with a wrong value)."""
    types = typing.get_type_hints(RunConfig)
    for name, value in args.items():
        if name not in types:
            continue  # a flag of another version of train.py: not used
        kinds = typing.get_args(types[name]) or (types[name],)
        if not any(_is_a(value, kind) for kind in kinds):
            want = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            fail(f"{state_file}: field 'args.{name}' is {json.dumps(value)[:80]}, not {want}")


def saved_run(checkpoint: str) -> dict:
    """The step and flags of a checkpoint written by train.py (put back from `.old` if a kill left
    only that); one line on failure, and when the run that writes it is still going."""
    folder = Path(checkpoint).parent
    # before recover(), which would move files under the running job; under torchrun rank 0 asks (the
    # others could find the lock rank 0 has just taken for this very run)
    if os.environ.get("RANK", "0") == "0" and (holder := lock_holder(folder)):
        fail(f"--resume {checkpoint}: its run is still going ({holder} holds {folder}); wait for it to end, "
             "or stop it first (Ctrl-C or SIGTERM saves a checkpoint)")
    path = recover(checkpoint)
    if not path.is_dir():
        fail(f"--resume {checkpoint}: no such checkpoint directory")
    try:
        saved = read_trainer_state(path)
    except CheckpointError as e:
        fail(str(e))
    _check_saved_flags(path / "trainer_state.json", saved["args"])
    return {"step": saved["step"], "args": saved["args"], "in_sft": saved.get("sft_step") is not None,
            "tested": saved.get("tested", True)}  # before 2026-12 only finished runs were resumed to their end


def _trained_flags(given: dict) -> dict:
    """--eval-only of a training checkpoint (trainer_state.json beside the weights): the prompt flags
    not given are those the checkpoint was trained with, not this script's defaults; without --data,
    so are the data flags (the same data, split and test examples: a demo checkpoint trained with
    --synthetic-users 150 is scored on its own world, not on the default one)."""
    model = Path(given["model"])
    if not (model / "trainer_state.json").exists():
        return given
    try:
        args = read_trainer_state(model)["args"]
    except CheckpointError as e:
        fail(str(e))
    _check_saved_flags(model / "trainer_state.json", args)
    names = PROMPT_FLAGS + (DATA_FLAGS if given["data"] is None else ())
    taken = {name: args[name] for name in names if given[name] is None and name in args}
    if taken:
        shown = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in taken.items()
                         if value is not None and value is not False)
        print(f"--eval-only: the prompt and data {model} was trained with: {shown}")
    return {**given, **taken}


def _resume_values(given: dict, saved: dict, defaults: dict) -> dict:
    """--resume: every flag not given is the checkpoint's; a given flag that differs from it must be
    safe to change (SAFE_ON_RESUME) or named in --resume-override. `saved`: saved_run's answer."""
    allowed = set(SAFE_ON_RESUME)
    for name in (given["resume_override"] or "").split(","):
        name = name.strip().lstrip("-").replace("-", "_")
        if name and name not in defaults:
            fail(f"--resume-override: no flag --{name.replace('_', '-')}")
        allowed.add(name)
    values, changed = {}, []
    for name, default in defaults.items():
        value, old = given[name], saved["args"].get(name, default)
        if value is None:
            value = default if name in LAUNCH_FLAGS else old
            if name == "out":  # the run's folder is where its checkpoint is, wherever this is started from
                value = str(Path(given["resume"]).absolute().parent)
        elif value != old and name not in allowed:
            changed.append(f"--{name.replace('_', '-')} {value} (checkpoint: {old})")
        values[name] = value
    if changed:
        fail(f"--resume {given['resume']}: flags differ from the run that wrote it: {', '.join(changed)}. "
             "Start a new run, or name them in --resume-override to change them anyway")
    for name in FIXED_ON_RESUME:
        if values[name] != saved["args"].get(name, defaults[name]):
            fail(f"--resume {given['resume']}: --{name.replace('_', '-')} cannot change on resume (the adapters and "
                 f"AdamW's moments have the shapes of the run's LoRA layers); start a new run with "
                 f"--model {given['resume']} instead")
    if saved["in_sft"] and values["mode"] != "recone":
        fail(f"--resume {given['resume']}: a checkpoint written during the cold-start SFT can only finish it "
             "(--mode recone); start a new --mode reczero run with --model instead")
    untested = values["steps"] == saved["step"] and not saved["tested"]  # stopped during its final test
    if not (values["eval_only"] or values["dry_run"] or saved["in_sft"] or untested) and values["steps"] <= saved["step"]:
        fail(f"--steps {values['steps']}: the checkpoint is already at step {saved['step']}, so there is "
             "nothing to do; ask for more steps, or --eval-only to score it")
    return values


def parse_args(argv=None) -> RunConfig:
    """Flags -> RunConfig: for each flag not given, the paper's or the demo's default, or with --resume
    the checkpoint's."""
    p = argparse.ArgumentParser(description="RecZero / RecOne training: cold-start SFT, GRPO, evaluation.",
                                epilog="Defaults shown as 'paper / demo': the first applies with --model, "
                                       "the second without.")
    types = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        name, kind = "--" + f.name.replace("_", "-"), types[f.name]
        if kind is bool:  # --x / --no-x, None when not given (so a resumed run can turn one off)
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
            continue
        base = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
        p.add_argument(name, type=base, choices=f.metadata["choices"], default=None,
                       help=f.metadata["help"] + _defaults_text(f))
    given = vars(p.parse_args(argv))
    if given["resume_override"] and not given["resume"]:
        fail("--resume-override needs --resume")
    saved = saved_run(given["resume"]) if given["resume"] else None
    demo = (saved["args"] if saved else given).get("model") is None
    defaults = {f.name: f.metadata["demo"] if demo and f.metadata["demo"] is not _UNSET else f.default
                for f in dataclasses.fields(RunConfig)}
    if saved:
        cfg = RunConfig(**_resume_values(given, saved, defaults))
    else:
        taken = _trained_flags(given) if given["eval_only"] and given["model"] else given
        cfg = RunConfig(**{name: default if taken[name] is None else taken[name] for name, default in defaults.items()})
    _warn_ignored(given, cfg)
    if cfg.out.strip():  # absolute in the checkpoint, so --resume works from any directory
        cfg.out = os.path.abspath(cfg.out)
    return cfg


# The cold start's flags, and of those the ones that only the teacher reads
COLD_START_FLAGS = ("teacher", "sft_traces", "cold_start_size", "rationalise_rate", "sft_epochs", "sft_lr",
                    "sft_batch", "sft_prompt_weight", "sft_save_every")
TEACHER_FLAGS = ("teacher", "cold_start_size", "rationalise_rate")


def _warn_ignored(given: dict, cfg: RunConfig):
    """Warnings before any work: RecZero on the demo's random weights, and flags given that this run
    will not read."""
    def named(names) -> str:
        return ", ".join(f"--{n.replace('_', '-')}" for n in names if given[n] is not None)

    if cfg.demo and cfg.mode == "reczero" and not cfg.resume:
        print("warning: --mode reczero on the embedded demo starts GRPO from the demo's random weights, which "
              "cannot write the four-tag format: every reward will be the format penalty and GRPO has no signal. "
              "Use --mode recone (the default) or --model with an instruct checkpoint.", file=sys.stderr)
    if cfg.mode == "reczero" and (flags := named(COLD_START_FLAGS)):
        print(f"warning: --mode reczero has no cold start: {flags} ignored", file=sys.stderr)
    elif cfg.mode == "recone" and cfg.sft_traces and (flags := named(TEACHER_FLAGS)):
        print(f"warning: --sft-traces gives the cold-start traces, so no teacher is asked: {flags} ignored",
              file=sys.stderr)
    if cfg.overwrite and (cfg.eval_only or cfg.dry_run):
        print("warning: --overwrite ignored: --eval-only writes only into OUT/eval/ (each evaluation replaces it), "
              "--dry-run writes nothing into --out", file=sys.stderr)


def fail(msg: str):
    """One clear line and exit code 2 for bad paths or flags (or a file that fails mid-run: written
    above any progress bar)."""
    tqdm.write(f"train.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


MIN_TEMPERATURE = 0.01  # rollouts at lower temperatures are greedy in effect


def check_args(cfg: RunConfig):
    """Refuse bad flag combinations and missing paths before any work starts (one line, exit 2)."""
    if cfg.data and not cfg.data_format:
        fail("--data needs --data-format")
    if cfg.data_format and not cfg.data:
        fail("--data-format needs --data")
    if not cfg.data and (flags := [f for f, on in (("--meta", cfg.meta), ("--skip-bad-rows", cfg.skip_bad_rows),
                                                   ("--drop-duplicates", cfg.drop_duplicates)) if on]):
        fail(f"{', '.join(flags)} without --data: the embedded synthetic data has no file to read them for")
    if cfg.eval_only and not (cfg.model or cfg.resume):
        fail("--eval-only scores --model or --resume: without either there is nothing trained to score")
    if not cfg.out.strip():
        fail("--out '': name the run's folder")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        fail(f"--out {cfg.out}: a file, not a folder")
    # a resumed run never asks the teacher again: its traces are in the checkpoint's run
    asks_teacher = cfg.mode == "recone" and not cfg.sft_traces and not cfg.resume
    if asks_teacher and cfg.teacher != "heuristic" and not (Path(cfg.teacher) / "config.json").exists():
        fail(f"--teacher {cfg.teacher}: not 'heuristic' or a checkpoint directory")
    for flag in ("model", "data", "meta", "sft_traces", "resume"):
        path = getattr(cfg, flag)
        if path and not Path(path).exists():
            fail(f"--{flag.replace('_', '-')} {path}: no such file or directory")
    if cfg.sft_traces and not Path(cfg.sft_traces).is_file():
        fail(f"--sft-traces {cfg.sft_traces}: a directory; name a JSONL file of traces")
    if cfg.model and not (Path(cfg.model) / "config.json").exists():
        fail(f"--model {cfg.model}: not a checkpoint directory (no config.json)")
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        fail(f"WORLD_SIZE={world}: not a number of processes (torchrun sets it; unset it to run one process)")
    if int(world) > 1 and not all(k in os.environ for k in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
        fail(f"WORLD_SIZE={world} but no RANK, MASTER_ADDR or MASTER_PORT: start the processes with torchrun "
             f"--nproc-per-node {world} train.py ..., or unset WORLD_SIZE")
    if cfg.prompts_per_step % int(world):
        fail("--prompts-per-step must be divisible by the number of ranks")
    if cfg.dtype == "fp16" and cfg.master_weights == "same" and not (cfg.eval_only or cfg.dry_run):
        fail("--dtype fp16 --master-weights same cannot train: fp16 weights have no loss scaling here and "
             "AdamW's eps (1e-8) rounds to 0 in fp16, so the first updates overflow; use --dtype bf16, or keep "
             "--master-weights fp32")
    if cfg.filter_groups and int(world) > 1:
        fail("--filter-groups runs in one process: under torchrun the ranks would draw different numbers of prompts")
    check_device(cfg.device)
    if cfg.fsdp and "WORLD_SIZE" not in os.environ:
        fail("--fsdp shards the model across the processes of a torchrun job: "
             "torchrun --nproc-per-node N train.py --fsdp ...")
    for f in dataclasses.fields(RunConfig):
        valid, value = f.metadata["valid"], getattr(cfg, f.name)
        if valid is not None and value not in valid:
            why = f" ({valid.why})" if valid.why else ""
            finite = "" if math.isfinite(value) else "a finite number "
            fail(f"--{f.name.replace('_', '-')} {value}: must be {finite}{valid}{why}")
    if cfg.temperature < MIN_TEMPERATURE:
        fail(f"--temperature {cfg.temperature:g}: below {MIN_TEMPERATURE:g} every completion of a group is the greedy "
             "one (nothing for GRPO to compare) and logits / temperature overflow; evaluation is always greedy")
    if cfg.threads > (os.cpu_count() or 1):
        fail(f"--threads {cfg.threads}: this machine has {os.cpu_count()} CPUs; more threads only slow a run "
             "(0: torch's default)")
    if cfg.lora_rank and cfg.demo:
        fail("--lora-rank needs --model: LoRA adapts a pretrained model, and the demo's starts from random weights")
    unknown = set(lora_targets(cfg)) - set(LORA_TARGETS)
    if cfg.lora_rank and unknown:
        fail(f"--lora-targets: no layer {', '.join(sorted(unknown))}; choose from {', '.join(LORA_TARGETS)}")
    if cfg.lora_rank and not lora_targets(cfg):
        fail(f"--lora-targets {cfg.lora_targets!r}: names no layer; choose from {', '.join(LORA_TARGETS)}")
    prompt_settings(cfg)  # the prompt flags too: a bad --history-fields or --system-prompt file


def check_device(device: str):
    """Refuse a --device this machine does not have (one line), before any work starts."""
    kind, _, index = device.partition(":")
    if device == "auto" or (kind == "cpu" and not index):
        return
    if kind != "cuda" or (index and not index.isdigit()):
        fail(f"--device {device}: choose auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        fail(f"--device {device}: no CUDA device is available here (torch.cuda.is_available() is False)")
    if index and int(index) >= torch.cuda.device_count():
        fail(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
             f"cuda:{torch.cuda.device_count() - 1}")


def prompt_settings(cfg: RunConfig, scale: tuple[float, float] = RATING_SCALE) -> tuple[PromptCaps, str]:
    """The prompt caps and the system prompt the flags ask for (the full one states the rating scale)."""
    caps = PromptCaps(max_user_history=cfg.max_user_history, max_item_history=cfg.max_item_history,
                      item_texts=cfg.item_texts == "on", mark_shared=cfg.mark_shared == "on")
    if cfg.history_fields:
        known = PromptCaps.history_fields  # every field an item can show, in the prompt's order
        caps.history_fields = tuple(f.strip() for f in cfg.history_fields.split(","))
        unknown = [f for f in caps.history_fields if f not in known]
        if unknown:
            fail(f"--history-fields: no field {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    if cfg.system_prompt in ("full", "short"):
        return caps, full_system_prompt(scale) if cfg.system_prompt == "full" else SHORT_SYSTEM_PROMPT
    path = Path(cfg.system_prompt)
    if not path.is_file():
        fail(f"--system-prompt {cfg.system_prompt}: not 'full', 'short' or a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--system-prompt {cfg.system_prompt}: not a readable UTF-8 text file ({e})")
    if "\x00" in text or not text.strip():
        fail(f"--system-prompt {cfg.system_prompt}: {'a binary file' if text.strip() else 'empty'}, not a prompt")
    return caps, text
