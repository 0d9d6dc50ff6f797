"""The paper's recipe on a real instruct checkpoint and real ratings, sized for about an hour of CPU per seed.

    python benchmarks/real_ratings.py --model ~/models/SmolLM2-135M-Instruct --data ~/data/ml-100k \
        --data-format ml-100k --seeds 0 1 --out runs/real
    python benchmarks/real_ratings.py ... -- --steps 80        # flags after -- go to every train.py call

Per seed, two train.py runs in their own folders, one after the other:
  OUT/seed-S/zero-shot  `--eval-only` on the checkpoint itself (it writes into zero-shot/eval/): the
                        model before any training (RecZero's starting point), on the seed's test examples;
  OUT/seed-S/run        RecOne: the heuristic teacher's traces, cold-start SFT, then GRPO; it also
                        scores the baselines and the cold start on the same test examples.
A finished stage is not run again (its folder holds its predictions); a stage killed half-way
continues from its checkpoint (`--resume`). Then the script reads every predictions file and writes
OUT/summary.md and OUT/summary.json: each method's MAE, RMSE, format-valid rate, prediction spread
and distinct ratings (mean ± sd over seeds, and each seed), paired bootstrap 95% intervals on the
same test examples, the goals checked per seed, the learning curves, and what the traces say before
and after GRPO. `--quick` runs the same pipeline at toy sizes (the test suite does, on a tiny
random checkpoint and a tiny ratings file), so the script cannot rot.

RECIPE below is the CPU-sized recipe; docs/real_ratings.md says what each choice trades.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo_seeds import spread  # noqa: E402  (the benchmarks folder is on sys.path: this script's own)
from plumbing.report import compare, read_predictions  # noqa: E402
from reczero import rating_metrics  # noqa: E402

# What the prompt shows and how long a completion may be: the same for the zero-shot model and the run.
# --mark-shared on: history entries that share the target's genre are marked, so a 135M model need not
# find them itself (with it, the cold start agreed with the teacher on the item's reception 86% of the time).
PROMPT = ["--split", "global", "--system-prompt", "short", "--max-user-history", "5", "--max-item-history", "5",
          "--history-fields", "Categories", "--item-texts", "off", "--mark-shared", "on", "--max-new-tokens", "112",
          "--eval-size", "1000", "--valid-size", "200"]
# RecOne: the heuristic teacher asked about 2,400 training examples (~1,150 traces kept), one SFT epoch,
# then 40 GRPO steps of 6 prompts x 8 samples. (The first recipe, ~110 traces, taught the format but not
# the judgement, and GRPO settled on the constant 4: docs/real_ratings.md.)
RECIPE = ["--mode", "recone", "--cold-start-size", "2400", "--sft-epochs", "1", "--sft-batch", "8", "--sft-lr", "1e-4",
          "--micro-batch", "4", "--steps", "40", "--prompts-per-step", "6", "--samples", "8", "--lr", "1e-5",
          "--eval-every", "20", "--save-every", "5", "--sample-every", "5", "--expected-rating"]
# --quick: the same stages at toy sizes (seconds on a tiny model)
QUICK_PROMPT = ["--eval-size", "8", "--valid-size", "4", "--max-new-tokens", "16", "--threads", "1"]
QUICK_RECIPE = ["--cold-start-size", "24", "--steps", "2", "--prompts-per-step", "2", "--samples", "2",
                "--eval-every", "1", "--save-every", "1", "--sample-every", "1"]

START, COLD, GRPO = "zero-shot (before any training)", "after cold start", "after GRPO"
EXPECTED = ", expected rating"  # the same model's expected-rating read-out (train.py --expected-rating)
CONSTANT, BIAS, MF = "best constant", "user+item bias", "matrix factorisation"
BASELINE_FILES = {"global mean": "baseline-global_mean", CONSTANT: "baseline-constant",
                  "user mean": "baseline-user_mean", "item mean": "baseline-item_mean", BIAS: "baseline-bias",
                  MF: "baseline-mf", "heuristic teacher": "baseline-teacher"}
# the paired comparisons the summary gives each seed (a - b, where both rows exist)
PAIRS = [(COLD, CONSTANT), (COLD, BIAS), (COLD, START), (GRPO, COLD), (GRPO, CONSTANT), (GRPO, BIAS), (GRPO, MF),
         (COLD + EXPECTED, COLD), (GRPO + EXPECTED, GRPO), (GRPO + EXPECTED, BIAS)]


def train(args: list[str], log: Path) -> float:
    """One train.py process; returns its wall-clock seconds. Its output goes to `log`."""
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    print(" ".join(cmd[1:]), flush=True)
    start = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"real_ratings.py: train.py failed (exit {done.returncode}), see {log}: {' / '.join(tail)}")
    return time.time() - start


def run_seed(seed: int, out: Path, base: list[str], recipe: list[str]) -> dict:
    """The two stages of one seed (each skipped when done, resumed when killed); their wall clock."""
    seconds = {}
    zero = out / "zero-shot"
    if not (zero / "eval" / "predictions" / "model.jsonl").exists():
        seconds["zero-shot"] = train([*base, "--seed", str(seed), "--eval-only", "--out", str(zero)],
                                     out / "zero-shot.log")
    run = out / "run"
    if not (run / "results.md").exists():
        if (run / "checkpoint" / "trainer_state.json").exists():  # killed after a checkpoint: continue it
            args = ["--resume", str(run / "checkpoint"), "--out", str(run)]
        else:
            args = [*base, *recipe, "--seed", str(seed), "--out", str(run)]
        seconds["run"] = train(args, out / "run.log")
    return seconds


# -----------------------------------------------------------------------------
# Reading the runs back


def method_files(seed_dir: Path) -> dict[str, Path]:
    """Each method's predictions file in one seed's folders, by the name the tables use."""
    pred = seed_dir / "run" / "predictions"
    files = {name: pred / f"{stem}.jsonl" for name, stem in BASELINE_FILES.items()}
    files.update({START: seed_dir / "zero-shot" / "eval" / "predictions" / "model.jsonl",
                  COLD: pred / "test_start.jsonl", GRPO: pred / "test.jsonl",
                  COLD + EXPECTED: pred / "test_start-expected.jsonl", GRPO + EXPECTED: pred / "test-expected.jsonl"})
    return {name: f for name, f in files.items() if f.exists()}


def scored(path: Path) -> dict:
    """MAE, RMSE, format-valid rate, spread and distinct ratings of one predictions file."""
    rows = list(read_predictions(path).values())
    m = rating_metrics([r["rating"] for r in rows], [r["label"] for r in rows], [r["scored"] for r in rows])
    return {"mae": m.mae, "rmse": m.rmse, "format_valid": m.valid_rate, "pred_std": m.pred_std,
            "true_std": m.true_std, "distinct": m.distinct, "n": m.n}


def before_rate(text: str) -> str:
    return text.split("<rate>")[0]


def trace_changes(cold: Path, after: Path, shown: int = 3) -> dict:
    """What GRPO changed in the test traces: the share identical to the cold start's up to <rate>,
    the share of ratings that moved, and a few examples whose rating moved (both texts)."""
    a, b = read_predictions(cold), read_predictions(after)
    keys = sorted(a)
    same = sum(before_rate(a[k].get("text", "")) == before_rate(b[k].get("text", "")) for k in keys)
    moved = [k for k in keys if a[k]["rating"] != b[k]["rating"]]
    examples = [{"label": a[k]["label"], "cold_start": a[k].get("text", ""), "after_grpo": b[k].get("text", "")}
                for k in moved[:shown]]
    return {"same_reasoning": same / len(keys), "rating_moved": len(moved) / len(keys), "examples": examples}


def read_seed(seed: int, seed_dir: Path) -> dict:
    """Everything the summary needs from one seed's folders."""
    files = method_files(seed_dir)
    records = [json.loads(line) for line in open(seed_dir / "run" / "metrics.jsonl")]
    fidelity = {r["stage"]: r.get("fidelity") for r in records if r.get("stage") in ("test_start", "test")}
    cold_start = next((r for r in records if r.get("stage") == "cold_start"), {})
    curve = {"grpo": [{k: r.get(k) for k in ("step", "reward_mean", "format_valid", "train_mae",
                                             "frac_reward_zero_std", "entropy", "response_length_mean")}
                      for r in records if r.get("stage") == "grpo"],
             "valid": [{k: r.get(k) for k in ("step", "mae", "valid_rate", "pred_std", "distinct")}
                       for r in records if r.get("stage") == "eval"],
             "sft": [r.get("loss") for r in records if r.get("stage") == "sft"]}
    intervals = {}
    for a, b in PAIRS:
        if a in files and b in files:
            iv = compare(files[a], files[b])
            intervals[f"{a} - {b}"] = {"diff": iv.diff, "low": iv.low, "high": iv.high, "n": iv.n}
    zero = read_predictions(files[START]) if START in files else {}
    start_check = next((r for r in records if r.get("stage") == "start_check"), None)
    return {"seed": seed, "methods": {name: scored(f) for name, f in files.items()}, "intervals": intervals,
            "start_check": start_check,
            "fidelity": fidelity, "cold_start": cold_start, "curve": curve,
            "traces": trace_changes(files[COLD], files[GRPO]) if COLD in files and GRPO in files else None,
            "zero_shot_example": next(iter(zero.values()), {}).get("text", "")}


def goals(s: dict) -> dict[str, bool]:
    """The goals of the recipe, checked on one seed: the cold start reads its prompt (below the best
    constant), GRPO does not collapse and improves on the cold start and on the bias baseline; "below"
    means the paired interval of the MAE difference lies below 0."""
    m, iv = s["methods"], s["intervals"]
    after = m.get(GRPO)
    if after is None or COLD not in m:
        return {}

    def below(a, b):
        return iv.get(f"{a} - {b}", {}).get("high", 0) < 0

    return {
        "the cold start below the best constant": below(COLD, CONSTANT),
        "after GRPO no collapse (>= 3 distinct ratings, pred std >= 0.5)":
            after["distinct"] >= 3 and after["pred_std"] >= 0.5,
        "after GRPO below the cold start": below(GRPO, COLD),
        "after GRPO below the user+item bias": below(GRPO, BIAS),
    }


# -----------------------------------------------------------------------------
# Tables


def summary(seeds: list[dict]) -> str:
    names = list(dict.fromkeys(name for s in seeds for name in s["methods"]))
    out = [f"Seeds {', '.join(str(s['seed']) for s in seeds)}; {seeds[0]['methods'][names[0]]['n']} test ratings "
           "per seed (mean ± sd over seeds):", "",
           "| method | MAE | RMSE | format valid | pred std (truth) | distinct |", "|---|---|---|---|---|---|"]
    for name in names:
        ms = [s["methods"][name] for s in seeds if name in s["methods"]]
        out.append(f"| {name} | {spread([m['mae'] for m in ms], '.3f')} | {spread([m['rmse'] for m in ms], '.3f')} | "
                   f"{spread([100 * m['format_valid'] for m in ms], '.0f')}% | "
                   f"{spread([m['pred_std'] for m in ms], '.2f')} ({spread([m['true_std'] for m in ms], '.2f')}) | "
                   f"{spread([float(m['distinct']) for m in ms], '.0f')} |")
    out += ["", "Paired comparisons, each seed on its own test examples (MAE difference, 95% paired bootstrap "
            "interval):", "", "| a - b | " + " | ".join(f"seed {s['seed']}" for s in seeds) + " |",
            "|---" * (len(seeds) + 1) + "|"]
    for pair in dict.fromkeys(k for s in seeds for k in s["intervals"]):
        cells = [(f"{iv['diff']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}]" if (iv := s["intervals"].get(pair))
                  else "-") for s in seeds]
        out.append(f"| {pair} | " + " | ".join(cells) + " |")
    checks = {s["seed"]: goals(s) for s in seeds}
    first = next((c for c in checks.values() if c), {})
    out += ["", "Goals, per seed:", "", "| goal | " + " | ".join(f"seed {s['seed']}" for s in seeds) + " |",
            "|---" * (len(seeds) + 1) + "|"]
    for goal in first:
        out.append(f"| {goal} | " + " | ".join("yes" if checks[s["seed"]].get(goal) else "**no**" for s in seeds) + " |")
    out += ["", "The start check before GRPO (validation examples):", ""]
    for s in seeds:
        c = s.get("start_check")
        out.append(f"- seed {s['seed']}: " + (f"cold start {c['mae']:.3f}, best constant ({c['constant']:g}) "
                                              f"{c['constant_mae']:.3f}, user+item bias {c['bias_mae']:.3f}; "
                                              f"{'beats' if c['beats_constant'] else 'does **not** beat'} the "
                                              f"constant on {c['n']} examples" if c else "not run"))
    out += ["", "Learning curves (GRPO steps: mean reward, format-valid share, training MAE; validation MAE):", ""]
    for s in seeds:
        g, v = s["curve"]["grpo"], s["curve"]["valid"]
        every = max(len(g) // 8, 1)
        out.append(f"- seed {s['seed']}: reward " + ", ".join(f"{r['step']}: {r['reward_mean']:.2f}" for r in g[::every])
                   + "; format " + ", ".join(f"{100 * r['format_valid']:.0f}%" for r in g[::every])
                   + "; valid MAE " + ", ".join(f"{r['step']}: {r['mae']:.3f}" for r in v)
                   + f"; SFT loss {', '.join(f'{x:.3f}' for x in s['curve']['sft'])}")
    out += ["", "What the traces say (test set):", ""]
    for s in seeds:
        f0, f1 = (s["fidelity"].get(k) or {} for k in ("test_start", "test"))
        t = s["traces"] or {}
        line = f"- seed {s['seed']}: "
        if t:
            line += (f"{100 * t['same_reasoning']:.0f}% of the traces after GRPO are the cold start's word for word "
                     f"up to <rate>, {100 * t['rating_moved']:.0f}% of the ratings moved. ")
        if f0 and f1:
            line += "Agreement with the teacher, cold start -> after GRPO: " + ", ".join(
                f"{k} {100 * f0[k]:.0f}% -> {100 * f1[k]:.0f}%" for k in f0)
        out.append(line)
    s = seeds[0]
    if s["zero_shot_example"]:
        out += ["", f"Seed {s['seed']}, the zero-shot model's first test answer:", "", "```",
                s["zero_shot_example"].strip()[:600], "```"]
    for ex in (s["traces"] or {}).get("examples", [])[:2]:
        out += ["", f"Seed {s['seed']}, a test example whose rating GRPO moved (the user gave {ex['label']:g}):", "",
                "```", "cold start:", ex["cold_start"].strip(), "", "after GRPO:", ex["after_grpo"].strip(), "```"]
    return "\n".join(out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (safetensors)")
    p.add_argument("--data", required=True, help="ratings file or dataset directory (e.g. ml-100k/)")
    p.add_argument("--data-format", required=True, help="as train.py's --data-format (ml-100k, amazon, ...)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="runs/real", help="one folder per seed, plus summary.md / summary.json")
    p.add_argument("--quick", action="store_true", help="toy sizes: the pipeline end to end in seconds")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    out = Path(args.out)
    base = ["--model", args.model, "--data", args.data, "--data-format", args.data_format, *PROMPT,
            *(QUICK_PROMPT if args.quick else []), *extra]
    recipe = [*RECIPE, *(QUICK_RECIPE if args.quick else []), *extra]
    seconds = {s: run_seed(s, out / f"seed-{s}", base, recipe) for s in args.seeds}
    seeds = [read_seed(s, out / f"seed-{s}") for s in args.seeds]
    for s in seeds:
        s["seconds"] = seconds[s["seed"]]
    text = summary(seeds)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps({"recipe": base + recipe, "seeds": seeds}, indent=1))
    print(text)
    return seeds


if __name__ == "__main__":
    main()
