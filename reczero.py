"""RecZero task: the four-step prompt, output parsing, the rule-based reward and rating metrics.

An LLM reads a user's history and a target item, reasons in four tagged blocks (analyze user, analyze
item, match, rate) and ends with a rating on the data's scale (1-5; 0.5-5 for MovieLens 20M); GRPO
trains it on R = R_format + R_answer (docs/paper.md describes the paper's prompt, reward and metrics
and where we differ).

Simplifications and decisions:
- The prompt is a plain system + user message list; the tokenizer's chat template renders it (the released
  code pasted literal Qwen tokens into one string). The wording is our own.
- Averages are shown rounded to 2 decimals (the released code printed raw floats); whitespace inside
  free text is collapsed to single spaces so one review cannot break the line layout; empty reviews and
  summaries are left out of the target item's lists.
- A valid rating is a plain ASCII decimal ("4", "4.50"): no sign, exponent, fraction or words. Text before
  the first tag, between blocks and after </rate> is allowed, as in the released code.
- Metrics score an unparsable output with a caller-given fallback (e.g. the bias baseline); the released
  code counted such outputs as perfect predictions, which we never do.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from data import RATING_SCALE, Example, Item

# ---------------------------------------------------------------------------------------------------
# Tags and prompt
# ---------------------------------------------------------------------------------------------------

USER_OPEN, USER_CLOSE = "<analyze user>", "</analyze user>"
ITEM_OPEN, ITEM_CLOSE = "<analyze item>", "</analyze item>"
MATCH_OPEN, MATCH_CLOSE = "<match>", "</match>"
RATE_OPEN, RATE_CLOSE = "<rate>", "</rate>"
TAG_PAIRS = ((USER_OPEN, USER_CLOSE), (ITEM_OPEN, ITEM_CLOSE), (MATCH_OPEN, MATCH_CLOSE), (RATE_OPEN, RATE_CLOSE))

def full_system_prompt(scale: tuple[float, float] = RATING_SCALE) -> str:
    """The system prompt asking for the four tagged steps, for ratings on `scale` (the data's)."""
    return f"""You predict how much a user will like an item. You receive four fields: user_history (items the \
user rated before, with what they wrote), user_avg_rating, target_item (its details plus earlier ratings and \
reviews by other users) and target_item_avg_rating.

Think in four steps, and write each step inside its own pair of tags, in this order:
1. {USER_OPEN} ... {USER_CLOSE}: work out what this user cares about and how strictly they tend to rate, \
judging from their history.
2. {ITEM_OPEN} ... {ITEM_CLOSE}: name the key traits of the target item. Mark each point this user would \
probably like with [pos] and each point they would probably dislike with [neg].
3. {MATCH_OPEN} ... {MATCH_CLOSE}: weigh the preferences from step 1 against the [pos] and [neg] points \
from step 2 and explain how well the item fits this user.
4. {RATE_OPEN} ... {RATE_CLOSE}: write only the predicted rating, a number from {scale[0]:g} to {scale[1]:g} \
(decimals such as 3.5 are allowed), and nothing else.

Use each pair of tags exactly once."""


SYSTEM_PROMPT = full_system_prompt()


@dataclass
class PromptCaps:
    """Length limits for the user message (counts of history entries, characters per text field)."""

    max_user_history: int = 10
    max_item_history: int = 10
    summary_chars: int = 200
    text_chars: int = 400  # description and reviews
    title_chars: int = 120
    item_texts: bool = True  # show the target's earlier reviews and summaries (the paper does)
    # mark user-history entries that share a category with the target (ours, for the CPU demo's
    # from-scratch model; a pretrained LLM finds them without help)
    mark_shared: bool = False
    # which item fields the user-history blocks show after "k. Title, rating;" (all, as in the paper)
    history_fields: tuple[str, ...] = ("Title", "Categories", "Brand", "Price", "Summary", "Description", "Review")


SHARED_MARK = " (same category)"  # appended to a history block by PromptCaps.mark_shared


def _cut(text: str, cap: int) -> str:
    """Collapse whitespace, then keep at most `cap` characters, marking a cut with '...'."""
    text = " ".join(text.split())  # a newline inside a review would otherwise break the field layout
    # str slicing counts code points, so a cut never splits a multi-byte character.
    return text if len(text) <= cap else text[:cap].rstrip() + "..."


def _avg(value: float) -> str:
    # Rounded to 2 decimals; the released code printed raw floats such as 3.8571428571428572.
    return f"{value:.2f}" if math.isfinite(value) else "unknown"


def _item_fields(item: Item, caps: PromptCaps, summary: str = "", review: str = "", keep=None) -> str:
    """An item's features (plus one interaction's summary and review) as 'Name: value' joined by ' | '.
    `keep` limits the fields shown (None: all)."""
    fields = [
        ("Title", _cut(item.title, caps.title_chars)),
        ("Categories", _cut(", ".join(item.categories), caps.text_chars)),
        ("Brand", _cut(item.brand, caps.title_chars)),
        ("Price", "" if item.price is None else f"{item.price:.2f}"),
        ("Summary", _cut(summary, caps.summary_chars)),
        ("Description", _cut(item.description, caps.text_chars)),
        ("Review", _cut(review, caps.text_chars)),
    ]
    return " | ".join(f"{name}: {value}" for name, value in fields if value and (keep is None or name in keep))


def render_user_message(ex: Example, caps: PromptCaps = PromptCaps()) -> str:
    """Render the paper's four input fields: user history, user average, target item, item average."""
    user_hist = ex.user_history[-caps.max_user_history :] if caps.max_user_history > 0 else []
    blocks = []
    for k, (r, item) in enumerate(user_hist, 1):
        title = _cut(item.title, caps.title_chars) or f"item {item.item_id}"
        mark = SHARED_MARK if caps.mark_shared and set(item.categories) & set(ex.item.categories) else ""
        blocks.append(f"{k}. {title}, {r.rating:.1f};\n" + _item_fields(item, caps, r.summary, r.review,
                                                                     caps.history_fields) + mark)
    # Target item: fixed features once, then what earlier raters (other users) gave and wrote.
    item_hist = ex.item_history[-caps.max_item_history :] if caps.max_item_history > 0 else []
    ratings = ", ".join(f"{r.rating:.1f}" for r in item_hist)
    reviews = "; ".join(_cut(r.review, caps.text_chars) for r in item_hist if r.review.strip())
    summaries = "; ".join(_cut(r.summary, caps.summary_chars) for r in item_hist if r.summary.strip())
    fixed = _item_fields(ex.item, caps) or f"Item: {ex.item.item_id}"
    target = f"{fixed} | Ratings: [{ratings}]" + (f" | Reviews: [{reviews}] | Summaries: [{summaries}]" if caps.item_texts else "")
    history = "\n\n".join(blocks)
    return (
        f"user_history: {history}\n\n"
        f"user_avg_rating: {_avg(ex.user_avg)}\n\n"
        f"target_item: {target}\n\n"
        f"target_item_avg_rating: {_avg(ex.item_avg)}"
    )


# A one-sentence version for the CPU demo, whose from-scratch model learns the format from the cold start
# rather than from instructions: every prompt token costs compute in each training step.
SHORT_SYSTEM_PROMPT = (f"Predict the user's rating of the target item. Think in four steps: {USER_OPEN}, "
                       f"{ITEM_OPEN} with [pos] and [neg] points, {MATCH_OPEN}, then only the number in {RATE_OPEN}.")

# Appended to the user message when a RecOne teacher is asked to rationalise the true rating.
HINT = "\n\nThe user's actual rating of the target item was {rating:g}. Reason towards it and end with it."


def build_messages(ex: Example, caps: PromptCaps = PromptCaps(), system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
    """Chat messages for one example: the system prompt with the four steps, then the rendered inputs."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": render_user_message(ex, caps)}]


class Prompter:
    """Example -> prompt token ids: system + user message in the tokenizer's chat format, with the
    assistant's generation prompt. `hint` (a true rating) appends HINT, for rationalising teachers."""

    def __init__(self, tokenizer, caps: PromptCaps = PromptCaps(), system_prompt: str = SYSTEM_PROMPT):
        self.tok, self.caps, self.system = tokenizer, caps, system_prompt

    def __call__(self, ex: Example, hint: float | None = None) -> list[int]:
        msgs = build_messages(ex, self.caps, self.system)
        if hint is not None:
            msgs[1]["content"] += HINT.format(rating=hint)
        return self.tok.encode(self.tok.apply_chat(msgs))


# ---------------------------------------------------------------------------------------------------
# Parsing and reward
# ---------------------------------------------------------------------------------------------------

# A plain decimal: ASCII digits with an optional fraction. Rejects signs, exponents, "nan", "inf", "4/5"
# and non-ASCII digits (which Python's float() would accept).
_PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")


@dataclass
class ParsedOutput:
    """Result of checking one model output: format validity, the rating if valid, and the first failed check."""

    valid: bool
    rating: float | None
    reason: str  # "ok" when valid


def parse_output(text: str, scale: tuple[float, float] = RATING_SCALE) -> ParsedOutput:
    """Check the four-block format and read the rating (linear time, never raises): each tag exactly once,
    in order, the first three blocks non-empty, the rate a plain decimal within `scale`."""
    positions = []
    for tag in (t for pair in TAG_PAIRS for t in pair):
        count = text.count(tag)  # "<rate>" is not a substring of "</rate>", so counts never overlap
        if count != 1:
            return ParsedOutput(False, None, f"{'missing' if count == 0 else 'duplicate'} {tag}")
        positions.append((text.find(tag), tag))
    # Each tag occurs once, so pairwise order of neighbours in the expected sequence rules out nesting.
    for (pos_a, tag_a), (pos_b, tag_b) in zip(positions, positions[1:]):
        if pos_a > pos_b:
            return ParsedOutput(False, None, f"{tag_b} comes before {tag_a}")
    contents = []
    for k in range(0, 8, 2):
        (start, open_tag), (end, _) = positions[k], positions[k + 1]
        contents.append(text[start + len(open_tag) : end].strip())
    for (open_tag, _), content in zip(TAG_PAIRS[:3], contents[:3]):
        if not content:
            return ParsedOutput(False, None, f"empty {open_tag}")
    rate = contents[3]
    if _PLAIN_NUMBER.fullmatch(rate):
        value = float(rate)
        if scale[0] <= value <= scale[1]:
            return ParsedOutput(True, value, "ok")
    shown = rate if len(rate) <= 40 else rate[:40] + "..."
    return ParsedOutput(False, None, f"rate {shown!r} is not a number in [{scale[0]:g}, {scale[1]:g}]")


@dataclass
class RewardConfig:
    """Reward shape: R_format = +-format_reward, R_answer = 1 - |y - y_hat| / max_error, for ratings
    on `scale` (outside it an output is malformed)."""

    format_reward: float = 0.5
    max_error: float = 4.0
    scale: tuple[float, float] = RATING_SCALE


# RecZero paper: R_format = +-0.5, R_answer = 1 - |y - y_hat| / 4 (max_error 4 inferred from the 1-5 scale:
# the largest possible error, so R_answer spans [0, 1]; on another scale we keep that meaning).
# Released code (rec_rate_format.py): +-1 and 1 - |y - y_hat| / 2, whatever the scale.
REWARD_PRESETS = ("paper", "code")


def reward_config(preset: str, scale: tuple[float, float] = RATING_SCALE) -> RewardConfig:
    """The `--reward` preset for ratings on `scale`: paper -> +-0.5 and max_error = the scale's span
    (4 on 1-5, 4.5 on 0.5-5); code -> +-1 and max_error 2."""
    if preset == "paper":
        return RewardConfig(0.5, scale[1] - scale[0], scale)
    if preset == "code":
        return RewardConfig(1.0, 2.0, scale)
    raise ValueError(f"unknown reward preset {preset!r}; expected one of {REWARD_PRESETS}")


@dataclass
class Reward:
    """One output's reward and its parts."""

    total: float
    format: float
    answer: float
    valid: bool
    rating: float | None


def compute_reward(text: str, truth: float, cfg: RewardConfig = RewardConfig()) -> Reward:
    """R = R_format + R_answer (RecZero paper): -a when the format fails (R_answer = 0, as in the released
    code), else a + 1 - |y - y_hat| / max_error."""
    parsed = parse_output(text, cfg.scale)
    if not parsed.valid:
        return Reward(-cfg.format_reward, -cfg.format_reward, 0.0, False, None)
    answer = 1.0 - abs(truth - parsed.rating) / cfg.max_error  # RecZero paper: R_answer = 1 - |y - y_hat| / max_error
    return Reward(cfg.format_reward + answer, cfg.format_reward, answer, True, parsed.rating)


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


def rollout_metrics(rewards: list[Reward], truths: list[float], prompt_index, completion_lengths) -> dict:
    """A step's rollouts as the task sees them (reward parts, format share, training MAE): rewards[r] is row
    r's Reward, truths[p] prompt p's rating; prompt_index, completion_lengths (N,) (grpo.RolloutBatch's)."""
    rows = [(r, truths[p]) for r, p in zip(rewards, prompt_index.tolist())]
    errors = [abs(r.rating - y) for r, y in rows if r.valid]
    return {"reward_std": float(np.std([r.total for r in rewards])),
            "reward_format": float(np.mean([r.format for r in rewards])),
            "reward_answer": float(np.mean([r.answer for r in rewards])),
            "format_valid": len(errors) / len(rewards),
            "train_mae": float(np.mean(errors)) if errors else math.nan,
            "response_length_max": int(completion_lengths.max())}


@dataclass
class RatingMetrics:
    """MAE / RMSE over all examples (invalid ones scored by a fallback) and over the valid ones only."""

    n: int
    mae: float
    rmse: float
    valid_rate: float
    mae_valid: float
    rmse_valid: float
    pred_std: float
    true_std: float
    distinct: int  # distinct scored predictions after rounding to 2 decimals; 1 means a collapsed model
    # when the traces can be compared with a reference teacher's: the share agreeing on each field
    # and the share whose rating follows the trace's own judgements (plumbing/teachers.Fidelity)
    fidelity: dict | None = None
    top_rating: float = math.nan  # the most frequent scored prediction...
    top_share: float = 0.0  # ...and its share: near 1, the model answers one rating whatever the prompt
    expected: dict | None = None  # the expected-rating read-out's metrics (expected_rating), when asked


COLLAPSE_SHARE = 0.95  # a model that gives one rating to this share of examples has collapsed to it


def collapsed(m: RatingMetrics) -> bool:
    """Whether (nearly) every prediction is the same rating: a policy that ignores its prompt."""
    return m.top_share >= COLLAPSE_SHARE


def rating_metrics(preds: list[float | None], truths: list[float], fallback: list[float]) -> RatingMetrics:
    """Score predictions; None (or non-finite) counts as invalid and is replaced by fallback[i].

    The released code replaced an unparsable rating by the ground truth (a free perfect score); we never do.
    """
    if not (len(preds) == len(truths) == len(fallback)):
        raise ValueError(f"length mismatch: {len(preds)} preds, {len(truths)} truths, {len(fallback)} fallbacks")
    if not preds:
        raise ValueError("no predictions to score")
    valid = np.array([p is not None and math.isfinite(p) for p in preds])
    scored = np.array([p if ok else f for p, f, ok in zip(preds, fallback, valid)], dtype=float)
    truth = np.asarray(truths, dtype=float)
    err, v_err = scored - truth, (scored - truth)[valid]
    mae, rmse = float(np.mean(np.abs(err))), float(np.sqrt(np.mean(err**2)))
    mae_v = float(np.mean(np.abs(v_err))) if v_err.size else math.nan
    rmse_v = float(np.sqrt(np.mean(v_err**2))) if v_err.size else math.nan
    values, counts = np.unique(np.round(scored, 2), return_counts=True)
    return RatingMetrics(len(preds), mae, rmse, float(valid.mean()), mae_v, rmse_v,
                         float(np.std(scored)), float(np.std(truth)), len(values),
                         top_rating=float(values[counts.argmax()]), top_share=float(counts.max() / len(preds)))


def expected_rating(rating_logits, values):
    """Reason4Rec's read-out of a rating: (N, K) next-token logits of the K rating tokens ("1".."5") at the
    position where the model writes its rating, and their values (K,) -> (N,) sum_k p_k v_k, with p the
    softmax over those K tokens only (the rest of the vocabulary is ignored)."""
    p = torch.softmax(rating_logits.float(), dim=-1)  # Reason4Rec: probability-weighted rating over "1".."5"
    return p @ torch.as_tensor(values, dtype=p.dtype, device=p.device)


@dataclass
class Interval:
    """A paired comparison of two methods on the same examples: mean(loss_a - loss_b) and its interval."""

    diff: float  # e.g. MAE(a) - MAE(b): negative when a predicts better
    low: float
    high: float
    n: int  # examples compared

    def excludes_zero(self) -> bool:
        return self.high < 0 or self.low > 0


def paired_bootstrap(loss_a, loss_b, resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval:
    """The percentile bootstrap interval of mean(loss_a - loss_b) over the same n examples (Efron &
    Tibshirani 1993, ch. 13): resample the n examples with replacement, keeping each one's pair
    together, so what both methods find hard cancels. loss_a, loss_b: (n,) per-example losses, e.g.
    absolute errors (then diff is MAE(a) - MAE(b))."""
    a, b = np.asarray(loss_a, dtype=float), np.asarray(loss_b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired_bootstrap needs two equal-length lists of losses (got shapes {a.shape} and {b.shape})")
    if a.size < 2:  # one example resampled is itself: a zero-width interval that means nothing
        raise ValueError(f"too few test examples for an interval ({a.size})")
    d = a - b  # (n,)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # 1000 resamples at a time: (1000, n) indices in memory
        k = min(1000, resamples - start)
        means[start:start + k] = d[rng.integers(0, d.size, (k, d.size))].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(d.mean()), float(low), float(high), int(d.size))


# Student's t quantile t_{0.975, df} for df = 1..30 (any statistics table); above 30 the normal 1.96 is within 2%
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_interval(values) -> Interval:
    """The 95% t-interval of the mean of independent values, e.g. one MAE difference per seed:
    mean ± t_{0.975, n-1} * sd / sqrt(n). It measures the spread between seeds, which a paired
    bootstrap on one seed's test examples does not."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or v.size < 2:
        raise ValueError(f"mean_interval needs at least 2 values (got {v.size})")
    half = (_T975[v.size - 2] if v.size - 1 <= len(_T975) else 1.96) * v.std(ddof=1) / math.sqrt(v.size)
    return Interval(float(v.mean()), float(v.mean() - half), float(v.mean() + half), int(v.size))
