"""RecZero / RecOne training: command line, cold-start SFT, the GRPO loop, evaluation, checkpoints.

`python train.py` with no arguments runs the embedded demo: synthetic data, a byte-level BPE tokenizer
trained on it, a tiny Qwen2-architecture model, RecOne cold start on heuristic-teacher traces, GRPO,
and a table against classic baselines. With `--model DIR --data PATH --data-format F` it runs the
paper's setting on a real checkpoint (defaults from PAPER.md §4; see `--help`).

Simplifications:
- Every random draw of step s comes from generators seeded with (seed, s), so a resumed run replays
  exactly what an uninterrupted one would: a checkpoint needs the model, the optimizer and the step.
- Data parallel (torchrun) splits each step's prompts across ranks and averages gradients; rank 0
  evaluates, logs and saves. Evaluation is greedy on a fixed subset (`--eval-size`).
"""

from __future__ import annotations

import argparse
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
from readers import FORMATS, DataError, load_ratings
from checkpoint import load_optimizer, save_checkpoint
from model import CheckpointError, ModelConfig, Transformer, load_model, save_model
from coldstart import HeuristicTeacher, ModelTeacher, SFTConfig, build_cold_start, load_traces, sft
from reczero import (REWARD_PRESETS, SHORT_SYSTEM_PROMPT, SYSTEM_PROMPT, Prompter, PromptCaps, compute_reward,
                     render_user_message)
from report import RunLog, baseline_rows, evaluate, plot, results_table
from sampling import SamplingConfig, generate
from tokenizer import Tokenizer
from synthetic import SyntheticConfig, make_synthetic

# Defaults: (the paper's setting for a real model, the CPU demo). None in argparse means "not given".
DEFAULTS = {
    "steps": (300, 60), "prompts_per_step": (8, 16), "samples": (8, 8), "lr": (2e-6, 2e-4),
    "temperature": (1.0, 1.0), "max_new_tokens": (1024, 96), "cold_start_size": (1000, 3000),
    "sft_epochs": (2, 3), "sft_lr": (1e-5, 3e-3), "sft_batch": (16, 4), "sft_prompt_weight": (0.0, 0.0),
    "eval_size": (1000, 300), "eval_every": (50, 10), "mode": ("recone", "recone"), "micro_batch": (8, 64),
    "max_user_history": (10, 6), "max_item_history": (10, 6),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
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
                m = evaluate(model, tok, prompter, task.valid, task.fallback, args.max_new_tokens, desc="valid")
                log({"stage": "eval", "step": step, **asdict(m)})
                tqdm.write(f"step {step}: valid MAE {m.mae:.3f} RMSE {m.rmse:.3f} format {m.valid_rate:.0%} "
                           f"pred std {m.pred_std:.2f} distinct {m.distinct}")
            if step % args.save_every == 0 or step == args.steps:
                save()
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {step}: saving {out / 'checkpoint'}", file=sys.stderr)
        save()
        sys.exit(130)
    bar.close()
    model.eval()


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
            state.update({k: resumed[k] for k in ("step", "cold_start", "start_model")})
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
        final = evaluate(model, tok, prompter, task.test, task.fallback, args.max_new_tokens, desc="test (GRPO)")
        log({"stage": "test", "step": args.steps, **asdict(final)})
        start = "after cold start" if args.mode == "recone" else "before RL"
        rows += [(f"LLM {start}", RatingMetrics(**state["cold_start"])), ("LLM after GRPO", final)]
        table = results_table(rows)
        (out / "results.md").write_text(table + "\n")
        print(table)
        plot(out)
    if dist.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
