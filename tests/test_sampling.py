"""Tests for model.py's sampler: KV-cache decoding against a full forward pass, temperature and seeded sampling,
top-k / top-p filters on a hand-made distribution, per-row stop ids, shared prompt prefill, batching."""

from __future__ import annotations

import pytest
import torch
from tiny_models import GREEDY, PROMPTS, full_logits, tiny_model

from model import (
    ModelConfig,
    SamplingConfig,
    Transformer,
    filter_logits,
    generate,
    head_logits,
    sample_plain,
    sample_tokens,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kv_cache_decoding_equals_full_forward():
    """Greedy tokens and temperature-1 log-probs from the cached decode loop equal one full forward pass."""
    model = tiny_model()
    greedy = generate(model, PROMPTS, SamplingConfig(max_new_tokens=20, temperature=0.0))
    sampled = generate(model, PROMPTS, SamplingConfig(max_new_tokens=20, temperature=1.0), num_samples=2,
                       generator=torch.Generator().manual_seed(0))
    for gen in (greedy, sampled):
        for row, completion in enumerate(gen.completions()):
            p = PROMPTS[int(gen.prompt_index[row])]
            logp = full_logits(model, p + completion)[len(p) - 1:-1].log_softmax(-1)  # (20, V)
            if gen is greedy:
                assert logp.argmax(-1).tolist() == completion
            expected = logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)
            torch.testing.assert_close(gen.logprobs[row], expected, atol=1e-5, rtol=0)


def test_sampling_logprobs_use_the_temperature():
    """At temperature 0.7 the returned log-probs are log_softmax(logits / 0.7) of the sampled tokens."""
    model = tiny_model()
    gen = generate(model, PROMPTS[:1], SamplingConfig(max_new_tokens=8, temperature=0.7),
                   generator=torch.Generator().manual_seed(0))
    completion = gen.completions()[0]
    logp = (full_logits(model, PROMPTS[0] + completion)[len(PROMPTS[0]) - 1:-1] / 0.7).log_softmax(-1)
    expected = logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)
    torch.testing.assert_close(gen.logprobs[0], expected, atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible():
    """The same generator seed gives identical samples; a different seed gives different ones."""
    model, cfg = tiny_model(), SamplingConfig(max_new_tokens=16, temperature=1.0)

    def run(seed):
        return generate(model, PROMPTS, cfg, num_samples=2, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


# probs [0.5, 0.2, 0.15, 0.1, 0.05] stored in a shuffled order, to check the scatter back to vocab order.
# fp32, the dtype generate() filters in: there softmax(log p) gives the masses 0.5 and 0.7 at the
# boundaries exactly (in fp64 they come out 1 ulp low and top_p=0.5 would keep a second token).
ORDER = [3, 0, 4, 1, 2]  # position j holds the token of rank ORDER[j]
PROBS = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float32)


@pytest.mark.parametrize("top_k, top_p, kept_ranks", [
    (2, 1.0, {0, 1}), (0, 0.7, {0, 1}), (0, 0.71, {0, 1, 2}), (0, 0.5, {0}), (0, 0.3, {0}),
    (0, 1.0, {0, 1, 2, 3, 4}), (4, 1.0, {0, 1, 2, 3}), (3, 0.6, {0, 1}), (1, 1.0, {0}),
])
def test_top_k_top_p_keep_exactly_the_right_tokens(top_k, top_p, kept_ranks):
    """top-k keeps the k most likely tokens; top-p the fewest most likely whose mass reaches top_p."""
    logits = PROBS[ORDER].log()[None]
    kept = filter_logits(logits, top_k=top_k, top_p=top_p)[0].isfinite().nonzero().flatten().tolist()
    assert {ORDER[j] for j in kept} == kept_ranks


def test_sample_tokens_draws_from_the_given_distribution():
    """Inverse-CDF sampling reproduces the probabilities and never draws a zero-probability token."""
    probs = torch.tensor([0.0, 0.5, 0.2, 0.0, 0.15, 0.1, 0.05, 0.0])  # zeros first, inside and last
    n = 40000
    tokens = sample_tokens(probs.log().expand(n, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=len(probs)) / n
    assert (freq[probs == 0] == 0).all()
    assert (freq - probs).abs().max() < 0.01  # 4 standard deviations of the largest cell


def test_the_sampling_speed_ups_equal_the_plain_computations():
    """sample_tokens (inverse CDF) draws what sample_plain (torch.multinomial) draws: the same frequencies
    within sampling noise; head_logits gives model.logits' values for the few rows it handles itself."""
    probs = torch.tensor([0.0, 0.5, 0.2, 0.0, 0.15, 0.1, 0.05, 0.0])
    n = 40000
    logp = probs.log().expand(n, -1)
    fast = torch.bincount(sample_tokens(logp, torch.Generator().manual_seed(0)), minlength=len(probs)) / n
    plain = torch.bincount(sample_plain(logp, torch.Generator().manual_seed(1)), minlength=len(probs)) / n
    assert (fast - plain).abs().max() < 0.015  # about 4 standard deviations of the difference
    model = tiny_model(seed=0)
    h = torch.randn(8, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(head_logits(model, h), model.logits(h).float(), atol=1e-5, rtol=1e-5)


def test_each_row_stops_at_its_own_stop_id():
    """Rows end at their first stop id (kept, last), pad after it, and only truncated rows lack one."""
    torch.manual_seed(0)  # default std-0.02 init: next-token distribution near uniform over 12 tokens
    model = Transformer(ModelConfig(vocab_size=12, hidden_size=32, intermediate_size=64, head_dim=8))
    stops, pad, T = (3, 7), 11, 10
    gen = generate(model.eval(), [[1, 2], [4, 5, 6]], SamplingConfig(max_new_tokens=T, stop_ids=stops),
                   num_samples=8, generator=torch.Generator().manual_seed(0), pad_id=pad)
    assert gen.prompt_index.tolist() == [0] * 8 + [1] * 8
    assert 0 < int(gen.truncated.sum()) < 16  # both kinds of row occur with this seed
    for row, n in enumerate(gen.lengths.tolist()):
        tokens = gen.tokens[row].tolist()
        assert all(t == pad for t in tokens[n:]) and (gen.logprobs[row, n:] == 0).all()
        assert not any(t in stops for t in tokens[:n - 1])
        assert (tokens[n - 1] in stops) == (not gen.truncated[row])
        assert gen.truncated[row] == (n == T and tokens[n - 1] not in stops)
        assert (gen.logprobs[row, :n] < 0).all()


def test_group_samples_share_one_prefill():
    """num_samples=G from one prefill equals G separate copies of the prompt: greedy rows, seeded samples."""
    model = tiny_model()
    g3 = generate(model, PROMPTS, GREEDY, num_samples=3)
    g1 = generate(model, PROMPTS, GREEDY)
    assert g3.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for row in range(9):
        assert torch.equal(g3.tokens[row], g1.tokens[row // 3])

    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0)
    shared = generate(model, PROMPTS, cfg, num_samples=3, generator=torch.Generator().manual_seed(5))
    copies = generate(model, [p for p in PROMPTS for _ in range(3)], cfg, generator=torch.Generator().manual_seed(5))
    assert torch.equal(shared.tokens, copies.tokens)
    torch.testing.assert_close(shared.logprobs, copies.logprobs, atol=1e-5, rtol=0)


def test_batched_prompts_equal_each_prompt_alone():
    """Prompts of different lengths in one call give the same greedy continuation as each one alone."""
    for kw in ({}, dict(arch="llama", qkv_bias=False, tie_word_embeddings=False),
               dict(arch="qwen3", qkv_bias=False, head_dim=24)):
        model = tiny_model(**kw)
        batch = generate(model, PROMPTS, GREEDY)
        for i, p in enumerate(PROMPTS):
            alone = generate(model, [p], GREEDY)
            assert batch.completions()[i] == alone.completions()[0]
            torch.testing.assert_close(batch.logprobs[i], alone.logprobs[0], atol=1e-5, rtol=0)


def test_generate_refuses_empty_prompts():
    """An empty prompt list or an empty prompt is a ValueError, not an index error deep in the loop."""
    with pytest.raises(ValueError):
        generate(tiny_model(), [], GREEDY)
    with pytest.raises(ValueError):
        generate(tiny_model(), [[1, 2], []], GREEDY)
