"""GPU throughput of our model (model.py: the decoder and its sampler) at the full Qwen2.5-0.5B shape, bf16, random weights.

Qwen2.5-0.5B dimensions with all 24 layers (hidden 896, 14 heads, 2 KV heads, head_dim 64, intermediate
4864, vocab 151936, tied head, q/k/v bias), random weights. A transformers Qwen2ForCausalLM is built
and saved with save_pretrained, ours is loaded from that directory (bench_model.build_models), so both
hold the same weights; both are cast to bf16 on the device. It prints:

- sample tok/s: new tokens per second for 8 prompts (128 random tokens each) x 8 samples x 256 new
  tokens at temperature 1, no stop token (every row makes all 256), i.e. 16384 tokens per run. Ours:
  model.generate(num_samples=8) (one prefill per prompt, KV cache copied to its samples);
  transformers: generate(do_sample=True, num_return_sequences=8, min_new_tokens=256), default
  dynamic cache, no compile. "transformers/ours" above 1 means ours is faster.
- train tok/s: tokens per second of one forward + backward of an 8 x 1024 batch, loss = next-token
  cross-entropy over all positions (logits in bf16, loss in fp32), no optimizer step; both models.
- MFU: model FLOPs utilisation of our training step = 6 * params * tokens/s / peak FLOP/s, with params
  counted once for the tied embedding/head (494M) and attention-score FLOPs left out (the usual
  approximation; they add a few percent at 1024 tokens). Peak from --peak-tflops (default 989: H100/H200
  dense bf16); the device name is printed so the peak can be checked.

Every workload runs once to warm up, then --repeats times alternating ours/theirs (median shown), with
a device synchronise inside each timed call. On an H100/H200 the whole run takes about a minute.

    python benchmarks/bench_gpu.py                     # CUDA, bf16, the sizes above
    python benchmarks/bench_gpu.py --quick             # tiny model, fp32, CPU: seconds (the tests run this)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_model import QUICK as MODEL_QUICK  # noqa: E402
from bench_model import Sizes, build_models, fwd_bwd_ours, fwd_bwd_theirs, time_pair  # noqa: E402

from model import SamplingConfig, generate  # noqa: E402
from plumbing.checkpoints import load_model  # noqa: E402


@dataclass
class GPUSizes(Sizes):
    prompts: int = 8  # distinct prompts per sampling run (each gets `samples` completions)


FULL = GPUSizes(layers=24, train_batch=8, train_len=1024, prompt_len=128, samples=8, new_tokens=256, prompts=8)
QUICK = GPUSizes(**{**vars(MODEL_QUICK), "prompts": 2})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", "--cpu-smoke", action="store_true", help="tiny model in fp32 on the CPU")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per workload; the median is shown")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak bf16 dense TFLOP/s for MFU")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 24; --quick: 2)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    return p.parse_args(argv)


def synced(fn, device):
    """fn followed by a device synchronise, so wall-clock timing sees the finished kernels."""
    def call():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return call


def sampling_pair(ours, hf, prompts: torch.Tensor, s: GPUSizes):
    cfg = SamplingConfig(max_new_tokens=s.new_tokens, temperature=1.0)  # no stop ids: all rows run to the end
    gen = torch.Generator(device=prompts.device).manual_seed(0)

    def run_ours():
        out = generate(ours, prompts.tolist(), cfg, num_samples=s.samples, generator=gen)
        assert out.tokens.shape == (s.prompts * s.samples, s.new_tokens)

    def run_theirs():
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens,
                              num_return_sequences=s.samples, pad_token_id=0)
        assert out.shape == (s.prompts * s.samples, s.prompt_len + s.new_tokens)
    return run_ours, run_theirs


def run(s: GPUSizes, device: torch.device, dtype, repeats: int, peak_tflops: float) -> dict:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, s.vocab, (s.prompts, s.prompt_len), generator=g).to(device)
    ids = torch.randint(0, s.vocab, (s.train_batch, s.train_len), generator=g).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        hf, _ = build_models(s, Path(tmp))
        hf = hf.to(device, dtype)
        ours = load_model(tmp, dtype=dtype, device=device)
    params = ours.num_parameters()
    res = {"params": params}

    n = s.prompts * s.samples * s.new_tokens
    o, t = time_pair(*(synced(f, device) for f in sampling_pair(ours, hf, prompts, s)), repeats)
    res["sample"] = {"tokens": n, "ours_tok_s": n / o, "theirs_tok_s": n / t, "ratio": t / o}
    print(f"  sampling: ours {o:.2f} s, transformers {t:.2f} s", flush=True)

    ours.train(), hf.train()
    n = ids.numel()
    o, t = time_pair(synced(fwd_bwd_ours(ours, ids), device), synced(fwd_bwd_theirs(hf, ids), device), repeats)
    mfu = 6 * params * (n / o) / (peak_tflops * 1e12)
    res["train"] = {"tokens": n, "ours_tok_s": n / o, "theirs_tok_s": n / t, "ratio": t / o, "mfu": mfu}
    print(f"  fwd+bwd: ours {o:.2f} s, transformers {t:.2f} s", flush=True)
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def table(res: dict) -> str:
    sm, tr = res["sample"], res["train"]
    return "\n".join([
        "| workload | tokens | ours tok/s | transformers tok/s | transformers/ours | ours MFU |",
        "|---|---:|---:|---:|---:|---:|",
        f"| sample | {sm['tokens']} | {sm['ours_tok_s']:.0f} | {sm['theirs_tok_s']:.0f} | {sm['ratio']:.2f}x | |",
        f"| fwd+bwd | {tr['tokens']} | {tr['ours_tok_s']:.0f} | {tr['theirs_tok_s']:.0f} | {tr['ratio']:.2f}x "
        f"| {100 * tr['mfu']:.3g}% |"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    import transformers

    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    s = QUICK if args.quick else FULL
    if args.layers is not None:
        s = replace(s, layers=args.layers)
    if not cuda and not args.quick:
        print("no CUDA device: running the full size on the CPU in fp32 will be very slow (use --quick)")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device {name}, {dtype}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peak {args.peak_tflops:g} TFLOP/s for MFU, median of {args.repeats}\n{s}", flush=True)
    res = run(s, device, dtype, args.repeats, args.peak_tflops)
    print(f"params {res['params'] / 1e6:.1f}M" +
          (f", peak GPU memory {res['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in res else ""))
    print(table(res))
    res.update(device=name, dtype=str(dtype), sizes=vars(s), peak_tflops=args.peak_tflops)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
