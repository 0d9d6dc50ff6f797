"""The flags and the task they assemble (plumbing/cli.py, plumbing/experiment.py): every bad flag stops
before any work with one line and exit code 2, and each data flag reaches the examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such file or directory"),
    (["--data", "x.csv", "--data-format", "parquet"], "invalid choice: 'parquet'"),
    (["--data", "/nonexistent.csv", "--data-format", "csv"], "--data /nonexistent.csv: no such file"),
    (["--data", "ratings.csv"], "--data needs --data-format"),
])
def test_cli_errors_exit_2_with_one_line(args, message):
    """Bad paths and flags: exit code 2 and one clear line on stderr, no traceback."""
    r = run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_cli_unreadable_data_file(tmp_path):
    """A data file with a bad row stops with the file, line and field named, exit code 2."""
    f = tmp_path / "ratings.csv"
    f.write_text("user_id,item_id,rating,timestamp\nu1,i1,4,100\nu2,i1,six,200\n")
    r = run_cli("--data", str(f), "--data-format", "csv", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "ratings.csv line 3" in r.stderr and "rating" in r.stderr


def test_half_star_data_sets_the_scale_of_prompt_reward_and_baselines(tmp_path):
    """A 0.5-5 dataset (MovieLens 20M) carries its scale to the baselines (a user who rates 0.5 is
    predicted below 1, not clipped to 1), the full system prompt and the reward."""
    from plumbing.cli import parse_args, prompt_settings
    from plumbing.experiment import load_task
    from reczero import compute_reward, reward_config

    rows, t = ["userId,movieId,rating,timestamp"], 0
    for user in range(1, 21):
        for item in range(1, 13):
            t += 1
            rating = 0.5 if user == 1 or item == 1 else 0.5 * (1 + (user * 7 + item * 3) % 10)
            rows.append(f"{user},{item},{rating},{t}")
    (tmp_path / "ratings.csv").write_text("\n".join(rows) + "\n")
    cfg = parse_args(["--data", str(tmp_path / "ratings.csv"), "--data-format", "ml-20m", "--model", str(tmp_path),
                      "--system-prompt", "full"])
    task = load_task(cfg)
    assert task.scale == (0.5, 5.0)
    assert task.baselines["bias"].predict("1", "1") < 0.9
    _, system = prompt_settings(cfg, task.scale)
    assert "a number from 0.5 to 5 " in system
    ok = "<analyze user>a</analyze user><analyze item>b</analyze item><match>c</match><rate>0.5</rate>"
    assert compute_reward(ok, 0.5, reward_config(cfg.reward, task.scale)).total == 1.5


def test_split_flag_reaches_the_data():
    """--split global cuts all ratings at one time (every test target after every training target);
    the default user-last does not."""
    from plumbing.cli import parse_args
    from plumbing.experiment import load_task

    def times(task, name):
        return [e.target.time for e in getattr(task, name)]

    cut = load_task(parse_args(["--synthetic-users", "150", "--split", "global"]))
    assert min(times(cut, "test")) >= max(times(cut, "valid"))
    assert min(times(cut, "valid")) >= max(times(cut, "train"))
    per_user = load_task(parse_args(["--synthetic-users", "150"]))
    assert min(times(per_user, "test")) < max(times(per_user, "train"))


@pytest.mark.parametrize("args, message", [
    (["--steps", "-1"], "--steps -1: must be >= 0"),
    (["--samples", "0"], "--samples 0: must be >= 2"),
    (["--samples", "1"], "--samples 1: must be >= 2 (GRPO compares"),
    (["--prompts-per-step", "0"], "--prompts-per-step 0: must be >= 1"),
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--lr", "-1"], "--lr -1.0: must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["--beta", "-1"], "--beta -1.0: must be >= 0"),
    (["--clip-low", "2"], "--clip-low 2.0: must be in [0, 1)"),
    (["--threads", "-3"], "--threads -3: must be >= 0"),
    (["--eval-size", "0"], "--eval-size 0: must be >= 1"),
    (["--max-grad-norm", "nan"], "--max-grad-norm nan: must be a finite number > 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm 0.0: must be > 0"),
    (["--temperature", "0"], "--temperature 0.0: must be > 0 (for training rollouts"),
    (["--rationalise-rate", "1.5"], "--rationalise-rate 1.5: must be in [0, 1]"),
    (["--lora-rank", "4"], "--lora-rank needs --model"),
    (["--fsdp"], "--fsdp shards the model across the processes of a torchrun job"),
])
def test_flags_that_make_no_sense_stop_before_any_work(args, message, capsys):
    """Every numeric flag is checked against its range at once: one line, exit code 2."""
    from plumbing.cli import check_args, parse_args

    with pytest.raises(SystemExit) as stop:
        check_args(parse_args(args))
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_every_numeric_flag_declares_its_range():
    """A new numeric flag cannot skip the checks: each int or float field of RunConfig has a Range."""
    import dataclasses
    import typing

    from plumbing.cli import RunConfig

    hints = typing.get_type_hints(RunConfig)
    unchecked = [f.name for f in dataclasses.fields(RunConfig)
                 if hints[f.name] in (int, float) and f.metadata["valid"] is None]
    assert not unchecked


def test_unknown_history_field_is_refused(capsys):
    """--history-fields Bogus used to show no field at all, silently."""
    from plumbing.cli import parse_args, prompt_settings

    with pytest.raises(SystemExit) as stop:
        prompt_settings(parse_args(["--history-fields", "Categories,Bogus"]))
    assert stop.value.code == 2 and "--history-fields: no field 'Bogus'; choose from Title, Categories" in \
        capsys.readouterr().err
    assert prompt_settings(parse_args(["--history-fields", "Title, Categories"]))[0].history_fields == \
        ("Title", "Categories")


def test_duplicate_ratings_are_reported_or_dropped(tmp_path, capsys):
    """The same (user, item, time) twice: a warning with the count, or --drop-duplicates keeps the first."""
    from plumbing.cli import parse_args
    from plumbing.experiment import load_task

    rows = [f"u{u},i{i},{1 + (u + i) % 5},{100 * u + i}" for u in range(12) for i in range(8)]
    f = tmp_path / "r.csv"
    f.write_text("user_id,item_id,rating,timestamp\n" + "\n".join(rows + rows[:5]) + "\n")
    warned = load_task(parse_args(["--data", str(f), "--data-format", "csv", "--model", str(tmp_path)]))
    assert "5 ratings repeat the (user, item, time) of an earlier one" in capsys.readouterr().err
    dropped = load_task(parse_args(["--data", str(f), "--data-format", "csv", "--model", str(tmp_path),
                                    "--drop-duplicates"]))
    assert "dropped 5 duplicate" in capsys.readouterr().out
    assert len(dropped.train) < len(warned.train)


def test_fsdp_is_how_a_run_is_launched_not_a_flag_a_resume_inherits(tmp_path):
    """A checkpoint written with --fsdp (one whole folder) resumes in one process without --no-fsdp."""
    from plumbing.cli import parse_args

    (tmp_path / "trainer_state.json").write_text(json.dumps(
        {"step": 2, "param_groups": [], "args": {"fsdp": True, "steps": 3, "lr": 5e-5}}))
    cfg = parse_args(["--resume", str(tmp_path)])
    assert cfg.fsdp is False and cfg.lr == 5e-5  # the other flags are still the checkpoint's
    assert parse_args(["--resume", str(tmp_path), "--fsdp"]).fsdp is True
