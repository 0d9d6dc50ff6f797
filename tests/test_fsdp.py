"""FSDP (plumbing/parallel.py): two gloo processes on the CPU, each with half of the work and half of
every weight, take the step one process takes with all of it.

Tolerances: the sharded run adds the two ranks' gradient parts in a reduce-scatter where one process
adds them inside its matmuls, so sums are taken in another order: equal to ~1e-7 relative in fp32,
well below any real difference (a step here moves weights by ~1e-3).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ranks import run_ranks, torchrun
from safetensors.torch import load_file
from tiny_models import PROMPTS, full_logits, tiny_model
from torch.distributed.tensor import DTensor

import grpo
from grpo import GRPOConfig, RolloutBatch, grpo_update
from lora import add_lora
from model import SamplingConfig, generate
from plumbing.checkpoints import TrainerState, load_adapters, load_model, load_optimizer, save_checkpoint
from plumbing.memory import plan_memory
from plumbing.parallel import Distributed, full_optimizer_state, full_state_dict, gathered, shard

pytestmark = pytest.mark.usefixtures("one_thread")

FIELDS = ("input_ids", "prompt_lengths", "completion_lengths", "truncated", "prompt_index", "rewards",
          "sampler_logprobs")


def make_rollout(n_prompts: int = 4, samples: int = 4) -> RolloutBatch:
    """A real rollout of the tiny model: 4 groups of 4 sampled completions, rewards that vary in each group."""
    model = tiny_model(seed=0)
    prompts = [PROMPTS[i % 3][: 13 - i] for i in range(n_prompts)]
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(n_prompts * samples, generator=torch.Generator().manual_seed(1))
    gen = generate(model, prompts, SamplingConfig(max_new_tokens=8, temperature=1.0), samples, g)
    batch = grpo.rollout_batch(prompts, gen, [0.0] * len(gen.lengths))
    return _with_rewards(batch, rewards)


def _with_rewards(batch: RolloutBatch, rewards: torch.Tensor) -> RolloutBatch:
    return RolloutBatch(**{f: getattr(batch, f) for f in FIELDS if f != "rewards"}, rewards=rewards)


def rank_rows(batch: RolloutBatch, rank: int, world: int) -> RolloutBatch:
    """This rank's whole groups (prompt p goes to rank p % world), as train.py splits a step's prompts."""
    rows = (batch.prompt_index % world) == rank
    return RolloutBatch(**{f: getattr(batch, f)[rows] for f in FIELDS})


def _policy(lora_rank: int):
    model = tiny_model(seed=0)
    if lora_rank:
        add_lora(model, lora_rank, 2.0 * lora_rank, seed=3)
    return model


def grpo_step(dist: Distributed, batch: RolloutBatch, cfg: GRPOConfig, lora_rank: int = 0, checkpointing=False,
              steps: int = 2) -> dict[str, torch.Tensor]:
    """`steps` GRPO updates of the tiny model on this rank's share of `batch`; the whole weights after.
    With cfg.beta > 0 the reference is another tiny model (seed 1), sharded like the policy."""
    model = _policy(lora_rank)
    model.gradient_checkpointing = checkpointing
    ref = tiny_model(seed=1).requires_grad_(False) if cfg.beta > 0 else None
    if dist.fsdp:
        shard(model)
        if ref is not None:
            shard(ref)
    model.train()
    # SGD, not AdamW: its step is proportional to the gradient, so averaged instead of summed gradients
    # (or one rank's part lost) would show in the weights; AdamW's would hide a scale
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    part = rank_rows(batch, dist.rank, dist.world)
    norms = []
    for _ in range(steps):
        m = grpo_update(model, opt, part, cfg, ref, ranks=dist)
        assert m["weights_finite"] == 1.0 and m["skipped"] == 0.0
        norms.append(m["grad_norm"])
    if dist.fsdp:  # no-grad passes (pi_old for mu > 1, the reference) leave no unit gathered
        for net in (model, ref) if ref is not None else (model,):
            assert all(isinstance(p, DTensor) for p in net.parameters())
    def local_bytes(tensors) -> int:  # what this rank holds: its shards
        return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)

    trained = [p for p in model.parameters() if p.requires_grad]
    held = torch.tensor([local_bytes(model.parameters()), local_bytes(p.grad for p in trained)])
    return {**(full_state_dict(model) or {}), "grad_norms": torch.tensor(norms), "held_bytes": held}


@pytest.mark.parametrize("lora_rank,checkpointing,micro_batch,max_grad_norm,mu,beta",
                         [(0, False, 1000, 1e9, 1, 0.0), (0, False, 5, 0.05, 2, 0.1), (4, True, 3, 1e9, 1, 0.0)])
def test_sharded_grpo_steps_match_one_process(tmp_path, lora_rank, checkpointing, micro_batch, max_grad_norm,
                                              mu, beta):
    """Full fine-tuning (tied embedding, shared prompt passes) unclipped; clipped by the global norm with
    2 passes per batch and a sharded KL reference; LoRA with gradient checkpointing and micro-batches:
    two sharded ranks reach the single process's weights and grad norms after 2 steps."""
    batch = make_rollout()
    cfg = GRPOConfig(max_new_tokens=8, micro_batch=micro_batch, max_grad_norm=max_grad_norm, mu=mu, beta=beta)
    one = grpo_step(Distributed(), batch, cfg, lora_rank, checkpointing)
    two = run_ranks(tmp_path, grpo_step, batch, cfg, lora_rank, checkpointing)
    assert set(two) == set(one)
    # the memory plan's weights and gradients are what each rank holds: all of them, or half with 2 shards
    for shards, got in ((1, one), (2, two)):
        plan = plan_memory(tiny_model().config, weight_bytes=4, compute_bytes=4, lora_rank=lora_rank, rows=1,
                           prompt_tokens=1, new_tokens=1, micro_batch=1, shards=shards)
        assert got.pop("held_bytes").tolist() == [plan.weights, plan.gradients]
    start = _policy(lora_rank).state_dict()
    moved = 0.0
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, atol=1e-6, rtol=1e-5, msg=name)
        if name != "grad_norms":
            moved = max(moved, (value - start[name]).abs().max().item())
    assert moved > 1e-3  # the steps did something to compare (1000x the tolerance)
    if max_grad_norm < 1:
        assert (one["grad_norms"] > max_grad_norm).all()  # the clipping was active


def sample_in_gathered(dist: Distributed) -> dict[str, torch.Tensor]:
    """Greedy sampling of a sharded model inside gathered(): rank 0 decodes three prompts for 32 tokens,
    rank 1 one prompt for 4 (each rank a different number of forwards); the shards come back after."""
    model = shard(tiny_model(seed=0))
    prompts, new = (PROMPTS, 32) if dist.rank == 0 else (PROMPTS[:1], 4)
    with gathered(model):
        gen = generate(model, prompts, SamplingConfig(max_new_tokens=new, temperature=0.0))
    assert all(isinstance(p, DTensor) for p in model.parameters())  # resharded: 1/world of the memory again
    return {"tokens": gen.tokens, "lengths": gen.lengths}


def test_sampling_in_gathered_matches_the_unsharded_model(tmp_path):
    got = run_ranks(tmp_path, sample_in_gathered)
    want = generate(tiny_model(seed=0), PROMPTS, SamplingConfig(max_new_tokens=32, temperature=0.0))
    assert torch.equal(got["tokens"], want.tokens) and torch.equal(got["lengths"], want.lengths)


def save_and_resume(dist: Distributed, batch: RolloutBatch, out: str) -> dict[str, torch.Tensor]:
    """LoRA, sharded: an AdamW step, save_checkpoint (every rank calls it), then a fresh model and optimizer
    restored from the folder as train.py resumes (adapters into the whole model, then shard, then the
    moments); both take one more step. Returns, from rank 0, the moments before the save and after the
    restore, and both models' weights after the second step."""
    def build(resume: bool):
        model = _policy(4)
        if resume:
            load_adapters(out, model)
        shard(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        if resume:
            load_optimizer(Path(out), opt)
        return model.train(), opt

    cfg = GRPOConfig(max_new_tokens=8)
    part = rank_rows(batch, dist.rank, dist.world)
    model, opt = build(resume=False)
    grpo_update(model, opt, part, cfg, ranks=dist)
    save_checkpoint(Path(out), model, None, opt, TrainerState(step=1), {})
    dist.barrier()  # rank 0 writes; the others read it next
    before, saved = full_optimizer_state(opt)["state"], full_state_dict(model)
    model2, opt2 = build(resume=True)
    after = full_optimizer_state(opt2)["state"]
    for m, o in ((model, opt), (model2, opt2)):
        grpo_update(m, o, part, cfg, ranks=dist)
    weights, weights2 = full_state_dict(model), full_state_dict(model2)
    if dist.rank != 0:
        return {}
    result = {f"moment.{i}.{k}": v for i, s in before.items() for k, v in s.items()}
    result |= {f"restored.{i}.{k}": v for i, s in after.items() for k, v in s.items()}
    result |= {f"saved.{k}": v for k, v in saved.items()}
    return result | {f"first.{k}": v for k, v in weights.items()} | {f"second.{k}": v for k, v in weights2.items()}


def test_a_sharded_checkpoint_is_one_plain_folder_and_resumes_exactly(tmp_path):
    out = tmp_path / "ckpt"
    got = run_ranks(tmp_path, save_and_resume, make_rollout(), str(out))
    moments = [k for k in got if k.startswith("moment.")]
    assert len(moments) == 3 * len([p for p in _policy(4).parameters() if p.requires_grad])  # step, m, v
    for k in moments:
        assert torch.equal(got[k.replace("moment.", "restored.")], got[k]), k
    firsts = [k for k in got if k.startswith("first.")]
    for k in firsts:
        assert torch.equal(got[k.replace("first.", "second.")], got[k]), k
    # the folder is the plain one a single process writes and reads: merged weights, adapters, moments
    single = _policy(4)
    load_adapters(out, single)
    adapters = {k: v for k, v in single.state_dict().items() if ".lora_" in k}
    assert adapters and all(torch.equal(v, got[f"saved.{k}"]) for k, v in adapters.items())
    merged = load_model(out)
    # merged weights round differently from base + adapters (test_lora.py uses the same tolerance)
    torch.testing.assert_close(full_logits(merged, PROMPTS[0]), full_logits(single.eval(), PROMPTS[0]), atol=1e-4, rtol=0)
    load_optimizer(out, torch.optim.AdamW([p for p in single.parameters() if p.requires_grad]))


# -----------------------------------------------------------------------------
# train.py under torchrun: --fsdp takes the data-parallel run's steps, and resumes exactly


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_fsdp_run_takes_the_data_parallel_steps_and_resumes_exactly(tmp_path, monkeypatch):
    """The demo's RecOne on 2 ranks, with and without --fsdp: the same cold start as one process (SFT
    splits each batch's rows), the same GRPO steps (losses, grad norms, weights); a --fsdp run stopped
    at step 2 and resumed reaches the uninterrupted run's step-3 weights exactly."""
    from tiny_runs import TINY, metrics, varied_rewards

    import train

    args = TINY + ["--steps", "3", "--save-every", "1"]
    varied_rewards(monkeypatch)
    train.main(args + ["--steps", "0", "--out", str(tmp_path / "one")])  # cold start only, one process
    torchrun(args + ["--out", str(tmp_path / "ddp")])
    torchrun(args + ["--out", str(tmp_path / "fsdp"), "--fsdp"])
    torchrun(args + ["--out", str(tmp_path / "stop"), "--fsdp", "--steps", "2"])
    torchrun(["--resume", str(tmp_path / "stop" / "checkpoint"), "--steps", "3", "--fsdp"])  # not inherited

    sft_loss = {run: [r["loss"] for r in map(json.loads, open(tmp_path / run / "metrics.jsonl"))
                      if r["stage"] == "sft"] for run in ("one", "ddp", "fsdp")}
    assert sft_loss["ddp"] == pytest.approx(sft_loss["one"], rel=1e-5)  # AdamW would hide a doubled gradient;
    assert sft_loss["fsdp"] == pytest.approx(sft_loss["one"], rel=1e-5)  # the loss (summed over ranks) does not
    one, ddp, fsdp = (_weights(tmp_path / run / "cold_start") for run in ("one", "ddp", "fsdp"))
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(fsdp[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
    m_ddp, m_fsdp = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    assert sorted(m_fsdp) == sorted(m_ddp) == [1, 2, 3]
    for step in m_ddp:
        assert m_fsdp[step]["reward_mean"] == m_ddp[step]["reward_mean"]  # the same completions were sampled
        for key in ("loss", "grad_norm"):
            assert m_fsdp[step][key] == pytest.approx(m_ddp[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert all(m_ddp[s]["grad_norm"] > 0 for s in m_ddp)
    ddp, fsdp = _weights(tmp_path / "ddp" / "checkpoint"), _weights(tmp_path / "fsdp" / "checkpoint")
    resumed = _weights(tmp_path / "stop" / "checkpoint")
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], atol=1e-5, rtol=1e-4, msg=name)
        assert torch.equal(resumed[name], fsdp[name]), name


def untied_step(dist: Distributed, batch: RolloutBatch, cfg: GRPOConfig) -> dict[str, torch.Tensor]:
    """One update of an untied-head tiny model (Llama-style) on this rank's share of `batch`."""
    model = tiny_model(seed=0, tie_word_embeddings=False)
    if dist.fsdp:
        shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    grpo_update(model.train(), opt, rank_rows(batch, dist.rank, dist.world), cfg,
                ranks=dist)
    return full_state_dict(model) or {}


def test_a_rank_whose_micro_batch_has_no_loss_tokens_still_joins_the_backward(tmp_path):
    """--drop-truncated with rank 1's first micro-batch all truncated, on an untied head: that rank's
    backward must still give the head a gradient, or its reduce-scatter would not match the other
    rank's (a crash on gloo, a hang on NCCL). The step equals one process's."""
    batch = make_rollout()
    batch.truncated[:] = False
    batch.truncated[4:6] = True  # prompt 1 goes to rank 1: rows 4-5 are its first micro-batch of 2
    cfg = GRPOConfig(max_new_tokens=8, micro_batch=2, drop_truncated=True)
    one = untied_step(Distributed(), batch, cfg)
    two = run_ranks(tmp_path, untied_step, batch, cfg)
    start = tiny_model(seed=0, tie_word_embeddings=False).state_dict()
    assert not torch.equal(one["lm_head.weight"], start["lm_head.weight"])  # the other rows did train
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, atol=1e-6, rtol=1e-5, msg=name)


def bf16_lora_step(dist: Distributed, batch: RolloutBatch) -> dict[str, torch.Tensor]:
    """LoRA as on a GPU: the frozen base in bf16, fp32 adapters, gathered in bf16 under autocast."""
    model = tiny_model(seed=0).to(torch.bfloat16)
    add_lora(model, 4, 8.0, seed=3)
    if dist.fsdp:
        shard(model, torch.bfloat16)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = grpo_update(model.train(), opt, rank_rows(batch, dist.rank, dist.world), GRPOConfig(max_new_tokens=8),
                        ranks=dist)
    assert m["weights_finite"] == 1.0
    dtypes = {p.dtype for n, p in model.named_parameters() if ".lora_" in n}
    assert dtypes == {torch.float32}, dtypes  # the adapters stay fp32 where they are kept
    return {**(full_state_dict(model) or {}), "grad_norm": torch.tensor([m["grad_norm"]])}


def test_bf16_base_with_fp32_adapters_shards(tmp_path):
    """A bf16 base and fp32 adapters in one FSDP unit (gathered in bf16): the step trains only the
    adapters and lands where one process's bf16 step does, to bf16 precision."""
    batch = make_rollout()
    one = bf16_lora_step(Distributed(), batch)
    two = run_ranks(tmp_path, bf16_lora_step, batch)
    start = tiny_model(seed=0).to(torch.bfloat16).state_dict()
    for name, value in one.items():
        if ".lora_B" in name:
            assert value.abs().max() > 0  # trained (B starts at zero)
        elif ".base." in name or (name in start and ".lora_" not in name):
            assert torch.equal(two[name], start[name.replace(".base.", ".")]), name  # frozen
        torch.testing.assert_close(two[name], value, atol=2e-3, rtol=2e-2, msg=name)


# -----------------------------------------------------------------------------
# RecOne's teacher under torchrun: each rank asks its share, every rank gets every trace


class ByExample:
    """A teacher whose answers depend on the example only (not on its batch): right about a third of
    them, and when told the truth, rationalises another third."""

    def write(self, examples, hints=None):
        texts = []
        for k, ex in enumerate(examples):
            kind = sum(map(ord, ex.target.user_id + ex.target.item_id)) % 3
            right = (kind == 0) if hints is None else (kind == 1)
            rating = ex.label if right else ex.label + 1
            texts.append(f"<analyze user>u</analyze user><analyze item>i</analyze item><match>m</match>"
                         f"<rate>{rating:g}</rate>")
        return texts


def _examples():
    from data import build_examples, split_by_time
    from plumbing.synthetic import SyntheticConfig, make_synthetic

    data = make_synthetic(SyntheticConfig(n_users=60, seed=5))
    return build_examples(data, split_by_time(data).test)[:25]


def cold_start_on_ranks(dist: Distributed) -> dict[str, torch.Tensor]:
    from plumbing.teachers import build_cold_start

    examples = _examples()
    traces, stats = build_cold_start(ByExample(), examples, dist=dist)
    where = {id(ex): k for k, ex in enumerate(examples)}
    return {"index": torch.tensor([where[id(t.example)] for t in traces]),
            "rationalised": torch.tensor([t.rationalised for t in traces]),
            "stats": torch.tensor([stats.asked, stats.aligned, stats.rationalised, stats.dropped, stats.quoted_hint])}


def test_teacher_asked_by_two_ranks_gives_one_process_traces(tmp_path):
    """25 examples asked by 2 ranks (13 + 12): the same traces, in the same order, and the same counts."""
    one = cold_start_on_ranks(Distributed())
    two = run_ranks(tmp_path, cold_start_on_ranks)
    assert one["stats"][0] == 25 and 0 < one["stats"][1] < 25 and one["stats"][2] > 0  # aligned and rationalised
    for key in one:
        assert torch.equal(two[key], one[key]), key


def gathered_dtypes(dist: Distributed) -> dict[str, torch.Tensor]:
    """The dtypes a sharded model is gathered in: fp32 weights with bf16 compute (full fine-tuning with
    fp32 master weights), and a bf16 base with fp32 LoRA adapters; whether the sharded weights stay fp32."""
    whole = shard(tiny_model(), torch.bfloat16)
    adapted = tiny_model().to(torch.bfloat16)
    add_lora(adapted, 4, 8.0)
    shard(adapted, torch.bfloat16)
    out = {"kept": torch.tensor(sorted({p.dtype.itemsize for p in whole.parameters()}))}
    for name, model in (("whole", whole), ("lora", adapted)):
        with gathered(model):
            out[name] = torch.tensor(sorted({p.dtype.itemsize for p in model.parameters()}))
    return out


def test_weights_are_gathered_in_the_compute_dtype(tmp_path):
    """bf16 compute: fp32 master weights stay fp32 in their shards (AdamW updates them) and are gathered
    in bf16, as are LoRA's mixed units (one dtype per unit)."""
    got = run_ranks(tmp_path, gathered_dtypes)
    assert got["kept"].tolist() == [4] and got["whole"].tolist() == [2] and got["lora"].tolist() == [2]
