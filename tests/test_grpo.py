"""Tests for grpo.py: each pins one property with hand-computed numbers or an exact identity."""

import contextlib
import copy
import math
import time

import pytest
import torch
import torch.nn as nn
from tiny_models import tiny_model

from grpo import (
    GRPOConfig,
    RolloutBatch,
    aggregation_weights,
    clipped_surrogate,
    completion_mask,
    group_advantages,
    grpo_update,
    kl_estimate,
    plain_token_logprobs,
    rollout_batch,
    token_logprobs,
)
from model import Generation, SamplingConfig, generate


class MockPolicy(nn.Module):
    """Embedding + causal running mean + linear head: the forward/logits split of model.Transformer."""

    def __init__(self, vocab=11, dim=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):  # (B, T) -> (B, T, C), position t sees tokens 0..t only
        x = self.embed(ids)
        causal_mean = x.cumsum(1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]
        return torch.tanh(self.mix(causal_mean))

    def logits(self, h):
        return self.head(h)


def make_batch(seed=0, vocab=11):
    """8 rows in 2 groups of 4, ragged prompts and completions, one truncated row."""
    g = torch.Generator().manual_seed(seed)
    plens = torch.tensor([2, 3, 2, 1, 3, 2, 2, 1])
    clens = torch.tensor([3, 1, 4, 2, 2, 4, 1, 3])
    L = int((plens + clens).max())
    return RolloutBatch(
        input_ids=torch.randint(0, vocab, (8, L), generator=g),
        prompt_lengths=plens,
        completion_lengths=clens,
        truncated=torch.tensor([0, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool),
        prompt_index=torch.tensor([0, 1, 0, 1, 1, 0, 0, 1]),
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 1.0, 0.0, 0.0]),
    )


# -----------------------------------------------------------------------------
# advantages


def test_advantages_worked_example():
    """Rewards [1, 1, 0, 0, 0] in one group give the hand-computed unbiased-std advantages."""
    # mean = 2/5 = 0.4; deviations +0.6, +0.6, -0.4, -0.4, -0.4
    # Bessel variance = (2 * 0.36 + 3 * 0.16) / (5 - 1) = 1.2 / 4 = 0.3; std = sqrt(0.3) = 0.5477226
    # A = 0.6 / 0.5477226 = 1.0954451, -0.4 / 0.5477226 = -0.7302967 (eps 1e-6 changes the 7th digit)
    out = group_advantages(torch.tensor([1.0, 1, 0, 0, 0]), torch.zeros(5, dtype=torch.long))
    expected = torch.tensor([1.0954451, 1.0954451, -0.7302967, -0.7302967, -0.7302967])
    torch.testing.assert_close(out.values, expected, atol=1e-5, rtol=0)
    assert out.frac_zero_std_groups == 0.0


def test_equal_rewards_give_exact_zero_and_are_counted():
    """A group with all-equal rewards (even 0.1, inexact in binary) or one sample gets exactly 0."""
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.7])
    index = torch.tensor([0, 0, 0, 1, 1, 2])  # group 2 has a single sample
    out = group_advantages(rewards, index)
    assert torch.equal(out.values[[0, 1, 2, 5]], torch.zeros(4))
    assert out.values[3] > 0 > out.values[4]
    assert out.frac_zero_std_groups == pytest.approx(2 / 3)


def test_advantage_scale_modes_two_groups():
    """group / batch / none scaling on two groups: [1, 0] (prompt 0) and [2, 0] (prompt 1)."""
    rewards, index = torch.tensor([1.0, 0.0, 2.0, 0.0]), torch.tensor([0, 0, 1, 1])
    # none: subtract group means 0.5 and 1.0 -> [0.5, -0.5, 1, -1]
    none = group_advantages(rewards, index, adv_scale="none").values
    torch.testing.assert_close(none, torch.tensor([0.5, -0.5, 1.0, -1.0]))
    # group: std of [1, 0] = sqrt(0.5) = 0.7071, of [2, 0] = sqrt(2) = 1.4142 -> all +-0.7071
    group = group_advantages(rewards, index, adv_scale="group").values
    torch.testing.assert_close(group, torch.tensor([0.7071063, -0.7071063, 0.7071065, -0.7071065]))
    # batch: mean 0.75, squared deviations 0.0625 + 0.5625 + 1.5625 + 0.5625 = 2.75,
    # std = sqrt(2.75 / 3) = 0.9574271 -> [0.5, -0.5, 1, -1] / 0.9574271
    batch = group_advantages(rewards, index, adv_scale="batch").values
    torch.testing.assert_close(batch, torch.tensor([0.5222330, -0.5222330, 1.0444659, -1.0444659]))


def test_groups_follow_prompt_index_after_shuffle():
    """Shuffling rows (and their prompt index) permutes the advantages the same way."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, generator=g)
    index = torch.arange(3).repeat_interleave(4)
    perm = torch.randperm(12, generator=g)
    ref = group_advantages(rewards, index).values
    shuffled = group_advantages(rewards[perm], index[perm]).values
    torch.testing.assert_close(shuffled, ref[perm])


# -----------------------------------------------------------------------------
# clipped surrogate


def surrogate_grad(ratio, adv, clip_low=0.2, clip_high=0.28):
    """d loss / d logp for one token with the given ratio and advantage."""
    old = torch.tensor([0.0], dtype=torch.float64)
    logp = torch.tensor([math.log(ratio)], dtype=torch.float64, requires_grad=True)
    loss, *_ = clipped_surrogate(logp, old, torch.tensor([adv], dtype=torch.float64), clip_low, clip_high)
    loss.sum().backward()
    return logp.grad.item()


def test_clipping_cuts_gradient_outside_band():
    """A > 0 above 1 + clip_high and A < 0 below 1 - clip_low: the gradient is exactly zero."""
    assert surrogate_grad(1.3, 2.0) == 0.0
    assert surrogate_grad(0.7, -2.0) == 0.0
    # the other sides are not clipped (the min keeps the pessimistic, unclipped term)
    assert surrogate_grad(1.3, -2.0) == pytest.approx(2.0 * 1.3)
    assert surrogate_grad(0.7, 2.0) == pytest.approx(-2.0 * 0.7)


def test_clipping_inside_band_is_advantage_times_ratio():
    """Inside [1 - clip_low, 1 + clip_high] d(-loss)/d logp = A * ratio."""
    for ratio, adv in [(0.9, 1.5), (1.1, -0.5), (1.25, 2.0), (0.85, -3.0)]:
        assert -surrogate_grad(ratio, adv) == pytest.approx(adv * ratio, rel=1e-12)


def test_clip_fractions_count_cut_tokens():
    """clipped_low / clipped_high flag exactly the tokens whose gradient is cut."""
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0])
    _, r, low, high = clipped_surrogate(ratio.log(), torch.zeros(5), adv, 0.2, 0.28)
    assert high.tolist() == [True, False, False, False, False]
    assert low.tolist() == [False, False, True, False, False]
    torch.testing.assert_close(r, ratio)


def test_ratio_one_gives_reinforce_gradient():
    """On-policy (old = logp detached) the gradient is -sum(A * grad logp * mask) / tokens."""
    policy, batch = MockPolicy(), make_batch()
    mask = completion_mask(batch.prompt_lengths, batch.completion_lengths, batch.input_ids.shape[1])
    A = group_advantages(batch.rewards, batch.prompt_index).values[:, None]
    w = aggregation_weights(mask, "token-mean")
    logp, _ = token_logprobs(policy, batch.input_ids, mask)
    loss, *_ = clipped_surrogate(logp, logp.detach(), A)
    grads = torch.autograd.grad((loss * w).sum(), list(policy.parameters()))
    logp, _ = token_logprobs(policy, batch.input_ids, mask)
    reinforce = -(A * logp * mask).sum() / mask.sum()
    expected = torch.autograd.grad(reinforce, list(policy.parameters()))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-7, rtol=1e-6)


# -----------------------------------------------------------------------------
# KL estimators


def test_k3_nonnegative_and_zero_when_equal():
    """k3 = r - 1 - log r >= 0 for any pair of log-probs, and exactly 0 when they are equal."""
    g = torch.Generator().manual_seed(0)
    logp, ref = -5 * torch.rand(10_000, generator=g), -5 * torch.rand(10_000, generator=g)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert torch.equal(kl_estimate(logp, logp, "k3"), torch.zeros(10_000))


def test_k3_expm1_keeps_precision():
    """At a log-ratio of 1e-8, k3 ~ x^2 / 2 = 5e-17 in fp64; exp(x) - 1 - x would be off by ~1e-16."""
    logp, ref = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-1.0 - 1e-8], dtype=torch.float64)
    x = (ref - logp).item()
    exact = x * x / 2 + x**3 / 6  # Taylor series of e^x - 1 - x
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(exact, rel=1e-6)
    # in fp32 exp(-1e-8) rounds to 1, so the naive form returns |x| = 1e-8, 2e8 times too big;
    # expm1 returns the nearest fp32 to the truth (0 here), an error below 1e-16.
    x32 = torch.tensor([-1e-8])
    assert (torch.exp(x32) - 1 - x32).item() == pytest.approx(1e-8)
    assert abs(kl_estimate(torch.zeros(1), x32, "k3").item()) < 1e-16


def test_k1_k2_k3_values():
    """The three estimators at log(pi_ref / pi) = x = -0.5: k1 = 0.5, k2 = 0.125, k3 = e^-0.5 - 0.5."""
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 0.5, rel=1e-6)


def test_k1_k3_unbiased_for_categorical_kl():
    """Sampling x ~ p, the means of k1 and k3 match exact KL(p || q) within 4 standard errors."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    exact = (p * (p / q).log()).sum().item()  # 0.1923
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for kind in ("k1", "k3"):
        est = kl_estimate(p.log()[x], q.log()[x], kind)
        stderr = est.std().item() / math.sqrt(len(est))  # ~0.0013 for k1, ~0.0006 for k3
        assert abs(est.mean().item() - exact) < 4 * stderr, kind


# -----------------------------------------------------------------------------
# masks, log-probs and aggregation


def test_aggregation_modes_on_ragged_mask():
    """Per-token losses [4] and [1, 2, 3]: token-mean 2.5, seq-mean-token-mean 3.0, Dr. GRPO 1.25."""
    mask = completion_mask(torch.tensor([1, 2]), torch.tensor([1, 3]), seq_len=5)
    assert mask.int().tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 1, 1]]
    per_token = torch.tensor([[9.0, 4, 9, 9, 9], [9.0, 9, 1, 2, 3]])  # 9s sit outside the mask
    agg = {m: (aggregation_weights(mask, m, max_new_tokens=4) * per_token).sum().item()
           for m in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")}
    assert agg["token-mean"] == pytest.approx((4 + 1 + 2 + 3) / 4)  # 2.5
    assert agg["seq-mean-token-mean"] == pytest.approx((4 / 1 + 6 / 3) / 2)  # 3.0
    assert agg["seq-mean-token-sum-norm"] == pytest.approx((4 / 4 + 6 / 4) / 2)  # 1.25


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_match_full_batch(loss_agg):
    """4 micro-batches of 2 rows accumulate the same gradient as 1 batch of 8 (normalisers global)."""
    batch = make_batch()
    updated = []
    for mbs in (8, 2):
        policy = MockPolicy()
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)  # new params = old - grad
        cfg = GRPOConfig(loss_agg=loss_agg, max_new_tokens=4, micro_batch=mbs, max_grad_norm=1e9)
        grpo_update(policy, opt, batch, cfg)
        updated.append(torch.cat([p.detach().flatten() for p in policy.parameters()]))
    torch.testing.assert_close(updated[0], updated[1], atol=1e-6, rtol=0)


def test_stop_token_in_mask_when_pad_is_eos():
    """With pad == eos == 0 the stop token still gets a log-prob; an `ids != pad` mask would drop it."""
    eos = 0
    gen = Generation(  # what model.generate returns for 2 samples of one prompt
        tokens=torch.tensor([[5, 6, eos, eos], [7, 3, 2, 4]]),
        lengths=torch.tensor([3, 4]),
        logprobs=torch.tensor([[-1.0, -1.0, -1.0, 0.0], [-1.0, -1.0, -1.0, -1.0]]),
        truncated=torch.tensor([False, True]),
        prompt_index=torch.tensor([0, 0]),
    )
    batch = rollout_batch([[1, 2]], gen, [1.0, 0.0], pad_id=eos)
    assert batch.input_ids[0].tolist() == [1, 2, 5, 6, eos, eos]
    mask = completion_mask(batch.prompt_lengths, batch.completion_lengths, batch.input_ids.shape[1])
    assert mask[0].tolist() == [False, False, True, True, True, False]  # the eos at position 4 is in
    assert not (batch.input_ids[0] != eos)[4]  # ...which the pad-based mask would have lost
    logp, _ = token_logprobs(MockPolicy(), batch.input_ids, mask)
    assert logp[0, 4] < 0 and logp[0, 5] == 0
    torch.testing.assert_close(batch.sampler_logprobs[0], torch.tensor([0.0, 0, -1, -1, -1, 0]))


def test_drop_truncated_removes_rows_from_mask():
    """drop_truncated leaves rows that hit max_new_tokens out of the loss entirely."""
    truncated = torch.tensor([False, True])
    mask = completion_mask(torch.tensor([1, 1]), torch.tensor([2, 3]), 4, truncated=truncated)
    assert mask.int().tolist() == [[0, 1, 1, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("drop", [True, False])
def test_drop_truncated_in_update_ignores_the_truncated_rows(drop):
    """grpo_update with drop_truncated: the update does not depend on a truncated row's tokens (without
    it, it does), and equals the update in which that row has no tokens at all (so the loss normaliser
    counts only the kept rows) while its reward still counts in its group's advantages."""
    def update(batch, drop_truncated):
        policy = MockPolicy()
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)
        grpo_update(policy, opt, batch, GRPOConfig(drop_truncated=drop_truncated, loss_agg="seq-mean-token-mean"))
        return [p.detach() for p in policy.parameters()]

    a, b = make_batch(), make_batch()
    row = int(a.truncated.nonzero()[0, 0])  # make_batch truncates one row of group 0
    start, n = int(a.prompt_lengths[row]), int(a.completion_lengths[row])
    b.input_ids[row, start:start + n] = (a.input_ids[row, start:start + n] + 1) % 11
    assert all(torch.equal(x, y) for x, y in zip(update(a, drop), update(b, drop))) == drop
    if drop:
        empty = make_batch()
        empty.completion_lengths[row] = 0
        for x, y in zip(update(a, True), update(empty, False)):
            torch.testing.assert_close(x, y, atol=1e-7, rtol=0)


def test_token_logprobs_match_full_log_softmax_at_temperature():
    """Chunked fp32 log-probs equal log_softmax(logits / T) gathered at the next token; 0 elsewhere."""
    policy, batch = MockPolicy(), make_batch()
    mask = completion_mask(batch.prompt_lengths, batch.completion_lengths, batch.input_ids.shape[1])
    logp, entropy = token_logprobs(policy, batch.input_ids, mask, temperature=0.7, chunk_size=3)
    full = torch.log_softmax(policy.logits(policy(batch.input_ids)) / 0.7, dim=-1)  # (B, T, V)
    expected = torch.zeros_like(logp)
    expected[:, 1:] = full[:, :-1].gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp, expected * mask)
    ent = -(full.exp() * full).sum(-1)
    torch.testing.assert_close(entropy[:, 1:], ent[:, :-1] * mask[:, 1:])
    assert logp.requires_grad and not entropy.requires_grad
    # the checkpointed chunks give the same gradient as the full (B, T, V) computation
    params = list(policy.parameters())
    got, want = torch.autograd.grad(logp.sum(), params), torch.autograd.grad((expected * mask).sum(), params)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


# -----------------------------------------------------------------------------
# the update step


def test_on_policy_update_metrics():
    """mu = 1: ratio exactly 1, nothing clipped, the zero-std share reported, the optimizer stepped."""
    policy, batch = MockPolicy(), make_batch()
    before = [p.detach().clone() for p in policy.parameters()]
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    m = grpo_update(policy, opt, batch, GRPOConfig(micro_batch=3))
    assert m["ratio_mean"] == 1.0 and m["pg_clipfrac_low"] == 0 and m["pg_clipfrac_high"] == 0
    assert m["skipped"] == 0.0 and m["frac_reward_zero_std"] == 0.0 and m["kl"] == 0.0
    assert m["grad_norm"] > 0 and m["entropy"] > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, policy.parameters()))


def test_mu_passes_clip_and_kl_with_reference():
    """mu = 3 with lr 0.5 moves off-policy (ratio != 1, tokens clipped); beta > 0 reports a KL."""
    policy, batch = MockPolicy(), make_batch()
    ref = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    cfg = GRPOConfig(mu=3, beta=0.1, clip_low=0.01, clip_high=0.01)
    m = grpo_update(policy, opt, batch, cfg, ref_policy=ref)
    assert m["skipped"] == 0.0 and m["ratio_mean"] != 1.0
    assert m["pg_clipfrac_low"] + m["pg_clipfrac_high"] > 0 and m["kl"] > 0


def test_nonfinite_loss_does_not_step():
    """A nan reward makes the loss nan: grads are zeroed, parameters untouched, skipped = 1."""
    policy, batch = MockPolicy(), make_batch()
    batch.rewards[0] = float("nan")
    before = [p.detach().clone() for p in policy.parameters()]
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    m = grpo_update(policy, opt, batch, GRPOConfig())
    assert m["skipped"] == 1.0
    assert all(torch.equal(b, p) for b, p in zip(before, policy.parameters()))
    assert all(p.grad is None for p in policy.parameters())
    assert m["weights_finite"] == 1.0  # nothing was applied


def test_an_update_that_overflows_the_weights_is_reported():
    """A finite, clipped gradient times a huge step overflows fp32: the step reports weights_finite = 0
    (the loss and gradient norm were finite, so only the weights show it)."""
    class Overflowing(torch.optim.SGD):  # an update too large for fp32, as --lr 1e30 can give
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(p.grad * 1e30 * 1e30)

    policy, batch = MockPolicy(), make_batch()
    m = grpo_update(policy, Overflowing(policy.parameters(), lr=1.0), batch, GRPOConfig())
    assert m["skipped"] == 0.0 and math.isfinite(m["grad_norm"]) and m["weights_finite"] == 0.0
    sane = grpo_update(policy := MockPolicy(), torch.optim.SGD(policy.parameters(), lr=1e-2), make_batch(),
                       GRPOConfig())
    assert sane["weights_finite"] == 1.0


# -----------------------------------------------------------------------------
# with the real model and sampler


def tiny_qwen(vocab=256, seed=0):
    """tiny_model with its own small init (scoring identities hold for any weights)."""
    return tiny_model(seed, std=None, vocab_size=vocab)


def test_scorer_matches_sampler_at_temperature():
    """Rescoring sampled tokens at the sampler's temperature (0.7) reproduces its log-probs."""
    policy = tiny_qwen()
    prompts = [[3, 4, 5], [6, 7]]
    gen = generate(policy, prompts, SamplingConfig(max_new_tokens=6, temperature=0.7, stop_ids=(0,)),
                   num_samples=3, generator=torch.Generator().manual_seed(0))
    batch = rollout_batch(prompts, gen, torch.zeros(6))
    mask = completion_mask(batch.prompt_lengths, batch.completion_lengths, batch.input_ids.shape[1])
    with torch.no_grad():
        logp, _ = token_logprobs(policy, batch.input_ids, mask, temperature=0.7)
    torch.testing.assert_close(logp, batch.sampler_logprobs, atol=1e-5, rtol=0)


def test_grpo_learns_to_emit_token_7():
    """A random tiny Qwen2 trained with GRPO on "completion contains token 7" goes from chance to > 0.9."""
    policy = tiny_qwen()
    V, eos, target = 256, 0, 7
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, stop_ids=(eos,))
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0)
    grpo_cfg = GRPOConfig(max_new_tokens=8)
    gen_rng = torch.Generator().manual_seed(1)
    prompts = [[int(t) for t in torch.randint(1, V, (4,))] for _ in range(8)]
    rewards_seen, start, threads = [], time.time(), torch.get_num_threads()
    torch.set_num_threads(1)  # 64-wide matrices: one thread is faster, and immune to a busy machine
    try:
        for step in range(30):  # seeds 0-5 all pass 0.9 by step 12
            gen = generate(policy, prompts, sampling, num_samples=8, generator=gen_rng)
            rewards = [float(target in c) for c in gen.completions()]
            batch = rollout_batch(prompts, gen, rewards, pad_id=eos)
            metrics = grpo_update(policy, opt, batch, grpo_cfg)
            rewards_seen.append(metrics["reward_mean"])
            assert metrics["sampler_logp_absdiff"] < 1e-4  # the sampler and the trainer score tokens alike
            if min(rewards_seen[-3:]) > 0.9:
                break
    finally:
        torch.set_num_threads(threads)
    print(f"rewards {[round(r, 2) for r in rewards_seen]} in {time.time() - start:.1f}s")
    assert rewards_seen[0] < 0.2  # chance: about 8 / 256 per completion
    assert min(rewards_seen[-3:]) > 0.9


def test_shared_prompt_pass_equals_separate_rows():
    """Scoring G rows through one shared prompt pass gives the same log-probs and gradients as row by row,
    and as plain_token_logprobs."""
    policy = tiny_qwen()
    for p in policy.parameters():  # larger weights than the 0.02 init, so the check is not vacuous
        torch.nn.init.normal_(p, std=0.2)
    prompts = [[3, 4, 5, 9], [6, 7]]
    gen = generate(policy, prompts, SamplingConfig(max_new_tokens=6, temperature=1.0, stop_ids=(0,)),
                   num_samples=3, generator=torch.Generator().manual_seed(0))
    batch = rollout_batch(prompts, gen, torch.zeros(6))
    mask = completion_mask(batch.prompt_lengths, batch.completion_lengths, batch.input_ids.shape[1])
    results = []
    for grouped in (False, True):
        policy.zero_grad()
        extra = (batch.prompt_lengths, batch.prompt_index) if grouped else ()
        logp, _ = token_logprobs(policy, batch.input_ids, mask, 1.0, 1024, *extra)
        (logp * torch.arange(logp.numel()).view_as(logp)).sum().backward()  # position-dependent weights
        results.append((logp.detach(), [p.grad.clone() for p in policy.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[1][0], batch.sampler_logprobs, atol=1e-5, rtol=0)  # and the sampler's
    # both equal the plain computation, whose (B, T, V) logits all live at once
    policy.zero_grad()
    logp, _ = plain_token_logprobs(policy, batch.input_ids, mask)
    (logp * torch.arange(logp.numel()).view_as(logp)).sum().backward()
    torch.testing.assert_close(logp.detach(), results[1][0], atol=1e-5, rtol=0)
    for a, p in zip(results[1][1], policy.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-4, rtol=1e-4)


def _dp_update(dist, batch):
    """One gloo rank: update a fresh MockPolicy on its half of the groups with all_reduce."""
    policy = MockPolicy()
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    rows = (batch.prompt_index % dist.world) == dist.rank  # whole groups per rank
    part = RolloutBatch(*(getattr(batch, f)[rows] for f in ("input_ids", "prompt_lengths", "completion_lengths",
                                                              "truncated", "prompt_index", "rewards")))
    cfg = GRPOConfig(loss_agg="token-mean", max_grad_norm=0.5)  # clipping must see the global norm
    grpo_update(policy, opt, part, cfg, ranks=dist)
    return {"weights": torch.cat([p.detach().flatten() for p in policy.parameters()])}


def test_two_gloo_ranks_match_one_process(tmp_path):
    """Two data-parallel gloo processes, each with half of the groups, take the single-process step."""
    from ranks import run_ranks

    batch = make_batch()
    policy = MockPolicy()
    grpo_update(policy, torch.optim.SGD(policy.parameters(), lr=1.0), batch,
                GRPOConfig(loss_agg="token-mean", max_grad_norm=0.5))
    expected = torch.cat([p.detach().flatten() for p in policy.parameters()])
    got = run_ranks(tmp_path, _dp_update, batch)["weights"]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_a_micro_batch_with_no_loss_tokens_still_runs_its_backward():
    """--drop-truncated can leave a micro-batch without a single loss token. Its backward must still run
    (FSDP ranks meet in every backward; a skipped one would leave the others waiting) and add nothing:
    the update equals the one without that micro-batch's rows."""
    batch = make_batch()
    batch.truncated[:] = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)  # rows 0-1: micro-batch 1
    cfg = GRPOConfig(drop_truncated=True, micro_batch=2)
    policy = MockPolicy()
    grpo_update(policy, torch.optim.SGD(policy.parameters(), lr=1.0), batch, cfg)
    whole = MockPolicy()
    grpo_update(whole, torch.optim.SGD(whole.parameters(), lr=1.0), batch, GRPOConfig(drop_truncated=True))
    for a, b in zip(policy.parameters(), whole.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_a_batch_with_no_loss_tokens_at_all_is_a_zero_step():
    """Every completion truncated and dropped: a step with zero gradient, not a crash. The tied
    embedding's gradient would be the lookup's sparse one alone, which clipping cannot take a norm
    of; the head also runs (on no position) so it is dense."""
    from tiny_models import tiny_model

    model = tiny_model(seed=0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(1, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = RolloutBatch(ids, torch.tensor([6, 6, 5, 5]), torch.tensor([6, 4, 7, 3]), torch.ones(4, dtype=torch.bool),
                         torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 0.0, 0.2, 0.9]))
    m = grpo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, GRPOConfig(drop_truncated=True))
    assert m["skipped"] == 0.0 and m["grad_norm"] == 0.0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_steps_inside_one_autocast_region_use_the_updated_weights():
    """train.py runs everything inside one torch.autocast (fp32 weights, bf16 compute). Autocast keeps
    the bf16 copy of each weight it casts until the region ends, so after optimizer.step() the next
    forward would still see the old weights: two steps inside one region must equal two steps each in
    its own region."""
    from tiny_models import tiny_model

    ids = torch.randint(1, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = RolloutBatch(ids, torch.tensor([6, 6, 5, 5]), torch.tensor([6, 4, 7, 3]),
                         torch.zeros(4, dtype=torch.bool), torch.tensor([0, 0, 1, 1]),
                         torch.tensor([1.0, 0.0, 0.2, 0.9]))
    cfg = GRPOConfig(max_new_tokens=8, share_prompt=False)

    def two_steps(one_region: bool):
        model = tiny_model(seed=0).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        norms = []
        region = torch.autocast("cpu", dtype=torch.bfloat16)
        with region if one_region else contextlib.nullcontext():
            for _ in range(2):
                with contextlib.nullcontext() if one_region else torch.autocast("cpu", dtype=torch.bfloat16):
                    norms.append(grpo_update(model, opt, batch, cfg)["grad_norm"])
        return norms, model.state_dict()

    (n1, w1), (n2, w2) = two_steps(True), two_steps(False)
    assert n1 == n2
    for name in w1:
        assert torch.equal(w1[name], w2[name]), name
