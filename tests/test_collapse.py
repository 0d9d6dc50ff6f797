"""A policy that ignores its prompt (plumbing/collapse.py, bookkeeping.FlatWatch): the start check before
GRPO against the best constant, by hand; the collapse and flat-group warnings; and in a run, the lines
printed before GRPO and repeated in results.md."""

from __future__ import annotations


import pytest
from tiny_runs import TINY

import train
from data import Example, Item, Rating
from plumbing import bookkeeping, stages
from plumbing.bookkeeping import FlatWatch
from plumbing.collapse import collapse_note, labelled, start_check, start_line
from reczero import Reward, rating_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def examples(labels):
    return [Example(Rating(f"u{k}", "i", y, k), Item("i"), [], [], 3.0, 3.0) for k, y in enumerate(labels)]


class Fixed:
    """A fitted baseline that predicts one value (its mu) for every pair."""

    def __init__(self, value):
        self.mu = value

    def predict(self, user_id, item_id):
        return self.mu


BASELINES = {"constant": Fixed(4.0), "bias": Fixed(3.5), "mf": Fixed(4.5)}


def test_start_check_by_hand():
    """Labels 4, 4, 2, 5. The model rates 4, (unparsable), 2, 4: the unparsable one counts as the constant 4,
    so its errors are 0, 0, 0, 1 (MAE 0.25); the constant's 0, 0, 2, 1 (0.75); the bias's 0.5, 0.5, 1.5, 1.5
    (1.0). The model beats the constant by 0.5, inside its paired interval."""
    c = start_check(examples([4.0, 4.0, 2.0, 5.0]), [4.0, None, 2.0, 4.0], BASELINES)
    assert (c.n, c.mae, c.constant, c.constant_mae, c.bias_mae, c.diff) == (4, 0.25, 4.0, 0.75, 1.0, -0.5)
    assert c.beats_constant and c.low <= -0.5 <= c.high and c.mf_mae == 1.0  # 0.5, 0.5, 2.5, 0.5
    never = start_check(examples([4.0, 4.0, 2.0, 5.0]), [None] * 4, BASELINES)  # writes no rating at all
    assert never.mae == never.constant_mae and not never.beats_constant
    one = start_check(examples([3.0]), [3.0], BASELINES)  # one example: no interval
    assert one.low is None and one.beats_constant


def test_start_line_says_what_grpo_will_do_and_what_to_change():
    ex = examples([4.0, 4.0, 2.0, 5.0])
    m = rating_metrics([4.0, 4.0, 4.0, 4.0], [4.0, 4.0, 2.0, 5.0], [3.5] * 4)
    m.fidelity = {"taste": 0.26, "reception": 0.38}
    bad = start_line(start_check(ex, [4.0, 4.0, 4.0, 5.0][::-1], BASELINES), m, "recone")
    assert bad.startswith("warning: start check: the cold start's validation MAE 1.000 against 0.750 for always "
                          "answering 4")
    assert "GRPO is likely to settle on answering 4 everywhere" in bad and "taste 26%" in bad and "reception 38%" in bad
    assert all(fix in bad for fix in ("--cold-start-size", "--mark-shared on", "a larger model", "--teacher"))
    good = start_line(start_check(ex, [4.0, 4.0, 2.0, 5.0], BASELINES), m, "reczero")
    assert good.startswith("start check: the starting model's validation MAE 0.000") and "reads its prompt" in good
    m.valid_rate = 0.5
    assert "50% of its outputs parsable (the others count as the constant)" in start_line(
        start_check(ex, [4.0, None, 2.0, None], BASELINES), m, "recone")


def test_collapse_is_named_with_its_step_and_rating():
    truths = [1.0, 2.0, 3.0, 4.0, 5.0] * 4
    spread = rating_metrics([2.0, 3.0, 4.0, 4.0, 5.0] * 4, truths, truths)
    fallen = rating_metrics([4.0] * 19 + [3.0], truths, truths)
    assert collapse_note(10, spread) is None and labelled("LLM", spread) == "LLM"
    line = collapse_note(30, fallen)
    assert line.startswith("warning: collapse at step 30: 95% of the validation predictions are 4 ")
    assert labelled("LLM after GRPO", fallen) == "LLM after GRPO (collapsed: 95% of the predictions are 4)"


def test_flat_watch_warns_once_when_groups_stay_tied():
    """Nine tied steps say nothing; the tenth (window mean 0.96 >= 0.9) names the step and the rating
    sampled most (4 in 9 of 10 valid samples); it stays quiet while the share stays high, and warns
    again after it has fallen and risen."""
    watch = FlatWatch()
    fours = [Reward(1.0, 0.5, 0.5, True, 4.0)] * 9 + [Reward(1.0, 0.5, 0.5, True, 3.0), Reward(-0.5, -0.5, 0, False, None)]
    lines = [watch.update(step, 1.0 if step != 5 else 0.6, fours) for step in range(1, 11)]
    assert lines[:9] == [None] * 9
    assert lines[9].startswith("warning: step 10: over the last 10 steps 96% of the groups had equal rewards; "
                               "90% of the valid samples rated 4")
    assert watch.update(11, 1.0, fours) is None  # said once
    for step in range(12, 16):
        watch.update(step, 0.0, fours)  # the share falls below 0.9
    again = {step: watch.update(step, 1.0, fours) for step in range(16, 26)}
    assert [step for step, line in again.items() if line] == [24]  # steps 15-24: nine of ten tied


def test_a_run_checks_its_start_and_repeats_the_warnings_in_results(tmp_path, monkeypatch, capsys):
    """RecZero from the demo's random weights (no output parses): before step 1 the start check says it does
    not beat the best constant; with a flat window of 3, the tied groups are named at step 3; results.md
    repeats both under its table."""
    monkeypatch.setattr(bookkeeping, "FLAT_WINDOW", 3)
    out = tmp_path / "run"
    train.main(TINY + ["--mode", "reczero", "--steps", "3", "--out", str(out)])
    err = capsys.readouterr().err
    check = next(line for line in err.splitlines() if "start check" in line)
    assert "the starting model's validation MAE" in check and "does not beat the constant" in check
    assert "0% of its outputs parsable" in check and "--mode recone" in check
    assert err.index("start check") < err.index("GRPO:")  # before the first step
    assert "warning: step 3: over the last 3 steps 100% of the groups had equal rewards; no sample was in the format" in err
    results = (out / "results.md").read_text()
    assert "| best constant (the training median, " in results
    notes = results.split("Before and during GRPO:")[1]
    assert "does not beat the constant" in notes and "over the last 3 steps" in notes


def test_a_run_without_validation_examples_says_it_cannot_check(tmp_path, monkeypatch, capsys):
    load = stages.load_task

    def no_valid(cfg):
        task = load(cfg)
        task.valid = []
        return task

    monkeypatch.setattr(stages, "load_task", no_valid)
    train.main(TINY + ["--mode", "reczero", "--steps", "1", "--out", str(tmp_path / "run")])
    assert "start check: no validation examples" in capsys.readouterr().err
    assert "cannot be checked" in (tmp_path / "run" / "results.md").read_text()
