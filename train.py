"""RecZero / RecOne training: RecOne's cold-start SFT, the GRPO loop, and main(), which runs the stages.

Reading order for one GRPO step: train_grpo() below (Steps 1-7, numbered as in the README), then
grpo.py (the batch, advantages, log-probs, clipped loss, aggregation, update), then model.py (the
decoder, its sampler and tokenizer). The task (prompt, reward, metrics) is reczero.py. What a run does
around the two loops (log, validate, save, stop) is one call per step into plumbing/bookkeeping.py; the
stages main() lists (build the run, cold start, GRPO, final test) are in plumbing/stages.py.

`python train.py` with no arguments runs the embedded demo: synthetic data, a byte-level BPE trained
on it, a tiny Qwen2-architecture model, RecOne cold start on the heuristic teacher's traces, GRPO,
and a table against classic baselines. With `--model DIR --data PATH --data-format F` it runs the
paper's setting on a real checkpoint (`--help` lists every flag with its paper and demo defaults).

Simplifications:
- Every random draw of GRPO step s comes from generators seeded with (seed, s, rank), so a resumed run
  replays exactly what an uninterrupted one would: a checkpoint needs the model, the optimizer and
  the step.
- Ctrl-C and SIGTERM are requests: the SFT batch or GRPO step in progress finishes, then a checkpoint
  is written that --resume continues from. The cold-start SFT also saves every --sft-save-every
  batches and at its end, so even a kill loses little of it.
- Under torchrun each rank takes its share of each step's prompts (and of each SFT batch) and the
  gradients of one globally normalised loss are summed, so N ranks take the one-process step
  (`ranks`: plumbing/parallel.py); rank 0 logs and writes checkpoints. With --fsdp the weights,
  gradients and AdamW state are sharded across the ranks. Evaluation is greedy on fixed subsets
  (`--valid-size`, `--eval-size` for the test split).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import grpo
from model import SamplingConfig, generate, right_pad
from plumbing import stages
from plumbing.bookkeeping import Run
from plumbing.cli import RunConfig, check_args, from_flags, parse_args
from plumbing.experiment import TaskData
from plumbing.teachers import Trace
from reczero import Prompter, compute_reward, reward_config, rollout_metrics

# -----------------------------------------------------------------------------
# RecOne stage 1: supervised fine-tuning on the teacher's traces


@dataclass
class SFTConfig:
    """The cold-start SFT's settings: each is the flag of the same name (--sft-lr is sft_lr), with the
    same default (a test checks)."""

    sft_epochs: int = 2
    sft_lr: float = 1e-5
    sft_batch: int = 16
    sft_prompt_weight: float = 0.0  # > 0 also trains on the prompt tokens
    sft_save_every: int = 50  # batches between checkpoints
    micro_batch: int = 8  # rows per forward/backward; gradients accumulate over the batch
    seed: int = 0


def sft_row(prompter: Prompter, trace: Trace) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one trace: the completion ends with the token that closes an
    assistant turn in the model's chat format, as the chat template would write it."""
    return prompter(trace.example), prompter.tok.encode(trace.text) + [prompter.tok.turn_end_id]


def sft_loss(model, rows: list[tuple[list[int], list[int]]], n_trace: int, n_prompt: int, prompt_weight: float,
             pad_id: int, device, weight: float = 1.0) -> float:
    """Backpropagate one micro-batch's share of the SFT loss: the next-token NLL summed over its trace
    tokens / n_trace (+ prompt_weight x the same over prompt tokens / n_prompt); returns that share.
    weight 0 runs the passes for nothing (FSDP: a rank whose share of the batch has run out)."""
    ids, _ = right_pad([p + c for p, c in rows], pad_id, device)
    plens = torch.tensor([len(p) for p, _ in rows], device=device)
    clens = torch.tensor([len(c) for _, c in rows], device=device)
    trace_mask = grpo.completion_mask(plens, clens, ids.shape[1])  # the trace and its end token
    prompt_mask = grpo.completion_mask(torch.ones_like(plens), plens - 1, ids.shape[1])  # prompt after token 0
    prompt_mask &= prompt_weight > 0
    logp, _ = grpo.token_logprobs(model, ids, trace_mask | prompt_mask)
    loss = -(logp * trace_mask).sum() / n_trace  # mean next-token NLL over the batch's trace tokens
    if prompt_weight > 0:
        loss = loss - prompt_weight * (logp * prompt_mask).sum() / n_prompt
    (loss * weight).backward()
    return loss.item() * weight


def sft(model, prompter: Prompter, traces: list[Trace], cfg: SFTConfig, run: Run) -> None:
    """Teacher-forced cross-entropy on the completion tokens of each trace (see sft_row), plus
    cfg.sft_prompt_weight times the same loss on the prompt tokens. AdamW, linear warm-up then decay.

    A run resumed in the SFT skips the run.state.sft_step batches done (the same seeded order is
    replayed) with AdamW's moments restored. Under torchrun every rank takes every ranks.world-th row
    of each batch and the gradients are summed, so N ranks take the one-process step. After each
    batch `run` checks, logs, saves and stops (plumbing/bookkeeping.Run.after_sft_batch)."""
    if not traces:
        raise ValueError("sft: no traces to train on")
    ranks, tok = run.ranks, prompter.tok
    rows = [sft_row(prompter, t) for t in traces]
    trained = [p for p in model.parameters() if p.requires_grad]  # all, or only LoRA's adapters
    optimizer = torch.optim.AdamW(trained, lr=cfg.sft_lr, weight_decay=0.0, betas=(0.9, 0.95))
    run.restore(optimizer, "sft")
    for group in optimizer.param_groups:  # the schedule scales initial_lr; a resumed one starts at batch `start`
        group["initial_lr"] = cfg.sft_lr
    batches, start = cfg.sft_epochs * math.ceil(len(rows) / cfg.sft_batch), run.state.sft_step or 0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (0.1 * batches + 1)) * max(0.0, 1 - s / batches), last_epoch=start - 1)
    rng = np.random.default_rng(cfg.seed + 1)
    device = model.embed_tokens.weight.device
    model.train()
    run.bar = tqdm(total=batches, initial=start, desc="cold-start SFT", disable=ranks.rank != 0)
    step, applied = 0, 0
    for epoch in range(cfg.sft_epochs):
        order = rng.permutation(len(rows))  # drawn for every epoch, so a resumed run sees the same order
        for i in range(0, len(rows), cfg.sft_batch):
            step += 1
            if step <= start:  # done before the checkpoint
                continue
            batch = [rows[j] for j in order[i:i + cfg.sft_batch]]
            # means over the whole batch's tokens, so splitting it into micro-batches changes nothing
            n_trace = sum(len(c) for _, c in batch)
            n_prompt = sum(len(p) - 1 for p, _ in batch)
            optimizer.zero_grad(set_to_none=True)
            mine = batch[ranks.rank::ranks.world]
            # the same number of passes on every rank (a sharded model gathers weights in each one):
            # a rank whose rows have run out repeats a row with weight 0
            passes = math.ceil(math.ceil(len(batch) / ranks.world) / cfg.micro_batch)
            loss = 0.0
            for k in range(0, passes * cfg.micro_batch, cfg.micro_batch):
                micro = mine[k:k + cfg.micro_batch]
                loss += sft_loss(model, micro or batch[:1], n_trace, n_prompt, cfg.sft_prompt_weight,
                                 tok.pad_id, device, weight=1.0 if micro else 0.0)
            loss = ranks.sum(loss)
            _, stepped = grpo.optimizer_step(optimizer, trained, loss, 1.0, ranks)  # clip, AdamW (never on nan)
            applied += stepped
            schedule.step()
            run.bar.update()
            run.bar.set_postfix(loss=f"{loss:.3f}")
            record = {"stage": "sft", "epoch": epoch + 1, "batch": step, "loss": loss}
            epoch_end = i + cfg.sft_batch >= len(rows)  # the epoch's last batch is logged
            run.after_sft_batch(model, optimizer, step, batches, stepped, record if epoch_end else None)
    run.bar.close()
    if start == 0 and not applied:  # every batch skipped: the "cold start" would be the starting weights
        run.no_cold_start(batches)
    model.eval()


# -----------------------------------------------------------------------------
# GRPO (RecZero; RecOne stage 2)


def step_generator(seed: int, step: int, rank: int, device, draw: int = 0) -> torch.Generator:
    """All randomness of one step comes from (seed, step, rank): resuming replays it exactly. (draw > 0:
    --filter-groups' extra draws of the step.)"""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, step, rank] + ([draw] if draw else [])).generate_state(1)[0]))
    return g


def step_prompts(n_train: int, per_step: int, seed: int, step: int) -> list[int]:
    """Example indices for a step: epochs of a seeded permutation, consumed `per_step` at a time."""
    per_epoch = n_train // per_step
    epoch, k = divmod(step, max(per_epoch, 1))
    order = np.random.default_rng((seed, epoch)).permutation(n_train)
    return order[k * per_step:(k + 1) * per_step].tolist()


@dataclass
class Rollout:
    """Steps 1-2's output: the examples (prompt p's is examples[p]), each row's completion text and reward
    (reczero.Reward), and the batch grpo_update trains on."""

    examples: list
    texts: list[str]
    rewards: list
    batch: grpo.RolloutBatch


def rollout(model, examples, prompter: Prompter, sampling: SamplingConfig, reward_cfg, samples: int,
            generator: torch.Generator) -> Rollout:
    """Steps 1-2 for a list of examples: `samples` completions of each prompt, each with its reward."""
    tok = prompter.tok
    prompts = [prompter(e) for e in examples]
    # Step 1: sample G completions of each prompt (model.generate)
    gen = generate(model, prompts, sampling, samples, generator, tok.pad_id)
    # Step 2: score each completion with the task's reward (reczero.compute_reward)
    texts = [tok.decode(c) for c in gen.completions()]
    rewards = [compute_reward(t, examples[p].target.rating, reward_cfg) for t, p in zip(texts, gen.prompt_index.tolist())]
    return Rollout(examples, texts, rewards, grpo.rollout_batch(prompts, gen, [r.total for r in rewards], tok.pad_id))


def train_grpo(model, ref_model, prompter: Prompter, task: TaskData, cfg: RunConfig, run: Run) -> None:
    """GRPO steps from run.state.step to cfg.steps, each one rollout and one update. ref_model: the frozen
    KL reference (None when beta = 0). After each step `run` logs, validates, saves and stops."""
    ranks, device = run.ranks, model.embed_tokens.weight.device
    grpo_cfg, reward_cfg = from_flags(grpo.GRPOConfig, cfg), reward_config(cfg.reward, task.scale)
    sampling = from_flags(SamplingConfig, cfg, stop_ids=prompter.tok.stop_ids)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    run.restore(optimizer, "grpo")  # AdamW's moments, when resuming a GRPO checkpoint
    run.before_grpo(model, optimizer)
    share = cfg.prompts_per_step // ranks.world  # prompts per step for each rank
    for step in range(run.state.step, cfg.steps):
        chosen = step_prompts(len(task.train), cfg.prompts_per_step, cfg.seed, step)
        examples = [task.train[i] for i in chosen[ranks.rank * share:(ranks.rank + 1) * share]]
        t0 = time.time()
        # Steps 1-2: sample G completions of each prompt and score them (rollout above)
        model.eval()
        with ranks.gathered(model):  # FSDP: the whole model, since ranks stop sampling at different lengths
            r = rollout(model, examples, prompter, sampling, reward_cfg, cfg.samples,
                        step_generator(cfg.seed, step, ranks.rank, device))
            if cfg.filter_groups:  # DAPO's dynamic sampling (off by default, as in the paper)
                r, drawn = filter_groups(r, model, prompter, task, cfg, sampling, reward_cfg, step, device)
        t1 = time.time()
        # Steps 3-7: advantages, log-probs, clipped loss, aggregation, AdamW (grpo.grpo_update)
        model.train()
        metrics = grpo.grpo_update(model, optimizer, r.batch, grpo_cfg, ref_model, ranks)
        metrics.update(rollout_metrics(r.rewards, [e.target.rating for e in r.examples], r.batch.prompt_index,
                                       r.batch.completion_lengths))
        if cfg.filter_groups:
            metrics.update(drawn)
        # Around the step: check, log, validate, save, stop (plumbing/bookkeeping.py)
        run.after_step(model, optimizer, metrics, (t1 - t0, time.time() - t1), (r.examples, r.texts, r.rewards, r.batch))


def filter_groups(first: Rollout, model, prompter, task, cfg, sampling, reward_cfg, step: int, device):
    """DAPO's dynamic sampling (Yu et al. 2025 §3.2; verl's algorithm.filter_groups): keep only the groups
    whose rewards differ (grpo.groups_with_signal), drawing --prompts-per-step more prompts at a time
    until the step has that many such groups or --extra-draws more draws were made; more than needed are
    cut, fewer are trained on as they are (none at all: the first draw, whose gradient is 0). Draw d of
    step s takes its prompts and samples from (seed, s, d), so a resumed run replays it exactly. Returns
    the kept rollout and the step's draw metrics. One process only (check_args)."""
    kept = _groups(first, grpo.groups_with_signal(first.batch.rewards, first.batch.prompt_index))
    drawn, with_signal, draws = len(first.examples), len(kept.examples), 0
    while len(kept.examples) < cfg.prompts_per_step and draws < cfg.extra_draws:
        draws += 1
        order = np.random.default_rng((cfg.seed, step, draws)).choice(len(task.train), cfg.prompts_per_step,
                                                                      replace=False)
        more = rollout(model, [task.train[i] for i in order], prompter, sampling, reward_cfg, cfg.samples,
                       step_generator(cfg.seed, step, 0, device, draw=draws))
        found = _groups(more, grpo.groups_with_signal(more.batch.rewards, more.batch.prompt_index))
        drawn, with_signal = drawn + len(more.examples), with_signal + len(found.examples)
        kept = Rollout(kept.examples + found.examples, kept.texts + found.texts, kept.rewards + found.rewards,
                       grpo.concat_batches(kept.batch, found.batch))
    kept = _groups(kept, list(range(min(len(kept.examples), cfg.prompts_per_step))))
    record = {"filter_draws": 1 + draws, "filter_groups_kept": len(kept.examples),
              "filter_zero_std_share": 1 - with_signal / drawn}  # of every group drawn this step
    return (kept if kept.examples else first), record


def _groups(r: Rollout, prompts: list[int]) -> Rollout:
    """The rollout's groups `prompts` only (grpo.select_groups), its rows' texts and rewards with them."""
    wanted = set(prompts)
    rows = [k for k, p in enumerate(r.batch.prompt_index.tolist()) if p in wanted]
    return Rollout([r.examples[p] for p in prompts], [r.texts[k] for k in rows], [r.rewards[k] for k in rows],
                   grpo.select_groups(r.batch, prompts))


# -----------------------------------------------------------------------------
# Main: the stages of a run (plumbing/stages.py)


def main(argv=None):
    """`python train.py [flags]`: build the run, score the baselines, cold start (RecOne), GRPO, final test."""
    cfg = parse_args(argv)
    check_args(cfg)
    with stages.session(cfg) as s:  # flags, folder, signals, ranks, data, tokenizer, memory plan
        if s is None:  # --dry-run: the memory plan was the answer
            return
        model = stages.first_policy(s)
        rows = stages.baselines(s)
        if cfg.eval_only:
            return stages.evaluate_only(s, model, rows)
        run = stages.run_around(s)
        if s.in_cold_start:  # RecOne stage 1: the teacher's traces, SFT, then the cold start's test row
            sft(model, s.prompter, stages.cold_start_data(s), from_flags(SFTConfig, cfg), run)
            model = stages.after_cold_start(s, model)
        elif not cfg.resume:  # RecZero: the starting model's test row
            stages.before_rl(s, model)
        stages.start_row(s)
        train_grpo(model, stages.reference(s), s.prompter, s.task, cfg, run)
        stages.final_test(s, model, rows)


if __name__ == "__main__":
    main()
