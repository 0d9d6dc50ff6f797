"""RecZero / RecOne training: RecOne's cold-start SFT, then the GRPO loop, then a results table.

Reading order for one GRPO step: train_grpo() below (Steps 1-7, numbered as in the README), then
grpo.py (rollout, advantages, log-probs, clipped loss, aggregation, update), then model.py (the
decoder and its sampler). The task (prompt, reward, metrics) is reczero.py; everything else a run
needs (flags, data files, baselines, teachers, checkpoints, reports) is in plumbing/.

`python train.py` with no arguments runs the embedded demo: synthetic data, a byte-level BPE trained
on it, a tiny Qwen2-architecture model, RecOne cold start on the heuristic teacher's traces, GRPO,
and a table against classic baselines. With `--model DIR --data PATH --data-format F` it runs the
paper's setting on a real checkpoint (`--help` lists every flag with its paper and demo defaults).

Simplifications:
- Every random draw of GRPO step s comes from generators seeded with (seed, s, rank), so a resumed run
  replays exactly what an uninterrupted one would: a checkpoint needs the model, the optimizer and
  the step.
- Data parallel (torchrun) splits each step's prompts across ranks and sums the gradients of one
  globally normalised loss (so N ranks take the one-process step); rank 0 runs the cold start,
  evaluates, logs and saves. Evaluation is greedy on a fixed subset (`--eval-size`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import grpo
from model import CheckpointError, SamplingConfig, right_pad
from plumbing.checkpoints import BestSoFar, TrainerState, load_model, load_optimizer, save_checkpoint, save_model
from plumbing.cli import RunConfig, check_args, fail, parse_args, pick, prompt_settings
from plumbing.experiment import (Distributed, TaskData, cold_start_traces, demo_model, demo_tokenizer, load_task,
                                 setup_distributed, trace_fidelity)
from plumbing.readers import DataError
from plumbing.report import RunLog, baseline_rows, describe, evaluate, plot, results_table, rollout_metrics
from plumbing.teachers import Trace, TraceFidelity
from plumbing.tokenizer import Tokenizer
from reczero import REWARD_PRESETS, Prompter, RatingMetrics, compute_reward

# -----------------------------------------------------------------------------
# RecOne stage 1: supervised fine-tuning on the teacher's traces


@dataclass
class SFTConfig:
    """The cold-start SFT's settings (named as their flags: --sft-lr is sft_lr)."""

    sft_epochs: int = 2
    sft_lr: float = 1e-5
    sft_batch: int = 16
    sft_prompt_weight: float = 0.0  # > 0 also trains on the prompt tokens
    seed: int = 0


def sft(model, prompter: Prompter, traces: list[Trace], cfg: SFTConfig, log=lambda record: None) -> None:
    """Teacher-forced cross-entropy on the completion tokens (+ end token) of each trace, plus
    cfg.sft_prompt_weight times the same loss on the prompt tokens. AdamW, linear warm-up then decay."""
    if not traces:
        raise ValueError("sft: no traces to train on")
    tok = prompter.tok
    rows = [(prompter(t.example), tok.encode(t.text) + [tok.stop_ids[0]]) for t in traces]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0, betas=(0.9, 0.95))
    steps = cfg.sft_epochs * math.ceil(len(rows) / cfg.sft_batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.1 * steps + 1)) * max(0.0, 1 - s / steps))
    rng = np.random.default_rng(cfg.seed + 1)
    device = model.embed_tokens.weight.device
    model.train()
    bar = tqdm(total=steps, desc="cold-start SFT")
    for epoch in range(cfg.sft_epochs):
        order = rng.permutation(len(rows))
        for i in range(0, len(rows), cfg.sft_batch):
            batch = [rows[j] for j in order[i:i + cfg.sft_batch]]
            ids, _ = right_pad([p + c for p, c in batch], tok.pad_id, device)
            plens = torch.tensor([len(p) for p, _ in batch], device=device)
            clens = torch.tensor([len(c) for _, c in batch], device=device)
            trace_mask = grpo.completion_mask(plens, clens, ids.shape[1])  # the trace and its end token
            prompt_mask = grpo.completion_mask(torch.ones_like(plens), plens - 1, ids.shape[1])  # prompt after token 0
            prompt_mask &= cfg.sft_prompt_weight > 0
            logp, _ = grpo.token_logprobs(model, ids, trace_mask | prompt_mask)
            loss = -(logp * trace_mask).sum() / trace_mask.sum()  # mean next-token NLL over trace tokens
            if cfg.sft_prompt_weight > 0:
                loss = loss - cfg.sft_prompt_weight * (logp * prompt_mask).sum() / prompt_mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        log({"stage": "sft", "epoch": epoch + 1, "loss": loss.item()})
    bar.close()
    model.eval()


# -----------------------------------------------------------------------------
# GRPO (RecZero; RecOne stage 2)


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """All randomness of one step comes from (seed, step, rank): resuming replays it exactly."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))
    return g


def step_prompts(n_train: int, per_step: int, seed: int, step: int) -> list[int]:
    """Example indices for a step: epochs of a seeded permutation, consumed `per_step` at a time."""
    per_epoch = n_train // per_step
    epoch, k = divmod(step, max(per_epoch, 1))
    order = np.random.default_rng((seed, epoch)).permutation(n_train)
    return order[k * per_step:(k + 1) * per_step].tolist()


def train_grpo(model, tok: Tokenizer, tok_dir: Path, prompter: Prompter, task: TaskData, cfg: RunConfig,
               dist: Distributed, log: RunLog, state: TrainerState, fidelity: TraceFidelity | None = None):
    """The GRPO loop: one rollout and one update per step, periodic evaluation and checkpoints."""
    device = model.embed_tokens.weight.device
    grpo_cfg = pick(grpo.GRPOConfig, cfg)
    sampling = pick(SamplingConfig, cfg, stop_ids=tok.stop_ids)
    reward_cfg = REWARD_PRESETS[cfg.reward]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    out = Path(cfg.out)
    if cfg.resume:
        load_optimizer(Path(cfg.resume), opt)
    ref = None
    if cfg.beta > 0:  # the frozen starting point: the cold-start checkpoint or the given model
        ref = load_model(state.start_model, torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(
            device.type) else model.embed_tokens.weight.dtype, device).requires_grad_(False)
    per_rank = cfg.prompts_per_step // dist.world
    all_reduce = dist.all_reduce if dist.world > 1 else None

    def save():
        if dist.rank == 0:
            save_checkpoint(out / "checkpoint", model, tok_dir, opt, state, asdict(cfg))

    def validate():
        m = evaluate(model, tok, prompter, task.valid, task.fallback, cfg.max_new_tokens, desc="valid",
                     fidelity=fidelity)
        log({"stage": "eval", "step": state.step, **asdict(m)})
        tqdm.write(f"step {state.step}: valid {describe(m)}")
        if cfg.select == "best" and (state.best is None or m.mae < state.best.mae):
            save_model(model, out / "best", tok_dir)  # atomic: a crash keeps the previous best
            state.best = BestSoFar(state.step, m.mae, str(out / "best"))

    if dist.rank == 0 and state.step == 0 and task.valid and cfg.steps > 0:
        model.eval()
        validate()  # the starting point of the validation curve (after the cold start, if any)
    bar = tqdm(total=cfg.steps, initial=state.step, desc="GRPO", disable=dist.rank != 0)
    try:
        while state.step < cfg.steps:
            idx = step_prompts(len(task.train), cfg.prompts_per_step, cfg.seed, state.step)
            examples = [task.train[i] for i in idx[dist.rank * per_rank:(dist.rank + 1) * per_rank]]
            t0 = time.time()
            texts, rewards = [], []  # each row's decoded completion and Reward, in row order

            def reward_fn(i: int, completion: list[int]) -> float:  # Step 2: the task's reward
                texts.append(tok.decode(completion))
                rewards.append(compute_reward(texts[-1], examples[i].label, reward_cfg))
                return rewards[-1].total

            # Steps 1-2: sample G completions of each prompt and score each one (grpo.rollout)
            model.eval()
            batch = grpo.rollout(model, [prompter(e) for e in examples], reward_fn, sampling, cfg.samples,
                                 step_generator(cfg.seed, state.step, dist.rank, device), tok.pad_id)
            t1 = time.time()
            # Steps 3-7: advantages, log-probs, clipped loss, aggregation, AdamW (grpo.grpo_update)
            model.train()
            metrics = grpo.grpo_update(model, opt, batch, grpo_cfg, ref, all_reduce)
            if metrics["skipped"]:
                print(f"warning: step {state.step + 1}: non-finite loss or gradient, update skipped", file=sys.stderr)
            state.step += 1
            metrics.update(rollout_metrics(rewards, [e.label for e in examples], batch),
                           stage="grpo", step=state.step, time_sampling=t1 - t0, time_update=time.time() - t1)
            log(metrics)
            bar.update()
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", mae=f"{metrics['train_mae']:.2f}")
            if state.step % cfg.sample_every == 0:
                log.sample(state.step, examples, texts, rewards, batch.prompt_index.tolist())
            if dist.rank == 0 and (state.step % cfg.eval_every == 0 or state.step == cfg.steps) and task.valid:
                validate()
            if state.step % cfg.save_every == 0 or state.step == cfg.steps:
                save()
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {state.step}: saving {out / 'checkpoint'}", file=sys.stderr)
        save()
        sys.exit(130)
    bar.close()
    model.eval()


# -----------------------------------------------------------------------------
# Main


def main(argv=None):
    cfg = parse_args(argv)
    check_args(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        cfg.dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    compute, dtype = dtype, torch.float32 if cfg.master_weights == "fp32" else dtype  # dtype: of the weights
    with torch.autocast(device.split(":")[0], dtype=compute, enabled=compute != dtype):
        run(cfg, device, dtype, compute)


def run(cfg: RunConfig, device: str, dtype, compute):
    """Everything after the flags: data, model, cold start, GRPO, evaluation (inside autocast if asked)."""
    dist = setup_distributed(device)
    out = Path(cfg.out)
    try:
        task = load_task(cfg)
        state = TrainerState.read(cfg.resume) if cfg.resume else TrainerState(start_model=cfg.model)
        log = RunLog(out, dist.rank == 0, state.step if cfg.resume else None)
        if cfg.resume or cfg.model:
            tok_dir = Path(cfg.resume or cfg.model)
            model, tok = load_model(tok_dir, dtype, device), Tokenizer(tok_dir)
        else:  # the demo: a tokenizer trained on the synthetic text, a tiny random model
            tok_dir = demo_tokenizer(task, prompt_settings(cfg), out, dist.rank)
            dist.barrier()
            tok = Tokenizer(tok_dir)
            model = demo_model(tok.vocab_size, tok.stop_ids[0], cfg.seed).to(device, dtype)
    except (DataError, CheckpointError, OSError) as e:
        fail(str(e))
    model.gradient_checkpointing = cfg.grad_checkpointing
    prompter = Prompter(tok, *prompt_settings(cfg))
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {model.config.arch}, weights {dtype}, "
          f"compute {compute}, {device}")
    fidelity = trace_fidelity(cfg, task)
    rows = baseline_rows(task.baselines, task.test, fidelity)
    for name, m in rows:
        log({"stage": "baseline", "name": name, **asdict(m)})
    if cfg.eval_only:
        rows.append(("model", evaluate(model, tok, prompter, task.test, task.fallback, cfg.max_new_tokens, desc="test")))
        print(results_table(rows))
        return
    if not cfg.resume and cfg.mode == "recone":
        traces = cold_start_traces(cfg, task, prompter, compute, device, log)
        if dist.rank == 0:  # the other ranks load the result: the same weights everywhere
            sft(model, prompter, traces, pick(SFTConfig, cfg), log)
            # save in the HF layout and reload through the loader real checkpoints use
            save_model(model, out / "cold_start", tok_dir)
        dist.barrier()
        model = load_model(out / "cold_start", dtype, device)
        model.gradient_checkpointing = cfg.grad_checkpointing
        state.start_model = str(out / "cold_start")
        if dist.rank == 0:
            state.cold_start = asdict(evaluate(model, tok, prompter, task.test, task.fallback, cfg.max_new_tokens,
                                               desc="test (cold start)", fidelity=fidelity))
    elif not cfg.resume and dist.rank == 0:
        state.cold_start = asdict(evaluate(model, tok, prompter, task.test, task.fallback, cfg.max_new_tokens,
                                           desc="test (before RL)"))
    if not cfg.resume and dist.rank == 0:
        log({"stage": "test_start", "step": 0, **state.cold_start})  # the test row of the model GRPO starts from
    train_grpo(model, tok, tok_dir, prompter, task, cfg, dist, log, state, fidelity)
    if dist.rank == 0:
        label, step = f"LLM after GRPO (step {cfg.steps})", cfg.steps
        if cfg.select == "best" and state.best:  # the weights of the best validation MAE
            step = state.best.step
            model = load_model(state.best.path, dtype, device)
            label = f"LLM after GRPO (best valid MAE: step {step} of {cfg.steps})"
        final = evaluate(model, tok, prompter, task.test, task.fallback, cfg.max_new_tokens, desc="test (GRPO)",
                         fidelity=fidelity)
        log({"stage": "test", "step": step, **asdict(final)})
        start = "after cold start" if cfg.mode == "recone" else "before RL"
        rows += [(f"LLM {start}", RatingMetrics(**state.cold_start)), (label, final)]
        table = results_table(rows)
        (out / "results.md").write_text(table + "\n")
        print(table)
        plot(out)
    if dist.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
