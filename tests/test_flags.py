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
    (["--max-user-history", str(10**23)], f"--max-user-history {10**23}: must be in [1, 10000] (entries shown"),
    (["--max-item-history", "0"], "--max-item-history 0: must be in [1, 10000]"),
    (["--dtype", "fp16", "--master-weights", "same"], "--dtype fp16 --master-weights same cannot train: fp16 "
                                                      "weights have no loss scaling here and AdamW's eps"),
    (["--extra-draws", "0", "--filter-groups"], "--extra-draws 0: must be >= 1"),
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


@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**64)], f"--seed {2**64}: must be in [0, {2**64 - 1}]"),
    (["--threads", "100000"], "--threads 100000: this machine has"),
    (["--clip-high", "1e39", "--mu", "2"], "--clip-high 1e+39: must be in [0, 100]"),
    (["--device", "tpu"], "--device tpu: choose auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], "--device cuda:x: choose auto, cpu, cuda or cuda:N"),
    (["--temperature", "1e-300"], "--temperature 1e-300: below 0.01 every completion of a group is the greedy one"),
    (["--lora-targets", ",", "--lora-rank", "4", "--model", "{model}"], "--lora-targets ',': names no layer"),
    (["--meta", "."], "--meta without --data"),
    (["--skip-bad-rows", "--drop-duplicates"], "--skip-bad-rows, --drop-duplicates without --data"),
    (["--eval-only"], "--eval-only scores --model or --resume"),
    (["--out", ""], "--out '': name the run's folder"),
    (["--out", __file__], f"--out {__file__}: a file, not a folder"),
    (["--sft-traces", "."], "--sft-traces .: a directory"),
    (["--system-prompt", "."], "--system-prompt .: not 'full', 'short' or a file"),
])
def test_cases_that_were_tracebacks_stop_before_any_work(args, message, tmp_path, capsys, monkeypatch):
    """Flags accepted by the checks that then failed with a traceback (or ran something else than
    asked): one line, exit code 2, before any work."""
    from plumbing.cli import check_args, parse_args

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    (tmp_path / "config.json").write_text("{}")  # what --model needs to pass the path checks
    with pytest.raises(SystemExit) as stop:
        check_args(parse_args([a.replace("{model}", str(tmp_path)) for a in args]))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_cuda_device_on_a_machine_without_one_is_refused(capsys, monkeypatch):
    """--device cuda without CUDA used to fail deep inside torch, even with --dry-run."""
    from plumbing.cli import check_device

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        check_device("cuda")
    assert stop.value.code == 2 and "--device cuda: no CUDA device is available here" in capsys.readouterr().err


@pytest.mark.parametrize("world, message", [
    ("abc", "WORLD_SIZE=abc: not a number of processes"),
    ("2", "WORLD_SIZE=2 but no RANK, MASTER_ADDR or MASTER_PORT: start the processes with torchrun"),
])
def test_world_size_without_torchrun_is_refused(world, message, capsys, monkeypatch):
    from plumbing.cli import check_args, parse_args

    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(SystemExit) as stop:
        check_args(parse_args([]))
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_system_prompt_file_must_be_text(tmp_path, capsys):
    """A binary or empty --system-prompt file is refused (a directory too, above)."""
    from plumbing.cli import parse_args, prompt_settings

    for content, word in ((b"\x00\x01\x02binary", "a binary file"), (b"\xff\xfe\x00", "not a readable UTF-8"),
                          (b"  \n", "empty")):
        (tmp_path / "p.txt").write_bytes(content)
        with pytest.raises(SystemExit):
            prompt_settings(parse_args(["--system-prompt", str(tmp_path / "p.txt")]))
        assert word in capsys.readouterr().err


def test_sft_traces_that_are_no_traces_are_refused(tmp_path, capsys):
    """An empty --sft-traces file (SFT then raised a ValueError) and a trace whose text is a number (a
    TypeError in the tokenizer) are one line each."""
    from data import Example, Item, Rating
    from plumbing.cli import parse_args
    from plumbing.experiment import TaskData, cold_start_traces

    task = TaskData([Example(Rating("u", "i", 4.0, 1), Item("i"), [], [], 3.0, 3.0)], [], [], {}, {}, (1.0, 5.0))
    for content, message in (("", "no traces in it"), ('{"user_id": "u", "item_id": "i", "time": 1, "text": 4}\n',
                                                       "line 1: not a trace of a training example (TypeError: text is int")):
        (tmp_path / "t.jsonl").write_text(content)
        with pytest.raises(SystemExit) as stop:
            cold_start_traces(parse_args(["--sft-traces", str(tmp_path / "t.jsonl")]), task, None, None, None,
                              lambda record: None)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_flags_a_mode_ignores_are_named(capsys):
    """--mode reczero has no cold start, and --sft-traces asks no teacher: the flags given for them are
    named in one warning instead of being dropped silently."""
    from plumbing.cli import parse_args

    parse_args(["--mode", "reczero", "--teacher", "x", "--cold-start-size", "5", "--sft-epochs", "3"])
    assert "warning: --mode reczero has no cold start: --teacher, --cold-start-size, --sft-epochs ignored" in \
        capsys.readouterr().err
    parse_args(["--sft-traces", "t.jsonl", "--teacher", "x"])
    assert "warning: --sft-traces gives the cold-start traces, so no teacher is asked: --teacher ignored" in \
        capsys.readouterr().err
    parse_args(["--sft-epochs", "3"])
    assert "warning" not in capsys.readouterr().err


def test_eval_only_of_a_training_checkpoint_uses_the_prompt_it_was_trained_with(tmp_path, capsys):
    """--eval-only --model RUN/checkpoint used to score a demo-trained model with the paper's prompt (full
    system prompt, 10/10 history, no shared marks, 1024 tokens); flags given explicitly still win."""
    from plumbing.cli import parse_args

    demo = {"system_prompt": "short", "max_user_history": 6, "max_item_history": 6, "history_fields": "Categories",
            "item_texts": "off", "mark_shared": "on", "max_new_tokens": 20, "lr": 0.5}
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 4, "param_groups": [], "args": demo}))
    cfg = parse_args(["--eval-only", "--model", str(tmp_path), "--max-user-history", "8"])
    assert (cfg.system_prompt, cfg.max_user_history, cfg.max_item_history, cfg.history_fields, cfg.item_texts,
            cfg.mark_shared, cfg.max_new_tokens) == ("short", 8, 6, "Categories", "off", "on", 20)
    assert cfg.lr == 2e-6  # only the prompt's flags are taken
    assert "--system-prompt short" in capsys.readouterr().out
    assert parse_args(["--model", str(tmp_path)]).max_new_tokens == 1024  # training from it: the flags' defaults


def test_eval_only_of_a_training_checkpoint_scores_its_own_data(tmp_path):
    """Without --data, --eval-only --model RUN/checkpoint scores the data the checkpoint was trained on: a
    demo run with --synthetic-users 150 and --seed 3 was scored on the default 1,200-user world of seed 0
    (a different synthetic world, silently). Given --data, the data flags are the user's."""
    from plumbing.cli import parse_args

    demo = {"data": None, "synthetic_users": 150, "seed": 3, "split": "global", "eval_size": 6, "lr": 0.5}
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 4, "param_groups": [], "args": demo}))
    cfg = parse_args(["--eval-only", "--model", str(tmp_path)])
    assert (cfg.data, cfg.synthetic_users, cfg.seed, cfg.split, cfg.eval_size) == (None, 150, 3, "global", 6)
    assert parse_args(["--eval-only", "--model", str(tmp_path), "--seed", "1"]).seed == 1  # given: it wins
    other = parse_args(["--eval-only", "--model", str(tmp_path), "--data", "x.csv", "--data-format", "csv"])
    assert (other.seed, other.split, other.eval_size) == (0, "user-last", 1000)


def test_resume_overrides_that_cannot_work_are_refused(tmp_path, capsys):
    """--resume-override lora_rank --lora-rank 0 (AdamW's moments have the adapters' shapes) and
    --resume-override mode --mode reczero of a checkpoint written in the cold-start SFT (a TypeError)."""
    from plumbing.cli import parse_args

    (tmp_path / "trainer_state.json").write_text(json.dumps(
        {"step": 0, "sft_step": 3, "param_groups": [], "args": {"lora_rank": 4, "model": "m", "mode": "recone"}}))
    for args, message in ((["--lora-rank", "0", "--resume-override", "lora_rank"], "--lora-rank cannot change"),
                          (["--mode", "reczero", "--resume-override", "mode"], "can only finish it (--mode recone)")):
        with pytest.raises(SystemExit):
            parse_args(["--resume", str(tmp_path), *args])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("config", ["grpo.GRPOConfig", "train.SFTConfig", "model.SamplingConfig"])
def test_a_stage_config_and_its_flags_have_one_default(config):
    """Each field a stage's dataclass shares with RunConfig has the flag's default (the paper's), so a
    stage built in a test or a notebook behaves as `python train.py --model M` would; the fields that
    are not flags are the ones the dataclass's docstring names."""
    import dataclasses
    import importlib

    from plumbing.cli import RunConfig

    module, name = config.split(".")
    cls = getattr(importlib.import_module(module), name)
    flags = {f.name: f for f in dataclasses.fields(RunConfig)}
    fields = dataclasses.fields(cls)
    assert [f.name for f in fields if f.name in flags and f.default != flags[f.name].default] == []
    not_flags = {f.name for f in fields} - set(flags)
    assert not_flags == {"GRPOConfig": {"adv_eps", "logprob_chunk", "share_prompt"}, "SFTConfig": set(),
                         "SamplingConfig": {"stop_ids"}}[name]
    assert all(n in (cls.__doc__ or "") for n in not_flags if name == "GRPOConfig")


def test_the_test_examples_do_not_depend_on_the_validation_size():
    """Validation and test subsets came from one random stream, so --eval-only with another --valid-size
    than the run's scored other test examples, silently (bias 0.859 against the run's 1.091)."""
    from plumbing.cli import parse_args
    from plumbing.experiment import load_task

    def test_keys(valid_size):
        cfg = parse_args(["--synthetic-users", "60", "--split", "global", "--eval-size", "20",
                          "--valid-size", str(valid_size)])
        return [e.target.key for e in load_task(cfg).test]

    assert test_keys(5) == test_keys(17)


def test_auto_dtype_is_bf16_where_the_cpu_has_bf16_units(tmp_path, monkeypatch):
    """--dtype auto: bf16 on CUDA, and for a real checkpoint on a CPU whose flags name bf16 matrix units
    (AMX, AVX512-BF16, Arm's BF16); fp32 on other CPUs and always for the demo."""
    import torch

    from plumbing import stages

    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f amx_bf16 amx_tile\n")
    plain.write_text("processor : 0\nflags : fpu sse2 avx2 fma\n")
    assert stages.cpu_bf16_units(str(amx)) and not stages.cpu_bf16_units(str(plain))
    assert not stages.cpu_bf16_units(str(tmp_path / "missing"))
    monkeypatch.setattr(stages, "cpu_bf16_units", lambda: True)
    assert stages.auto_dtype("cpu", demo=False) == torch.bfloat16
    assert stages.auto_dtype("cpu", demo=True) == torch.float32  # the demo's numbers: the same everywhere
    monkeypatch.setattr(stages, "cpu_bf16_units", lambda: False)
    assert stages.auto_dtype("cpu", demo=False) == torch.float32
    assert stages.auto_dtype("cuda", demo=True) == stages.auto_dtype("cuda:1", demo=False) == torch.bfloat16
