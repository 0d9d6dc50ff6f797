"""The README's pictures, remade from run folders (needs matplotlib: `pip install matplotlib`).

    python benchmarks/figures.py demo runs/seeds             # docs/demo_learning.png, docs/demo_traces.png
    python benchmarks/figures.py real runs/real              # docs/real_ratings.png

demo: FOLDER holds one demo run per seed (seed-0/, seed-1/, ...: what benchmarks/demo_seeds.py writes).
  demo_learning.png: left, the validation MAE over GRPO steps of every seed (thin) and their mean (thick),
  beside the same validation examples' MAE under matrix factorisation and the user+item bias (the start
  check's record, mean over seeds); right, each seed's test MAE for the cold start, after GRPO, MF and
  the bias. demo_traces.png: for the (taste, reception) pairs the traces of the lowest seed write, the mean
  rating of the cold start and after GRPO beside the mean true rating (benchmarks/demo_traces.py).
real: FOLDER is benchmarks/real_ratings.py's --out (its summary.json). real_ratings.png: each method's
  test MAE per seed, and the paired 95% intervals of the comparisons the recipe's goals name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_traces import by_judgement, read_run  # noqa: E402


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def demo_learning(folder: Path, to: Path) -> Path:
    """Validation MAE over GRPO steps for every seed, with the baselines; test MAE per seed."""
    plt = pyplot()
    seeds = sorted(folder.glob("seed-*"), key=lambda p: int(p.name.split("-")[1]))
    if not seeds:
        raise SystemExit(f"{folder}: no seed-*/ run folders")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    curves, checks, tests = [], [], []
    for run in seeds:
        rs = records(run)
        curve = sorted((r["step"], r["mae"]) for r in rs if r.get("stage") == "eval")
        curves.append(curve)
        left.plot(*zip(*curve), color="tab:blue", alpha=0.25, lw=1)
        checks += [r for r in rs if r.get("stage") == "start_check"]
        base = {r["name"]: r["mae"] for r in rs if r.get("stage") == "baseline"}
        test = {r.get("stage"): r["mae"] for r in rs if r.get("stage") in ("test_start", "test")}
        constant = next((mae for name, mae in base.items() if name.startswith("best constant")), None)
        tests.append((run.name, test.get("test_start"), test.get("test"), base.get("matrix factorisation"),
                      base.get("user+item bias"), constant))
    steps = [s for s, _ in curves[0]]
    mean = [statistics.fmean(c[k][1] for c in curves if k < len(c)) for k in range(len(steps))]
    left.plot(steps, mean, color="tab:blue", lw=2.5, marker="o", label=f"LLM, mean of {len(seeds)} seeds")
    for key, label, color in (("mf_mae", "matrix factorisation", "tab:green"), ("bias_mae", "user+item bias", "tab:red")):
        values = [c[key] for c in checks if key in c]
        if values:
            left.axhline(statistics.fmean(values), color=color, ls="--", lw=1.5, label=label)
    left.set(xlabel="GRPO step (step 0: the cold start)", ylabel="validation MAE (lower is better)",
             title="The demo learning: validation MAE during GRPO")
    left.legend(frameon=False, loc="lower left")
    ticks = ("cold\nstart", "after\nGRPO", "MF", "bias", "best\nconstant")
    colors = ("tab:gray", "tab:blue", "tab:green", "tab:red", "black")
    shown = []
    for k, color in enumerate(colors):
        values = [t[k + 1] for t in tests if t[k + 1] is not None]
        if values:
            right.scatter([len(shown)] * len(values), values, color=color, alpha=0.6, s=18)
            right.hlines(statistics.fmean(values), len(shown) - 0.3, len(shown) + 0.3, color=color, lw=2.5)
            shown.append(ticks[k])
    right.set_xticks(range(len(shown)), shown)
    right.set(ylabel="test MAE (1,200 users)", title=f"Test MAE, each of {len(seeds)} seeds (bar: mean)")
    fig.tight_layout()
    return save(fig, to / "demo_learning.png", plt)


def demo_traces(run: Path, to: Path, min_n: int = 20) -> Path:
    """Mean rating per (taste, reception) pair written in the traces: cold start, after GRPO, truth."""
    plt = pyplot()
    _, _, _, truths, judged, step = read_run(run)
    cells = [(k, c) for k, c in by_judgement(truths, judged).items() if len(c["truth"]) >= min_n]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    x = range(len(cells))
    for name, color, marker in (("cold start", "tab:gray", "s"), ("GRPO", "tab:blue", "o"), ("truth", "black", "_")):
        ax.scatter(x, [statistics.fmean(c[name]) for _, c in cells], color=color, marker=marker,
                   s=120 if marker == "_" else 40, label={"GRPO": f"after GRPO (step {step})",
                                                          "truth": "true mean rating"}.get(name, name), zorder=3)
    for k, (_, c) in enumerate(cells):
        ax.annotate("", (k, statistics.fmean(c["GRPO"])), (k, statistics.fmean(c["cold start"])),
                    arrowprops={"arrowstyle": "->", "color": "tab:blue", "alpha": 0.5})
    ax.set_xticks(list(x), [f"{taste}\n{rec} ({len(c['truth'])})" for (taste, rec), c in cells], rotation=60,
                  ha="right", fontsize=8)
    ax.set(ylabel="mean rating (1-5)", title="What GRPO changed: the rating for each (taste; reception) the "
                                             f"trace writes ({run.name}, pairs with >= {min_n} test users)")
    ax.legend(frameon=False, ncol=3, loc="upper right")
    fig.tight_layout()
    return save(fig, to / "demo_traces.png", plt)


def real_ratings(folder: Path, to: Path) -> Path:
    """Each method's test MAE per seed, and the paired intervals of the recipe's comparisons."""
    plt = pyplot()
    summary = json.loads((folder / "summary.json").read_text())
    seeds = summary["seeds"]
    methods = list(dict.fromkeys(m for s in seeds for m in s["methods"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for k, name in enumerate(methods):
        values = [s["methods"][name]["mae"] for s in seeds if name in s["methods"]]
        left.scatter(values, [k] * len(values), color="tab:blue", s=25)
    left.set_yticks(range(len(methods)), methods, fontsize=8)
    left.invert_yaxis()
    left.set(xlabel=f"test MAE ({seeds[0]['methods'][methods[0]]['n']} ratings per seed; a dot per seed)",
             title="SmolLM2-135M on MovieLens 100K")
    pairs = list(dict.fromkeys(p for s in seeds for p in s["intervals"]))
    for k, pair in enumerate(pairs):
        for j, s in enumerate(seeds):
            if pair in s["intervals"]:
                iv = s["intervals"][pair]
                y = k + (j - (len(seeds) - 1) / 2) * 0.2
                right.errorbar(iv["diff"], y, xerr=[[iv["diff"] - iv["low"]], [iv["high"] - iv["diff"]]], fmt="o",
                               color=f"C{j}", capsize=3, label=f"seed {s['seed']}" if k == 0 else None)
    right.axvline(0, color="black", lw=0.8)
    right.set_yticks(range(len(pairs)), pairs, fontsize=8)
    right.invert_yaxis()
    right.xaxis.set_major_locator(plt.MaxNLocator(5))
    right.set(xlabel="MAE of a - MAE of b, 95% paired interval (< 0: a is better)",
              title="a - b on the same test ratings")
    right.legend(frameon=False)
    fig.tight_layout()
    return save(fig, to / "real_ratings.png", plt)


def save(fig, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("demo", "real"))
    p.add_argument("folder", type=Path)
    p.add_argument("--to", type=Path, default=ROOT / "docs", help="where the pictures go (default docs/)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks/figures.py needs matplotlib: pip install matplotlib") from None
    if args.kind == "demo":
        first = min(args.folder.glob("seed-*"), key=lambda p: int(p.name.split("-")[1]), default=args.folder / "seed-0")
        return [demo_learning(args.folder, args.to), demo_traces(first, args.to)]
    return [real_ratings(args.folder, args.to)]


if __name__ == "__main__":
    main()
