"""RecZero / RecOne training: command line, cold-start SFT, the GRPO loop, evaluation, checkpoints.

`python train.py` with no arguments runs the embedded demo: synthetic data, a byte-level BPE tokenizer
trained on it, a tiny Qwen2-architecture model, RecOne cold start on heuristic-teacher traces, GRPO,
and a table against classic baselines. With `--model DIR --data PATH --data-format F` it runs the
paper's setting on a real checkpoint (defaults from PAPER.md §4; see `--help`). The flags, their two
sets of defaults and their checks live in cli.py.

Simplifications:
- Every random draw of step s comes from generators seeded with (seed, s), so a resumed run replays
  exactly what an uninterrupted one would: a checkpoint needs the model, the optimizer and the step.
- Data parallel (torchrun) splits each step's prompts across ranks and averages gradients; rank 0
  evaluates, logs and saves. Evaluation is greedy on a fixed subset (`--eval-size`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import grpo
from baselines import fit_baselines
from data import Example, build_examples, split_by_time
from readers import DataError, load_ratings
from checkpoint import load_optimizer, save_checkpoint
from cli import check_args, fail, parse_args, prompt_settings
from model import CheckpointError, ModelConfig, Transformer, load_model, save_model
from coldstart import HeuristicTeacher, ModelTeacher, SFTConfig, build_cold_start, load_traces, sft
from reczero import REWARD_PRESETS, Prompter, compute_reward, render_user_message
from report import RunLog, baseline_rows, evaluate, plot, results_table
from sampling import SamplingConfig, generate
from tokenizer import Tokenizer
from synthetic import SyntheticConfig, make_synthetic

# -----------------------------------------------------------------------------
# Data and prompts


@dataclass
class TaskData:
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    baselines: dict
    fallback: dict  # (user_id, item_id, time) -> bias-baseline prediction, for unparsable outputs


def load_task(args) -> TaskData:
    """Ratings -> time split -> leak-free examples; classic baselines fitted on the training split."""
    if args.data:
        data = load_ratings(args.data, args.data_format, args.meta, skip_bad_rows=args.skip_bad_rows)
        if data.skipped:
            print(f"skipped {data.skipped} bad rows in {args.data}")
    else:
        data = make_synthetic(SyntheticConfig(n_users=args.synthetic_users, seed=args.seed))
    split = split_by_time(data, "user-last")
    rng = np.random.default_rng(args.seed)
    # examples hold exactly the history the prompt shows, so a teacher never cites entries the model cannot see
    ex = {name: build_examples(data, getattr(split, name), args.max_user_history, args.max_item_history)
          for name in ("train", "valid", "test")}
    for name in ("valid", "test"):  # fixed random subsets, so evaluation cost is bounded
        if len(ex[name]) > args.eval_size:
            ex[name] = [ex[name][i] for i in sorted(rng.choice(len(ex[name]), args.eval_size, replace=False))]
    if not ex["train"] or not ex["test"]:
        fail(f"{args.data or 'synthetic data'}: no usable examples after the history filter")
    baselines = fit_baselines(split.train, seed=args.seed)
    fallback = {}
    for e in ex["valid"] + ex["test"]:
        fallback[(e.target.user_id, e.target.item_id, e.target.time)] = baselines["bias"].predict(e.target.user_id, e.target.item_id)
    print(f"data: {len(data.ratings)} ratings, examples train/valid/test {len(ex['train'])}/{len(ex['valid'])}/{len(ex['test'])}")
    return TaskData(ex["train"], ex["valid"], ex["test"], baselines, fallback)


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


def rollout(model, tok, prompter, examples, args, gen_rng, reward_cfg):
    """Sample G completions per example, score them; returns (RolloutBatch, texts, Reward list)."""
    prompts = [prompter(e) for e in examples]
    gen = generate(model, prompts, SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                                  tok.stop_ids), num_samples=args.samples, generator=gen_rng,
                   pad_id=tok.pad_id)
    texts = [tok.decode(c) for c in gen.completions()]
    rewards = [compute_reward(t, examples[i].label, reward_cfg) for t, i in zip(texts, gen.prompt_index.tolist())]
    batch = grpo.rollout_from_generation(prompts, gen, [r.total for r in rewards], pad_id=tok.pad_id)
    return batch, texts, rewards, gen


def rollout_metrics(rewards, examples, gen, samples: int) -> dict:
    """Reward parts, format rate, training MAE and the longest completion of one step's rollouts
    (grpo_update already reports reward_mean, response_length_mean and truncated_frac)."""
    valid = [r for r in rewards if r.valid]
    truth = [examples[i // samples].label for i, r in enumerate(rewards) if r.valid]
    return {"reward_std": float(np.std([r.total for r in rewards])),
            "reward_format": float(np.mean([r.format for r in rewards])),
            "reward_answer": float(np.mean([r.answer for r in rewards])),
            "format_valid": len(valid) / len(rewards),
            "train_mae": float(np.mean([abs(r.rating - y) for r, y in zip(valid, truth)])) if valid else math.nan,
            "response_length_max": gen.lengths.max().item()}


# -----------------------------------------------------------------------------
# Main


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(t)
        return t


def setup_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK: NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Dist()
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return Dist(torch.distributed.get_rank(), world)


def demo_model(vocab_size: int, eos: int, seed: int) -> Transformer:
    """The tiny Qwen2-architecture model of the demo (about 1.3M parameters with a 2k vocabulary)."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig(arch="qwen2", vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
                                   num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, qkv_bias=True,
                                   max_position_embeddings=4096, eos_token_id=eos))


def train_grpo(model, tok, tok_dir, prompter, task: TaskData, args, dist: Dist, log: RunLog, state: dict):
    """The GRPO loop: rollouts, rewards, one update per step, periodic evaluation and checkpoints."""
    device = model.embed_tokens.weight.device
    cfg = grpo.GRPOConfig(scale=args.adv_scale, eps_low=args.clip_low, eps_high=args.clip_high, beta=args.beta,
                          kl_estimator=args.kl_estimator, loss_agg=args.loss_agg, max_completion_length=args.max_new_tokens,
                          mu=args.mu, micro_batch_size=args.micro_batch, max_grad_norm=args.max_grad_norm,
                          temperature=args.temperature, drop_truncated=args.drop_truncated)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    out = Path(args.out)
    if args.resume:
        load_optimizer(Path(args.resume), opt)
    ref = None
    if args.beta > 0:  # the frozen starting point: the cold-start checkpoint or the given model
        ref = load_model(state["start_model"], torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(
            device.type) else model.embed_tokens.weight.dtype, device).requires_grad_(False)
    reward_cfg = REWARD_PRESETS[args.reward]
    per_rank = args.prompts_per_step // dist.world
    all_reduce = dist.all_reduce if dist.world > 1 else None
    step = state["step"]

    def save():
        if dist.rank == 0:
            save_checkpoint(out / "checkpoint", model, tok_dir, opt, {**state, "step": step, "args": vars(args)})

    def validate():
        m = evaluate(model, tok, prompter, task.valid, task.fallback, args.max_new_tokens, desc="valid")
        log({"stage": "eval", "step": step, **asdict(m)})
        tqdm.write(f"step {step}: valid MAE {m.mae:.3f} RMSE {m.rmse:.3f} format {m.valid_rate:.0%} "
                   f"pred std {m.pred_std:.2f} distinct {m.distinct}")
        if args.select == "best" and (state.get("best") is None or m.mae < state["best"]["mae"]):
            save_model(model, out / "best", tok_dir)  # atomic: a crash keeps the previous best
            state["best"] = {"step": step, "mae": m.mae, "path": str(out / "best")}

    if dist.rank == 0 and step == 0 and task.valid and args.steps > 0:
        model.eval()
        validate()  # the starting point of the validation curve (after the cold start, if any)
    bar = tqdm(total=args.steps, initial=step, desc="GRPO", disable=dist.rank != 0)
    try:
        while step < args.steps:
            idx = step_prompts(len(task.train), args.prompts_per_step, args.seed, step)
            examples = [task.train[i] for i in idx[dist.rank * per_rank:(dist.rank + 1) * per_rank]]
            t0 = time.time()
            model.eval()
            batch, texts, rewards, gen = rollout(model, tok, prompter, examples, args,
                                                 step_generator(args.seed, step, dist.rank, device), reward_cfg)
            t1 = time.time()
            model.train()
            metrics = grpo.grpo_update(model, opt, batch, cfg, ref, all_reduce)
            if metrics["skipped"]:
                print(f"warning: step {step + 1}: non-finite loss or gradient, update skipped", file=sys.stderr)
            step += 1
            metrics.update(rollout_metrics(rewards, examples, gen, args.samples),
                           stage="grpo", step=step, time_sampling=t1 - t0, time_update=time.time() - t1)
            log(metrics)
            bar.update()
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", mae=f"{metrics['train_mae']:.2f}")
            if step % args.sample_every == 0:
                log.sample(step, examples, texts, rewards, args.samples)
            if dist.rank == 0 and (step % args.eval_every == 0 or step == args.steps) and task.valid:
                validate()
            if step % args.save_every == 0 or step == args.steps:
                save()
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {step}: saving {out / 'checkpoint'}", file=sys.stderr)
        save()
        sys.exit(130)
    bar.close()
    model.eval()


def cold_start_traces(args, task: TaskData, prompter: Prompter, dtype, device, log):
    """RecOne's trace set: from --sft-traces, or built by the teacher on the first training examples."""
    if args.sft_traces:
        try:
            traces = load_traces(args.sft_traces, task.train)
        except ValueError as e:
            fail(str(e))
        log({"stage": "cold_start", "traces": len(traces)})
        return traces
    if args.teacher == "heuristic":
        teacher = HeuristicTeacher(seed=args.seed)
    else:
        tok = Tokenizer(args.teacher)
        teacher = ModelTeacher(load_model(args.teacher, dtype, device), Prompter(tok, prompter.caps, prompter.system),
                               args.max_new_tokens, seed=args.seed)
    traces, stats = build_cold_start(teacher, task.train[:args.cold_start_size])
    print(f"cold start: {stats}")
    if not traces:
        fail(f"cold start: none of the {stats.asked} teacher traces ended at the true rating; "
             "ask more examples (--cold-start-size), use another --teacher, or --mode reczero")
    log({"stage": "cold_start", "traces": len(traces), **asdict(stats)})
    return traces


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        args.dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    compute, dtype = dtype, torch.float32 if args.master_weights == "fp32" else dtype  # dtype: of the weights
    with torch.autocast(device.split(":")[0], dtype=compute, enabled=compute != dtype):
        run(args, device, dtype, compute)


def run(args, device: str, dtype, compute):
    """Everything after the flags: data, model, cold start, GRPO, evaluation (inside autocast if asked)."""
    dist = setup_distributed(device)
    out = Path(args.out)
    try:
        task = load_task(args)
        resumed = json.loads((Path(args.resume) / "trainer_state.json").read_text()) if args.resume else None
        log = RunLog(out, dist.rank == 0, resumed["step"] if resumed else None)
        state = {"step": 0, "cold_start": None, "start_model": args.model}
        if resumed:
            state.update({k: resumed.get(k) for k in ("step", "cold_start", "start_model", "best")})
            model, tok_dir = load_model(args.resume, dtype, device), Path(args.resume)
        elif args.model:
            model, tok_dir = load_model(args.model, dtype, device), Path(args.model)
        else:  # the demo: a tokenizer trained on the synthetic text, a tiny random model
            from tokenizer import train_bpe
            caps, system = prompt_settings(args)
            corpus = [render_user_message(e, caps) for e in task.train[:3000]] + [system] + \
                HeuristicTeacher().write(task.train[:2000])
            tok_dir = out / "tokenizer"
            if dist.rank == 0:
                train_bpe(corpus, tok_dir)
            if dist.world > 1:
                torch.distributed.barrier()
            tok = Tokenizer(tok_dir)
            model = demo_model(tok.vocab_size, tok.stop_ids[0], args.seed).to(device, dtype)
        tok = Tokenizer(tok_dir)
    except (DataError, CheckpointError, OSError) as e:
        fail(str(e))
    model.gradient_checkpointing = args.grad_checkpointing
    prompter = Prompter(tok, *prompt_settings(args))
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {model.config.arch}, weights {dtype}, "
          f"compute {compute}, {device}")
    rows = baseline_rows(task.baselines, task.test)
    if args.eval_only:
        rows.append(("model", evaluate(model, tok, prompter, task.test, task.fallback, args.max_new_tokens, desc="test")))
        print(results_table(rows))
        return
    if not resumed and args.mode == "recone":
        traces = cold_start_traces(args, task, prompter, compute, device, log)
        if dist.rank == 0:  # the other ranks load the result: the same weights everywhere
            sft(model, prompter, traces, SFTConfig(args.sft_epochs, args.sft_lr, args.sft_batch,
                                                   args.sft_prompt_weight, args.seed), log)
            # step 4: save in the HF layout and reload through the loader real checkpoints use
            save_model(model, out / "cold_start", tok_dir)
        if dist.world > 1:
            torch.distributed.barrier()
        model = load_model(out / "cold_start", dtype, device)
        model.gradient_checkpointing = args.grad_checkpointing
        state["start_model"] = str(out / "cold_start")
        if dist.rank == 0:
            state["cold_start"] = asdict(evaluate(model, tok, prompter, task.test, task.fallback, args.max_new_tokens,
                                                  desc="test (cold start)"))
    elif not resumed and dist.rank == 0:
        state["cold_start"] = asdict(evaluate(model, tok, prompter, task.test, task.fallback, args.max_new_tokens,
                                              desc="test (before RL)"))
    train_grpo(model, tok, tok_dir, prompter, task, args, dist, log, state)
    if dist.rank == 0:
        from reczero import RatingMetrics
        label, step = f"LLM after GRPO (step {args.steps})", args.steps
        if args.select == "best" and state.get("best"):  # the weights of the best validation MAE
            step = state["best"]["step"]
            model = load_model(state["best"]["path"], dtype, device)
            label = f"LLM after GRPO (best valid MAE: step {step} of {args.steps})"
        final = evaluate(model, tok, prompter, task.test, task.fallback, args.max_new_tokens, desc="test (GRPO)")
        log({"stage": "test", "step": step, **asdict(final)})
        start = "after cold start" if args.mode == "recone" else "before RL"
        rows += [(f"LLM {start}", RatingMetrics(**state["cold_start"])), (label, final)]
        table = results_table(rows)
        (out / "results.md").write_text(table + "\n")
        print(table)
        plot(out)
    if dist.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
