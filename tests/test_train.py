"""End-to-end tests of train.py on tiny settings: it runs, learns parameters, resumes exactly, fails clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import grpo
import train
from plumbing.checkpoints import load_model
from plumbing.experiment import demo_model

TINY = ["--synthetic-users", "150", "--cold-start-size", "24", "--sft-epochs", "1", "--eval-size", "6",
        "--prompts-per-step", "2", "--samples", "3", "--max-new-tokens", "20", "--eval-every", "2",
        "--sample-every", "1", "--threads", "1", "--select", "best"]


def metrics(out: Path, stage="grpo") -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl")) if r.get("stage") == stage}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted 4-step demo run, shared by the tests below."""
    out = tmp_path_factory.mktemp("run") / "a"
    train.main(TINY + ["--out", str(out), "--steps", "4", "--save-every", "2"])
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


def test_resume_replays_the_same_steps(tiny_run, tmp_path):
    """Stopping after step 2 and resuming gives the metrics of steps 3 and 4 of the uninterrupted run."""
    out = tmp_path / "b"
    train.main(TINY + ["--out", str(out), "--steps", "2"])
    train.main(TINY + ["--out", str(out), "--steps", "4", "--resume", str(out / "checkpoint")])
    a, b = metrics(tiny_run), metrics(out)
    assert sorted(b) == [1, 2, 3, 4]  # the resumed run's log continues, without duplicates
    for step in (3, 4):
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
