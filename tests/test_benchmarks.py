"""The benchmark scripts run in their quick modes, so they cannot rot. The TRL side of bench_grpo runs
only when trl is installed (pip install -r requirements-bench.txt); CI without it checks our side."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

HAVE_TRL = importlib.util.find_spec("trl") is not None


def test_bench_grpo_quick(tmp_path, capsys):
    import bench_grpo

    sides = "ours,trl" if HAVE_TRL else "ours"
    rows = bench_grpo.main(["--quick", "--threads", "1", "--sides", sides, "--json", str(tmp_path / "g.json")])
    out = capsys.readouterr().out
    assert "| size | ours s/step | TRL s/step |" in out and "| tiny |" in out
    saved = json.loads((tmp_path / "g.json").read_text())["results"]
    assert saved == json.loads(json.dumps(rows)) and len(rows) == 1
    row = rows[0]
    assert row["ours_s"] > 0 and row["ours_rss_mb"] > 0 and row["ours_completion_len"] > 0
    if HAVE_TRL:
        assert row["trl_s"] > 0 and row["trl_rss_mb"] > 0 and row["ratio"] > 0
    else:
        assert "trl_s" not in row


def test_bench_gpu_quick(tmp_path, capsys):
    pytest.importorskip("transformers")
    import bench_gpu

    res = bench_gpu.main(["--quick", "--repeats", "1", "--json", str(tmp_path / "gpu.json")])
    out = capsys.readouterr().out
    assert "| sample |" in out and "| fwd+bwd |" in out
    assert json.loads((tmp_path / "gpu.json").read_text())["device"] == "cpu"
    for key in ("sample", "train"):
        assert res[key]["ours_tok_s"] > 0 and res[key]["theirs_tok_s"] > 0 and res[key]["ratio"] > 0
    assert res["train"]["mfu"] > 0


def demo_run(seed, start_mae, final_mae, seconds=150.0, category=1.0, curve=(0.8, 0.7), half_width=0.03):
    metrics = lambda mae, fid: {"mae": mae, "rmse": mae + 0.3, "pred_std": 1.0, "distinct": 5, "fidelity": fid}  # noqa: E731
    fid = {"category": category, "taste": 0.95, "reception": 0.99, "rating": 0.9, "consistent": 0.6}
    rows = {"global mean": metrics(1.0, None), "user+item bias": metrics(0.8, None),
            "matrix factorisation": metrics(0.66, None), "heuristic teacher": metrics(start_mae + 0.02, None),
            "LLM after cold start": metrics(start_mae, fid), "LLM after GRPO": metrics(final_mae, fid)}
    versus = {"cold start": start_mae, "MF": 0.66, "bias": 0.8}
    intervals = {k: {"diff": final_mae - v, "low": final_mae - v - half_width, "high": final_mae - v + half_width,
                     "n": 1200} for k, v in versus.items()}
    return {"seed": seed, "seconds": seconds, "rows": rows, "final_step": 60,
            "valid_curve": list(zip((0, 60), curve)), "intervals": intervals}


def test_demo_seeds_checks_and_tables_keep_failed_seeds():
    """Each seed is checked on its own: a seed whose GRPO gain is under 10% or whose reasoning drifted is
    marked **no**, a crashed seed is listed as FAILED, and the means are over the seeds that ran."""
    import demo_seeds

    good = demo_run(0, 0.80, 0.60)
    weak = demo_run(1, 0.70, 0.66, category=0.80, half_width=0.05)
    crashed = {"seed": 2, "seconds": 3.0, "error": ["train.py: error: something"]}
    assert all(demo_seeds.checks(good).values())
    weak_checks = demo_seeds.checks(weak)
    assert not weak_checks["GRPO below the cold start, 95% interval excludes 0"]  # -0.04 in [-0.09, +0.01]
    assert not weak_checks["category fidelity after GRPO >= 90%"]
    assert weak_checks["below matrix factorisation"] is False  # 0.66 is not below 0.66
    text = demo_seeds.tables([good, weak, crashed])
    assert "| LLM after GRPO | 0.630 ± 0.042 |" in text
    assert "| 2 | 0.1 | FAILED: train.py: error: something |" in text
    assert "| GRPO below the cold start, 95% interval excludes 0 | yes | **no** | **no** |" in text
    # over the two seeds that ran: MF - GRPO is -0.06 and 0.00, so the mean is -0.03, below 0 on one seed
    assert "| MF | -0.030 | [-0.411, +0.351] | 1 of 2 | 1 of 2 |" in text
    assert "| 0 | 2.5 | 0.800 | 0.660 | 0.820 | 0.800 | 0.600 (60) | -25.0% | -0.200 [-0.230, -0.170] |" in text


def test_demo_seeds_end_to_end_tiny(tmp_path, capsys):
    """The sweep runs train.py per seed and reads its metrics.jsonl back (a tiny demo, 2 GRPO steps);
    demo_traces reads the same run."""
    import demo_seeds

    tiny = ["--synthetic-users", "150", "--cold-start-size", "24", "--sft-epochs", "1", "--eval-size", "6",
            "--valid-size", "6", "--prompts-per-step", "2", "--samples", "3", "--max-new-tokens", "20", "--eval-every", "1",
            "--steps", "2", "--threads", "1"]
    demo_seeds.main(["--seeds", "4", "--out", str(tmp_path), "--", *tiny])
    summary = json.loads((tmp_path / "summary.json").read_text())
    (run,) = summary["runs"]
    assert run["seed"] == 4 and "error" not in run and run["final_step"] == 2
    assert [step for step, _ in run["valid_curve"]] == [0, 1, 2]
    assert set(run["rows"]) >= {"user+item bias", "heuristic teacher", "LLM after cold start", "LLM after GRPO"}
    assert "| LLM after GRPO |" in (tmp_path / "summary.md").read_text()

    # demo_traces rebuilds the same task from the run's saved flags: its MAEs are the run's test rows
    import demo_traces

    demo_traces.main([str(tmp_path / "seed-4")])
    printed = capsys.readouterr().out
    start, final = run["rows"]["LLM after cold start"]["mae"], run["rows"]["LLM after GRPO"]["mae"]
    assert f"cold start: test MAE {start:.3f}" in printed and f"GRPO: test MAE {final:.3f}" in printed
    assert "6 test examples, step 2" in printed and "| the trace says: taste |" in printed

    # the README's pictures, from the same folder (skipped only without matplotlib, a dev requirement)
    pytest.importorskip("matplotlib")
    import figures

    made = figures.main(["demo", str(tmp_path), "--to", str(tmp_path / "docs")])
    assert [p.name for p in made] == ["demo_learning.png", "demo_traces.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size < 400_000 for p in made)


def test_memory_table(capsys):
    """The README's memory table: the three Qwen2.5 shapes have their published sizes, full fine-tuning
    of 7B fits no single GPU, LoRA with gradient checkpointing fits a 24 GB one, and FSDP divides the
    trained state by the number of GPUs (full fine-tuning of 7B then fits 80 GB cards from 4 of them)."""
    import memory_table

    rows = {(name, variant): plan for name, variant, plan in memory_table.main([])}
    sizes = {name: round(plan.parameters / 1e9, 2) for (name, variant), plan in rows.items() if "full" in variant}
    assert sizes == {"Qwen2.5-0.5B": 0.49, "Qwen2.5-1.5B": 1.54, "Qwen2.5-7B": 7.62}
    assert rows[("Qwen2.5-7B", "full fine-tuning (fp32 master weights)")].total > 141e9
    assert rows[("Qwen2.5-7B", "--lora-rank 16 --grad-checkpointing")].total < 24e9
    full = rows[("Qwen2.5-7B", "full fine-tuning (fp32 master weights)")]
    for n in (2, 4, 8):
        plan = rows[("Qwen2.5-7B", f"--fsdp --grad-checkpointing, {n} GPUs")]
        assert plan.weights + plan.gradients + plan.optimizer == pytest.approx(
            (full.weights + full.gradients + full.optimizer) / n, rel=1e-6)
        assert plan.gathered_sampling == full.parameters * 2  # the whole model, in bf16, while sampling
    assert rows[("Qwen2.5-7B", "--fsdp --grad-checkpointing, 4 GPUs")].total < 80e9
    assert capsys.readouterr().out.count("| Qwen2.5-") == 27


def test_bench_fsdp_under_torchrun():
    """Two gloo ranks: each mode holds what the memory plan says, and FSDP takes data parallel's steps."""
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          str(root / "benchmarks" / "bench_fsdp.py"), "--steps", "2"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {m: re.findall(r"([\d.]+) \(([\d.]+)\)", line) for m, line in
            re.findall(r"^\| (data parallel|fsdp) \|(.*)$", out.stdout, re.M)}
    assert len(rows["data parallel"]) == len(rows["fsdp"]) == 3
    for (held, plan), (held_dp, _) in zip(rows["fsdp"], rows["data parallel"]):
        assert held == plan and float(held) == pytest.approx(float(held_dp) / 2, abs=0.06)  # half on each rank
    weight_diff = float(re.search(r"max weight difference ([\d.e+-]+)", out.stdout).group(1))
    assert weight_diff < 1e-5


def tiny_movielens(folder: Path, users: int = 40, items: int = 30, per_user: int = 12) -> Path:
    """A small ml-100k folder (u.data, u.item) whose ratings follow each user's genre taste."""
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    genres = rng.integers(0, 19, items)
    (folder / "u.item").write_text("".join(
        f"{i + 1}|Movie {i + 1} (1995)|01-Jan-1995||http://x|"
        + "|".join("1" if g == genres[i] else "0" for g in range(19))
        + "\n" for i in range(items)), encoding="latin-1")
    rows, t = [], 880000000
    for u in range(users):
        taste = rng.normal(0, 1.2, 19)
        for i in rng.choice(items, per_user, replace=False):
            t += int(rng.integers(1, 1000))
            rows.append(f"{u + 1}\t{i + 1}\t{int(np.clip(np.rint(3.3 + taste[genres[i]]), 1, 5))}\t{t}\n")
    (folder / "u.data").write_text("".join(rows))
    return folder


def tiny_checkpoint(folder: Path) -> Path:
    """A random 2-layer model saved as a Hugging Face folder with a byte-level BPE tokenizer."""
    from model import ModelConfig, Transformer
    from plumbing.checkpoints import save_model
    from plumbing.teachers import HeuristicTeacher
    from plumbing.tokenizer import train_bpe

    tok = train_bpe(["user_history: Movie 1 (1995), 4.0; Categories: Drama | Comedy target_item: rating",
                     *HeuristicTeacher().write([])] * 20, folder / "tok", vocab_size=400)
    model = Transformer(ModelConfig(arch="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                                    eos_token_id=tok.turn_end_id))
    save_model(model, folder / "model", folder / "tok")
    return folder / "model"


def test_real_ratings_quick(tmp_path, capsys):
    """The real-ratings experiment end to end at toy sizes: a zero-shot run and a RecOne run per seed,
    every method's row, paired intervals on the same test examples, the goals and the trace report;
    a second call finds both stages done and only summarises."""
    import real_ratings

    args = ["--model", str(tiny_checkpoint(tmp_path / "ckpt")), "--data", str(tiny_movielens(tmp_path / "ml")),
            "--data-format", "ml-100k", "--seeds", "3", "--out", str(tmp_path / "real"), "--quick"]
    (seed,) = real_ratings.main(args)
    assert set(seed["methods"]) >= {"user+item bias", "matrix factorisation", "user mean", real_ratings.START,
                                    real_ratings.COLD, real_ratings.GRPO}
    assert seed["methods"][real_ratings.GRPO]["n"] == seed["methods"]["user+item bias"]["n"] == 8
    assert set(seed["seconds"]) == {"zero-shot", "run"}
    iv = seed["intervals"][f"{real_ratings.GRPO} - {real_ratings.COLD}"]
    assert iv["low"] <= iv["diff"] <= iv["high"] and iv["n"] == 8
    assert [r["step"] for r in seed["curve"]["grpo"]] == [1, 2] and seed["traces"] is not None
    text = (tmp_path / "real" / "summary.md").read_text()
    assert "| after GRPO |" in text and "| the cold start below the best constant |" in text
    assert f"| {real_ratings.GRPO} - {real_ratings.COLD} |" in text and "| best constant |" in text
    assert "| after GRPO, expected rating |" in text  # the tiny BPE writes each rating 1-5 as one token
    assert "The start check before GRPO" in text and seed["start_check"]["n"] == 4
    (again,) = real_ratings.main(args)
    assert again["seconds"] == {} and again["methods"] == seed["methods"]
    pytest.importorskip("matplotlib")
    import figures

    (made,) = figures.main(["real", str(tmp_path / "real"), "--to", str(tmp_path / "docs")])
    assert made.name == "real_ratings.png" and made.read_bytes()[:4] == b"\x89PNG"


def test_one_grpo_step_runs_through_the_lesson_files_only():
    """benchmarks/step_path.py on a small demo: every function one more GRPO step calls lives in the lesson
    (train.py, grpo.py, model.py), the task (reczero.py) or the one plumbing file around a step
    (plumbing/bookkeeping.py), and none of them is longer than 60 lines."""
    import step_path

    path = step_path.step_path(step_path.QUICK)
    assert set(path) <= {"train.py", "grpo.py", "model.py", "reczero.py", "plumbing/bookkeeping.py"}
    names = {name for functions in path.values() for name, _, _ in functions}
    assert {"train_grpo", "grpo_update", "generate", "compute_reward", "Run.after_step"} <= names
    assert max(n for functions in path.values() for _, _, n in functions) <= 60


def test_bench_bf16_quick(capsys):
    """fp32 against bf16 autocast, one GRPO step and one SFT batch, and their logits: within bf16's
    precision (8 bits of mantissa: ~1e-2 on logits of order 1)."""
    import bench_bf16

    results, diff = bench_bf16.main(["--quick", "--threads", "1", "--profile"])
    assert set(results) == {"fp32", "bf16 autocast", "bf16 weights"}
    assert all(t > 0 for times in results.values() for t in times)
    for sampling, update, whole, _ in results.values():
        assert whole == sampling + update
    assert 0 < diff < 0.05
    out = capsys.readouterr().out
    assert "| one GRPO step, whole" in out and "by operator" in out and "aten::" in out


def test_memory_plan_against_the_peak_of_a_tiny_run():
    """benchmarks/memory_rss.py --quick in its own process (its peak resident memory is its own): each
    phase's measured peak within a margin of the plan. The margin is what a tiny model's plan cannot
    see (allocator pools, thread stacks: tens of MB); before the plan counted the process's own memory
    (Python, torch), it planned a few MB for a process holding hundreds."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_rss.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--threads", "1"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "GiB" not in line]
    assert len(rows) == 4, out
    for phase, measured, planned, ratio in rows:
        assert 0.8 <= float(ratio) <= 1.3, (phase, measured, planned)
