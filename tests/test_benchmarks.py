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
