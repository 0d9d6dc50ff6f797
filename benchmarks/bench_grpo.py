"""Seconds per GRPO step: our grpo.py + model.py against TRL's GRPOTrainer, from the same start.

One step = sample G=8 completions of one RecZero prompt (temperature 1, at most 64 new tokens, stop at
<|im_end|>), decode them, score each with RecZero's compute_reward (paper preset), and take one policy
update at beta 0 (no reference model): token-mean loss (TRL loss_type "dapo"), group-scaled
advantages, one pass (num_iterations / mu = 1), AdamW lr 1e-6, weight decay 0, grad-norm clip 1.0,
fp32, no gradient checkpointing (TRL's default is on; switched off so both do the same work).

Shared setup (once, in the parent process): a byte-level BPE (tokenizer.train_bpe, ~1k tokens) trained
on synthetic RecZero prompts; a random Qwen2 model (seed 0, normal std 0.02 init) written by our
save_model in the Hugging Face layout next to the tokenizer files (no transformers import in the
parent). Ours loads it with model.load_model, TRL with Qwen2ForCausalLM.from_pretrained, so both start
from identical weights, prompt (the same chat-formatted text, the same token ids), group size, max new
tokens, learning rate and seed. Sizes:
- tiny: hidden 128, 4 layers, 4 heads, 2 KV heads, head_dim 32, intermediate 512, vocab = the BPE's;
- 0.5b: Qwen2.5-0.5B dimensions (hidden 896, 14 heads, 2 KV heads, head_dim 64, intermediate 4864,
  vocab 151936, tied head, q/k/v bias) with 4 layers, as in bench_model.py. The tokenizer stays the
  ~1k-token BPE (train_bpe cannot reach 151936): the model samples over all 151936 ids and ids the
  tokenizer does not know decode to nothing, the same on both sides.

The prompt is one chat-formatted RecZero prompt (system prompt, 3 user-history and 3 item-history
entries of the synthetic data): about 460 tokens, so prompt work weighs as much as the 64-token
completions. Our update runs that prompt once for its 8 completions (GRPOConfig.share_prompt, exact);
TRL runs prompt + completion for every row. Likewise when sampling, ours prefills the prompt once
and copies its KV cache to the 8 samples; TRL's transformers.generate prefills 8 copies of it.

The reward is the real RecZero reward, so with random weights nearly every completion is invalid
(-0.5), all advantages are 0 and the gradient is 0. Neither side short-circuits on that: TRL's
_compute_loss and our grpo_update both run the forward pass, the loss, backward, clipping and the
AdamW step whatever the advantages are (checked in TRL 1.16.0's source), so the work timed is the
same. No reward shaping is added: it would no longer be the RecZero reward.

Measurement: each side runs in its own subprocess (so peak RSS = that process's ru_maxrss; TRL's
includes importing TRL/datasets/accelerate, a real cost of using it). A subprocess does one untimed
warm-up step, then --steps timed steps; ours times generate -> decode -> reward -> grpo_update, TRL
times on_step_begin -> on_step_end of a TrainerCallback (generation, reward and update happen inside
the trainer step). --rounds alternates the subprocesses (ours, TRL, ours, TRL, ...) so machine drift
hits both. The table shows the median over all timed steps, TRL/ours (above 1: ours is faster) and
the largest peak RSS of each side's processes.

Run from the repository root (TRL: pip install -r requirements-bench.txt):
    python benchmarks/bench_grpo.py                         # tiny and 0.5b, 2 threads
    python benchmarks/bench_grpo.py --sizes 0.5b --steps 3 --rounds 1 --json grpo.json
    python benchmarks/bench_grpo.py --quick                 # seconds (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import build_examples, split_by_time  # noqa: E402
from model import ModelConfig, Tokenizer, Transformer  # noqa: E402
from plumbing.checkpoints import save_model  # noqa: E402
from plumbing.synthetic import SyntheticConfig, make_synthetic  # noqa: E402
from plumbing.tokenizer import train_bpe  # noqa: E402
from reczero import PromptCaps, build_messages, compute_reward, render_user_message  # noqa: E402


@dataclass
class Size:
    """Model dimensions (vocab 0 = the tokenizer's) and the workload."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int = 0
    group: int = 8  # completions per prompt (G)
    new_tokens: int = 64  # max new tokens per completion
    history: int = 3  # user / item history entries in the prompt (PromptCaps)


SIZES = {"tiny": Size(hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32, intermediate=512),
         "0.5b": Size(hidden=896, layers=4, heads=14, kv_heads=2, head_dim=64, intermediate=4864, vocab=151936)}
QUICK = {"tiny": replace(SIZES["tiny"], layers=2, new_tokens=16, history=1)}
LR, SEED = 1e-6, 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,0.5b", help="comma-separated: tiny, 0.5b")
    p.add_argument("--steps", type=int, default=5, help="timed steps per subprocess (after 1 warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternating ours/TRL subprocess pairs per size")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each subprocess")
    p.add_argument("--sides", default="ours,trl", help="ours,trl; trl is skipped when not installed")
    p.add_argument("--quick", action="store_true", help="tiny model, 16 new tokens, 1 step, 1 round")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)  # internal: one side
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Shared setup: tokenizer, prompt, weights


def prepare(size: Size, tmp: Path) -> tuple[dict, Path]:
    """Write tokenizer + random Qwen2 checkpoint + the prompt under `tmp`; return (task, checkpoint dir)."""
    data = make_synthetic(SyntheticConfig(n_users=100, seed=SEED))
    examples = build_examples(data, split_by_time(data, "user-last").train)
    caps = PromptCaps(max_user_history=size.history, max_item_history=size.history)
    tok = train_bpe([render_user_message(e, caps) for e in examples[:300]] +
                    [m["content"] for m in build_messages(examples[0], caps)], tmp / "tok", vocab_size=1024)
    ex = examples[0]
    prompt = tok.apply_chat(build_messages(ex, caps))
    # written by our save_model in the Hugging Face layout (config.json + model.safetensors), which
    # transformers reads as a Qwen2ForCausalLM; std-0.02 normal init like transformers' own
    cfg = ModelConfig(arch="qwen2", vocab_size=size.vocab or tok.vocab_size, hidden_size=size.hidden,
                      intermediate_size=size.intermediate, num_layers=size.layers, num_heads=size.heads,
                      num_kv_heads=size.kv_heads, head_dim=size.head_dim, qkv_bias=True,
                      tie_word_embeddings=True, eos_token_id=tok.stop_ids[0])
    torch.manual_seed(SEED)
    out = tmp / "ckpt"
    save_model(Transformer(cfg), out, tokenizer_dir=tmp / "tok")
    task = {"prompt": prompt, "truth": ex.label, "size": asdict(size), "prompt_tokens": len(tok.encode(prompt))}
    (out / "task.json").write_text(json.dumps(task))
    return task, out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -----------------------------------------------------------------------------
# The two sides; each runs in its own subprocess and prints one RESULT line


def worker_ours(d: Path, task: dict, steps: int) -> dict:
    from grpo import GRPOConfig, grpo_update, rollout_batch
    from model import SamplingConfig, generate
    from plumbing.checkpoints import load_model

    size, tok = Size(**task["size"]), Tokenizer(d)
    model = load_model(d)
    prompt = tok.encode(task["prompt"])
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    scfg = SamplingConfig(max_new_tokens=size.new_tokens, temperature=1.0, stop_ids=tok.stop_ids)
    gcfg = GRPOConfig(beta=0.0, loss_agg="token-mean", temperature=1.0, max_new_tokens=size.new_tokens)
    gen = torch.Generator().manual_seed(SEED)
    times, lengths = [], []
    for step in range(1 + steps):
        t0 = time.perf_counter()
        out = generate(model, [prompt], scfg, num_samples=size.group, generator=gen, pad_id=tok.pad_id)
        rewards = [compute_reward(tok.decode(c), task["truth"]).total for c in out.completions()]
        grpo_update(model, opt, rollout_batch([prompt], out, rewards, tok.pad_id), gcfg)
        if step:  # step 0 is the warm-up
            times.append(time.perf_counter() - t0)
            lengths += out.lengths.tolist()
    return {"times": times, "mean_completion_len": statistics.mean(lengths), "prompt_tokens": len(prompt)}


def worker_trl(d: Path, task: dict, steps: int) -> dict:
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        PreTrainedTokenizerFast,
        TrainerCallback,
    )
    from trl import GRPOConfig, GRPOTrainer

    size = Size(**task["size"])
    times, lengths = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > 1:  # the first step is the warm-up
                times.append(time.perf_counter() - self.t0)

    def reczero_reward(prompts, completions, truth, completion_ids=None, **kw):
        if completion_ids is not None:
            lengths.extend(len(c) for c in completion_ids)
        return [compute_reward(c, t).total for c, t in zip(completions, truth)]

    tokenizer = PreTrainedTokenizerFast.from_pretrained(d)  # AutoTokenizer would pick Qwen2Tokenizer (config.json) and re-split
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    rows = size.group * (steps + 1)
    data = Dataset.from_dict({"prompt": [task["prompt"]] * rows, "truth": [task["truth"]] * rows})
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=size.group, num_generations=size.group,
            max_completion_length=size.new_tokens, learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0,
            beta=0.0, num_iterations=1, loss_type="dapo", scale_rewards="group", temperature=1.0, top_p=1.0,
            top_k=0, use_vllm=False, gradient_checkpointing=False, bf16=False, use_cpu=True,
            max_steps=1 + steps, seed=SEED, report_to="none", logging_steps=10**6, save_strategy="no",
            disable_tqdm=True, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model, reward_funcs=reczero_reward, args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[StepTimer()])
        trainer.train()
    prompt_tokens = len(tokenizer(task["prompt"], add_special_tokens=False)["input_ids"])
    return {"times": times, "mean_completion_len": statistics.mean(lengths) if lengths else float("nan"),
            "prompt_tokens": prompt_tokens}


def worker(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    task = json.loads((args.dir / "task.json").read_text())
    res = (worker_ours if args.worker == "ours" else worker_trl)(args.dir, task, args.steps)
    res["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(res), flush=True)


def run_side(side: str, d: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--dir", str(d), "--steps", str(args.steps),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{side} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# -----------------------------------------------------------------------------
# Main


def trl_version() -> str | None:
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def run(name: str, size: Size, sides: list[str], args) -> dict:
    runs = {s: [] for s in sides}
    with tempfile.TemporaryDirectory() as tmp:
        task, ckpt = prepare(size, Path(tmp))
        for r in range(args.rounds):
            for side in sides:
                res = run_side(side, ckpt, args)
                runs[side].append(res)
                print(f"  {name} round {r + 1}: {side} " + " ".join(f"{t:.3f}" for t in res["times"]) +
                      f" s/step, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    row = {"size": name, "prompt_tokens": task["prompt_tokens"], "group": size.group, "new_tokens": size.new_tokens}
    for side, rs in runs.items():
        row[f"{side}_s"] = statistics.median(t for r in rs for t in r["times"])
        row[f"{side}_times"] = [t for r in rs for t in r["times"]]
        row[f"{side}_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        row[f"{side}_completion_len"] = statistics.mean(r["mean_completion_len"] for r in rs)
        assert all(r["prompt_tokens"] == task["prompt_tokens"] for r in rs), "sides tokenised the prompt differently"
    if "ours_s" in row and "trl_s" in row:
        row["ratio"] = row["trl_s"] / row["ours_s"]
    return row


def fmt(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "-"


def table(rows: list[dict]) -> str:
    lines = ["| size | ours s/step | TRL s/step | TRL/ours | ours peak RSS MB | TRL peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']} | {fmt(r, 'ours_s', '.3f')} | {fmt(r, 'trl_s', '.3f')} | "
                     f"{fmt(r, 'ratio', '.2f')}{'x' if 'ratio' in r else ''} | {fmt(r, 'ours_rss_mb', '.0f')} "
                     f"| {fmt(r, 'trl_rss_mb', '.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.steps, args.rounds = 1, 1
    sizes = QUICK if args.quick else {n: SIZES[n] for n in args.sizes.split(",")}
    sides, version = args.sides.split(","), trl_version()
    if "trl" in sides and version is None:
        print("trl is not installed: TRL side skipped (pip install -r requirements-bench.txt)")
        sides.remove("trl")
    print(f"torch {torch.__version__}, trl {version}, {args.threads} threads, G=8 per step, "
          f"{args.rounds} round(s) x {args.steps} timed step(s) per side, median shown", flush=True)
    rows = [run(name, size, sides, args) for name, size in sizes.items()]
    lens = ", ".join(f"{r['size']} {s} {r[s + '_completion_len']:.1f}" for r in rows for s in sides)
    print("prompt tokens: " + ", ".join(f"{r['size']} {r['prompt_tokens']}" for r in rows)
          + f"; mean completion length: {lens}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "trl": version, "threads": args.threads,
                                         "steps": args.steps, "rounds": args.rounds, "results": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
