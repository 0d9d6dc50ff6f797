"""Readers for the public rating formats (Amazon 2014/2018/2023, MovieLens, Yelp, CSV) into data.py's records.

Ratings files are strict: a bad row is a DataError naming file, line and field (or, with
skip_bad_rows, a counted skip). Metadata files are lenient: a row that cannot be read just leaves that
item without metadata. Python-literal metadata (Amazon 2014) is read with ast.literal_eval; nothing is
ever eval'd or unpickled.
"""

from __future__ import annotations

import ast
import codecs
import csv
import gzip
import json
import math
import re
import sys
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

from data import Item, Rating, RatingData

# ---------------------------------------------------------------- formats and errors

FORMATS = ("amazon", "amazon2023", "ml-100k", "ml-1m", "ml-20m", "yelp", "csv")


class DataError(ValueError):
    """A ratings file that cannot be read faithfully; the message names file, line and field."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A dataset file, or a standard file inside a dataset directory, that does not exist."""


class _RowError(Exception):
    """One bad row; `load_ratings`, which knows the file and line, makes it a DataError or a skip."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(f"field '{field}': {problem}" if field else problem)


def _shown(value: object, limit: int = 80) -> str:
    """repr(value) for a message, cut to `limit` characters: a 50 MB field must not make a 50 MB message."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(value) if isinstance(value, str) else len(text):,} characters)"


# ---------------------------------------------------------------- reading lines


class _Lines:
    """The lines of a text file (gzip if named *.gz), counting line numbers.

    `no` is the last line read, `first` the first line of the current record (a CSV row may span
    lines), `eof` whether a record asked for a line past the last one.
    """

    def __init__(self, path: Path, encoding: str = "utf-8"):
        self.path, self.encoding, self.no, self.first, self.bad_bytes, self.eof = path, encoding, 0, 0, False, False

    def __iter__(self) -> Iterator[str]:
        try:
            with (gzip.open if self.path.name.endswith(".gz") else open)(self.path, "rb") as f:
                for raw in f:
                    if self.no == 0:  # a byte-order mark (some editors write one) is not part of the first field
                        raw = raw.removeprefix(codecs.BOM_UTF8)
                    self.no = self.first = self.no + 1
                    try:
                        yield raw.decode(self.encoding)
                    except UnicodeDecodeError:  # flag it so that only the row holding it is rejected
                        self.bad_bytes = True
                        yield raw.decode(self.encoding, errors="replace")
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a truncated or corrupt .gz
            raise DataError(f"{self.path.name} line {self.no + 1}: unreadable ({e})") from None
        self.eof = True


def _collect(lines: _Lines, records: Iterable, parse: Callable) -> Iterator[Rating | _RowError]:
    """Parse each non-blank record (a line or a CSV row) of `lines`; yield a Rating or the _RowError."""
    for record in records:
        try:
            if isinstance(record, _RowError):
                raise record
            if lines.bad_bytes:
                raise _RowError(None, f"bytes that are not valid {lines.encoding}")
            if record and (not isinstance(record, str) or record.strip()):
                yield parse(record)
        except _RowError as e:
            yield e
        finally:
            lines.bad_bytes = False


def _csv(lines: _Lines, required: Iterable[str]) -> tuple[Iterator[list[str] | _RowError], Callable]:
    """CSV rows (quoted fields may span lines; a row the csv module refuses comes as its _RowError) and
    a row -> dict function that checks the width."""
    reader = csv.reader(lines)
    try:
        header = [h.strip().lstrip("\ufeff") for h in next(reader, [])]
    except csv.Error as e:  # a header beyond the field size limit, say
        raise DataError(f"{lines.path.name} line 1: unreadable header ({e})") from None
    for column in required:
        if column not in header:
            raise DataError(f"{lines.path.name} line 1: header lacks column '{column}' (has {_shown(header)})")

    def rows() -> Iterator[list[str] | _RowError]:
        while True:
            before = lines.no
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # the reader goes on with the next line, so only this row is lost
                row = _RowError(None, f"unreadable CSV ({e})")
            lines.first = before + 1
            yield row

    def as_dict(row: list[str]) -> dict:
        if len(row) != len(header):
            raise _RowError(None, f"expected {len(header)} fields, found {len(row)}")
        return dict(zip(header, row))

    return rows(), as_dict


def _fields(line: str, sep: str, n: int) -> list[str]:
    parts = line.rstrip("\r\n").split(sep)
    if len(parts) != n:
        raise _RowError(None, f"expected {n} fields separated by {sep!r}, found {len(parts)}")
    return parts


def _json_object(line: str) -> dict:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise _RowError(None, f"malformed JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _RowError(None, "not a JSON object")
    return obj


# ---------------------------------------------------------------- field parsing


def _number(value: object) -> float:
    if isinstance(value, bool):  # JSON true would otherwise be a 1-star rating
        raise ValueError
    return float(value)


# Times outside 1970 to the end of 2100 (unix seconds) are typos or wrong units, not ratings.
_TIME_RANGE = (0.0, datetime(2101, 1, 1, tzinfo=timezone.utc).timestamp())
# Milliseconds below this are March 1973 or earlier: a file whose first time is this small is in seconds
_MILLIS_FLOOR = 1e11


def _parse_time(value: object, key: str, millis: bool) -> int:
    """Unix seconds from a number (seconds, or milliseconds if `millis`) or an ISO date (UTC if naive),
    between 1970 and 2100."""
    try:
        number = _number(value)
        seconds = number // 1000 if millis else number
    except (TypeError, ValueError):
        try:
            when = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError:
            raise _RowError(key, f"{_shown(value)} is neither a unix time nor an ISO date") from None
        seconds = (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
    if not _TIME_RANGE[0] <= seconds < _TIME_RANGE[1]:  # in seconds, after any unit conversion; rejects NaN
        raise _RowError(key, f"{_shown(value)} is not a time between 1970 and 2100")
    return int(seconds)


def _rating_from(row: dict, cols: tuple, scale: tuple[float, float], millis: bool = False) -> Rating:
    """A Rating from a dict; `cols` names its (user, item, rating, time, review, summary) keys."""
    def required(key: str) -> object:
        value = row.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise _RowError(key, "missing")
        return value

    user, item, rating_key, time_key, review, summary = cols
    raw = required(rating_key)
    try:
        rating = _number(raw)
    except (TypeError, ValueError):
        raise _RowError(rating_key, f"{_shown(raw)} is not a number") from None
    if not scale[0] <= rating <= scale[1]:  # also rejects NaN
        raise _RowError(rating_key, f"{_shown(raw)} is outside the scale {scale[0]:g}-{scale[1]:g}")
    ids = {key: str(required(key)).strip() for key in (user, item)}
    for key, value in ids.items():
        if "\x00" in value:  # a damaged file: the id would be a phantom user or item
            raise _RowError(key, f"{_shown(value)} holds a NUL byte")
    return Rating(ids[user], ids[item], rating,
                  _parse_time(required(time_key), time_key, millis),
                  _clean(row.get(review)) if review else "", _clean(row.get(summary)) if summary else "")


def _clean(text: object) -> str:
    """Text with whitespace runs collapsed; lists (Amazon descriptions) are joined; None is empty."""
    if isinstance(text, (list, tuple)):
        text = " ".join(map(str, text))
    return " ".join(str(text).split()) if text is not None else ""


def _price(value: object) -> float | None:
    """12.99 from 12.99, "12.99" or "$12.99" (the low end of a range); None if absent or unreadable."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    match = re.search(r"\d+(?:\.\d+)?", str(value or "").replace(",", ""))
    return float(match.group()) if match else None


def _item(item_id: object, title: object = "", categories: Iterable = (), brand: object = "",
          price: object = None, description: object = "") -> Item:
    """A cleaned Item; nested category lists (Amazon 2014) are flattened and de-duplicated."""
    flat: list[str] = []
    for group in categories or ():
        for name in map(_clean, group if isinstance(group, (list, tuple)) else [group]):
            if name and name not in flat:
                flat.append(name)
    return Item(str(item_id).strip(), _clean(title), tuple(flat), _clean(brand), _price(price),
                _clean(description))


# ---------------------------------------------------------------- metadata (lenient)

_ML100K_GENRES = ("unknown|Action|Adventure|Animation|Children's|Comedy|Crime|Documentary|Drama|Fantasy|"
                  "Film-Noir|Horror|Musical|Mystery|Romance|Sci-Fi|Thriller|War|Western").split("|")


def _amazon_item(line: str) -> Item:
    """Amazon 2014/2018/2023 metadata; 2014 files hold Python literals, read with ast.literal_eval."""
    try:
        obj = json.loads(line)
    except ValueError:
        obj = ast.literal_eval(line)  # literals only: never eval or pickle
    categories = [obj.get("main_category") or ()] + list(obj.get("categories") or obj.get("category") or ())
    return _item(obj.get("parent_asin") or obj.get("asin") or "", obj.get("title"), categories,
                 obj.get("brand") or obj.get("store"), obj.get("price"), obj.get("description"))


def _ml100k_item(line: str) -> Item:
    parts = line.rstrip("\r\n").split("|")
    return _item(parts[0], parts[1], [g for g, f in zip(_ML100K_GENRES, parts[5:]) if f.strip() == "1"])


def _ml_genres(movie_id: str, title: str, genres: str) -> Item:
    return _item(movie_id, title, [g for g in genres.split("|") if g != "(no genres listed)"])


def _yelp_item(line: str) -> Item:
    """Yelp business: name as title, comma-separated categories. The price level (1-4) becomes the
    description "Price level 2 of 4 ($$)": Item.price is money, and the prompt would show "Price: 2.00"."""
    obj = json.loads(line)
    level = _price((obj.get("attributes") or {}).get("RestaurantsPriceRange2"))
    described = f"Price level {level:g} of 4 ({'$' * int(level)})" if level in (1, 2, 3, 4) else ""
    return _item(obj["business_id"], obj.get("name"), (obj.get("categories") or "").split(","),
                 description=described)


def _csv_item(row: dict) -> Item | None:
    """The item columns of a generic CSV row; None when the row has none filled in."""
    if not any((row.get(k) or "").strip() for k in ("title", "categories", "brand", "price", "description")):
        return None
    return _item(row["item_id"], row.get("title"), (row.get("categories") or "").split("|"),
                 row.get("brand"), row.get("price"), row.get("description"))


def _read_meta(path: Path, fmt: str) -> dict[str, Item]:
    """Items from a metadata file; rows that cannot be understood are skipped, first row per id wins.
    A file that yields no item at all is a DataError: the run would have no item texts."""
    lines = _Lines(path, "latin-1" if fmt in ("ml-100k", "ml-1m") else "utf-8")
    records: Iterable = lines
    if fmt in ("ml-20m", "csv"):
        records, as_dict = _csv(lines, ["movieId", "title", "genres"] if fmt == "ml-20m" else ["item_id"])
        to_item = (lambda row: _csv_item(as_dict(row))) if fmt == "csv" else (lambda row: _ml_genres(*row))
    else:
        to_item = {"amazon": _amazon_item, "amazon2023": _amazon_item, "yelp": _yelp_item,
                   "ml-100k": _ml100k_item, "ml-1m": lambda line: _ml_genres(*_fields(line, "::", 3))}[fmt]
    items: dict[str, Item] = {}
    seen = 0
    for record in records:
        blank = not (record.strip() if isinstance(record, str) else record)
        seen += not blank
        if blank or isinstance(record, _RowError):  # a _RowError: a row the csv module refused
            continue
        try:
            item = to_item(record)
        except (ValueError, SyntaxError, TypeError, KeyError, AttributeError, IndexError, _RowError):
            continue
        if item is not None and item.item_id:
            items.setdefault(item.item_id, item)
    if not items:
        unit = ("row" if fmt in ("ml-20m", "csv") else "line") + "s" * (seen != 1)
        raise DataError(f"{path.name}: no item metadata read (0 of {seen:,} {unit} usable)")
    return items


# ---------------------------------------------------------------- ratings (strict)

# Standard file names inside a dataset directory: (ratings candidates, metadata candidates).
_DIR_FILES = {
    "ml-100k": (("u.data",), ("u.item",)),
    "ml-1m": (("ratings.dat",), ("movies.dat",)),
    "ml-20m": (("ratings.csv",), ("movies.csv",)),
    "yelp": (("yelp_academic_dataset_review.json", "review.json"),
             ("yelp_academic_dataset_business.json", "business.json")),
}
# (user, item, rating, time, review, summary) keys of each format's ratings rows.
_COLS = {
    "amazon": ("reviewerID", "asin", "overall", "unixReviewTime", "reviewText", "summary"),
    "amazon2023": ("user_id", "parent_asin", "rating", "timestamp", "text", "title"),
    "yelp": ("user_id", "business_id", "stars", "date", "text", None),
    "csv": ("user_id", "item_id", "rating", "timestamp", "review", "summary"),
    "ml-20m": ("userId", "movieId", "rating", "timestamp", None, None),
}
_COLS["ml-100k"] = _COLS["ml-1m"] = ("user_id", "item_id", "rating", "timestamp", None, None)
# What the formats without a standard directory read, for errors when --data names a directory.
_FILE_KINDS = {
    "amazon": "one reviews file (.json or .json.gz, one JSON object per line)",
    "amazon2023": "one reviews file (.jsonl or .jsonl.gz, one JSON object per line)",
    "csv": "one CSV file whose header has user_id,item_id,rating,timestamp",
}


def _expects(fmt: str) -> str:
    """What --data must name for `fmt`, in words."""
    if fmt not in _DIR_FILES:
        return _FILE_KINDS[fmt]
    ratings, meta = (" or ".join(names) for names in _DIR_FILES[fmt])
    return f"a directory holding {ratings} (and {meta} for item details), or that ratings file itself"


def _resolve(path: Path, meta_path: Path | None, fmt: str) -> tuple[Path, Path | None]:
    """The ratings and metadata files; directory formats look up their standard file names."""
    if not path.exists():
        raise DataFileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir() and fmt not in _DIR_FILES:  # open() would say only "[Errno 21] Is a directory"
        raise DataError(f"{path}: a directory, but --data-format {fmt} reads {_expects(fmt)}")
    if meta_path is not None and meta_path.is_dir():
        raise DataError(f"{meta_path}: a directory, but --meta expects one metadata file")
    if fmt in _DIR_FILES:
        folder = path if path.is_dir() else path.parent
        ratings_names, meta_names = _DIR_FILES[fmt]
        if path.is_dir():
            path = next((folder / n for n in ratings_names if (folder / n).exists()), None)
            if path is None:
                raise DataFileNotFoundError(f"{folder}: none of {ratings_names} in this directory")
        if meta_path is None:  # these distributions ship the metadata next to the ratings
            meta_path = next((folder / n for n in meta_names if (folder / n).exists()), None)
    if meta_path is not None and not meta_path.exists():
        raise DataFileNotFoundError(f"{meta_path}: no such file")
    return path, meta_path


def load_ratings(path: str | Path, fmt: str, meta_path: str | Path | None = None,
                 skip_bad_rows: bool = False, scale: tuple[float, float] | None = None) -> RatingData:
    """Read a dataset in one of FORMATS; ratings come sorted by (time, file order).

    A bad ratings row raises DataError naming file, line and field; with `skip_bad_rows` it is
    skipped and its lines (a stray quote can take many) counted in `skipped`. Default scale: 0.5-5 for
    ml-20m, else 1-5. A metadata file that yields no item of the ratings is a DataError.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    name = Path(path).resolve().name.split(".")[0]
    path, meta = _resolve(Path(path), Path(meta_path) if meta_path else None, fmt)
    scale = (float(scale[0]), float(scale[1])) if scale else ((0.5, 5.0) if fmt == "ml-20m" else (1.0, 5.0))
    cols, lines = _COLS[fmt], _Lines(path)
    # A directory format given some other file: if its first row cannot be read, the file is probably
    # not of this format at all, so say what the format expects.
    hint = (f" (--data-format {fmt} reads {_expects(fmt)})"
            if fmt in _DIR_FILES and path.name not in _DIR_FILES[fmt][0] else "")
    items: dict[str, Item] = {}
    records: Iterable = lines
    if fmt in ("csv", "ml-20m"):
        try:
            records, as_dict = _csv(lines, cols[:4])
        except DataError as e:
            raise DataError(f"{e}{hint}") from None

        def parse(row: list[str]) -> Rating:
            rating = _rating_from(as_dict(row), cols, scale)
            # item columns ride along, first wins; not from a row an unclosed quote ran to the end of file
            if fmt == "csv" and rating.item_id not in items and not lines.eof:
                if item := _csv_item(as_dict(row)):
                    items[rating.item_id] = item
            return rating
    elif fmt in ("ml-100k", "ml-1m"):
        sep = "\t" if fmt == "ml-100k" else "::"
        parse = lambda line: _rating_from(dict(zip(cols, _fields(line, sep, 4))), cols, scale)  # noqa: E731
    else:
        millis = None  # amazon2023: milliseconds, unless the file's first time is plainly in seconds

        def parse(line: str) -> Rating:
            nonlocal millis
            row = _json_object(line)
            if fmt == "amazon2023":
                row["parent_asin"] = row.get("parent_asin") or row.get("asin")
                first = row.get("timestamp")
                if millis is None and isinstance(first, (int, float)) and not isinstance(first, bool):
                    millis = first >= _MILLIS_FLOOR
                    if not millis:  # read as milliseconds, every time would fall in the early 1970s
                        print(f"warning: {path.name}: the first time, {first:g}, is in seconds, not the milliseconds "
                              "of Amazon 2023 files: the file is read as seconds", file=sys.stderr)
            return _rating_from(row, cols, scale, millis=fmt == "amazon2023" and millis is not False)
    ratings, skipped = [], 0
    for result in _collect(lines, records, parse):
        # A stray quote makes the csv module read on, as one field, up to the next quote or the end of
        # the file: every line it took is lost, so each counts, and the error names where it opened.
        span = lines.no - lines.first + 1
        if lines.eof:  # only a quoted field still open asks for a line past the last one
            result = (f"line {lines.first}: an unclosed quote swallows the rest of the file "
                      f"({span:,} line{'s' * (span != 1)})")
        elif isinstance(result, Rating):
            ratings.append(result)
            continue
        elif span > 1:
            result = (f"line {lines.first}: a quoted field opened here runs to line {lines.no}, "
                      f"taking {span:,} lines (a stray quote?): {result}")
        else:
            result = f"line {lines.no}: {result}"
        if not skip_bad_rows:
            raise DataError(f"{path.name} {result}" + ("" if ratings else hint))
        skipped += span
    ratings.sort(key=lambda r: r.time)  # stable, so ties keep file order
    if meta is not None:
        described = _read_meta(meta, fmt)
        if ratings and not any(r.item_id in described for r in ratings):  # wrong file, or ids of another kind
            raise DataError(f"no item in {meta.name} matches an item of the ratings in {path.name}")
        items.update(described)  # an explicit metadata file wins over CSV item columns
    return RatingData(name, ratings, items, skipped, scale)
