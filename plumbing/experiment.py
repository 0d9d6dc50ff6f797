"""Assembling a run from its flags: the data and baselines, the demo's tokenizer and model, the teacher's
traces, the memory plan. train.py calls these; none of them is GRPO.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from data import (
    Example,
    build_examples,
    count_duplicates,
    drop_duplicates,
    split_by_time,
)
from model import CheckpointError, ModelConfig, Tokenizer, Transformer
from plumbing.baselines import fit_baselines
from plumbing.checkpoints import load_config, load_model
from plumbing.cli import RunConfig, fail, lora_targets
from plumbing.memory import MemoryPlan, host_bytes, plan_memory, prompt_length, teacher_bytes
from plumbing.parallel import Distributed
from plumbing.readers import load_ratings
from plumbing.report import EVAL_BATCH
from plumbing.synthetic import SyntheticConfig, make_synthetic
from plumbing.teachers import (
    HeuristicTeacher,
    ModelTeacher,
    Trace,
    TraceFidelity,
    build_cold_start,
    load_traces,
)
from plumbing.tokenizer import train_bpe
from reczero import Prompter, render_user_message

# -----------------------------------------------------------------------------
# Data


@dataclass
class TaskData:
    """The examples of each split, the classic baselines fitted on the training split, and the
    prediction an unparsable output is scored with (the bias baseline's), by Rating.key."""

    train: list[Example]
    valid: list[Example]
    test: list[Example]
    baselines: dict
    fallback: dict
    scale: tuple[float, float]  # the data's rating scale: prompt text, reward, parsing and baselines use it
    fingerprint: str = ""  # of every example's target and label: a resumed run checks it is on the same data


def fingerprint(splits: dict[str, list[Example]]) -> str:
    """A short hash of the examples of each split (user, item, time, rating): equal iff the same task."""
    h = hashlib.sha256()
    for name, examples in splits.items():
        h.update(name.encode())
        for e in examples:
            h.update(f"{e.target.user_id}\t{e.target.item_id}\t{e.target.time}\t{e.label}\n".encode())
    return h.hexdigest()[:16]


def load_task(cfg: RunConfig) -> TaskData:
    """Ratings -> time split -> leak-free examples; classic baselines fitted on the training split."""
    if cfg.data:
        data = load_ratings(cfg.data, cfg.data_format, cfg.meta, skip_bad_rows=cfg.skip_bad_rows)
        if data.skipped:
            print(f"skipped {data.skipped} lines of bad rows in {cfg.data}")
        if cfg.drop_duplicates:
            if dropped := drop_duplicates(data):
                print(f"{cfg.data}: dropped {dropped} duplicate (user, item, time) ratings")
        elif duplicates := count_duplicates(data):
            print(f"warning: {cfg.data}: {duplicates} ratings repeat the (user, item, time) of an earlier one; "
                  "each copy counts as its own example and in every average (--drop-duplicates keeps the first)",
                  file=sys.stderr)
    else:
        data = make_synthetic(SyntheticConfig(n_users=cfg.synthetic_users, seed=cfg.seed))
    split = split_by_time(data, cfg.split)
    # examples hold exactly the history the prompt shows, so a teacher never cites entries the model cannot see
    ex = {name: build_examples(data, getattr(split, name), cfg.max_user_history, cfg.max_item_history)
          for name in ("train", "valid", "test")}
    # fixed random subsets (bounded cost), each from its own stream: the test examples a seed scores do not
    # depend on --valid-size (an --eval-only run with another one scores the run's own test examples)
    streams = {"valid": np.random.default_rng(cfg.seed), "test": np.random.default_rng((cfg.seed, 2))}
    for name, size in (("valid", cfg.valid_size), ("test", cfg.eval_size)):
        if len(ex[name]) > size:
            ex[name] = [ex[name][i] for i in sorted(streams[name].choice(len(ex[name]), size, replace=False))]
    if not ex["train"] or not ex["test"]:
        fail(f"{cfg.data or 'synthetic data'}: no usable examples after the history filter")
    baselines = fit_baselines(split.train, seed=cfg.seed, scale=data.scale)
    fallback = {e.target.key: baselines["bias"].predict(e.target.user_id, e.target.item_id)
                for e in ex["valid"] + ex["test"]}
    print(f"data: {len(data.ratings)} ratings, examples train/valid/test {len(ex['train'])}/{len(ex['valid'])}/{len(ex['test'])}")
    return TaskData(ex["train"], ex["valid"], ex["test"], baselines, fallback, data.scale, fingerprint(ex))


# -----------------------------------------------------------------------------
# The demo's tokenizer and model


def demo_tokenizer(task: TaskData, prompter_settings, out: Path, rank: int) -> Path:
    """A byte-level BPE trained (by rank 0) on the demo's own text: prompts (with their chat roles and the
    system prompt, as often as they occur) and teacher traces."""
    caps, system = prompter_settings
    tok_dir = out / "tokenizer"
    if rank == 0:
        corpus = [f"system\n{system}\nuser\n{render_user_message(e, caps)}\nassistant" for e in task.train[:3000]]
        train_bpe(corpus + HeuristicTeacher().write(task.train[:2000]), tok_dir)
    return tok_dir


def demo_config(vocab_size: int, eos: int) -> ModelConfig:
    """The tiny Qwen2 architecture of the demo (0.54M parameters with a 2k vocabulary)."""
    return ModelConfig(arch="qwen2", vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=32, qkv_bias=True, max_position_embeddings=4096,
                       eos_token_id=eos)


def demo_model(vocab_size: int, eos: int, seed: int) -> Transformer:
    """The demo's model (demo_config) with random weights drawn from `seed`."""
    torch.manual_seed(seed)
    return Transformer(demo_config(vocab_size, eos))


# -----------------------------------------------------------------------------
# RecOne's cold-start traces


TEACHER_BATCH = 16  # traces a --teacher model writes at a time (its KV cache is in the memory plan)


def cold_start_traces(cfg: RunConfig, task: TaskData, prompter: Prompter, dtype, device, log,
                      dist: Distributed | None = None) -> list[Trace]:
    """RecOne's trace set: from --sft-traces, or written by the teacher for --cold-start-size training
    examples drawn at random (seeded; all of them when there are fewer). Under torchrun a --teacher
    model, the slow part of RecOne, is asked by all ranks, each about its share of the examples; the
    heuristic teacher (fast, and drawing from one seeded stream) answers all of them on every rank."""
    if cfg.sft_traces:
        try:
            traces = load_traces(cfg.sft_traces, task.train)
        except (OSError, ValueError) as e:
            fail(f"--sft-traces: {e}")
        if not traces:
            fail(f"--sft-traces {cfg.sft_traces}: no traces in it")
        log({"stage": "cold_start", "traces": len(traces)})
        return traces
    if cfg.teacher == "heuristic":
        teacher = HeuristicTeacher(rationalise_rate=cfg.rationalise_rate, seed=cfg.seed)
    else:
        try:
            tok, model = Tokenizer(cfg.teacher), load_model(cfg.teacher, dtype, device)
            tok.check_fits(model.config.vocab_size, cfg.teacher)
        except CheckpointError as e:
            fail(f"--teacher: {e}")
        teacher = ModelTeacher(model, Prompter(tok, prompter.caps, prompter.system), cfg.max_new_tokens,
                               batch=TEACHER_BATCH, seed=cfg.seed)
    asked = task.train
    if cfg.cold_start_size < len(asked):  # seeded random: the head of the time-sorted list has the thinnest histories
        rng = np.random.default_rng([cfg.seed, 7])
        asked = [asked[i] for i in sorted(rng.choice(len(asked), cfg.cold_start_size, replace=False))]
    traces, stats = build_cold_start(teacher, asked, task.scale, dist if isinstance(teacher, ModelTeacher) else None)
    if dist is None or dist.rank == 0:
        print(f"cold start: {stats}")
    if not traces:
        fail(f"cold start: none of the {stats.asked} teacher traces ended at the true rating; "
             "ask more examples (--cold-start-size), use another --teacher, or --mode reczero")
    log({"stage": "cold_start", "traces": len(traces), **asdict(stats)})
    return traces


def trace_fidelity(cfg: RunConfig, task: TaskData) -> TraceFidelity | None:
    """When the heuristic teacher wrote the cold-start traces, a scorer of how far the model's traces
    agree with it (see teachers.TraceFidelity); None otherwise."""
    if cfg.mode == "recone" and cfg.teacher == "heuristic" and not cfg.sft_traces:
        return TraceFidelity(HeuristicTeacher(), task.train, task.scale)
    return None


def memory_plan(cfg: RunConfig, config: ModelConfig, prompter: Prompter, task: TaskData, weight_dtype,
                compute_dtype, world: int, device: str = "cuda") -> MemoryPlan:
    """The memory plan (plumbing/memory.py) of this run, per process, with the longest of its first
    256 training prompts; the --teacher model counts when this run's cold start will load it. On the CPU
    the process's own memory counts too: the device's memory is its RAM."""
    prompt_tokens = prompt_length([prompter(e) for e in task.train[:256]])
    teacher = 0
    if cfg.mode == "recone" and not cfg.resume and not cfg.sft_traces and cfg.teacher != "heuristic":
        teacher = teacher_bytes(load_config(cfg.teacher), compute_dtype.itemsize, rows=TEACHER_BATCH,
                                tokens=prompt_tokens + cfg.max_new_tokens)
    return plan_memory(config, weight_bytes=weight_dtype.itemsize, compute_bytes=compute_dtype.itemsize,
                       lora_rank=cfg.lora_rank, lora_targets=lora_targets(cfg), beta=cfg.beta,
                       rows=cfg.prompts_per_step // world * cfg.samples, prompt_tokens=prompt_tokens,
                       new_tokens=cfg.max_new_tokens, micro_batch=cfg.micro_batch,
                       grad_checkpointing=cfg.grad_checkpointing, shards=world if cfg.fsdp else 1,
                       teacher=teacher, eval_rows=min(EVAL_BATCH, -(-len(task.test) // world)),
                       host=host_bytes() if device == "cpu" else 0, cpu=device == "cpu")


def evaluation_plan(cfg: RunConfig, task: TaskData, prompt_tokens: int) -> str:
    """What the run's greedy evaluations will cost, printed beside the memory plan: how many examples, how
    often, how many tokens at most, and a rough share of the run's compute. Compute is counted in token
    passes at the longest prompt and the full --max-new-tokens: a forward pass each for sampling and
    evaluation, three (forward and backward) for the update; the cold-start SFT is left out."""
    new, tests = cfg.max_new_tokens, len(task.test) * (1 + cfg.expected_rating)  # the read-out: one more pass
    if cfg.eval_only:
        return f"evaluation plan: {len(task.test):,} test examples, greedy, up to {new} new tokens each"
    checks = cfg.steps // cfg.eval_every + 1 + (cfg.steps % cfg.eval_every > 0) if task.valid else 0
    evaluated = checks * len(task.valid) + 2 * tests  # validations, and the start's and the final test
    rollout = cfg.prompts_per_step * (prompt_tokens + cfg.samples * new)  # a step's prompts and completions
    training = cfg.steps * rollout * (1 + 3 * cfg.mu)
    share = evaluated * (prompt_tokens + new) / (evaluated * (prompt_tokens + new) + training)
    return (f"evaluation plan: {len(task.valid):,} validation examples at step 0, every {cfg.eval_every} steps and "
            f"at the end ({checks} times); {len(task.test):,} test examples twice (the starting model, the final "
            f"one); greedy, up to {new} new tokens each: about {share:.0%} of the run's compute after the cold "
            "start (--valid-size, --eval-every, --eval-size)")
