"""An embedded synthetic rating dataset: generated from a seed, no download, signal in the histories.

Users have a taste for each genre; items have a genre, a title, a price and a hidden quality. A rating is

    r = clip(round(base + b_user + taste[user, genre] + quality[item] + noise), 1, 5)

Each user mostly watches a few "usual" genres, so the target's genre usually appears in the user's
recent history. The user x genre taste is what a user+item bias model cannot see, and what a reader of
the history can: the user's earlier ratings of same-genre items reveal it, the item's earlier ratings
reveal its quality. Reviews are short snippets whose tone follows the rating.

Simplifications: one genre per item; price is shown but does not affect ratings; what a user watches
does not depend on their taste (real users avoid what they dislike, which would hide the low ratings).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data import Item, Rating, RatingData

GENRES = ("Sci-Fi", "Drama", "Comedy", "Horror", "Romance", "Documentary", "Animation", "Thriller")
_TITLE_WORDS = {
    "Sci-Fi": (("Star", "Orbit", "Nebula", "Quantum", "Android", "Galaxy"), ("Protocol", "Frontier", "Signal", "Colony")),
    "Drama": (("Silent", "Broken", "Distant", "Quiet", "Winter", "Last"), ("Promise", "Letters", "Harbor", "Season")),
    "Comedy": (("Crazy", "Lucky", "Awkward", "Wild", "Silly", "Happy"), ("Weekend", "Roommates", "Wedding", "Road Trip")),
    "Horror": (("Dark", "Hollow", "Cursed", "Bleeding", "Haunted", "Black"), ("House", "Woods", "Cellar", "Ritual")),
    "Romance": (("Sweet", "Paris", "Summer", "Secret", "Golden", "First"), ("Kiss", "Affair", "Hearts", "Dance")),
    "Documentary": (("Inside", "Wild", "Hidden", "Deep", "Ancient", "Modern"), ("Oceans", "Empires", "Minds", "Cities")),
    "Animation": (("Little", "Magic", "Brave", "Tiny", "Flying", "Clever"), ("Dragon", "Robot", "Fox", "Kingdom")),
    "Thriller": (("Deadly", "Final", "Cold", "Silent", "Double", "Night"), ("Witness", "Target", "Deal", "Escape")),
}
_REVIEWS = {
    5: ("Loved it", "A new favourite", "Brilliant", "Perfect for me"),
    4: ("Really good", "Enjoyed it", "Well worth it"),
    3: ("It was fine", "Mixed feelings", "Okay I guess"),
    2: ("Not great", "Disappointing", "Not my thing"),
    1: ("Hated it", "Waste of time", "Awful"),
}


@dataclass
class SyntheticConfig:
    """Sizes and effect strengths of the generated world (defaults: the CPU demo of train.py)."""

    n_users: int = 1200
    n_items: int = 240
    min_ratings: int = 10
    max_ratings: int = 20
    usual_genres: int = 2  # genres a user mostly watches
    usual_share: float = 0.85  # share of a user's ratings that fall in their usual genres
    base: float = 3.1
    user_bias_sd: float = 0.3
    taste_sd: float = 1.2  # user x genre effect: the signal only the histories reveal
    quality_sd: float = 0.9  # how much an item's own quality moves its ratings (the teacher ignores it)
    noise_sd: float = 0.3
    seed: int = 0


def make_synthetic(cfg: SyntheticConfig = SyntheticConfig()) -> RatingData:
    """Generate the dataset deterministically from cfg.seed. Times are distinct seconds (no ties)."""
    rng = np.random.default_rng(cfg.seed)
    n_g = len(GENRES)
    items = {}
    item_genre = rng.integers(0, n_g, cfg.n_items)
    quality = rng.normal(0.0, cfg.quality_sd, cfg.n_items)
    used_titles = set()
    for i in range(cfg.n_items):
        genre = GENRES[item_genre[i]]
        first, second = _TITLE_WORDS[genre]
        title = f"{first[rng.integers(len(first))]} {second[rng.integers(len(second))]}"
        n = 2
        while title in used_titles:  # keep titles unique so a title identifies one item
            title, n = f"{title.rsplit(' ', 1)[0] if n > 2 else title} {n}", n + 1
        used_titles.add(title)
        items[f"i{i}"] = Item(f"i{i}", title=title, categories=(genre,), price=float(rng.integers(5, 30)) - 0.01)
    by_genre = [np.flatnonzero(item_genre == g) for g in range(n_g)]

    ratings = []
    for u in range(cfg.n_users):
        bias = rng.normal(0.0, cfg.user_bias_sd)
        taste = rng.normal(0.0, cfg.taste_sd, n_g)
        usual = rng.choice(n_g, cfg.usual_genres, replace=False)
        n = int(rng.integers(cfg.min_ratings, cfg.max_ratings + 1))
        start = rng.uniform(0.0, 0.6)  # users join over time, so items gather earlier ratings
        times = np.sort(rng.uniform(start, 1.0, n))
        seen = set()
        for t in times:
            g = rng.choice(usual) if rng.random() < cfg.usual_share else int(rng.integers(n_g))
            choices = [i for i in by_genre[g] if i not in seen] or [i for i in range(cfg.n_items) if i not in seen]
            i = int(rng.choice(choices))
            seen.add(i)
            g = int(item_genre[i])
            raw = cfg.base + bias + taste[g] + quality[i] + rng.normal(0.0, cfg.noise_sd)
            r = int(np.clip(np.rint(raw), 1, 5))
            review = _REVIEWS[r][rng.integers(len(_REVIEWS[r]))]
            ratings.append(Rating(f"u{u}", f"i{i}", float(r), int(t * 1e8), review=review))
    ratings.sort(key=lambda r: r.time)
    return RatingData("synthetic", ratings, items)
