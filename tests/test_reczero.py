"""Tests for reczero.py: output parsing, reward values and range, prompt rendering, metrics, classic baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data import Example, Item, Rating
from reczero import (
    SHARED_MARK,
    SYSTEM_PROMPT,
    PromptCaps,
    RewardConfig,
    build_messages,
    compute_reward,
    full_system_prompt,
    parse_output,
    mean_interval,
    paired_bootstrap,
    rating_metrics,
    render_user_message,
    reward_config,
)


def wrap(rate="4", user="likes jazz", item="[pos] smooth [neg] short", match="good fit", pre="", post=""):
    """A well-formed output with replaceable parts."""
    return (
        f"{pre}<analyze user>{user}</analyze user>\n<analyze item>{item}</analyze item>\n"
        f"<match>{match}</match>\n<rate>{rate}</rate>{post}"
    )


GOOD = wrap()
E = "\u00e9"  # a two-byte character in UTF-8, to check that cuts never split one

# (name, text, valid, rating)
PARSE_CASES = [
    ("plain", GOOD, True, 4.0),
    ("decimal", wrap("4.5"), True, 4.5),
    ("padded", wrap(" 4 "), True, 4.0),
    ("newlines", wrap("\n3.25\n"), True, 3.25),
    ("trailing zero", wrap("4.50"), True, 4.5),
    ("bounds low", wrap("1"), True, 1.0),
    ("bounds high", wrap("5.0"), True, 5.0),
    ("fraction", wrap("4/5"), False, None),
    ("word", wrap("five"), False, None),
    ("zero", wrap("0"), False, None),
    ("six", wrap("6"), False, None),
    ("just above", wrap("5.01"), False, None),
    ("nan", wrap("nan"), False, None),
    ("inf", wrap("inf"), False, None),
    ("exponent", wrap("1e3"), False, None),
    ("small exponent", wrap("4e0"), False, None),
    ("plus sign", wrap("+4"), False, None),
    ("minus sign", wrap("-4"), False, None),
    ("trailing dot", wrap("4."), False, None),
    ("two numbers", wrap("4 5"), False, None),
    ("words and number", wrap("rating: 4"), False, None),
    ("arabic digit", wrap("\u0664"), False, None),
    ("empty rate", wrap(""), False, None),
    ("blank rate", wrap("  \n "), False, None),
    ("empty user", wrap(user=""), False, None),
    ("blank item", wrap(item=" \n\t "), False, None),
    ("empty match", wrap(match=""), False, None),
    ("text before and after", wrap(pre="Sure, here it is.\n", post="\nThanks!"), True, 4.0),
    ("missing </match>", GOOD.replace("</match>", ""), False, None),
    ("missing <analyze user>", GOOD.replace("<analyze user>", ""), False, None),
    ("missing rate", GOOD.split("<rate>")[0], False, None),
    ("underscore tags", GOOD.replace("analyze user", "analyze_user"), False, None),
    ("two rate blocks", GOOD + "<rate>3</rate>", False, None),
    ("duplicate <match>", wrap(match="a <match> b"), False, None),
    ("out of order", "<analyze item>x</analyze item><analyze user>y</analyze user><match>z</match><rate>4</rate>",
     False, None),
    ("rate first", "<rate>4</rate><analyze user>y</analyze user><analyze item>x</analyze item><match>z</match>",
     False, None),
    ("nested user in item", "<analyze item>x<analyze user>y</analyze user></analyze item><match>z</match>"
     "<rate>4</rate>", False, None),
    ("overlapping", "<analyze user>y<analyze item></analyze user>x</analyze item><match>z</match><rate>4</rate>",
     False, None),
    ("close before open", "</analyze user>y<analyze user><analyze item>x</analyze item><match>z</match>"
     "<rate>4</rate>", False, None),
    ("empty string", "", False, None),
    ("garbage 100KB", "<rate>" * 3 + "x" * 100_000 + "</match>", False, None),
    ("garbage with tags", ("<analyze user>a</analyze user>" + "\u00e9\U0001f600" * 30_000), False, None),
    ("unicode contents", wrap(user="mag Jazz \u00e9\U0001f3b7", item="[pos] \u97f3\u697d", match="\u2713"), True, 4.0),
    ("lone surrogate", wrap(user="\ud800", post="\udfff"), True, 4.0),
    ("huge rate number", wrap("4" + "0" * 50_000), False, None),
]


@pytest.mark.parametrize("name,text,valid,rating", PARSE_CASES, ids=[c[0] for c in PARSE_CASES])
def test_parse_output_table(name, text, valid, rating):
    """parse_output accepts exactly the well-formed outputs and reads their rating."""
    out = parse_output(text)
    assert out.valid is valid, out.reason
    assert out.rating == rating
    assert (out.reason == "ok") is valid


@pytest.mark.parametrize(
    "text,reason",
    [
        (GOOD.replace("</match>", ""), "missing </match>"),
        (GOOD + "<rate>3</rate>", "duplicate <rate>"),
        (wrap("4/5"), "rate '4/5' is not a number in [1, 5]"),
        (wrap(item=""), "empty <analyze item>"),
    ],
)
def test_parse_output_reason(text, reason):
    """The reason names the first failed check."""
    assert parse_output(text).reason == reason


@pytest.mark.parametrize(
    "preset,pred,truth,expected",
    [
        ("paper", "3.5", 4, 0.5 + 0.875),  # 1 - 0.5/4
        ("paper", "4", 4, 1.5),
        ("paper", "1", 5, 0.5 + 0.0),  # worst valid
        ("paper", "2.5", 1, 0.5 + 0.625),  # 1 - 1.5/4
        ("code", "3.5", 4, 1.0 + 0.75),  # 1 - 0.5/2
        ("code", "4", 4, 2.0),
        ("code", "1", 5, 1.0 - 1.0),  # 1 - 4/2 = -1
        ("code", "2.5", 1, 1.0 + 0.25),  # 1 - 1.5/2
    ],
)
def test_compute_reward_worked_values(preset, pred, truth, expected):
    """Hand-computed rewards for valid outputs under both presets."""
    r = compute_reward(wrap(pred), truth, reward_config(preset))
    assert r.valid and r.rating == float(pred)
    assert r.total == pytest.approx(expected)
    assert r.total == pytest.approx(r.format + r.answer)


@pytest.mark.parametrize("preset,expected", [("paper", -0.5), ("code", -1.0)])
def test_compute_reward_invalid(preset, expected):
    """A malformed output gets -a with no answer reward."""
    r = compute_reward(wrap("five"), 4, reward_config(preset))
    assert (r.total, r.format, r.answer, r.valid, r.rating) == (expected, expected, 0.0, False, None)


def test_default_reward_is_paper():
    """The default RewardConfig is the paper preset."""
    assert RewardConfig() == reward_config("paper")


def test_half_star_scale_through_parse_reward_and_prompt():
    """MovieLens 20M rates 0.5-5: <rate>0.5</rate> is a valid rating there (not on 1-5), the paper's
    reward spans the scale (max error 4.5: 1 - |0.5 - 5| / 4.5 = 0), and the prompt states the scale."""
    half = (0.5, 5.0)
    assert not parse_output(wrap("0.5")).valid
    assert parse_output(wrap("0.5"), half).rating == 0.5
    assert parse_output(wrap("0.4"), half).reason == "rate '0.4' is not a number in [0.5, 5]"
    cfg = reward_config("paper", half)
    assert (cfg.format_reward, cfg.max_error, cfg.scale) == (0.5, 4.5, half)
    assert compute_reward(wrap("0.5"), 0.5, cfg).total == pytest.approx(1.5)
    assert compute_reward(wrap("0.5"), 5.0, cfg).total == pytest.approx(0.5)  # the worst valid answer: 1 - 4.5/4.5
    assert compute_reward(wrap("3"), 2.0, reward_config("code", half)).total == pytest.approx(1.0 + 0.5)
    assert "a number from 0.5 to 5 " in full_system_prompt(half)
    assert "a number from 1 to 5 " in SYSTEM_PROMPT
    with pytest.raises(ValueError, match="unknown reward preset 'exact'"):
        reward_config("exact")


def assert_in_range(r, cfg):
    """Invalid -> exactly -a; valid -> [a + 1 - 4/max_error, a + 1]."""
    a = cfg.format_reward
    if not r.valid:
        assert r.total == -a
    else:
        assert a + 1 - 4 / cfg.max_error - 1e-9 <= r.total <= a + 1 + 1e-9


rate_strings = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"\s*[+-]?[0-9]{0,3}(\.[0-9]{0,3})?([eE][0-9])?\s*", fullmatch=True),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300), truth=st.integers(1, 5), preset=st.sampled_from(["paper", "code"]))
def test_reward_range_arbitrary_text(text, truth, preset):
    """compute_reward never raises and stays in the documented range on arbitrary text."""
    assert_in_range(compute_reward(text, truth, reward_config(preset)), reward_config(preset))


@settings(max_examples=300, deadline=None)
@given(rate=rate_strings, truth=st.floats(1, 5), preset=st.sampled_from(["paper", "code"]),
       post=st.sampled_from(["", "\n", "<rate>", "</match>", " done"]))
def test_reward_range_near_valid(rate, truth, preset, post):
    """On near-valid outputs with random rate strings the reward is in range and valid iff a plain number in [1, 5]."""
    r = compute_reward(wrap(rate, post=post), truth, reward_config(preset))
    assert_in_range(r, reward_config(preset))
    if r.valid:
        assert 1 <= r.rating <= 5 and post in ("", "\n", " done")


# ---------------------------------------------------------------------------------------------------
# Prompt rendering
# ---------------------------------------------------------------------------------------------------


def make_example(n_user=12, n_item=12, long=5000):
    """An example with long texts and more history than the caps allow."""
    big = E * long
    user_hist = [
        (Rating("u", f"h{k}", 1.0 + k % 5, k, review=big, summary=big),
         Item(f"h{k}", title=f"Old album {k}", categories=("CDs", "Jazz"), brand="Label", price=9.5, description=big))
        for k in range(n_user)
    ]
    item_hist = [
        Rating(f"v{k}", "t", 2.0 + k % 4, k, review=f"rev{k} " + big, summary=f"sum{k}") for k in range(n_item)
    ]
    target = Rating("u", "t", 4.0, 100)
    item = Item("t", title="Target album", categories=("CDs",), description=big)
    return Example(target, item, user_hist, item_hist, user_avg=3.123456, item_avg=3.0)


def test_render_user_message_fields_and_caps():
    """The message has the four fields, rounded averages, capped histories and capped texts."""
    caps = PromptCaps()
    msg = render_user_message(make_example(), caps)
    lines = msg.split("\n")
    for field in ("user_history: ", "user_avg_rating: 3.12", "target_item: ", "target_item_avg_rating: 3.00"):
        assert any(line.startswith(field) for line in lines), field
    # Only the last 10 user-history items, numbered 1..10, with their ratings.
    assert "Old album 1," not in msg and "1. Old album 2, 3.0;" in msg and "10. Old album 11, 2.0;" in msg
    assert "11. " not in msg
    # Item history: the last 10 ratings of other users.
    assert "Ratings: [4.0, 5.0, 2.0, 3.0, 4.0, 5.0, 2.0, 3.0, 4.0, 5.0]" in msg
    assert "rev1 " not in msg and "rev2 " in msg and "Summaries: [sum2; sum3" in msg
    # No text run is longer than its cap (plus the "..." marker).
    runs = [len(chunk) for chunk in "".join(c if c == E else " " for c in msg).split()]
    assert max(runs) == caps.text_chars
    assert "Summary: " + E * caps.summary_chars + "..." in msg
    assert "Review: " + E * caps.text_chars + "..." in msg
    assert "Description: " + E * caps.text_chars + "..." in msg


def test_render_small_caps_and_short_text():
    """Small caps shrink the histories; short texts are not cut and empty fields are omitted."""
    ex = make_example(n_user=3, n_item=3, long=5)
    msg = render_user_message(ex, PromptCaps(max_user_history=1, max_item_history=2, text_chars=3))
    assert "1. Old album 2, 3.0;" in msg and "2. " not in msg
    assert "Ratings: [3.0, 4.0]" in msg
    assert "Review: \u00e9\u00e9\u00e9..." in msg
    assert "Brand" not in msg.split("target_item: ")[1]  # the target item has no brand
    full = render_user_message(ex)
    assert "..." not in full and "Summary: \u00e9\u00e9\u00e9\u00e9\u00e9 |" in full


def test_mark_shared_marks_only_entries_sharing_a_category_with_the_target():
    """--mark-shared: a user-history block whose item shares a category with the target ends with the
    marker; the others do not; off (the default) nothing is marked."""
    ex = make_example(n_user=3, n_item=2, long=5)
    other = Item("x", title="Other", categories=("Books",))
    ex.user_history[1] = (ex.user_history[1][0], other)
    caps = PromptCaps(history_fields=("Categories",), mark_shared=True)
    blocks = render_user_message(ex, caps).split("user_avg_rating")[0].strip().split("\n\n")
    assert [b.endswith(SHARED_MARK) for b in blocks] == [True, False, True]
    assert "Categories: CDs, Jazz" + SHARED_MARK in blocks[0] and "Categories: Books" in blocks[1]
    assert SHARED_MARK not in render_user_message(ex, PromptCaps(history_fields=("Categories",)))


def test_build_messages():
    """build_messages returns the system prompt, then the rendered user message."""
    ex = make_example(2, 2, 10)
    msgs = build_messages(ex)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == SYSTEM_PROMPT and msgs[1]["content"] == render_user_message(ex)
    for tag in ("<analyze user>", "</analyze item>", "<match>", "</rate>", "[pos]", "[neg]"):
        assert tag in SYSTEM_PROMPT


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


def test_rating_metrics_hand_example():
    """An invalid output is scored with its fallback; valid-only metrics skip it."""
    m = rating_metrics([4.0, None, 2.5], [5.0, 3.0, 2.0], fallback=[3.9, 3.5, 3.0])
    # scored = [4.0, 3.5, 2.5]; errors = [-1, 0.5, 0.5]
    assert m.n == 3 and m.valid_rate == pytest.approx(2 / 3)
    assert m.mae == pytest.approx(2 / 3)
    assert m.rmse == pytest.approx(math.sqrt(1.5 / 3))
    assert m.mae_valid == pytest.approx(0.75)
    assert m.rmse_valid == pytest.approx(math.sqrt(1.25 / 2))
    assert m.pred_std == pytest.approx(np.std([4.0, 3.5, 2.5]))
    assert m.true_std == pytest.approx(np.std([5.0, 3.0, 2.0]))
    assert m.distinct == 3


def test_rating_metrics_edge_cases():
    """All-invalid gives nan valid-only metrics; empty or mismatched input raises."""
    m = rating_metrics([None, None], [4.0, 4.0], fallback=[4.0, 4.0])
    assert m.mae == 0 and m.valid_rate == 0 and math.isnan(m.mae_valid) and math.isnan(m.rmse_valid)
    assert m.distinct == 1 and m.pred_std == 0
    with pytest.raises(ValueError):
        rating_metrics([], [], [])
    with pytest.raises(ValueError):
        rating_metrics([1.0], [1.0, 2.0], [1.0])


def test_paired_bootstrap_hand_cases():
    """Identical losses give [0, 0]; a constant shift c gives [c, c]; two examples whose differences
    are 1 and 0 resample to means 0, 0.5, 1 (probability 1/4, 1/2, 1/4), so the 95% interval is [0, 1]."""
    a = [0.5, 1.0, 0.0, 2.0]
    same = paired_bootstrap(a, a)
    assert (same.diff, same.low, same.high, same.n) == (0.0, 0.0, 0.0, 4)
    assert not same.excludes_zero()
    shift = paired_bootstrap([x + 0.25 for x in a], a)
    assert shift.diff == pytest.approx(0.25) and shift.low == pytest.approx(0.25) and shift.high == pytest.approx(0.25)
    assert shift.excludes_zero()
    two = paired_bootstrap([1.0, 0.0], [0.0, 0.0], resamples=4000)
    assert (two.diff, two.low, two.high) == (0.5, 0.0, 1.0)


def test_paired_bootstrap_pairs_examples():
    """Pairing cancels what both methods share: a per-example offset common to both leaves a narrow
    interval; the same differences unpaired would spread with the offsets. Bad input is refused."""
    rng = np.random.default_rng(1)
    hard = rng.uniform(0, 3, 500)  # how hard each example is, shared by both methods
    iv = paired_bootstrap(hard + 0.1, hard, seed=3)
    assert iv.low == pytest.approx(0.1) and iv.high == pytest.approx(0.1)
    noisy = paired_bootstrap(hard + rng.normal(0.1, 0.2, 500), hard, seed=3)
    assert noisy.low < noisy.diff < noisy.high and noisy.high - noisy.low < 0.05
    assert paired_bootstrap(hard + 1, hard, seed=3) == paired_bootstrap(hard + 1, hard, seed=3)  # seeded
    with pytest.raises(ValueError, match="too few test examples for an interval"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_mean_interval_hand_case():
    """[1, 2, 3]: mean 2, sd 1, so 2 ± 4.303 / sqrt(3) = 2 ± 2.484; equal values give a zero-width
    interval; one value has no spread to measure."""
    iv = mean_interval([1.0, 2.0, 3.0])
    assert iv.diff == 2.0 and iv.n == 3
    assert iv.low == pytest.approx(2 - 4.303 / math.sqrt(3)) and iv.high == pytest.approx(2 + 4.303 / math.sqrt(3))
    flat = mean_interval([-0.1] * 10)
    assert flat.low == pytest.approx(-0.1) and flat.high == pytest.approx(-0.1) and flat.excludes_zero()
    with pytest.raises(ValueError):
        mean_interval([1.0])


def test_expected_rating_by_hand():
    """Reason4Rec's read-out: softmax over the rating tokens' logits, weighted by their values. Logits
    (0, 0, 0, 0, ln 4) -> p = (1, 1, 1, 1, 4) / 8 -> (1 + 2 + 3 + 4 + 20) / 8 = 3.75; equal logits -> 3."""
    import torch

    from reczero import expected_rating

    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, math.log(4.0)], [7.0, 7.0, 7.0, 7.0, 7.0]])
    assert expected_rating(logits, [1.0, 2.0, 3.0, 4.0, 5.0]).tolist() == pytest.approx([3.75, 3.0])


def test_rating_metrics_name_the_most_frequent_rating():
    """top_rating and top_share: 4 in 3 of 5 scored predictions (the unparsable one scored by its fallback 4);
    collapsed only at >= 95% of one rating."""
    from reczero import collapsed

    m = rating_metrics([4.0, 4.0, 2.0, None, 5.0], [3.0] * 5, [4.0] * 5)
    assert (m.top_rating, m.top_share, m.distinct) == (4.0, 0.6, 3) and not collapsed(m)
    assert collapsed(rating_metrics([4.0] * 19 + [3.0], [3.0] * 20, [4.0] * 20))  # 95%
    assert not collapsed(rating_metrics([4.0] * 18 + [3.0, 2.0], [3.0] * 20, [4.0] * 20))  # 90%
