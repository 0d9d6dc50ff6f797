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
- Ctrl-C and SIGTERM are requests (GracefulStop): the SFT batch or GRPO step in progress finishes,
  then a checkpoint is written that --resume continues from, in SFT or in GRPO. The cold-start SFT
  also saves every --sft-save-every batches and at its end, so even a kill loses little of it.
- One run per folder (plumbing/runs.py): a run locks its --out and refuses one that holds another
  run; --eval-only writes into OUT/eval/, --dry-run nowhere in --out.
- Under torchrun each rank takes its share of each step's prompts (and of each SFT batch) and the
  gradients of one globally normalised loss are summed, so N ranks take the one-process step; each
  rank decodes its share of the evaluation examples; rank 0 logs and writes checkpoints. With --fsdp
  the weights, gradients and AdamW state are sharded across the ranks (plumbing/parallel.py).
  Evaluation is greedy on fixed subsets (`--valid-size`, `--eval-size` for the test split).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import grpo
from lora import add_lora
from model import CheckpointError, SamplingConfig, right_pad
from plumbing.checkpoints import (
    BestSoFar,
    TrainerState,
    load_adapters,
    load_config,
    load_model,
    load_optimizer,
    save_checkpoint,
    save_model,
)
from plumbing.cli import RunConfig, check_args, fail, lora_targets, parse_args, pick, prompt_settings
from plumbing.experiment import (
    TaskData,
    cold_start_traces,
    demo_model,
    demo_tokenizer,
    load_task,
    memory_plan,
    trace_fidelity,
)
from plumbing.memory import device_bytes, fits
from plumbing.parallel import Distributed, end_distributed, gathered, setup_distributed, shard
from plumbing.readers import DataError
from plumbing.runs import FolderError, WriteError, run_folder, write_text
from plumbing.report import (
    RunLog,
    baseline_rows,
    compare,
    describe,
    evaluate,
    interval_table,
    plot,
    results_table,
    rollout_metrics,
)
from plumbing.teachers import Trace, TraceFidelity, load_traces, save_traces
from plumbing.tokenizer import Tokenizer
from reczero import Prompter, RatingMetrics, compute_reward, reward_config

# -----------------------------------------------------------------------------
# RecOne stage 1: supervised fine-tuning on the teacher's traces


@dataclass
class SFTConfig:
    """The cold-start SFT's settings (named as their flags: --sft-lr is sft_lr)."""

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


def sft(model, prompter: Prompter, traces: list[Trace], cfg: SFTConfig, log=lambda record: None,
        start: int = 0, resume_from: Path | None = None, stop: GracefulStop | None = None, save=None,
        dist: Distributed = Distributed()) -> None:
    """Teacher-forced cross-entropy on the completion tokens of each trace (see sft_row), plus
    cfg.sft_prompt_weight times the same loss on the prompt tokens. AdamW, linear warm-up then decay.

    Resumable: `start` batches are skipped (the same seeded order is replayed) after AdamW's moments
    and schedule are restored from `resume_from`. save(step, optimizer) writes a checkpoint every
    cfg.sft_save_every batches and after the last one; when `stop` is requested (Ctrl-C, SIGTERM), the
    batch in progress finishes, is saved, and the run exits (130). As in GRPO, a batch with a
    non-finite loss or gradient is skipped (and never saved right after); MAX_BAD_STEPS in a row, or
    non-finite weights, stop the run (exit 3) without saving. Under torchrun every rank takes every
    dist.world-th row of each batch and the gradients are summed, so N ranks take the one-process step."""
    if not traces:
        raise ValueError("sft: no traces to train on")
    tok = prompter.tok
    rows = [sft_row(prompter, t) for t in traces]
    trained = [p for p in model.parameters() if p.requires_grad]  # all, or only LoRA's adapters
    opt = torch.optim.AdamW(trained, lr=cfg.sft_lr, weight_decay=0.0, betas=(0.9, 0.95))
    if resume_from is not None:
        load_optimizer(resume_from, opt)
    for group in opt.param_groups:  # the schedule scales initial_lr; a resumed one starts at batch `start`
        group["initial_lr"] = cfg.sft_lr
    steps = cfg.sft_epochs * math.ceil(len(rows) / cfg.sft_batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (0.1 * steps + 1)) * max(0.0, 1 - s / steps), last_epoch=start - 1)
    rng = np.random.default_rng(cfg.seed + 1)
    device = model.embed_tokens.weight.device
    model.train()
    bar = tqdm(total=steps, initial=start, desc="cold-start SFT", disable=dist.rank != 0)
    step = bad = 0  # bad: batches in a row skipped for a non-finite loss or gradient
    for epoch in range(cfg.sft_epochs):
        order = rng.permutation(len(rows))  # drawn for every epoch, so a resumed run sees the same order
        for i in range(0, len(rows), cfg.sft_batch):
            if step < start:  # done before the checkpoint
                step += 1
                continue
            batch = [rows[j] for j in order[i:i + cfg.sft_batch]]
            # means over the whole batch's tokens, so splitting it into micro-batches changes nothing
            n_trace = sum(len(c) for _, c in batch)
            n_prompt = sum(len(p) - 1 for p, _ in batch)
            opt.zero_grad(set_to_none=True)
            mine = batch[dist.rank::dist.world]
            # the same number of passes on every rank (a sharded model gathers weights in each one):
            # a rank whose rows have run out repeats a row with weight 0
            passes = math.ceil(math.ceil(len(batch) / dist.world) / cfg.micro_batch)
            loss = 0.0
            for k in range(0, passes * cfg.micro_batch, cfg.micro_batch):
                micro = mine[k:k + cfg.micro_batch]
                loss += sft_loss(model, micro or batch[:1], n_trace, n_prompt, cfg.sft_prompt_weight,
                                 tok.pad_id, device, weight=1.0 if micro else 0.0)
            if dist.world > 1:
                grpo.sum_gradients(trained, dist.all_reduce)
                loss = dist.sum(loss)
            norm = grpo.scalar(torch.nn.utils.clip_grad_norm_(trained, 1.0))  # the same on every rank
            if math.isfinite(loss) and math.isfinite(norm):
                opt.step()
                torch.clear_autocast_cache()  # its low-precision copies of the weights are stale now (grpo_update)
                bad = 0
                if not grpo.all_finite(trained, dist.all_reduce if dist.world > 1 else None):
                    diverged(f"cold-start SFT batch {step + 1}: the update made weights non-finite; they are "
                             "discarded.", "--sft-lr")
            else:  # never step on nan/inf
                opt.zero_grad(set_to_none=True)
                bad += 1
                tqdm.write(f"warning: cold-start SFT batch {step + 1}: non-finite loss or gradient, update skipped",
                           file=sys.stderr)
                if bad == MAX_BAD_STEPS:
                    diverged(f"{MAX_BAD_STEPS} cold-start SFT batches in a row (to batch {step + 1}) had a "
                             "non-finite loss or gradient: the weights have diverged.", "--sft-lr")
            sched.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}")
            if i + cfg.sft_batch >= len(rows):  # the epoch's last batch, logged before any save of it
                log({"stage": "sft", "epoch": epoch + 1, "batch": step, "loss": loss})
            if stopping(stop, dist) and save is not None:
                bar.close()
                opt.zero_grad(set_to_none=True)
                if not bad:  # never right after a non-finite batch: the weights may be the cause
                    save(step, opt, stopping=True)
                elif dist.rank == 0:
                    tqdm.write(f"stopping in the cold-start SFT at batch {step}, unsaved: it was not finite",
                               file=sys.stderr)
                dist.barrier()  # torchrun ends the others when one rank exits: not while rank 0 writes
                sys.exit(130)
            if save is not None and not bad and (step % cfg.sft_save_every == 0 or step == steps):
                opt.zero_grad(set_to_none=True)
                save(step, opt)  # at the end too: a kill while the cold start is written loses no batch
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


NO_SIGNAL_STEPS = 3  # flat steps with no formatted completion before train_grpo says RL cannot start
MAX_BAD_STEPS = 3  # consecutive non-finite steps before train_grpo stops the run


def diverged(msg: str, lr_flag: str = "--lr"):
    """Stop a run whose weights can no longer be trusted: nothing is saved, exit code 3."""
    name = lr_flag.lstrip("-").replace("-", "_")
    tqdm.write(f"train.py: error: {msg} Nothing was saved after it; resume from the last checkpoint written "
               f"(if any) with a lower learning rate: --resume OUT/checkpoint --resume-override {name} {lr_flag} ... "
               "(check its validation records in metrics.jsonl first: it may hold a policy that had already "
               "collapsed; with --select best, OUT/best/ holds the best validated weights, a --model for a new run)",
               file=sys.stderr)
    sys.exit(3)


def train_grpo(model, tok: Tokenizer, tok_dir: Path, prompter: Prompter, task: TaskData, cfg: RunConfig,
               dist: Distributed, log: RunLog, state: TrainerState, fidelity: TraceFidelity | None = None,
               stop: GracefulStop | None = None, resume_from: Path | None = None):
    """The GRPO loop: one rollout and one update per step, periodic evaluation and checkpoints; when
    `stop` is requested (Ctrl-C, SIGTERM) the step in progress finishes, is saved, and the run exits (130).
    resume_from: a checkpoint written during GRPO, whose AdamW moments the optimizer continues from."""
    device = model.embed_tokens.weight.device
    grpo_cfg = pick(grpo.GRPOConfig, cfg)
    sampling = pick(SamplingConfig, cfg, stop_ids=tok.stop_ids)
    reward_cfg = reward_config(cfg.reward, task.scale)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    out = Path(cfg.out)
    if resume_from is not None:
        load_optimizer(resume_from, opt)
    ref = None
    if cfg.beta > 0:  # the frozen starting point: the cold-start checkpoint or the given model
        ref_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(
            device.type) else model.embed_tokens.weight.dtype
        ref = distribute(load_model(state.start_model, ref_dtype, "cpu" if dist.fsdp else device), dist,
                         ref_dtype).requires_grad_(False)
    per_rank = cfg.prompts_per_step // dist.world
    all_reduce = dist.all_reduce if dist.world > 1 else None

    def save():  # every rank calls it (a sharded model is gathered); rank 0 writes
        save_checkpoint(out / "checkpoint", model, tok_dir, opt, state, asdict(cfg))

    def validate():  # on every rank, each decoding its share; all get the same metrics
        m = evaluate(model, tok, prompter, task.valid, task.fallback, cfg.max_new_tokens, desc="valid",
                     fidelity=fidelity, scale=task.scale, dist=dist)
        log({"stage": "eval", "step": state.step, **asdict(m)})
        if dist.rank == 0:
            tqdm.write(f"step {state.step}: valid {describe(m)}")
        if cfg.select == "best" and (state.best is None or m.mae < state.best.mae):
            save_model(model, out / "best", tok_dir)  # atomic: a crash keeps the previous best
            state.best = BestSoFar(state.step, m.mae, str(out / "best"))

    if state.step == 0 and task.valid and cfg.steps > 0:
        model.eval()
        validate()  # the starting point of the validation curve (after the cold start, if any)
    bar = tqdm(total=cfg.steps, initial=state.step, desc="GRPO", disable=dist.rank != 0)
    flat_steps = 0  # consecutive steps in which every group's rewards were equal: no advantage, no gradient
    bad_steps = 0  # consecutive steps skipped for a non-finite loss or gradient
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
        with gathered(model):  # FSDP: the whole model for the rollout, whose length differs between ranks
            batch = grpo.rollout(model, [prompter(e) for e in examples], reward_fn, sampling, cfg.samples,
                                 step_generator(cfg.seed, state.step, dist.rank, device), tok.pad_id)
        t1 = time.time()
        # Steps 3-7: advantages, log-probs, clipped loss, aggregation, AdamW (grpo.grpo_update)
        model.train()
        metrics = grpo.grpo_update(model, opt, batch, grpo_cfg, ref, all_reduce)
        if not metrics["weights_finite"]:
            diverged(f"step {state.step + 1}: the update made weights non-finite; they are discarded.")
        bad_steps = bad_steps + 1 if metrics["skipped"] else 0
        if bad_steps:
            tqdm.write(f"warning: step {state.step + 1}: non-finite loss or gradient, update skipped",
                       file=sys.stderr)
        if bad_steps == MAX_BAD_STEPS:
            diverged(f"{MAX_BAD_STEPS} steps in a row (to step {state.step + 1}) had a non-finite loss or "
                     "gradient: the weights have diverged.")
        state.step += 1
        metrics.update(rollout_metrics(rewards, [e.label for e in examples], batch),
                       stage="grpo", step=state.step, time_sampling=t1 - t0, time_update=time.time() - t1)
        log(metrics)
        bar.update()
        flat_steps = flat_steps + 1 if metrics["frac_reward_zero_std"] == 1.0 else 0
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", mae=f"{metrics['train_mae']:.2f}",
                        **({"signal": "none (all rewards in each group equal)"} if flat_steps else {}))
        if flat_steps == NO_SIGNAL_STEPS and metrics["format_valid"] == 0 and dist.rank == 0:
            fix = ("the cold start did not teach it: more traces or SFT (--cold-start-size, --sft-epochs, "
                   "--sft-lr)" if cfg.mode == "recone" else "RecZero needs a model that already follows the "
                   "format instructions: use --mode recone (a cold start teaches the format) or a larger "
                   "instruct model")
            tqdm.write(f"warning: {NO_SIGNAL_STEPS} steps without a single completion in the four-tag format: "
                       f"every reward is the format penalty, so GRPO has nothing to compare and the weights do "
                       f"not move; {fix}.", file=sys.stderr)
        if state.step % cfg.sample_every == 0:
            log.sample(state.step, examples, texts, rewards, batch.prompt_index.tolist())
        if (state.step % cfg.eval_every == 0 or state.step == cfg.steps) and task.valid:
            validate()
        due = state.step % cfg.save_every == 0 or state.step == cfg.steps
        if due and not bad_steps:
            save()  # never right after a non-finite step: the weights may be the cause
        if stopping(stop, dist) and state.step < cfg.steps:  # at the last step the run simply finishes
            if not bad_steps and not due:
                tqdm.write(f"stopping at step {state.step}: saving {out / 'checkpoint'}", file=sys.stderr)
                save()
            else:
                tqdm.write(f"stopping at step {state.step}", file=sys.stderr)
            dist.barrier()
            sys.exit(130)
    bar.close()
    model.eval()


# -----------------------------------------------------------------------------
# Main


def stopping(stop: GracefulStop | None, dist: Distributed) -> bool:
    """Whether any rank was asked to stop: every rank stops at the same step, or the others would
    wait for it forever."""
    return dist.sum(float(stop is not None and stop.requested is not None)) > 0


class GracefulStop:
    """Ctrl-C (SIGINT) or SIGTERM, what schedulers send, asks the loops to stop after the step in
    progress, so a checkpoint never holds a half-applied update; a second signal stops at once.
    A run that saves nothing (--eval-only, --dry-run: saves=False) stops at the first signal."""

    def __init__(self, saves: bool = True):
        self.saves = saves
        self.requested: str | None = None  # the first signal's name

    def __call__(self, signum, frame):
        if self.requested or not self.saves:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        tqdm.write(f"{self.requested}: stopping after this step to save a checkpoint "
                   "(send it again to stop at once, unsaved)", file=sys.stderr)

    @contextlib.contextmanager
    def installed(self):
        """Route SIGINT and SIGTERM here while the block runs (signals reach the main thread only:
        elsewhere, e.g. train.main called from a worker thread, nothing is installed)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


def main(argv=None):
    cfg = parse_args(argv)
    check_args(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        cfg.dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    compute, dtype = dtype, torch.float32 if cfg.master_weights == "fp32" else dtype  # dtype: of the weights
    stop = GracefulStop(saves=not (cfg.eval_only or cfg.dry_run))
    folder = run_folder(cfg.out, eval_only=cfg.eval_only, dry_run=cfg.dry_run, overwrite=cfg.overwrite,
                        resume=cfg.resume, rank=int(os.environ.get("RANK", 0)))
    try:
        with stop.installed(), folder as out, torch.autocast(device.split(":")[0], dtype=compute,
                                                             enabled=compute != dtype):
            run(cfg, out, device, dtype, compute, stop)
        end_distributed()  # after every way run() returns (--dry-run and --eval-only return early)
    except KeyboardInterrupt:  # a second signal (or the first, in a run that saves nothing): stop here
        print(f"\ninterrupted{' again' if stop.saves else ''}: stopped without saving", file=sys.stderr)
        sys.exit(130)
    except (CheckpointError, DataError, WriteError, FolderError) as e:  # a folder in use, a full disk, a cut file
        fail(str(e))


def with_lora(model, cfg: RunConfig):
    """`model` with LoRA adapters when --lora-rank > 0 (lora.py; everything else frozen), else unchanged."""
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, lora_targets(cfg), seed=cfg.seed)
    return model


def distribute(model, dist: Distributed, compute):
    """`model` sharded across the ranks with --fsdp (plumbing/parallel.py: loaded whole on the CPU, each
    rank keeps its shard on its device), else unchanged."""
    return shard(model, compute, dist.device) if dist.fsdp else model


def run(cfg: RunConfig, out: Path, device: str, dtype, compute, stop: GracefulStop | None = None):
    """Everything after the flags: data, model, cold start, GRPO, evaluation (inside autocast if asked).
    out: the folder it writes into (runs.run_folder: --out, OUT/eval for --eval-only, a temporary one
    for --dry-run)."""
    dist = setup_distributed(device, cfg.fsdp)
    load_to = "cpu" if dist.fsdp else device  # FSDP: whole on the CPU, then each rank's shard to its device
    base_dtype = compute if cfg.lora_rank else dtype  # with LoRA the base is frozen: keep it in the compute dtype
    try:
        task = load_task(cfg)
        state = TrainerState.read(cfg.resume) if cfg.resume else TrainerState(start_model=cfg.model)
        if cfg.resume and state.data_fingerprint not in (None, task.fingerprint):
            fail(f"--resume {cfg.resume}: the examples differ from those the checkpoint was trained on (data "
                 f"fingerprint {task.fingerprint}, checkpoint {state.data_fingerprint}): has --data changed?")
        state.data_fingerprint = task.fingerprint
        # a checkpoint written during the cold start holds SFT's AdamW moments, not GRPO's
        grpo_resume = Path(cfg.resume) if cfg.resume and state.sft_step is None else None
        if cfg.resume or cfg.model:
            tok_dir = Path(cfg.resume or cfg.model)
            tok = Tokenizer(tok_dir)
            # with LoRA a resumed run rebuilds the frozen base the adapters were trained on
            base = state.start_model if cfg.lora_rank and cfg.resume else tok_dir
            config = load_config(base)
            tok.check_fits(config.vocab_size, tok_dir)
        else:  # the demo: a tokenizer trained on the synthetic text, a tiny random model
            # --dry-run: every rank trains its own, in its own temporary folder
            tok_dir = demo_tokenizer(task, prompt_settings(cfg, task.scale), out, 0 if cfg.dry_run else dist.rank)
            dist.barrier()
            tok = Tokenizer(tok_dir)
            model = demo_model(tok.vocab_size, tok.turn_end_id, cfg.seed).to(load_to, dtype)
            config = model.config
        prompter = Prompter(tok, *prompt_settings(cfg, task.scale))
        plan = memory_plan(cfg, config, prompter, task, dtype, compute, dist.world)  # before any weight loads
        if dist.rank == 0:
            print(plan.describe())
        if cfg.dry_run:
            return
        if problem := fits(plan, device_bytes(device), evaluation=cfg.eval_only):  # scoring holds no gradients
            fail(problem)
        resumed = cfg.resume and not cfg.eval_only  # an evaluation starts its own log
        log = RunLog(out, dist.rank == 0, state.step if resumed else None, state.sft_step if resumed else None)
        if cfg.resume or cfg.model:
            model = with_lora(load_model(base, base_dtype, load_to), cfg)
            if cfg.lora_rank and cfg.resume:
                load_adapters(cfg.resume, model)
    except (DataError, CheckpointError, OSError) as e:
        fail(str(e))
    model = distribute(model, dist, compute)
    model.gradient_checkpointing = cfg.grad_checkpointing
    if dist.rank == 0:
        print(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {model.config.arch}, weights {dtype}, "
              f"compute {compute}, {device}" + (f", sharded over {dist.world} ranks" if dist.fsdp else ""))
    fidelity = trace_fidelity(cfg, task)

    def score_test(model, name: str, desc: str, fidelity=None) -> RatingMetrics:  # greedy, on the test split
        return evaluate(model, tok, prompter, task.test, task.fallback, cfg.max_new_tokens, desc=desc,
                        fidelity=fidelity, scale=task.scale, dist=dist, save_to=out / "predictions" / f"{name}.jsonl")

    rows = baseline_rows(task.baselines, task.test, fidelity, out / "predictions" if dist.rank == 0 else None)
    for name, m in rows:
        log({"stage": "baseline", "name": name, **asdict(m)})
    if cfg.eval_only:
        rows.append(("model", score_test(model, "model", "test")))
        log({"stage": "test", "name": "model", **asdict(rows[-1][1])})
        if dist.rank == 0:
            write_text(out / "results.md", results_table(rows) + "\n")
            print(results_table(rows))
        return
    if cfg.mode == "recone" and (not cfg.resume or state.sft_step is not None):
        if state.sft_step is None:  # a new cold start; its traces are kept, so a resumed SFT needs no teacher
            traces = cold_start_traces(cfg, task, prompter, compute, device, log, dist)
            state.sft_step, state.sft_traces = 0, str(out / "cold_start_traces.jsonl")
            if dist.rank == 0:
                save_traces(traces, Path(state.sft_traces))
        else:
            try:
                traces = load_traces(state.sft_traces, task.train)
            except (OSError, ValueError) as e:
                fail(f"--resume {cfg.resume}: cannot read the cold start's traces: {e}")

        def save_sft(step: int, opt, stopping: bool = False):
            if stopping and dist.rank == 0:
                tqdm.write(f"stopping in the cold-start SFT at batch {step}: saving {out / 'checkpoint'} "
                           f"(--resume {out / 'checkpoint'} continues from there)", file=sys.stderr)
            state.sft_step = step
            save_checkpoint(out / "checkpoint", model, tok_dir, opt, state, asdict(cfg))

        sft(model, prompter, traces, pick(SFTConfig, cfg), log, start=state.sft_step,
            resume_from=Path(cfg.resume) if cfg.resume else None, stop=stop, save=save_sft, dist=dist)
        # save in the HF layout and reload through the loader real checkpoints use
        save_model(model, out / "cold_start", tok_dir)
        state.sft_step = None
        dist.barrier()
        model = with_lora(load_model(out / "cold_start", base_dtype, load_to), cfg)  # fresh adapters for GRPO
        model = distribute(model, dist, compute)
        model.gradient_checkpointing = cfg.grad_checkpointing
        state.start_model = str(out / "cold_start")
        state.cold_start = asdict(score_test(model, "test_start", "test (cold start)", fidelity))
    elif not cfg.resume:
        if cfg.demo:  # random starting weights are on no disk: save them, the KL reference for --beta > 0
            save_model(model, out / "start", tok_dir)
            dist.barrier()
            state.start_model = str(out / "start")
        state.cold_start = asdict(score_test(model, "test_start", "test (before RL)"))
    if state.step == 0 and dist.rank == 0:
        log({"stage": "test_start", "step": 0, **state.cold_start})  # the test row of the model GRPO starts from
    train_grpo(model, tok, tok_dir, prompter, task, cfg, dist, log, state, fidelity, stop, grpo_resume)
    label, step = f"LLM after GRPO (step {cfg.steps})", cfg.steps
    if cfg.select == "best" and state.best:  # the weights of the best validation MAE
        step = state.best.step
        dist.barrier()  # rank 0 may still be writing it
        model = distribute(load_model(state.best.path, dtype, load_to), dist, compute)
        label = f"LLM after GRPO (best valid MAE: step {step} of {cfg.steps})"
    final = score_test(model, "test", "test (GRPO)", fidelity)
    log({"stage": "test", "step": step, **asdict(final)})
    if dist.rank == 0:
        start = "after cold start" if cfg.mode == "recone" else "before RL"
        rows += [(f"LLM {start}", RatingMetrics(**state.cold_start)), (label, final)]
        pred = out / "predictions"
        against = [(start, "test_start"), ("matrix factorisation", "baseline-mf"), ("user+item bias", "baseline-bias")]
        # a run resumed into another --out finds its cold start's predictions in the first run's folder only
        intervals = [(f"after GRPO - {name}", compare(pred / "test.jsonl", pred / f"{stem}.jsonl"))
                     for name, stem in against if (pred / f"{stem}.jsonl").exists()]
        for name, iv in intervals:
            log({"stage": "interval", "name": name, **asdict(iv)})
        table = results_table(rows) + f"\n\nOn the same {final.n} test examples:\n\n" + interval_table(intervals)
        write_text(out / "results.md", table + "\n")
        print(table)
        plot(out)


if __name__ == "__main__":
    main()
