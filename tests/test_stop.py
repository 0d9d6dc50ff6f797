"""A stop request is honoured in seconds wherever the run is: during an evaluation (validation, the cold
start's or the final test, the baselines, the teacher's traces) the first Ctrl-C or SIGTERM gives the
evaluation up at once, the last step's checkpoint stands (or is written), and --resume does the
evaluation again and finishes exactly as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal

import pytest
from tiny_runs import TINY, metrics, varied_rewards

import train
from plumbing import report
from plumbing.bookkeeping import Abandoned, GracefulStop

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_signal_inside_an_evaluation_abandons_it_and_outside_waits_for_the_step():
    stop = GracefulStop()
    with stop.installed():
        with pytest.raises(Abandoned) as e, stop.abandoning("the validation"):
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the evaluation went on after the signal")
        assert e.value.what == "the validation" and stop.requested == "SIGINT"
        with pytest.raises(Abandoned):  # asked before it started: not started
            with stop.abandoning("the final test"):
                pytest.fail("an evaluation started after a stop request")
    waits = GracefulStop()
    with waits.installed():
        os.kill(os.getpid(), signal.SIGTERM)  # between steps: only noted
        assert waits.requested == "SIGTERM" and waits.evaluating is None
    quiet = GracefulStop(saves=False)  # --eval-only: nothing to save, so the first signal stops
    with quiet.installed(), pytest.raises(KeyboardInterrupt), quiet.abandoning("the test"):
        os.kill(os.getpid(), signal.SIGINT)


def signal_during(monkeypatch, desc: str, after_calls: int = 1):
    """SIGINT from inside the evaluation named `desc`, after its first `after_calls` decoding batches; returns
    the list of every (desc, batch) decoded, to see that none followed the signal."""
    real_evaluate, real_generate, calls = report.evaluate, report.generate, []
    current = {}

    def evaluate(*a, **k):
        current["desc"] = k.get("desc")
        return real_evaluate(*a, **k)

    def generate(*a, **k):
        calls.append(current.get("desc"))
        if current.get("desc") == desc and calls.count(desc) == after_calls:
            os.kill(os.getpid(), signal.SIGINT)
        return real_generate(*a, **k)

    monkeypatch.setattr(report, "generate", generate)
    monkeypatch.setattr(report, "evaluate", evaluate)
    from plumbing import stages
    monkeypatch.setattr(stages, "evaluate", evaluate)
    return calls


# a validation of 300 examples of up to 400 tokens: minutes if it ran to its end, one batch when abandoned
LONG_VALID = ["--valid-size", "300", "--max-new-tokens", "40"]


def test_a_stop_during_validation_saves_the_step_and_resume_validates_it_first(tmp_path, monkeypatch, capsys):
    """SIGINT in the first batch of step 2's validation: no other batch is decoded, step 2 is saved with its
    validation due, exit 130; --resume validates step 2 first and steps 3-4 equal an uninterrupted run's."""
    varied_rewards(monkeypatch)
    args = TINY + LONG_VALID + ["--steps", "4", "--save-every", "4"]
    whole = tmp_path / "whole"
    train.main(args + ["--out", str(whole)])
    calls = signal_during(monkeypatch, "valid", after_calls=6)  # step 0's 5 batches, then step 2's first
    out = tmp_path / "stopped"
    with pytest.raises(SystemExit) as stop:
        train.main(args + ["--out", str(out)])
    err = capsys.readouterr().err
    assert stop.value.code == 130 and "SIGINT: abandoning the validation" in err
    assert "stopping at step 2, before its validation: saving" in err
    assert calls.count("valid") == 6  # nothing decoded after the signal
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["validation_due"] is True and state["tested"] is False
    monkeypatch.undo()
    varied_rewards(monkeypatch)
    train.main(["--resume", str(out / "checkpoint")])
    a, b = metrics(whole), metrics(out)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], abs=1e-6)
    va, vb = metrics(whole, "eval"), metrics(out, "eval")
    assert sorted(vb) == [0, 2, 4] and all(va[k]["mae"] == pytest.approx(vb[k]["mae"]) for k in va)


def test_a_stop_during_the_final_test_leaves_a_checkpoint_that_resume_tests(tmp_path, monkeypatch, capsys):
    """SIGINT in the final test's first batch: it is given up, the last step's checkpoint stands, and no
    results.md is written; --resume runs the test only; once it is written, --resume has nothing to do."""
    out = tmp_path / "run"
    signal_during(monkeypatch, "test (GRPO)")
    with pytest.raises(SystemExit) as stop:
        train.main(TINY + ["--mode", "reczero", "--steps", "1", "--eval-size", "150", "--out", str(out)])
    err = capsys.readouterr().err
    assert stop.value.code == 130 and "SIGINT: abandoning the test (GRPO)" in err
    assert f"stopped: the test (GRPO) abandoned; {out / 'checkpoint'} (step 1) stands: --resume" in err
    assert not (out / "results.md").exists()
    monkeypatch.undo()
    train.main(["--resume", str(out / "checkpoint")])
    assert "LLM after GRPO" in (out / "results.md").read_text()
    assert len(metrics(out, "test")) == 1
    with pytest.raises(SystemExit) as again:
        train.main(["--resume", str(out / "checkpoint")])
    assert again.value.code == 2 and "nothing to do" in capsys.readouterr().err


def test_a_stop_during_the_cold_starts_test_resumes_into_it(tmp_path, monkeypatch, capsys):
    """SIGINT while the cold start is scored: the SFT's last checkpoint stands; --resume scores it and goes on."""
    out = tmp_path / "run"
    signal_during(monkeypatch, "test (cold start)")
    with pytest.raises(SystemExit) as stop:
        train.main(TINY + ["--steps", "1", "--eval-size", "150", "--out", str(out)])
    assert stop.value.code == 130
    assert "(the end of the cold-start SFT) stands" in capsys.readouterr().err
    monkeypatch.undo()
    train.main(["--resume", str(out / "checkpoint")])
    assert "LLM after cold start" in (out / "results.md").read_text()


# -----------------------------------------------------------------------------
# The reliability probe's last cases (each failed before its fix)


def test_a_cold_start_that_applied_no_batch_stops_naming_the_cause(tmp_path, monkeypatch, capsys):
    """Every SFT batch skipped as non-finite (fewer than the 3 in a row that stop a run): the random weights
    were reported as "LLM after cold start" and the run exited 0."""
    def never(optimizer, params, loss, max_grad_norm, ranks=None):
        optimizer.zero_grad(set_to_none=True)
        return float("nan"), False

    monkeypatch.setattr(train.grpo, "optimizer_step", never)
    with pytest.raises(SystemExit) as stop:
        train.main(TINY + ["--steps", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 3 and "the cold-start SFT applied none of its 1 batches" in err
    assert not (tmp_path / "run" / "cold_start").exists() and not (tmp_path / "run" / "results.md").exists()


def test_one_test_example_gives_no_interval(tmp_path):
    """A paired bootstrap over one example is that example: the table said "excludes 0: yes" for a
    zero-width interval."""
    from reczero import paired_bootstrap

    with pytest.raises(ValueError, match="too few test examples for an interval"):
        paired_bootstrap([0.5], [1.0])
    train.main(TINY + ["--mode", "reczero", "--steps", "1", "--eval-size", "1", "--out", str(tmp_path / "run")])
    results = (tmp_path / "run" / "results.md").read_text()
    assert "too few test examples for an interval" in results and "| yes |" not in results


def test_a_relative_out_resumes_from_any_directory_and_a_failed_run_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """--out runs/x stored as given: --resume from another directory wrote into a new runs/x there (a
    stray folder with .lock, metrics.jsonl and predictions/) and failed. A run that fails its checks
    (here: unreadable data) leaves no folder behind."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    train.main(TINY + ["--mode", "reczero", "--steps", "1", "--out", "runs/x"])
    monkeypatch.chdir(tmp_path / "b")
    train.main(["--resume", "../a/runs/x/checkpoint", "--steps", "2"])
    assert sorted(metrics(tmp_path / "a" / "runs" / "x")) == [1, 2] and list((tmp_path / "b").iterdir()) == []
    (tmp_path / "bad.csv").write_text("user,item\n")
    with pytest.raises(SystemExit) as stop:
        train.main(["--data", str(tmp_path / "bad.csv"), "--data-format", "csv", "--out", "never", "--threads", "1"])
    assert stop.value.code == 2 and not (tmp_path / "b" / "never").exists()
