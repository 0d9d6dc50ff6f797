"""Time data.build_examples on a ratings file where one user re-rates the same two items many times: the
case that made history building quadratic (each target's walk back through the item's ratings passed
every one of the user's own). Linear now: doubling the rows should about double the time.

    python benchmarks/history_build.py --rows 25000 50000 100000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import Rating, RatingData, build_examples  # noqa: E402


def repeats(rows: int) -> RatingData:
    """Two light users rate items i0 and i1 once, first; then one heavy user rates i0 and i1 in turn, `rows`
    times. For each of the heavy user's targets, the item's other raters lie behind all of its own ratings."""
    first = [Rating(f"light{k}", f"i{k}", 4.0, k) for k in range(2)]
    heavy = [Rating("heavy", f"i{k % 2}", float(1 + k % 5), 2 + k) for k in range(rows)]
    return RatingData("repeats", first + heavy, {})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[25_000, 50_000, 100_000])
    args = p.parse_args(argv)
    print("| rows | examples | seconds |\n|---|---|---|")
    for n in args.rows:
        data = repeats(n)
        start = time.perf_counter()
        examples = build_examples(data, data.ratings)
        print(f"| {n:,} | {len(examples):,} | {time.perf_counter() - start:.2f} |", flush=True)


if __name__ == "__main__":
    main()
