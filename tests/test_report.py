"""Tests for reczero.rollout_metrics, plumbing/bookkeeping.RunLog and plumbing/report.py: a step's rollout metrics
and the sample log group rows by their prompt index (never by row order), and the results table shows what
it is given."""

from __future__ import annotations

import json
import math

import pytest
import torch

from data import Example, Item, Rating
from grpo import RolloutBatch
from plumbing.bookkeeping import RunLog
from plumbing.report import results_table
from reczero import compute_reward, rating_metrics, rollout_metrics


def trace(rating: str) -> str:
    return f"<analyze user>u</analyze user><analyze item>i</analyze item><match>m</match><rate>{rating}</rate>"


def shuffled_batch(prompt_index: list[int], lengths: list[int]) -> RolloutBatch:
    n = len(prompt_index)
    return RolloutBatch(torch.zeros(n, 10, dtype=torch.long), torch.full((n,), 2), torch.tensor(lengths),
                        torch.zeros(n, dtype=torch.bool), torch.tensor(prompt_index), torch.zeros(n))


def test_rollout_metrics_group_rows_by_prompt_index():
    """Rows of two prompts interleaved (1, 0, 1, 0, 0): each row is scored against its own prompt's truth."""
    truths = [2.0, 5.0]  # prompt 0's true rating, prompt 1's
    index = [1, 0, 1, 0, 0]
    texts = [trace("5"), trace("2"), trace("4"), trace("2"), "no tags"]
    rewards = [compute_reward(t, truths[p]) for t, p in zip(texts, index)]
    batch = shuffled_batch(index, [7, 3, 9, 4, 2])
    m = rollout_metrics(rewards, truths, batch.prompt_index, batch.completion_lengths)
    # errors of the valid rows: |5-5|, |2-2|, |4-5|, |2-2| -> mean 0.25 (grouping by order would say 1.5)
    assert m["train_mae"] == pytest.approx(0.25)
    assert m["format_valid"] == pytest.approx(0.8)
    assert m["response_length_max"] == 9
    totals = [r.total for r in rewards]
    assert m["reward_std"] == pytest.approx(torch.tensor(totals).std(unbiased=False).item())
    assert m["reward_format"] == pytest.approx((4 * 0.5 - 0.5) / 5)


def test_rollout_metrics_with_no_valid_output():
    """No parsable rating in the step: format_valid 0 and train_mae nan (not 0, which would flatter)."""
    rewards = [compute_reward("nothing", 3.0)] * 2
    batch = shuffled_batch([0, 0], [1, 1])
    m = rollout_metrics(rewards, [3.0], batch.prompt_index, batch.completion_lengths)
    assert m["format_valid"] == 0.0 and math.isnan(m["train_mae"])


def example(rating: float) -> Example:
    target = Rating("u", "i", rating, 100)
    return Example(target, Item("i"), [], [], 3.0, 3.0)


def test_sample_log_writes_the_first_row_of_each_prompt(tmp_path):
    """samples.txt gets, for each of the first k prompts, its first row, found by prompt index."""
    log = RunLog(tmp_path, enabled=True)
    examples = [example(1.0), example(4.0), example(5.0)]
    texts = ["p1-a", "p0-a", "p1-b", "p0-b", "p2-a"]
    rewards = [compute_reward(t, 3.0) for t in texts]
    log.sample(7, examples, texts, rewards, [1, 0, 1, 0, 2], k=2)
    written = (tmp_path / "samples.txt").read_text()
    assert "truth 1 |" in written and "p0-a" in written and "truth 4 |" in written and "p1-a" in written
    assert "p0-b" not in written and "p1-b" not in written and "p2-a" not in written
    log({"step": 7, "mae": 0.5})
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": 7, "mae": 0.5}


def test_results_table_rows():
    """One markdown row per method, with the numbers it was given."""
    m = rating_metrics([4.0, None], [5.0, 3.0], [3.5, 3.5])
    table = results_table([("LLM", m)])
    assert "| LLM | 0.750 | " in table and "| 50% |" in table


def test_a_mostly_unparsable_row_says_so_in_words():
    """Outputs that mostly fail to parse are scored with the fallback, which can beat the model they
    replace: the row says so, so it is never read as an improvement."""
    truths, fallback = [1.0, 2.0, 4.0, 5.0], [1.5, 2.5, 3.5, 4.5]
    broken = rating_metrics([None, None, None, 5.0], truths, fallback)
    fine = rating_metrics([1.0, 3.0, 4.0, None], truths, fallback)
    table = results_table([("LLM after cold start", fine), ("LLM after GRPO", broken)])
    assert "| LLM after GRPO (mostly unparsable: 25% format valid" in table
    assert "| LLM after cold start |" in table


def test_resumed_log_survives_a_partial_line_and_keeps_one_copy_of_the_baselines(tmp_path):
    """A kill mid-write leaves half a line: resuming drops it (and records after the checkpoint's
    step, and the baselines the resumed run writes again) instead of failing."""
    lines = [{"stage": "baseline", "name": "MF", "mae": 0.7}, {"stage": "grpo", "step": 1, "loss": 0.1},
             {"stage": "grpo", "step": 2, "loss": 0.2}, {"stage": "grpo", "step": 3, "loss": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"stage": "gr')
    log = RunLog(tmp_path, enabled=True, resume_step=2)
    log({"stage": "baseline", "name": "MF", "mae": 0.7})
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r.get("step") for r in records] == [1, 2, None]
    assert sum(r["stage"] == "baseline" for r in records) == 1


def test_resuming_in_the_cold_start_drops_what_came_after_it(tmp_path):
    """A run killed after its cold start (the last checkpoint: the end of SFT, batch 12) is resumed from
    there: the records of the cold start's scoring and of GRPO are written again by the resumed run, so
    the log keeps only the teacher's record and the SFT epochs (they used to appear twice)."""
    lines = [{"stage": "baseline", "name": "MF", "mae": 0.7}, {"stage": "cold_start", "traces": 24},
             {"stage": "sft", "epoch": 1, "batch": 6, "loss": 2.0}, {"stage": "sft", "epoch": 2, "batch": 12, "loss": 1.0},
             {"stage": "test_start", "step": 0, "mae": 0.9}, {"stage": "eval", "step": 0, "mae": 0.8},
             {"stage": "grpo", "step": 1, "loss": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    RunLog(tmp_path, enabled=True, resume_step=0, resume_sft_batch=12)
    kept = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert kept == lines[1:4]
    RunLog(tmp_path, enabled=True, resume_step=0, resume_sft_batch=8)  # killed in the second epoch
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == lines[1:3]


def test_predictions_round_trip_and_paired_comparison(tmp_path):
    """write_predictions keeps the parsed rating (null when unparsable) and the scored one (the fallback
    then); compare pairs two files by example: its difference is MAE(a) - MAE(b), and two files that
    score different examples are refused."""
    from plumbing.report import compare, read_predictions, write_predictions

    examples = [Example(Rating(f"u{k}", "i1", y, 10 + k), Item("i1"), [], [], 3.0, 3.0)
                for k, y in enumerate([5.0, 3.0, 1.0])]
    write_predictions(tmp_path / "a.jsonl", examples, [4.0, None, 1.0], [3.5, 3.5, 3.5], ["t0", "t1", "t2"])
    write_predictions(tmp_path / "b.jsonl", examples, [3.0, 3.0, 3.0], [3.0, 3.0, 3.0])
    rows = read_predictions(tmp_path / "a.jsonl")
    assert rows[("u1", "i1", 11)] == {"user_id": "u1", "item_id": "i1", "time": 11, "label": 3.0, "rating": None,
                                      "scored": 3.5, "text": "t1"}
    iv = compare(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    # errors a: 1, 0.5, 0 (MAE 0.5); b: 2, 0, 2 (MAE 4/3)
    assert iv.diff == pytest.approx(0.5 - 4 / 3) and iv.n == 3 and iv.low <= iv.diff <= iv.high
    write_predictions(tmp_path / "c.jsonl", examples[:2], [3.0, 3.0], [3.0, 3.0])
    with pytest.raises(ValueError, match="different examples"):
        compare(tmp_path / "a.jsonl", tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"user_id": "u0"}\n')
    with pytest.raises(ValueError, match="d.jsonl line 1"):
        read_predictions(tmp_path / "d.jsonl")


class PieceTokenizer:
    """A test tokenizer over a list of pieces (greedy longest match), so a test chooses how a rating is
    written: "4" alone, or " 4" as one token."""

    def __init__(self, pieces: list[str]):
        self.pieces = [chr(c) for c in range(32, 127)] + pieces
        self.pad_id = 0

    def encode(self, text: str) -> list[int]:
        ids = []
        while text:
            k = max((i for i, p in enumerate(self.pieces) if text.startswith(p)), key=lambda i: len(self.pieces[i]))
            ids.append(k)
            text = text[len(self.pieces[k]):]
        return ids

    def decode(self, ids) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_rating_position_finds_the_token_that_starts_the_rating():
    from plumbing.report import rating_position

    tok = PieceTokenizer(["<rate>", " 4", " 3"])
    assert rating_position(tok, tok.encode("<match>m</match><rate>4</rate>")) == (17, "")
    assert rating_position(tok, tok.encode("<rate> 4 </rate>")) == (1, " ")  # the space is part of the token
    assert rating_position(tok, tok.encode("<rate>  5</rate>")) == (3, "")  # two plain spaces, then "5"
    assert rating_position(tok, tok.encode("<rate>x</rate>")) is None
    assert rating_position(tok, tok.encode("no tags, 4")) is None


def test_rating_tokens_refuse_what_cannot_be_read_at_one_position():
    from plumbing.report import rating_tokens

    assert rating_tokens(PieceTokenizer([]), (1.0, 5.0)) == ([1.0, 2.0, 3.0, 4.0, 5.0], {"": [17, 18, 19, 20, 21]})
    spaced = PieceTokenizer([f" {k}" for k in range(1, 6)])
    assert rating_tokens(spaced, (1.0, 5.0))[1][" "] == [95, 96, 97, 98, 99]
    with pytest.raises(ValueError, match="half stars"):
        rating_tokens(PieceTokenizer([]), (0.5, 5.0))
    multi = PieceTokenizer([])
    multi.encode = lambda text: [19, 19] if text == "3" else PieceTokenizer.encode(multi, text)  # "3": 2 tokens
    with pytest.raises(ValueError, match="one token"):
        rating_tokens(multi, (1.0, 5.0))


def test_expected_ratings_read_the_model_where_it_writes_its_rating():
    """On a tiny random model: one teacher-forced pass up to the rating; by hand, the softmax of the full
    forward's logits of "1".."5" at the token before the rating, weighted 1..5. A completion whose rating
    token carries a space is read with the " k" tokens; one without a rating is None."""
    from plumbing.report import expected_ratings
    from tiny_models import full_logits, tiny_model

    tok = PieceTokenizer([f" {k}" for k in range(1, 6)])
    model = tiny_model(seed=1)
    prompts = [[5, 9, 30, 41], [7, 8]]
    completions = [tok.encode("<m>x</m><rate>2</rate>"), tok.encode("ok <rate> 5</rate>"), tok.encode("none")]
    got = expected_ratings(model, tok, prompts + [[3]], completions, (1.0, 5.0), batch=2)

    def by_hand(ids, candidates):
        p = torch.softmax(full_logits(model, ids)[-1][candidates], -1)
        return float(p @ torch.arange(1.0, 6.0))

    digits, spaced = [tok.encode(str(k))[0] for k in range(1, 6)], [tok.encode(f" {k}")[0] for k in range(1, 6)]
    j0, j1 = completions[0].index(tok.encode("2")[0]), completions[1].index(tok.encode(" 5")[0])
    assert got[0] == pytest.approx(by_hand(prompts[0] + completions[0][:j0], digits), abs=1e-5)
    assert got[1] == pytest.approx(by_hand(prompts[1] + completions[1][:j1], spaced), abs=1e-5)
    assert got[2] is None and 1 < got[0] < 5
