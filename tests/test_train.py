"""End-to-end tests of train.py on tiny settings: it runs, learns parameters, resumes exactly (in the
cold start and in GRPO), stops cleanly on a signal or a divergence, and keeps its checkpoints whole."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny_runs import TINY, metrics, varied_rewards

import grpo
import train
from plumbing import bookkeeping, experiment, stages
from plumbing.checkpoints import load_model
from plumbing.experiment import demo_model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted 4-step demo run, shared by the tests below (with varied_rewards)."""
    out = tmp_path_factory.mktemp("run") / "a"
    with pytest.MonkeyPatch.context() as mp:
        varied_rewards(mp)
        train.main(TINY + ["--out", str(out), "--steps", "4", "--save-every", "2"])
    return out


SFT_ARGS = TINY + ["--sft-epochs", "3", "--sft-batch", "4", "--steps", "2"]  # 18 SFT batches, then 2 GRPO steps


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """One uninterrupted run with a longer cold start (SFT_ARGS, varied_rewards), shared by the tests
    that stop or kill the cold start and resume it."""
    out = tmp_path_factory.mktemp("run") / "whole"
    with pytest.MonkeyPatch.context() as mp:
        varied_rewards(mp)
        train.main(SFT_ARGS + ["--out", str(out)])
    return out


def test_end_to_end_tiny_run(tiny_run):
    """The demo pipeline runs: finite losses each step, a results table, a reloadable checkpoint."""
    steps = metrics(tiny_run)
    assert sorted(steps) == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([s["loss"], s["grad_norm"], s["reward_mean"]])).all() for s in steps.values())
    assert "LLM after GRPO" in (tiny_run / "results.md").read_text()
    state = json.loads((tiny_run / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4
    model = load_model(tiny_run / "checkpoint")  # the checkpoint is a plain HF-layout model
    assert model.config.arch == "qwen2"
    assert (tiny_run / "cold_start" / "model.safetensors").exists()


def test_resume_replays_the_same_steps(tiny_run, tmp_path, monkeypatch):
    """Stopping after step 2 and resuming gives the metrics of steps 3 and 4 of the uninterrupted run."""
    varied_rewards(monkeypatch)
    out = tmp_path / "b"
    train.main(TINY + ["--out", str(out), "--steps", "2"])
    train.main(TINY + ["--out", str(out), "--steps", "4", "--resume", str(out / "checkpoint")])
    a, b = metrics(tiny_run), metrics(out)
    assert sorted(b) == [1, 2, 3, 4]  # the resumed run's log continues, without duplicates
    for step in (3, 4):
        assert a[step]["grad_norm"] > 0  # the steps compared really update the weights
        for key in ("reward_mean", "loss", "grad_norm", "response_length_mean"):
            assert a[step][key] == pytest.approx(b[step][key], abs=1e-6), (step, key)
    ea, eb = metrics(tiny_run, "eval"), metrics(out, "eval")
    assert sorted(eb) == [0, 2, 4] and all(ea[s]["mae"] == pytest.approx(eb[s]["mae"]) for s in ea)
    state = [json.loads((d / "checkpoint" / "trainer_state.json").read_text()) for d in (tiny_run, out)]
    assert state[0]["best"]["step"] == state[1]["best"]["step"]  # the best-so-far survives the resume


def test_select_best_scores_the_weights_of_the_best_validation_mae(tiny_run):
    """--select best (the demo default): the test row is the step with the lowest validation MAE."""
    evals = metrics(tiny_run, "eval")
    assert sorted(evals) == [0, 2, 4]  # step 0 = the cold-start model, then every --eval-every steps
    best = min(evals, key=lambda s: (evals[s]["mae"], s))
    (test,) = metrics(tiny_run, "test").values()
    assert test["step"] == best
    assert f"best valid MAE: step {best} of 4" in (tiny_run / "results.md").read_text()
    state = json.loads((tiny_run / "checkpoint" / "trainer_state.json").read_text())
    assert state["best"]["step"] == best and state["best"]["mae"] == pytest.approx(evals[best]["mae"])
    saved = load_model(tiny_run / "best")
    reference = load_model(tiny_run / ("cold_start" if best == 0 else "checkpoint"))
    if best in (0, 4):  # those weights are on disk elsewhere too: they must be the same tensors
        for (name, p), q in zip(saved.named_parameters(), reference.parameters()):
            assert torch.equal(p, q), name


def test_select_last_scores_the_final_weights(tmp_path):
    """--select last: no best/ copy, and the test row is the final step."""
    out = tmp_path / "last"
    train.main(TINY + ["--out", str(out), "--steps", "2", "--select", "last"])
    (test,) = metrics(out, "test").values()
    assert test["step"] == 2 and not (out / "best").exists()
    assert "LLM after GRPO (step 2)" in (out / "results.md").read_text()


def test_one_grpo_step_changes_every_parameter():
    """After one GRPO update with non-zero advantages, every parameter tensor of the model has moved."""
    torch.manual_seed(0)
    model = demo_model(vocab_size=64, eos=0, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(1, 64, (4, 12))
    batch = grpo.RolloutBatch(ids, torch.tensor([6, 6, 5, 5]), torch.tensor([6, 4, 7, 3]),
                              torch.zeros(4, dtype=torch.bool), torch.tensor([0, 0, 1, 1]),
                              torch.tensor([1.0, 0.0, 0.2, 0.9]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    metrics = grpo.grpo_update(model, opt, batch, grpo.GRPOConfig())
    assert metrics["skipped"] == 0.0
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged


def test_bf16_autocast_with_fp32_master_weights(tmp_path):
    """--dtype bf16 computes under autocast while the trained weights (and checkpoint) stay fp32."""
    out = tmp_path / "bf16"
    train.main(TINY + ["--out", str(out), "--steps", "1", "--dtype", "bf16"])
    step = metrics(out)[1]
    assert torch.isfinite(torch.tensor([step["loss"], step["grad_norm"]])).all()
    assert load_model(out / "checkpoint").embed_tokens.weight.dtype == torch.float32


def test_checkpoint_as_teacher(tiny_run, tmp_path, capsys):
    """--teacher DIR samples traces from a checkpoint; when none ends at the truth, one clear line, exit 2."""
    out = tmp_path / "t"
    with pytest.raises(SystemExit) as stop:  # the barely trained tiny model never hits the true rating
        train.main(TINY + ["--out", str(out), "--steps", "1", "--teacher", str(tiny_run / "cold_start")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "none of the 24 teacher traces ended at the true rating" in err


def test_rl_that_cannot_start_says_so(tmp_path, capsys):
    """RecZero on the demo's random weights: warned before any work, the progress bar shows no signal,
    and after NO_SIGNAL_STEPS flat steps without a formatted completion one warning says why."""
    out = tmp_path / "zero"
    train.main(TINY + ["--mode", "reczero", "--steps", str(bookkeeping.NO_SIGNAL_STEPS + 1), "--out", str(out)])
    err = capsys.readouterr().err
    assert "--mode reczero on the embedded demo" in err.split("\n")[0]
    assert "signal=none" in err
    assert err.count(f"warning: {bookkeeping.NO_SIGNAL_STEPS} steps without a single completion") == 1
    steps = metrics(out)
    assert all(r["frac_reward_zero_std"] == 1.0 and r["format_valid"] == 0 for r in steps.values())
    assert (out / "start" / "model.safetensors").exists()  # the KL reference (--beta 0.3) of random weights


def test_a_run_whose_steps_keep_failing_stops_without_saving(tmp_path, monkeypatch, capsys):
    """From step 2 every update is non-finite (as after --lr 1e30): the run stops after MAX_BAD_STEPS of
    them with exit code 3, and the checkpoint on disk stays the last good one (step 1)."""
    real = grpo.grpo_update

    def failing(policy, opt, batch, cfg, *rest):
        metrics = real(policy, opt, batch, cfg, *rest)
        if failing.calls:
            opt.zero_grad(set_to_none=True)
            metrics.update(skipped=1.0, loss=float("nan"))
        failing.calls += 1
        return metrics

    failing.calls = 0
    monkeypatch.setattr(grpo, "grpo_update", failing)
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as stop:
        train.main(TINY + ["--steps", "8", "--save-every", "1", "--out", str(out)])
    assert stop.value.code == 3
    assert f"{bookkeeping.MAX_BAD_STEPS} steps in a row (to step {1 + bookkeeping.MAX_BAD_STEPS})" in capsys.readouterr().err
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 1
    assert not (out / "results.md").exists()


def test_resume_takes_the_checkpoints_flags_and_refuses_changes(tiny_run, tmp_path, capsys):
    """--resume alone continues with the checkpoint's flags (not the demo's 1,200 users); a flag that
    changes what the run computes is refused, listed, unless named in --resume-override; --steps at or
    below the checkpoint's step says there is nothing to do."""
    from plumbing.cli import parse_args

    ckpt = str(tiny_run / "checkpoint")
    cfg = parse_args(["--resume", ckpt, "--steps", "6"])
    assert (cfg.synthetic_users, cfg.samples, cfg.steps, cfg.out) == (150, 3, 6, str(tiny_run))

    def refused(args) -> str:
        with pytest.raises(SystemExit) as stop:
            parse_args(["--resume", ckpt, *args])
        assert stop.value.code == 2
        return capsys.readouterr().err

    err = refused(["--steps", "6", "--synthetic-users", "300", "--lr", "0.5"])
    assert "--synthetic-users 300 (checkpoint: 150)" in err and "--lr 0.5 (checkpoint: 0.0001)" in err
    assert parse_args(["--resume", ckpt, "--steps", "6", "--lr", "0.5", "--resume-override", "lr"]).lr == 0.5
    assert "--steps 4: the checkpoint is already at step 4" in refused(["--steps", "4"])
    assert parse_args(["--resume", ckpt, "--dry-run"]).dry_run  # planning needs no more steps
    assert "no flag --bogus" in refused(["--steps", "6", "--resume-override", "bogus"])


def test_resume_on_other_data_is_refused(tiny_run, tmp_path, capsys):
    """The same flags on changed data: the examples' fingerprint differs from the checkpoint's."""
    import shutil

    ckpt = tmp_path / "checkpoint"
    shutil.copytree(tiny_run / "checkpoint", ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["data_fingerprint"] = "0" * 16  # as if written on other data
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(SystemExit) as stop:
        train.main(["--resume", str(ckpt), "--steps", "6", "--out", str(tmp_path / "o")])
    assert stop.value.code == 2 and "the examples differ from those the checkpoint was trained on" in \
        capsys.readouterr().err


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_the_cold_start_saves_and_resume_finishes_it_identically(sig, sft_run, tmp_path, monkeypatch,
                                                                                   capsys):
    """SIGTERM (what schedulers send) or Ctrl-C in the middle of the cold-start SFT: the batch finishes,
    a checkpoint with the SFT's progress and AdamW state is written, exit code 130; --resume finishes
    the SFT and the cold-start weights equal those of an uninterrupted run."""
    import os
    import signal

    from safetensors.torch import load_file

    varied_rewards(monkeypatch)
    args = SFT_ARGS
    real, calls = grpo.token_logprobs, []

    def signalled(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # during the second SFT batch
            os.kill(os.getpid(), getattr(signal, sig))
        return real(*a, **k)

    monkeypatch.setattr(grpo, "token_logprobs", signalled)
    out = tmp_path / "cut"
    with pytest.raises(SystemExit) as stop:
        train.main(args + ["--out", str(out)])
    assert stop.value.code == 130 and "stopping in the cold-start SFT at batch 2" in capsys.readouterr().err
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert (state["step"], state["sft_step"]) == (0, 2) and not (out / "cold_start").exists()
    monkeypatch.setattr(grpo, "token_logprobs", real)
    train.main(["--resume", str(out / "checkpoint")])
    whole, resumed = (load_file(str(d / "cold_start" / "model.safetensors")) for d in (sft_run, out))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert [r["mae"] for r in metrics(out, "test").values()] == \
        [r["mae"] for r in metrics(sft_run, "test").values()]
    # and GRPO after the resumed SFT starts from fresh AdamW moments, as in the uninterrupted run: step 2
    # shows the first update
    assert metrics(out)[2]["grad_norm"] > 0
    for key in ("loss", "grad_norm", "reward_mean"):
        assert metrics(out)[2][key] == pytest.approx(metrics(sft_run)[2][key], abs=1e-6), key


def test_sigterm_during_grpo_finishes_the_step_saves_and_resumes_exactly(tiny_run, tmp_path, monkeypatch, capsys):
    """SIGTERM in the middle of GRPO step 2's update: the step completes and is saved (never half
    applied), exit code 130, and --resume replays steps 3-4 as the uninterrupted run took them."""
    import os
    import signal

    varied_rewards(monkeypatch)
    real, calls = grpo.grpo_update, []

    def signalled(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(grpo, "grpo_update", signalled)
    out = tmp_path / "term"
    with pytest.raises(SystemExit) as stop:
        train.main(TINY + ["--out", str(out), "--steps", "4"])
    assert stop.value.code == 130 and "stopping at step 2" in capsys.readouterr().err
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    monkeypatch.setattr(grpo, "grpo_update", real)
    train.main(["--resume", str(out / "checkpoint")])
    a, b = metrics(tiny_run), metrics(out)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert a[step]["grad_norm"] > 0
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], abs=1e-6)
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], abs=1e-6)


def test_a_tokenizer_larger_than_the_embedding_is_refused_at_load(tmp_path, capsys):
    """A tokenizer with more tokens than the model has embedding rows (SmolLM2's 49,152 against a config
    of 40,000) used to load and then fail at the first forward pass: now one line before any work."""
    from plumbing.checkpoints import save_model
    from plumbing.tokenizer import train_bpe
    from tests.tiny_models import tiny_model

    tok = train_bpe(["the user likes drama and the item is acclaimed"] * 50, tmp_path / "tok", vocab_size=300)
    save_model(tiny_model(vocab_size=tok.vocab_size - 10), tmp_path / "m", tmp_path / "tok")
    with pytest.raises(SystemExit) as stop:
        train.main(["--model", str(tmp_path / "m"), "--eval-only", "--synthetic-users", "150", "--eval-size", "6"])
    assert stop.value.code == 2
    assert f"the tokenizer has {tok.vocab_size} tokens but the model's embedding only {tok.vocab_size - 10}" in \
        capsys.readouterr().err


def test_checkpoint_housekeeping(tiny_run, tmp_path, monkeypatch, capsys):
    """Leftovers of killed writes are removed by the next write; a lone checkpoint.old (a kill between
    the two renames) is put back by --resume; a full disk, a missing optimizer file and a cut
    trainer_state.json are one line each, never a traceback."""
    import shutil

    import plumbing.checkpoints as ckpt
    from tests.tiny_models import tiny_model

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "checkpoint.tmp-killed").mkdir()
    ckpt.save_model(tiny_model(), run / "checkpoint2")
    ckpt.save_model(tiny_model(), run / "checkpoint")  # its own leftovers go
    assert not (run / "checkpoint.tmp-killed").exists()
    shutil.copytree(tiny_run / "checkpoint", run / "checkpoint", dirs_exist_ok=True)

    os.replace(run / "checkpoint", run / "checkpoint.old")
    from plumbing.cli import parse_args
    assert parse_args(["--resume", str(run / "checkpoint"), "--steps", "5"]).steps == 5
    assert (run / "checkpoint" / "trainer_state.json").exists() and not (run / "checkpoint.old").exists()
    assert "recovered from checkpoint.old" in capsys.readouterr().out

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ckpt, "save_file", full)
        with pytest.raises(ckpt.CheckpointError, match="could not be written .the previous one is intact.: No space"):
            ckpt.save_model(tiny_model(), run / "checkpoint2")
    assert not list(run.glob("checkpoint2.tmp-*"))

    def resumed_error(corrupt) -> str:
        broken = tmp_path / "broken"
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(tiny_run / "checkpoint", broken)
        corrupt(broken)
        with pytest.raises(SystemExit) as stop:
            train.main(["--resume", str(broken), "--steps", "5", "--out", str(tmp_path / "o")])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    assert "optimizer.safetensors: missing" in resumed_error(lambda d: (d / "optimizer.safetensors").unlink())
    cut = resumed_error(lambda d: (d / "trainer_state.json").write_text('{"step": 4, "cold'))
    assert "trainer_state.json: unreadable, so the checkpoint is incomplete" in cut


def test_resume_details(tiny_run, tmp_path, monkeypatch, capsys):
    """--resume-override lr sets the optimizer's lr (the saved param groups used to win); a boolean flag
    can be turned off on resume; --eval-only is not refused for the memory a training step would need;
    a stop requested at the last step lets the run finish its results."""
    import shutil

    from plumbing.cli import parse_args

    ckpt = tmp_path / "checkpoint"
    shutil.copytree(tiny_run / "checkpoint", ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["args"]["drop_truncated"] = True
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert parse_args(["--resume", str(ckpt), "--steps", "5"]).drop_truncated is True
    assert parse_args(["--resume", str(ckpt), "--steps", "5", "--no-drop-truncated",
                       "--resume-override", "drop_truncated"]).drop_truncated is False

    seen = []
    real = grpo.grpo_update
    monkeypatch.setattr(grpo, "grpo_update", lambda m, opt, *a, **k: seen.append(opt.param_groups[0]["lr"]) or
                        real(m, opt, *a, **k))
    train.main(["--resume", str(tiny_run / "checkpoint"), "--steps", "5", "--lr", "0.25", "--resume-override", "lr",
                "--out", str(tmp_path / "o")])
    assert seen == [0.25]

    # far too small to train (~290 MiB), enough to score (weights, the evaluation's KV cache and prefill:
    # tens of MiB), the process's own memory aside
    monkeypatch.setattr(experiment, "host_bytes", lambda: 0)
    monkeypatch.setattr(stages, "device_bytes", lambda device: 64 * 1024**2)
    train.main(["--resume", str(tiny_run / "checkpoint"), "--eval-only", "--out", str(tmp_path / "e")])
    assert "| model" in capsys.readouterr().out


def test_an_sft_only_run_stopped_in_the_cold_start_resumes(tmp_path, monkeypatch):
    """--steps 0 (cold start only), stopped mid-SFT: the checkpoint is at GRPO step 0, which is not
    'nothing to do' while the SFT is unfinished."""
    from plumbing.cli import parse_args

    out = tmp_path / "s0"
    real, calls = grpo.token_logprobs, []

    def stop_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), __import__("signal").SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(grpo, "token_logprobs", stop_second)
    with pytest.raises(SystemExit):
        train.main(TINY + ["--sft-epochs", "2", "--sft-batch", "4", "--steps", "0", "--out", str(out)])
    assert parse_args(["--resume", str(out / "checkpoint")]).steps == 0


def test_sigkill_during_the_cold_start_loses_at_most_sft_save_every_batches(sft_run, tmp_path, capsys):
    """kill -9 in the cold-start SFT used to lose the whole cold start (it was saved only on a signal).
    Now it is checkpointed every --sft-save-every batches: killed in batch 5 with checkpoints every 2,
    --resume continues from batch 4 (taking over the killed run's lock) and the cold start equals the
    uninterrupted run's bit for bit, with each SFT epoch logged once."""
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    out = tmp_path / "killed"
    script = ("import os, signal, sys, json; sys.path[:0] = sys.argv[2:]; import grpo, train\n"
              "real, calls = grpo.token_logprobs, []\n"
              "def killed(*a, **k):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 5:  # during SFT batch 5 (one micro-batch per batch)\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(*a, **k)\n"
              "grpo.token_logprobs = killed\n"
              "train.main(json.loads(sys.argv[1]))\n")
    args = SFT_ARGS + ["--sft-save-every", "2", "--out", str(out)]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script, json.dumps(args), str(root), str(root / "tests")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert (state["step"], state["sft_step"]) == (0, 4) and not (out / "cold_start").exists()
    train.main(["--resume", str(out / "checkpoint"), "--steps", "0"])
    assert "held this folder and ended without releasing it (killed?); taking it over" in capsys.readouterr().err
    whole, resumed = (load_file(str(d / "cold_start" / "model.safetensors")) for d in (sft_run, out))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert [r["epoch"] for r in map(json.loads, open(out / "metrics.jsonl")) if r.get("stage") == "sft"] == [1, 2, 3]


def test_a_diverging_cold_start_stops_without_saving_nan_weights(tmp_path, capsys):
    """--sft-lr 1e308 used to save a NaN cold_start/ and exit 0 with a table: SFT checks its loss,
    gradient and weights as GRPO does, and stops with exit code 3, naming --sft-lr."""
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as stop:
        train.main(TINY + ["--sft-lr", "1e308", "--sft-batch", "4", "--steps", "1", "--out", str(out)])
    assert stop.value.code == 3
    err = capsys.readouterr().err
    assert "cold-start SFT batch 1: the update made weights non-finite" in err
    assert "--resume-override sft_lr --sft-lr" in err
    assert not (out / "cold_start").exists() and not (out / "checkpoint").exists()


def test_eval_only_beside_a_finished_run_leaves_the_run_alone(tiny_run, tmp_path, capsys):
    """--eval-only --model RUN/checkpoint --out RUN used to truncate RUN/metrics.jsonl and samples.txt:
    it writes into RUN/eval/ only (its own log, predictions and results), and Ctrl-C there stops at
    once instead of promising a checkpoint."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "samples.txt", "results.md")}
    train.main(["--eval-only", "--model", str(run / "checkpoint"), "--out", str(run), "--synthetic-users", "150",
                "--eval-size", "6", "--threads", "1"])
    assert all((run / name).read_bytes() == data for name, data in before.items())
    assert sorted(p.name for p in (run / "eval").iterdir()) == [".lock", "metrics.jsonl", "predictions", "results.md"]
    assert (run / "eval" / "predictions" / "model.jsonl").exists() and "| model " in (run / "eval" / "results.md").read_text()
    assert "--eval-only: the prompt" in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):  # the handler --eval-only installs: no checkpoint to promise
        bookkeeping.GracefulStop(saves=False)(2, None)


def test_one_run_per_folder(tiny_run, tmp_path, capsys):
    """Two runs on one --out used to both exit 0 with the folder holding the second's records only. A run
    holding the folder refuses a second (and a --resume of its checkpoint) naming its PID; a new run
    refuses a finished run's folder, saying how to continue or replace it."""
    from plumbing.cli import parse_args
    from plumbing.runs import locked

    def refused(args) -> str:
        with pytest.raises(SystemExit) as stop:
            train.main(args)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err

    busy = tmp_path / "busy"
    with locked(busy):
        assert f"{busy} is in use: process {os.getpid()} is running in it" in refused(TINY + ["--out", str(busy)])
        (busy / "checkpoint").mkdir()
        with pytest.raises(SystemExit):
            parse_args(["--resume", str(busy / "checkpoint")])
        assert f"its run is still going (process {os.getpid()} holds {busy})" in capsys.readouterr().err
    err = refused(TINY + ["--out", str(tiny_run)])
    assert f"--out {tiny_run} holds another run (" in err and "cold_start/" in err and "metrics.jsonl" in err
    assert f"continue it with --resume {tiny_run / 'checkpoint'}, replace it with --overwrite" in err
