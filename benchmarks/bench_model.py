"""Speed of our hand-written model (model.py: the decoder and its sampler) against Hugging Face `transformers`.

Both models are built from the SAME random weights in one process: a transformers Qwen2ForCausalLM is
created (attn_implementation="sdpa"), saved with save_pretrained to a temporary directory and loaded
with our load_model. Workload "0.5B-shape": Qwen2.5-0.5B dimensions (hidden 896, 14 heads, 2 KV heads,
head_dim 64, intermediate 4864, vocab 151936, tied head, q/k/v bias) with only 4 layers (--layers), so
the 151k-vocabulary head weighs as much as it does in training. It measures:

- fwd+bwd fp32: forward + backward of a 4 x 256 token batch, loss = next-token cross-entropy over all
  positions (ours: logits = model.logits(model(ids))), gradients zeroed between runs;
- sample fp32 / sample bf16: one 128-token prompt, 8 samples of 64 new tokens at temperature 1, no
  stop token (ours: generate(..., num_samples=8); theirs: hf.generate(num_return_sequences=8)).

Each workload runs once to warm up, then --repeats times alternating ours/theirs; the table shows the
median seconds, tokens/s and the ratio theirs/ours of the medians (above 1: ours is faster); the log
also prints each side's range and the median of the per-repeat ratios (run i of each side back to
back), which drift on a shared machine disturbs least.

Run from the repository root:
    python benchmarks/bench_model.py                  # 2 threads, 4 layers, 3 repeats (a few minutes)
    python benchmarks/bench_model.py --threads 8 --json results.json
    python benchmarks/bench_model.py --quick          # tiny sizes, seconds (the test suite runs this)
    python benchmarks/bench_model.py --workloads train --dense-lookup-grad   # what the sparse lookup buys
    python benchmarks/bench_model.py --workloads train --profile  # fwd+bwd time by operator, both sides
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import SamplingConfig, generate  # noqa: E402
from plumbing.checkpoints import load_model  # noqa: E402


@dataclass
class Sizes:
    """Model dimensions and workload sizes."""

    hidden: int = 896
    heads: int = 14
    kv_heads: int = 2
    head_dim: int = 64
    intermediate: int = 4864
    vocab: int = 151936
    layers: int = 4
    train_batch: int = 4
    train_len: int = 256
    prompt_len: int = 128
    samples: int = 8
    new_tokens: int = 64


QUICK = Sizes(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=300, layers=2,
              train_batch=2, train_len=32, prompt_len=16, samples=4, new_tokens=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; --quick: 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model; the median is shown")
    p.add_argument("--quick", action="store_true", help="tiny sizes so the whole run takes seconds")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    p.add_argument("--workloads", choices=["all", "train", "sample"], default="all",
                   help="train: fwd+bwd only; sample: the two sampling workloads only")
    p.add_argument("--dense-lookup-grad", action="store_true",
                   help="give our tied embedding lookup the plain dense gradient (model.py keeps it sparse)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one fwd+bwd of each side: self CPU seconds in matmuls vs everything else")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Models from the same weights


def build_models(sizes: Sizes, tmp: Path):
    """(transformers Qwen2ForCausalLM in fp32, our Transformer loaded from its save_pretrained output)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=sizes.vocab, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
                      num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                      num_key_value_heads=sizes.kv_heads, head_dim=sizes.head_dim, tie_word_embeddings=True,
                      max_position_embeddings=32768, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp)
    return hf, load_model(tmp)


# -----------------------------------------------------------------------------
# Workloads: each returns a zero-argument function that runs one measured step


def next_token_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def fwd_bwd_ours(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        next_token_loss(model.logits(model(ids)), ids).backward()
    return step


def fwd_bwd_theirs(hf, ids):
    def step():
        hf.zero_grad(set_to_none=True)
        next_token_loss(hf(ids, use_cache=False).logits, ids).backward()
    return step


def sample_ours(model, prompt, sizes: Sizes):
    cfg = SamplingConfig(max_new_tokens=sizes.new_tokens, temperature=1.0)
    gen = torch.Generator().manual_seed(0)

    def step():
        out = generate(model, [prompt.tolist()], cfg, num_samples=sizes.samples, generator=gen)
        assert out.tokens.shape == (sizes.samples, sizes.new_tokens)
    return step


def sample_theirs(hf, prompt, sizes: Sizes):
    def step():
        with torch.no_grad():
            out = hf.generate(prompt[None], do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=sizes.new_tokens, min_new_tokens=sizes.new_tokens,
                              num_return_sequences=sizes.samples, pad_token_id=0)
        assert out.shape == (sizes.samples, len(prompt) + sizes.new_tokens)
    return step


def time_runs(ours, theirs, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of each run of both functions after one warm-up run each, alternating so drift hits both."""
    ours(), theirs()
    times = {ours: [], theirs: []}
    for _ in range(repeats):
        for fn in (ours, theirs):
            t0 = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - t0)
    return times[ours], times[theirs]


def time_pair(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median seconds of each function (see time_runs)."""
    o, t = time_runs(ours, theirs, repeats)
    return statistics.median(o), statistics.median(t)


# -----------------------------------------------------------------------------
# Main


def profile_split(step) -> dict:
    """Self CPU seconds of one call of `step`: matrix products, the rest, and the five largest other ops.

    Both sides run the same matrix products (identical shapes, the same BLAS), so on a machine whose
    speed drifts the non-matmul part is the comparison that noise disturbs least."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    matmul = sum(v for k, v in ops.items() if k in ("aten::mm", "aten::addmm", "aten::bmm"))
    rest = {k: v for k, v in ops.items() if k not in ("aten::mm", "aten::addmm", "aten::bmm")}
    top = dict(sorted(rest.items(), key=lambda kv: -kv[1])[:5])
    return {"matmul_s": matmul, "other_s": sum(rest.values()), "top_other": top}


def run(sizes: Sizes, repeats: int, workloads: str = "all", dense_lookup_grad: bool = False,
        profile: bool = False) -> list[dict]:
    results = []

    def record(name, tokens, ours, theirs):
        ours_runs, theirs_runs = time_runs(ours, theirs, repeats)
        o, t = statistics.median(ours_runs), statistics.median(theirs_runs)
        # paired: run i of each side ran back to back, so their ratio cancels slow machine drift
        paired = statistics.median(b / a for a, b in zip(ours_runs, theirs_runs))
        results.append({"workload": name, "ours_s": o, "theirs_s": t, "tokens": tokens,
                        "ours_tok_s": tokens / o, "theirs_tok_s": tokens / t, "ratio": t / o,
                        "paired_ratio": paired, "ours_runs_s": ours_runs, "theirs_runs_s": theirs_runs})
        print(f"  {name}: ours {o:.2f} s ({min(ours_runs):.2f}-{max(ours_runs):.2f}), transformers {t:.2f} s "
              f"({min(theirs_runs):.2f}-{max(theirs_runs):.2f}), median paired ratio {paired:.2f}", flush=True)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, sizes.vocab, (sizes.train_batch, sizes.train_len), generator=g)
    prompt = torch.randint(0, sizes.vocab, (sizes.prompt_len,), generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build_models(sizes, Path(tmp))
        if workloads in ("all", "train"):
            ours.embed_tokens.sparse = ours.embed_tokens.sparse and not dense_lookup_grad
            hf.train(), ours.train()
            record("fwd+bwd fp32", ids.numel(), fwd_bwd_ours(ours, ids), fwd_bwd_theirs(hf, ids))
            if profile:
                for side, step in (("ours", fwd_bwd_ours(ours, ids)), ("transformers", fwd_bwd_theirs(hf, ids))):
                    split = profile_split(step)
                    results[-1][f"profile_{side}"] = split
                    print(f"  profile {side}: matmul {split['matmul_s']:.2f} s, other ops {split['other_s']:.2f} s; "
                          + ", ".join(f"{k} {v:.2f}" for k, v in split["top_other"].items()), flush=True)
            hf.eval(), ours.eval()
            hf.zero_grad(set_to_none=True), ours.zero_grad(set_to_none=True)
        if workloads == "train":
            return results
        n = sizes.samples * sizes.new_tokens
        record("sample fp32", n, sample_ours(ours, prompt, sizes), sample_theirs(hf, prompt, sizes))
        del ours
        ours = load_model(tmp, dtype=torch.bfloat16)
        hf = hf.to(torch.bfloat16)
        record("sample bf16", n, sample_ours(ours, prompt, sizes), sample_theirs(hf, prompt, sizes))
    return results


def table(results: list[dict]) -> str:
    lines = ["| workload | ours s | transformers s | ours tok/s | transformers tok/s | transformers/ours |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['workload']} | {r['ours_s']:.2f} | {r['theirs_s']:.2f} | {r['ours_tok_s']:.0f} "
                     f"| {r['theirs_tok_s']:.0f} | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import transformers

    sizes = QUICK if args.quick else Sizes()
    if args.layers is not None:
        sizes = replace(sizes, layers=args.layers)
    torch.set_num_threads(args.threads)
    shape = "quick" if args.quick else "0.5B-shape"
    print(f"{shape}: {sizes}\ntorch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}", flush=True)
    results = run(sizes, args.repeats, args.workloads, args.dense_lookup_grad, args.profile)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"workload": shape, "sizes": vars(sizes), "threads": args.threads,
                                         "torch": torch.__version__, "transformers": transformers.__version__,
                                         "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
