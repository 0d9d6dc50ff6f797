"""The embedded demo over several seeds: one table with the mean and spread of each row, every seed shown.

    python benchmarks/demo_seeds.py --seeds 0 1 2                 # three full `python train.py` runs
    python benchmarks/demo_seeds.py --seeds 0 1 2 -- --threads 1  # flags after -- go to train.py

Each seed runs `python train.py --seed S --out OUT/seed-S` in its own process, one after the other (so
each run's wall clock is its own), and is read back from its metrics.jsonl and its per-example test
predictions. A seed generates its own synthetic world, tokenizer, model initialisation, teacher traces
and sampling, so the spread across seeds is the spread a user would see. Each seed's comparisons
(after GRPO against the cold start, matrix factorisation and the bias baseline) get a paired bootstrap
95% interval on that seed's test examples; the mean over seeds gets a t-interval over the seeds. The
script then checks each seed against what the demo is meant to show (the "checks" table) and keeps
failed seeds in every table: a mean alone would hide them.

Writes OUT/summary.md (the tables) and OUT/summary.json (every number), and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plumbing.report import compare  # noqa: E402
from reczero import mean_interval  # noqa: E402

FIDELITY = ("category", "taste", "reception", "rating", "consistent")
# after GRPO against: (row name, predictions file in OUT/seed-S/predictions)
VERSUS = (("cold start", "test_start"), ("MF", "baseline-mf"), ("bias", "baseline-bias"))


def run_seed(seed: int, out: Path, extra: list[str]) -> dict:
    """One demo run; returns its wall-clock seconds and its metrics.jsonl records by kind."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--seed", str(seed), "--out", str(out), *extra]
    print(f"seed {seed}: {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.time() - start
    if done.returncode != 0:
        return {"seed": seed, "seconds": seconds, "error": done.stderr.strip().splitlines()[-1:]}
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    rows = {r["name"]: r for r in records if r.get("stage") == "baseline"}
    start_row = next(r for r in records if r.get("stage") == "test_start")
    final = next(r for r in records if r.get("stage") == "test")
    rows["LLM after cold start"], rows["LLM after GRPO"] = start_row, final
    evals = [r for r in records if r.get("stage") == "eval"]
    pred = out / "predictions"
    intervals = {name: vars(compare(pred / "test.jsonl", pred / f"{stem}.jsonl")) for name, stem in VERSUS}
    return {"seed": seed, "seconds": seconds, "rows": rows, "final_step": final["step"],
            "valid_curve": [(r["step"], r["mae"]) for r in evals], "intervals": intervals}


def checks(run: dict) -> dict[str, bool]:
    """What the demo must show on every seed (each check is one line of the README's Results)."""
    rows = run["rows"]
    start, grpo, teacher = rows["LLM after cold start"], rows["LLM after GRPO"], rows.get("heuristic teacher")
    f0, f1 = start.get("fidelity") or {}, grpo.get("fidelity") or {}
    curve = run["valid_curve"]
    return {
        "cold start reads its prompt (category >= 95%, taste and reception >= 90%)":
            f0.get("category", 0) >= 0.95 and f0.get("taste", 0) >= 0.90 and f0.get("reception", 0) >= 0.90,
        "cold start MAE within 0.05 of its teacher's": teacher is not None and start["mae"] <= teacher["mae"] + 0.05,
        "GRPO below the cold start, 95% interval excludes 0": run["intervals"]["cold start"]["high"] < 0,
        "validation MAE at the last step below step 0's": len(curve) > 1 and curve[-1][1] < curve[0][1],
        "no collapse (>= 4 distinct ratings, pred std >= 0.6)": grpo["distinct"] >= 4 and grpo["pred_std"] >= 0.6,
        "category fidelity after GRPO >= 90%": f1.get("category", 0) >= 0.90,
        "below matrix factorisation": grpo["mae"] < rows["matrix factorisation"]["mae"],
        "below the user+item bias baseline, 95% interval excludes 0": run["intervals"]["bias"]["high"] < 0,
        "run <= 5 minutes": run["seconds"] <= 300,
    }


def spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def tables(runs: list[dict]) -> str:
    ok = [r for r in runs if "rows" in r]
    names = list(ok[0]["rows"]) if ok else []
    out = [f"Over seeds {', '.join(str(r['seed']) for r in ok)} (mean ± sd):", "",
           "| method | MAE | RMSE | pred std | distinct | agrees: category | taste | reception | rating | consistent |",
           "|---" * 10 + "|"]
    for name in names:
        rs = [r["rows"][name] for r in ok]
        cells = [spread([m["mae"] for m in rs], ".3f"), spread([m["rmse"] for m in rs], ".3f"),
                 spread([m["pred_std"] for m in rs], ".2f"), spread([float(m["distinct"]) for m in rs], ".0f")]
        for k in FIDELITY:
            vals = [m["fidelity"][k] * 100 for m in rs if m.get("fidelity")]
            cells.append(spread(vals, ".0f") + "%" if vals else "-")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    if len(ok) > 1:
        out += ["", "After GRPO minus each row, the mean over seeds of the per-seed MAE difference (95% t-interval "
                "over seeds), and on how many seeds it is below 0 (below 0 with its paired bootstrap interval "
                "excluding 0):", "",
                "| after GRPO minus | mean difference | 95% interval over seeds | seeds below 0 | with interval |",
                "|---|---|---|---|---|"]
        for name, _ in VERSUS:
            diffs = [r["intervals"][name] for r in ok]
            iv = mean_interval([d["diff"] for d in diffs])
            out.append(f"| {name} | {iv.diff:+.3f} | [{iv.low:+.3f}, {iv.high:+.3f}] | "
                       f"{sum(d['diff'] < 0 for d in diffs)} of {len(ok)} | {sum(d['high'] < 0 for d in diffs)} of {len(ok)} |")
    out += ["", "Each seed (intervals: paired bootstrap 95% on the seed's test examples):", "",
            "| seed | minutes | bias | MF | teacher | cold start | after GRPO (step) | change | GRPO - cold start | "
            "GRPO - MF | valid MAE by step |",
            "|---" * 11 + "|"]
    for r in runs:
        if "rows" not in r:
            out.append(f"| {r['seed']} | {r['seconds'] / 60:.1f} | FAILED: {' '.join(r['error'])} |||||||||")
            continue
        rows = r["rows"]
        a, b = rows["LLM after cold start"]["mae"], rows["LLM after GRPO"]["mae"]
        teacher = rows.get("heuristic teacher", {}).get("mae", float("nan"))
        curve = ", ".join(f"{m:.3f}" for _, m in r["valid_curve"])
        iv = {name: "{diff:+.3f} [{low:+.3f}, {high:+.3f}]".format(**r["intervals"][name]) for name in ("cold start", "MF")}
        out.append(f"| {r['seed']} | {r['seconds'] / 60:.1f} | {rows['user+item bias']['mae']:.3f} | "
                   f"{rows['matrix factorisation']['mae']:.3f} | {teacher:.3f} | {a:.3f} | {b:.3f} ({r['final_step']}) | "
                   f"{(b - a) / a:+.1%} | {iv['cold start']} | {iv['MF']} | {curve} |")
    out += ["", "Checks (a failed seed stays in every table above):", "",
            "| check | " + " | ".join(f"seed {r['seed']}" for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    results = {r["seed"]: checks(r) if "rows" in r else None for r in runs}
    for check in checks(ok[0]) if ok else []:
        marks = ["yes" if results[r["seed"]] and results[r["seed"]][check] else "**no**" for r in runs]
        out.append(f"| {check} | " + " | ".join(marks) + " |")
    return "\n".join(out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/seeds", help="one sub-directory per seed, plus summary.md / .json")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    out = Path(args.out)
    runs = [run_seed(s, out / f"seed-{s}", extra) for s in args.seeds]
    text = tables(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps({"train_flags": extra, "runs": runs}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
