"""Rating datasets: one record type, leak-free time splits and the histories a prompt may show.

The readers of the public file formats are in plumbing/readers.py, the embedded synthetic data in
plumbing/synthetic.py; docs/data.md describes the formats.

Simplifications and decisions:
- Everything is held in memory as plain dataclasses; the datasets the paper uses (Amazon Music/Book,
  Yelp subsets) fit comfortably.
- Time is an integer (unix seconds). "Earlier" always means strictly smaller time: interactions that
  share a timestamp never see each other, which is the only safe choice when files round to the day.
- Repeated (user, item) pairs are separate interactions and are all kept, but a target's prompt never
  shows the user's own earlier ratings of the same item, in either history or in either average: with
  repeats, that rating is the label more often than not.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, Iterable

RATING_SCALE = (1.0, 5.0)  # the 1-5 stars of Amazon, Yelp and MovieLens 100K / 1M


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Item:
    """What is known about an item besides its ratings (from a metadata file, or empty)."""

    item_id: str
    title: str = ""
    categories: tuple[str, ...] = ()
    brand: str = ""
    price: float | None = None
    description: str = ""


@dataclass(frozen=True)
class Rating:
    """One interaction: user `user_id` rated item `item_id` with `rating` at unix time `time`."""

    user_id: str
    item_id: str
    rating: float
    time: int
    review: str = ""
    summary: str = ""

    @property
    def key(self) -> tuple[str, str, int]:
        """(user_id, item_id, time): names one interaction, e.g. in a trace file or a fallback table."""
        return (self.user_id, self.item_id, self.time)


@dataclass
class RatingData:
    """A whole dataset: ratings sorted by (time, file order), items by id, rows skipped while reading."""

    name: str
    ratings: list[Rating]
    items: dict[str, Item]
    skipped: int = 0
    scale: tuple[float, float] = RATING_SCALE


@dataclass
class Split:
    """Target interactions for training, validation and test (each sorted by time)."""

    train: list[Rating]
    valid: list[Rating]
    test: list[Rating]


@dataclass
class Example:
    """One prediction task: everything the prompt may show, all strictly earlier than `target.time`.

    user_history: the user's last <= 10 earlier ratings of other items (oldest first), with those items.
    item_history: the last <= 10 earlier ratings of the target item by other users (oldest first).
    user_avg / item_avg: means over *all* such earlier ratings (before truncation to 10).
    """

    target: Rating
    item: Item
    user_history: list[tuple[Rating, Item]]
    item_history: list[Rating]
    user_avg: float
    item_avg: float

    @property
    def label(self) -> float:
        return self.target.rating


# ---------------------------------------------------------------- splits


def drop_duplicates(data: RatingData) -> int:
    """Keep the first of ratings sharing (user, item, time), in place; returns how many were dropped.
    A repeated row would be both a target and its own history, and count twice in every average."""
    seen, kept = set(), []
    for r in data.ratings:
        if r.key not in seen:
            seen.add(r.key)
            kept.append(r)
    dropped = len(data.ratings) - len(kept)
    data.ratings = kept
    return dropped


def count_duplicates(data: RatingData) -> int:
    """Ratings whose (user, item, time) an earlier rating already has."""
    return len(data.ratings) - len({r.key for r in data.ratings})


def split_by_time(data: RatingData, mode: str = "user-last", valid_frac: float = 0.1,
                  test_frac: float = 0.1) -> Split:
    """Split the ratings by time, deterministically (see the modes below).

    "user-last": each user's last rating (by time, then file order) is test, the one before valid,
    the rest train; users with fewer than 3 ratings go wholly to train. "global": the latest
    `test_frac` of all ratings is test, the `valid_frac` before it valid; each cut moves earlier to
    the start of its timestamp so ties never straddle a boundary (valid/test may grow slightly).
    """
    ratings = sorted(data.ratings, key=lambda r: r.time)  # stable: keeps file order within ties
    if mode == "user-last":
        by_user: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(ratings):
            by_user[r.user_id].append(i)
        part = [0] * len(ratings)  # 0 train, 1 valid, 2 test
        for positions in by_user.values():
            if len(positions) >= 3:
                part[positions[-2]], part[positions[-1]] = 1, 2
        return Split(*([r for r, p in zip(ratings, part) if p == k] for k in range(3)))
    if mode != "global":
        raise ValueError(f"unknown split mode {mode!r}; expected 'user-last' or 'global'")
    if not (valid_frac >= 0 and test_frac >= 0 and valid_frac + test_frac < 1):
        raise ValueError(f"bad fractions: valid {valid_frac}, test {test_frac}")
    times, n = [r.time for r in ratings], len(ratings)

    def block_start(index: int) -> int:
        return bisect_left(times, times[index]) if index < n else n

    test_at = block_start(n - round(n * test_frac))
    valid_at = block_start(max(test_at - round(n * valid_frac), 0))
    return Split(ratings[:valid_at], ratings[valid_at:test_at], ratings[test_at:])


# ---------------------------------------------------------------- histories


class _Timeline:
    """One key's ratings in time order with prefix sums, so the mean of any prefix is O(1). `other` names
    the other side of each rating (the item on a user's timeline, the user on an item's): run_start[i] is
    where the run of equal `other` values that ends at i begins, so recent() can jump over a run."""

    def __init__(self, ratings: list[Rating], other: Callable = lambda r: None):
        self.ratings = ratings
        self.times = [r.time for r in ratings]
        self.sums = [0.0, *accumulate(r.rating for r in ratings)]
        self.other = [other(r) for r in ratings]
        self.run_start = list(range(len(ratings)))
        for i in range(1, len(ratings)):
            if self.other[i] == self.other[i - 1]:
                self.run_start[i] = self.run_start[i - 1]

    def before(self, time: int) -> int:
        """How many ratings are strictly earlier than `time`."""
        return bisect_left(self.times, time)

    def recent(self, n: int, skip, count: int) -> list[Rating]:
        """The last `count` of the first n ratings whose other side is not `skip`, oldest first. A run of
        `skip` is passed in one jump, so this takes O(count) steps however often `skip` repeats (one user
        re-rating one item 50,000 times made history building quadratic)."""
        out, i = [], n - 1
        while i >= 0 and len(out) < count:
            if self.other[i] == skip:
                i = self.run_start[i] - 1
                continue
            out.append(self.ratings[i])
            i -= 1
        return out[::-1]


def _timelines(ordered: Iterable[Rating], key: Callable, other: Callable = lambda r: None) -> dict:
    """A _Timeline per key, in the order of `ordered` (already sorted by time)."""
    groups = defaultdict(list)
    for r in ordered:
        groups[key(r)].append(r)
    return {k: _Timeline(v, other) for k, v in groups.items()}


def build_examples(data: RatingData, targets: list[Rating], max_user_history: int = 10,
                   max_item_history: int = 10, min_total: int = 5) -> list[Example]:
    """An Example per target whose histories are both non-empty and hold >= min_total entries together.

    Histories come from all of `data.ratings`, whatever the split: only ratings strictly earlier
    than the target are visible, so nothing from its future (or its timestamp) leaks, and the user's
    own earlier ratings of the target item are left out of both sides (and both averages).
    O(log n + history length) each.
    """
    ordered = sorted(data.ratings, key=lambda r: r.time)
    pair_counts = Counter((r.user_id, r.item_id) for r in ordered)
    by_user = _timelines(ordered, lambda r: r.user_id, lambda r: r.item_id)
    by_item = _timelines(ordered, lambda r: r.item_id, lambda r: r.user_id)
    # Only repeated (user, item) pairs have ratings to leave out: the user's own ones of the target item.
    by_pair = _timelines((r for r in ordered if pair_counts[r.user_id, r.item_id] > 1),
                         lambda r: (r.user_id, r.item_id))
    empty = _Timeline([])
    examples = []
    for t in targets:
        user, item = by_user.get(t.user_id, empty), by_item.get(t.item_id, empty)
        own = by_pair.get((t.user_id, t.item_id), empty)
        n_user, n_item, n_own = user.before(t.time), item.before(t.time), own.before(t.time)
        if n_user == n_own or n_item == n_own:
            continue
        user_hist = user.recent(n_user, t.item_id, max_user_history)  # not the user's own earlier ratings of it
        item_hist = item.recent(n_item, t.user_id, max_item_history)  # not this user's
        if len(user_hist) + len(item_hist) < min_total:
            continue
        examples.append(Example(
            target=t, item=data.items.get(t.item_id) or Item(t.item_id),
            user_history=[(r, data.items.get(r.item_id) or Item(r.item_id)) for r in user_hist],
            item_history=item_hist,
            user_avg=(user.sums[n_user] - own.sums[n_own]) / (n_user - n_own),
            item_avg=(item.sums[n_item] - own.sums[n_own]) / (n_item - n_own),
        ))
    return examples
