"""RecOne's cold-start traces: teachers write four-tag traces, and only those that end at the truth are kept.

RecOne (docs/paper.md): a teacher answers each training example in the same four-tag format. A trace
whose rating equals the truth is kept (aligned); otherwise the teacher is asked again with the true
rating and its new trace is kept only if it then ends at the truth (rationalised). train.py then
fine-tunes the model on the kept traces (train.sft) before GRPO.

Simplification: the heuristic teacher stands in for the paper's DeepSeek-R1. Any checkpoint can be a
teacher through ModelTeacher, and any file of traces can be read with load_traces.
"""

from __future__ import annotations

import json
import re
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import torch

from data import RATING_SCALE, Example
from model import SamplingConfig, generate
from plumbing.runs import written_file
from reczero import (
    ITEM_CLOSE,
    ITEM_OPEN,
    MATCH_CLOSE,
    MATCH_OPEN,
    RATE_CLOSE,
    RATE_OPEN,
    USER_CLOSE,
    USER_OPEN,
    Prompter,
    parse_output,
)


@dataclass
class Evidence:
    """What the heuristic teacher reads off an example: the user's ratings of items sharing a category."""

    categories: tuple[str, ...]
    similar: list[float]  # the user's earlier ratings of items sharing a category with the target
    similar_mean: float | None
    user_avg: float
    item_avg: float


def history_evidence(ex: Example) -> Evidence:
    """Collect the user's earlier ratings of items that share a category with the target item."""
    cats = set(ex.item.categories)
    similar = [r.rating for r, item in ex.user_history if cats & set(item.categories)]
    mean = sum(similar) / len(similar) if similar else None
    return Evidence(ex.item.categories, similar, mean, ex.user_avg, ex.item_avg)


def _level(value: float, words: tuple[str, ...], cuts: tuple[float, ...]) -> str:
    """The word for `value`: words[k] for the first cut it reaches (cuts descending), else the last word."""
    return next((w for w, c in zip(words, cuts) if value >= c), words[-1])


TASTE = (("loves", "likes", "is lukewarm on", "dislikes", "hates"), (4.25, 3.5, 2.5, 1.75))
RATER = (("a generous", "a moderate", "a strict"), (3.5, 2.5))
RECEPTION = (("acclaimed", "liked", "mixed", "weak", "panned"), (3.75, 3.25, 2.75, 2.25))
TASTE_RATING = {"loves": 5, "likes": 4, "is lukewarm on": 3, "dislikes": 2, "hates": 1}


class HeuristicTeacher:
    """A rule-based teacher that writes four-tag traces from the histories, imperfect on purpose.

    Step 1 judges the user's taste for the target's genre from their ratings of same-category items
    (the decisive evidence on the synthetic data) and how generous a rater they are; step 2 judges
    how other users received the item; step 3 puts the two side by side. The steps use words rather
    than exact numbers: a small model learns an average of what attention finds long before it learns
    exact retrieval. Its own rating follows the taste alone and ignores the reception (its blind
    spot, which RL can correct because the reception is written right there in the trace).
    Asked again with the true rating (rationalisation), it argues its way there only when the truth is
    within `max_shift` of its own rating, and then only with probability `rationalise_rate`, as an LLM
    teacher often drifts back to its first answer.
    """

    def __init__(self, rationalise_rate: float = 0.3, max_shift: float = 1.0, seed: int = 0):
        self.rationalise_rate, self.max_shift = rationalise_rate, max_shift
        self.rng = np.random.default_rng(seed)

    @staticmethod
    def taste(ev: Evidence) -> str:
        """The user's taste for the genre: from same-category ratings, else from their average."""
        return _level(ev.similar_mean if ev.similar_mean is not None else ev.user_avg, *TASTE)

    def own_rating(self, ev: Evidence) -> int:
        """The teacher's prediction: the rating its taste word stands for (its blind spot: the item)."""
        return TASTE_RATING[self.taste(ev)]

    def judge(self, ex: Example) -> Judgement:
        """The decisive fields of the trace this teacher writes for `ex` (before any rationalisation)."""
        ev = history_evidence(ex)
        return Judgement(ev.categories[0] if ev.categories else None, self.taste(ev),
                         _level(ev.item_avg, *RECEPTION), float(self.own_rating(ev)))

    def write(self, examples: list[Example], hints: list[float | None] | None = None) -> list[str]:
        """One trace per example; a hint is the true rating to rationalise towards."""
        hints = hints or [None] * len(examples)
        return [self._trace(ex, hint) for ex, hint in zip(examples, hints)]

    def _trace(self, ex: Example, hint: float | None) -> str:
        ev = history_evidence(ex)
        cat = ev.categories[0] if ev.categories else "this kind of item"
        rating = own = self.own_rating(ev)
        if hint is not None and abs(hint - own) <= self.max_shift and self.rng.random() < self.rationalise_rate:
            rating = hint
        taste, reception = self.taste(ev), _level(ev.item_avg, *RECEPTION)
        basis = "" if ev.similar else f" (no earlier {cat}: judged from their average)"
        user = f"The user {taste} {cat}{basis}; {_level(ev.user_avg, *RATER)} rater."
        pos = [f"{cat}"] * (taste in ("loves", "likes")) + [f"{reception} by others"] * (reception in ("acclaimed", "liked"))
        neg = [f"{cat}"] * (taste in ("dislikes", "hates")) + [f"{reception} by others"] * (reception in ("weak", "panned"))
        item = f"A {cat} item, {reception} by others. [pos] {'; '.join(pos) or 'none'} [neg] {'; '.join(neg) or 'none'}"
        match = f"The user {taste} {cat}; the item is {reception}."
        return (f"{USER_OPEN}\n{user}\n{USER_CLOSE}\n{ITEM_OPEN}\n{item}\n{ITEM_CLOSE}\n"
                f"{MATCH_OPEN}\n{match}\n{MATCH_CLOSE}\n{RATE_OPEN}\n{rating:g}\n{RATE_CLOSE}")


# -----------------------------------------------------------------------------
# Reasoning fidelity: does a model's trace say what the teacher's would?


@dataclass(frozen=True)
class Judgement:
    """The decisive fields of a heuristic-teacher trace; None where a trace does not state one."""

    category: str | None  # the target item's category, copied from the prompt
    taste: str | None  # the user's taste for it, from their ratings of items of that category
    reception: str | None  # how other users received the item, from its average rating
    rating: float | None


_TASTE_WORDS = "|".join(TASTE[0])
_USER_LINE = re.compile(rf"The user ({_TASTE_WORDS}) (.+?)(?: \(no earlier .*?\))?;")
_RECEPTION_LINE = re.compile(rf"({'|'.join(RECEPTION[0])}) by others")


def read_judgement(text: str, scale: tuple[float, float] = RATING_SCALE) -> Judgement:
    """The decisive fields of a trace written in the heuristic teacher's format (any text is accepted);
    the rating as parse_output reads it on the data's `scale`."""
    user, item = _USER_LINE.search(text), _RECEPTION_LINE.search(text)
    return Judgement(user.group(2) if user else None, user.group(1) if user else None,
                     item.group(1) if item else None, parse_output(text, scale).rating)


@dataclass
class Fidelity:
    """Shares of evaluated examples: each field of the model's trace agreeing with the heuristic
    teacher's trace for the same example, and `consistent`: the model's rating is the one its own
    written taste and reception imply (the median true rating of training examples the teacher
    judges the same way)."""

    category: float
    taste: float
    reception: float
    rating: float
    consistent: float


class TraceFidelity:
    """Scores traces against the heuristic teacher: fidelity(examples, texts) -> Fidelity.

    The implied rating of a (taste, reception) pair is fitted once on the training examples: what the
    two judgements say about the rating in this data, so a rating that follows its own reasoning
    (right or wrong words) counts as consistent and one that ignores it does not."""

    def __init__(self, teacher: HeuristicTeacher, train: list[Example], scale: tuple[float, float] = RATING_SCALE):
        self.teacher, self.scale = teacher, scale
        ratings: dict[tuple[str, str], list[float]] = {}
        for ex in train:
            j = teacher.judge(ex)
            ratings.setdefault((j.taste, j.reception), []).append(ex.label)
        self.implied = {k: float(np.median(v)) for k, v in ratings.items()}

    def __call__(self, examples: list[Example], texts: list[str]) -> Fidelity:
        agree = {"category": 0, "taste": 0, "reception": 0, "rating": 0}
        consistent = 0
        for ex, text in zip(examples, texts):
            own, ref = read_judgement(text, self.scale), self.teacher.judge(ex)
            for field in agree:
                agree[field] += getattr(own, field) == getattr(ref, field)
            implied = self.implied.get((own.taste, own.reception))
            consistent += own.rating is not None and own.rating == implied
        n = max(len(examples), 1)
        return Fidelity(**{k: v / n for k, v in agree.items()}, consistent=consistent / n)


class ModelTeacher:
    """Any causal LM through our sampler: prompts with `prompter` (HINT appended when given the truth)
    and samples one trace per example (greedy by default)."""

    def __init__(self, model, prompter: Prompter, max_new_tokens: int = 1024, temperature: float = 0.0,
                 batch: int = 16, seed: int = 0):
        self.model, self.prompter, self.batch = model, prompter, batch
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.generator = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)

    def write(self, examples: list[Example], hints: list[float | None] | None = None) -> list[str]:
        """One sampled trace per example; a hint is the true rating to rationalise towards."""
        tok = self.prompter.tok
        hints = hints or [None] * len(examples)
        cfg = SamplingConfig(self.max_new_tokens, self.temperature, stop_ids=tok.stop_ids)
        texts = []
        for i in range(0, len(examples), self.batch):
            prompts = [self.prompter(ex, hint) for ex, hint in zip(examples[i:i + self.batch], hints[i:i + self.batch])]
            gen = generate(self.model, prompts, cfg, generator=self.generator, pad_id=tok.pad_id)
            texts += [tok.decode(c) for c in gen.completions()]
        return texts


@dataclass
class Trace:
    """One cold-start training example: the prompt's example and the completion to imitate."""

    example: Example
    text: str
    rationalised: bool


@dataclass
class TraceStats:
    asked: int
    aligned: int  # the teacher's own rating equalled the truth
    rationalised: int  # wrong at first, right when told the truth
    dropped: int
    quoted_hint: int = 0  # of the dropped: rationalised traces that cite the truth they were told


# A rationalised trace that says it was told the answer ("the actual rating was 4") teaches the student
# to cite a hint its own prompt never contains: such traces are dropped.
_HINT_QUOTE = re.compile(r"\b(?:actual|true|real|given|correct) rating\b|\breason(?:ing)? towards\b|\bhint\b", re.I)


def quotes_hint(text: str) -> bool:
    """Whether a trace refers to the true rating it was asked to rationalise (reczero.HINT)."""
    return _HINT_QUOTE.search(text) is not None


def build_cold_start(teacher, examples: list[Example], scale: tuple[float, float] = RATING_SCALE,
                     dist=None) -> tuple[list[Trace], TraceStats]:
    """RecOne's trace set: D_align (own rating == truth) plus D_misalign (re-asked with the truth, kept
    only if the new trace ends at the truth without citing it: see quotes_hint).
    `teacher.write(examples, hints)` returns one text each. Under torchrun (`dist`, a
    parallel.Distributed) each rank asks every dist.world-th example and every rank gets all traces."""
    if dist is not None and dist.world > 1:
        traces, stats = build_cold_start(teacher, examples[dist.rank::dist.world], scale)
        where = {id(ex): k for k, ex in enumerate(examples)}
        mine = [(where[id(t.example)], t.text, t.rationalised) for t in traces]  # indices travel, not examples
        traces = [Trace(examples[k], text, r) for k, text, r in sorted(dist.gather_objects(mine))]
        return traces, TraceStats(*map(sum, zip(*dist.gather_objects([astuple(stats)]))))
    first = teacher.write(examples)
    traces, wrong = [], []
    for ex, text in zip(examples, first):
        parsed = parse_output(text, scale)
        if parsed.valid and parsed.rating == ex.label:
            traces.append(Trace(ex, text, False))
        else:
            wrong.append(ex)
    aligned = len(traces)
    second = teacher.write(wrong, [ex.label for ex in wrong]) if wrong else []
    quoted = 0
    for ex, text in zip(wrong, second):
        parsed = parse_output(text, scale)
        if parsed.valid and parsed.rating == ex.label:
            if quotes_hint(text):
                quoted += 1
            else:
                traces.append(Trace(ex, text, True))
    order = {id(ex): k for k, ex in enumerate(examples)}
    traces.sort(key=lambda t: order[id(t.example)])  # keep the input order, so the set is deterministic
    return traces, TraceStats(len(examples), aligned, len(traces) - aligned, len(examples) - len(traces), quoted)


def save_traces(traces: list[Trace], path: Path) -> None:
    """Write traces as the JSONL lines load_traces (and --sft-traces) reads, whole or not at all
    (runs.written_file: a failed write is a WriteError naming the file)."""
    with written_file(path) as f:
        for t in traces:
            r = t.example.target
            f.write(json.dumps({"user_id": r.user_id, "item_id": r.item_id, "time": r.time, "text": t.text}) + "\n")


def load_traces(path, train: list[Example]) -> list[Trace]:
    """Cold-start traces from JSONL lines {user_id, item_id, time, text}, matched to training examples.
    A line that is not such a trace (or whose text is not a string) is a ValueError naming it."""
    index = {e.target.key: e for e in train}
    traces = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                key = (str(row["user_id"]), str(row["item_id"]), int(row["time"]))
                if not isinstance(row["text"], str):
                    raise TypeError(f"text is {type(row['text']).__name__}, not a string")
                traces.append(Trace(index[key], row["text"], False))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path} line {n}: not a trace of a training example ({type(e).__name__}: {e})") from None
    return traces
