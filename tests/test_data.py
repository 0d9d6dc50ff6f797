"""Tests for plumbing/readers.py and data.py: every reader on tiny hand-written files, strict errors, splits, leak-free histories."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from data import Example, Item, Rating, RatingData, build_examples, split_by_time
from plumbing.readers import FORMATS, DataError, DataFileNotFoundError, load_ratings
from reczero import render_user_message


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def rating(user: str, item: str, value: float, time: int) -> Rating:
    return Rating(user, item, value, time)


# ---------------------------------------------------------------- readers


def test_amazon_2014_gzip_with_python_literal_metadata(tmp_path):
    """Amazon 2014: .json.gz reviews sorted by time; literal-dict metadata with nested categories."""
    reviews = jsonl([
        {"reviewerID": "U2", "asin": "B1", "overall": 4.0, "unixReviewTime": 200,
         "reviewText": "Great\n  album", "summary": "Nice"},
        {"reviewerID": "U1", "asin": "B1", "overall": 5.0, "unixReviewTime": 100, "reviewText": "x"},
    ])
    with gzip.open(tmp_path / "Music_5.json.gz", "wt") as f:
        f.write(reviews)
    meta = write(tmp_path / "meta.json", "{'asin': 'B1', 'title': 'Abbey Road', "
                 "'categories': [['CDs', 'Rock'], ['CDs', 'Pop']], 'price': 12.99, 'brand': 'Apple'}\n"
                 "not a dict at all\n")
    data = load_ratings(tmp_path / "Music_5.json.gz", "amazon", meta_path=meta)
    assert [(r.user_id, r.item_id, r.rating, r.time) for r in data.ratings] == [
        ("U1", "B1", 5.0, 100), ("U2", "B1", 4.0, 200)]
    assert data.ratings[1].review == "Great album" and data.ratings[1].summary == "Nice"
    assert data.items["B1"] == Item("B1", "Abbey Road", ("CDs", "Rock", "Pop"), "Apple", 12.99, "")
    assert data.name == "Music_5" and data.skipped == 0 and data.scale == (1.0, 5.0)


def test_amazon_2018_metadata_fields(tmp_path):
    """Amazon 2018: `category` list, "$" price strings and list descriptions become Item fields."""
    write(tmp_path / "r.json", jsonl([{"reviewerID": "U", "asin": "A", "overall": 3, "unixReviewTime": 5}]))
    write(tmp_path / "m.json", jsonl([{"asin": "A", "title": " T ", "category": ["Books", "SciFi"],
                                      "price": "$1,012.50", "description": ["a", "b  c"], "brand": "B"},
                                     {"asin": "Z"}]))
    data = load_ratings(tmp_path / "r.json", "amazon", tmp_path / "m.json")
    assert data.items["A"] == Item("A", "T", ("Books", "SciFi"), "B", 1012.5, "a b c")
    assert data.items["Z"] == Item("Z")  # metadata with missing fields is kept, just empty


def test_amazon_2023_millis_parent_asin_and_meta(tmp_path):
    """Amazon 2023: millisecond timestamps become seconds; parent_asin is the item id, asin the fallback."""
    write(tmp_path / "Books.jsonl", jsonl([
        {"user_id": "U", "parent_asin": "P", "asin": "C", "rating": 2.0, "timestamp": 1588615855070,
         "title": "meh", "text": "too long"},
        {"user_id": "V", "asin": "Q", "rating": 5, "timestamp": 1000},
    ]))
    write(tmp_path / "meta_Books.jsonl", jsonl([
        {"parent_asin": "P", "title": "Dune", "main_category": "Books", "categories": ["Books", "SF"],
         "store": "Ace", "price": None, "description": ["Spice."]}]))
    data = load_ratings(tmp_path / "Books.jsonl", "amazon2023", tmp_path / "meta_Books.jsonl")
    assert [(r.user_id, r.item_id, r.time) for r in data.ratings] == [("V", "Q", 1), ("U", "P", 1588615855)]
    assert data.ratings[1].summary == "meh" and data.ratings[1].review == "too long"
    assert data.items["P"] == Item("P", "Dune", ("Books", "SF"), "Ace", None, "Spice.")


def test_movielens_100k_directory_latin1(tmp_path):
    """ML-100K: a directory with u.data and a Latin-1 u.item; genre flags become categories."""
    write(tmp_path / "u.data", "1\t10\t4\t881250949\n2\t10\t3\t881250940\n")
    flags = ["0"] * 19
    flags[5] = flags[8] = "1"  # Comedy, Drama
    write(tmp_path / "u.item", "10|Café Society (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n",
          encoding="latin-1")
    data = load_ratings(tmp_path, "ml-100k")
    assert [(r.user_id, r.item_id, r.rating, r.time) for r in data.ratings] == [
        ("2", "10", 3.0, 881250940), ("1", "10", 4.0, 881250949)]
    assert data.items["10"] == Item("10", "Café Society (1995)", ("Comedy", "Drama"))


def test_movielens_1m_directory(tmp_path):
    """ML-1M: `::`-separated ratings.dat and Latin-1 movies.dat with `|` genres."""
    write(tmp_path / "ratings.dat", "1::1193::5::978300760\n")
    write(tmp_path / "movies.dat", "1193::Amélie (2001)::Comedy|Romance\n", encoding="latin-1")
    data = load_ratings(tmp_path, "ml-1m")
    assert data.ratings == [Rating("1", "1193", 5.0, 978300760)]
    assert data.items["1193"] == Item("1193", "Amélie (2001)", ("Comedy", "Romance"))


def test_movielens_20m_half_stars_and_quoted_titles(tmp_path):
    """ML-20M: CSV with header, half-star ratings on a 0.5-5 scale, quoted titles with commas."""
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,100\n1,3,0.5,50\n")
    write(tmp_path / "movies.csv", 'movieId,title,genres\n2,"American President, The (1995)",Comedy|Drama\n'
          "3,Untitled,(no genres listed)\n")
    data = load_ratings(tmp_path / "ratings.csv", "ml-20m")
    assert [(r.item_id, r.rating, r.time) for r in data.ratings] == [("3", 0.5, 50), ("2", 3.5, 100)]
    assert data.scale == (0.5, 5.0)
    assert data.items["2"].title == "American President, The (1995)"
    assert data.items["2"].categories == ("Comedy", "Drama") and data.items["3"].categories == ()


def test_yelp_directory(tmp_path):
    """Yelp: dates become UTC unix seconds; business name, categories and price level fill the Item."""
    write(tmp_path / "review.json", jsonl([{"review_id": "r", "user_id": "U", "business_id": "B",
                                            "stars": 4, "date": "2018-07-07 22:09:11", "text": "Yum"}]))
    write(tmp_path / "business.json", jsonl([
        {"business_id": "B", "name": "Cafe", "categories": "Coffee & Tea, Bakeries",
         "attributes": {"RestaurantsPriceRange2": "2"}},
        {"business_id": "C", "name": "Shop", "categories": None, "attributes": None}]))
    data = load_ratings(tmp_path, "yelp")
    assert data.ratings == [Rating("U", "B", 4.0, 1531001351, review="Yum")]
    assert data.items["B"] == Item("B", "Cafe", ("Coffee & Tea", "Bakeries"), description="Price level 2 of 4 ($$)")
    assert data.items["C"] == Item("C", "Shop")


def test_yelp_price_level_is_shown_as_a_level_and_amazon_price_as_money(tmp_path):
    """Yelp's price level 2 reads "Price level 2 of 4 ($$)" in the prompt, not "Price: 2.00" (two dollars);
    an Amazon price stays an amount of money."""
    write(tmp_path / "review.json", jsonl([{"user_id": "U", "business_id": "B", "stars": 4, "date": "2018-07-07"}]))
    write(tmp_path / "business.json", jsonl([{"business_id": "B", "name": "Cafe", "categories": "Bakeries",
                                              "attributes": {"RestaurantsPriceRange2": "2"}}]))
    cafe = load_ratings(tmp_path, "yelp").items["B"]
    write(tmp_path / "r.json", jsonl([{"reviewerID": "U", "asin": "A", "overall": 5, "unixReviewTime": 1}]))
    write(tmp_path / "m.json", jsonl([{"asin": "A", "title": "Abbey Road", "price": "$12.99"}]))
    album = load_ratings(tmp_path / "r.json", "amazon", tmp_path / "m.json").items["A"]
    for target, seen in ((cafe, album), (album, cafe)):  # each as the target and in the user's history
        message = render_user_message(Example(Rating("U", target.item_id, 4.0, 9), target,
                                              [(Rating("U", seen.item_id, 5.0, 1), seen)], [], 5.0, 4.0))
        assert message.count("Price level 2 of 4 ($$)") == 1 and "Price: 2.00" not in message
        assert message.count("Price: 12.99") == 1


def test_generic_csv_iso_dates_and_item_columns(tmp_path):
    """Generic CSV: ISO or integer timestamps; optional item columns become items (first row wins)."""
    write(tmp_path / "r.csv", "user_id,item_id,rating,timestamp,title,categories,price,review\n"
          'u1,i1,5,2020-01-02,"Tea, green",Food|Drink,3.5,"Loved it"\n'
          "u2,i1,4,1577836800,Other,,,\n"
          "u2,i2,1,1577836801,,,,\n")
    data = load_ratings(tmp_path / "r.csv", "csv")
    assert [(r.user_id, r.item_id, r.time) for r in data.ratings] == [
        ("u2", "i1", 1577836800), ("u2", "i2", 1577836801), ("u1", "i1", 1577923200)]
    assert data.items == {"i1": Item("i1", "Tea, green", ("Food", "Drink"), "", 3.5)}
    assert data.ratings[2].review == "Loved it"


def test_ties_keep_file_order_and_duplicates_are_kept(tmp_path):
    """Ratings sharing a timestamp keep file order; repeated (user, item) pairs are all kept."""
    write(tmp_path / "r.csv", "user_id,item_id,rating,timestamp\nb,x,1,5\na,x,2,5\na,x,3,1\n")
    data = load_ratings(tmp_path / "r.csv", "csv")
    assert [(r.user_id, r.rating) for r in data.ratings] == [("a", 3.0), ("b", 1.0), ("a", 2.0)]


# ---------------------------------------------------------------- bad input

CSV_HEAD = "user_id,item_id,rating,timestamp\n"
BAD_ROWS = [  # (format, file name, text, substrings the error must contain)
    ("csv", "ratings.csv", CSV_HEAD + "u,i,5,1\nu,i,6,2\n", ["ratings.csv line 3", "field 'rating'", "'6' is outside the scale 1-5"]),
    ("csv", "ratings.csv", CSV_HEAD + "u,i,good,1\n", ["line 2", "field 'rating'", "not a number"]),
    ("csv", "ratings.csv", CSV_HEAD + "u,i,4,yesterday\n", ["line 2", "field 'timestamp'", "'yesterday'"]),
    ("csv", "ratings.csv", CSV_HEAD + "u,i,4\n", ["line 2", "expected 4 fields, found 3"]),
    ("csv", "ratings.csv", CSV_HEAD + ",i,4,1\n", ["line 2", "field 'user_id': missing"]),
    ("amazon", "r.json", '{"reviewerID": "u", "asin": "a", "overall": 5, "unixReviewTime": 1}\n{oops\n',
     ["r.json line 2", "malformed JSON"]),
    ("amazon", "r.json", '{"reviewerID": "u", "overall": 5, "unixReviewTime": 1}\n', ["line 1", "field 'asin': missing"]),
    ("amazon", "r.json", '{"reviewerID": "u", "asin": "a", "overall": 0, "unixReviewTime": 1}\n',
     ["line 1", "field 'overall'", "outside the scale"]),
    ("ml-100k", "u.data", "1\t2\t3\t4\n1\t2\t3\n", ["u.data line 2", "expected 4"]),
    ("ml-1m", "ratings.dat", "1::2::3::4\n1::2::3::nan\n", ["ratings.dat line 2", "field 'timestamp'"]),
    ("ml-20m", "ratings.csv", "userId,movieId,rating,timestamp\n1,2,5.5,1\n", ["line 2", "field 'rating'", "0.5-5"]),
    ("yelp", "review.json", '{"user_id": "u", "business_id": "b", "stars": 4, "date": "soon"}\n',
     ["review.json line 1", "field 'date'"]),
]


@pytest.mark.parametrize("fmt,name,text,expected", BAD_ROWS)
def test_bad_row_raises_naming_file_line_and_field(tmp_path, fmt, name, text, expected):
    """Each kind of bad ratings row raises DataError naming the file, the 1-based line and the field."""
    write(tmp_path / name, text)
    with pytest.raises(DataError) as err:
        load_ratings(tmp_path / name, fmt)
    for part in expected:
        assert part in str(err.value)


@pytest.mark.parametrize("fmt,name,text,expected", BAD_ROWS)
def test_skip_bad_rows_counts_instead(tmp_path, fmt, name, text, expected):
    """With skip_bad_rows the same bad rows are dropped and counted, the good ones kept."""
    write(tmp_path / name, text)
    data = load_ratings(tmp_path / name, fmt, skip_bad_rows=True)
    assert data.skipped == 1
    assert len(data.ratings) == text.count("\n") - 1 - (fmt in ("csv", "ml-20m"))


def test_undecodable_bytes(tmp_path):
    """Bytes that are not UTF-8 in a ratings file are an error on their line (or a counted skip)."""
    (tmp_path / "r.csv").write_bytes(b"user_id,item_id,rating,timestamp\nu,i,4,1\nu,caf\xe9,4,2\n")
    with pytest.raises(DataError, match=r"r.csv line 3: bytes that are not valid utf-8"):
        load_ratings(tmp_path / "r.csv", "csv")
    data = load_ratings(tmp_path / "r.csv", "csv", skip_bad_rows=True)
    assert data.skipped == 1 and [r.item_id for r in data.ratings] == ["i"]


def test_unclosed_quote_counts_every_line_it_swallows(tmp_path):
    """An unclosed quote makes the csv module read the rest of the file as one field: the error names the
    line where the quote opened, and skipping counts every line lost, not one row (also for ml-20m)."""
    rows = [f'u{k},"i{k},4,{1000 + k}' if k == 2000 else f"u{k},i{k},4,{1000 + k}" for k in range(3000)]
    for fmt, name, head in (("csv", "r.csv", CSV_HEAD), ("ml-20m", "ratings.csv", "userId,movieId,rating,timestamp\n")):
        write(tmp_path / name, head + "".join(row + "\n" for row in rows))
        with pytest.raises(DataError) as err:
            load_ratings(tmp_path / name, fmt)
        assert str(err.value) == f"{name} line 2002: an unclosed quote swallows the rest of the file (1,000 lines)"
        data = load_ratings(tmp_path / name, fmt, skip_bad_rows=True)
        assert len(data.ratings) == 2000 and data.skipped == 1000
        assert len(data.ratings) + data.skipped == len(rows)


def test_unclosed_quote_in_the_last_column_is_not_a_long_review(tmp_path):
    """A quote left open in the review column would give a well-formed row whose review is the rest of the
    file: it is refused all the same. A quote closed on a later line is a real multi-line field."""
    text = CSV_HEAD[:-1] + ",review\n" + 'a,i,4,1,"two\nlines"\nb,i,4,2,"open\nc,i,4,3,x\nd,i,4,4,y\n'
    write(tmp_path / "r.csv", text)
    with pytest.raises(DataError, match=r"^r.csv line 4: an unclosed quote swallows the rest of the file \(3 lines\)$"):
        load_ratings(tmp_path / "r.csv", "csv")
    data = load_ratings(tmp_path / "r.csv", "csv", skip_bad_rows=True)
    assert [r.review for r in data.ratings] == ["two lines"] and data.skipped == 3
    write(tmp_path / "t.csv", CSV_HEAD[:-1] + ",title\n" + 'a,i,4,1,Tea\nb,j,4,2,"Open\nc,k,4,3,Cake\n')
    data = load_ratings(tmp_path / "t.csv", "csv", skip_bad_rows=True)  # nor is it an item titled so
    assert list(data.items) == ["i"] and data.skipped == 2


def test_stray_quote_closed_later_names_where_it_opened(tmp_path):
    """A stray quote closed by another one lines later joins those lines into one bad row: the error names
    both lines, skipping counts each line, and the rows after it are read."""
    write(tmp_path / "r.csv", CSV_HEAD + 'a,i,4,1\nb,"i,4,2\nc,i,4,3\nd,i",4,4,9\ne,i,4,5\n')
    with pytest.raises(DataError) as err:
        load_ratings(tmp_path / "r.csv", "csv")
    assert str(err.value) == ("r.csv line 3: a quoted field opened here runs to line 5, taking 3 lines "
                              "(a stray quote?): expected 4 fields, found 5")
    data = load_ratings(tmp_path / "r.csv", "csv", skip_bad_rows=True)
    assert [r.user_id for r in data.ratings] == ["a", "e"] and data.skipped == 3


def test_oversized_csv_field_is_one_bad_row(tmp_path):
    """A field over the csv module's size limit is a bad row (skippable), not the end of the reading; in a
    metadata file it only loses that item; in a header it is a DataError, not a bare csv.Error."""
    write(tmp_path / "r.csv", CSV_HEAD + "u,i," + "9" * 200_000 + ",1\nu,j,4,2\n")
    with pytest.raises(DataError, match=r"^r.csv line 2: unreadable CSV \(field larger than field limit"):
        load_ratings(tmp_path / "r.csv", "csv")
    data = load_ratings(tmp_path / "r.csv", "csv", skip_bad_rows=True)
    assert [r.item_id for r in data.ratings] == ["j"] and data.skipped == 1
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,100\n")
    write(tmp_path / "movies.csv", f'movieId,title,genres\n3,"{"x" * 200_000}",Drama\n2,Heat (1995),Crime\n')
    assert load_ratings(tmp_path, "ml-20m").items["2"].title == "Heat (1995)"
    write(tmp_path / "h.csv", "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"^h.csv line 1: unreadable header"):
        load_ratings(tmp_path / "h.csv", "csv")


ABSURD_TIMES = [  # (format, file name, text, field, value as the message shows it)
    ("csv", "r.csv", CSV_HEAD + "u,i,4,1\nu,i,4,-5\n", "timestamp", "'-5'"),
    ("csv", "r.csv", CSV_HEAD + "u,i,4,1\nu,i,4,1e300\n", "timestamp", "'1e300'"),
    ("csv", "r.csv", CSV_HEAD + "u,i,4,1\nu,i,4,inf\n", "timestamp", "'inf'"),
    ("csv", "r.csv", CSV_HEAD + "u,i,4,1\nu,i,4,nan\n", "timestamp", "'nan'"),
    ("csv", "r.csv", CSV_HEAD + "u,i,4,1\nu,i,4,1969-12-31\n", "timestamp", "'1969-12-31'"),
    ("csv", "r.csv", CSV_HEAD + "u,i,4,1\nu,i,4,2101-01-01T00:00:00Z\n", "timestamp", "'2101-01-01T00:00:00Z'"),
    ("amazon", "r.json", jsonl([{"reviewerID": "u", "asin": "a", "overall": 5, "unixReviewTime": 1},
                                {"reviewerID": "u", "asin": "a", "overall": 5, "unixReviewTime": -5}]),
     "unixReviewTime", "-5"),
    ("amazon2023", "r.jsonl", jsonl([{"user_id": "u", "asin": "a", "rating": 5, "timestamp": 1588615855070},
                                     {"user_id": "u", "asin": "a", "rating": 5, "timestamp": 4133980800000}]),
     "timestamp", "4133980800000"),  # milliseconds: 2101-01-01
    ("amazon2023", "r.jsonl", jsonl([{"user_id": "u", "asin": "a", "rating": 5, "timestamp": 1000},
                                     {"user_id": "u", "asin": "a", "rating": 5, "timestamp": 1e300}]),
     "timestamp", "1e+300"),
    ("ml-100k", "u.data", "1\t2\t3\t4\n1\t2\t3\t1e300\n", "timestamp", "'1e300'"),
    ("ml-1m", "ratings.dat", "1::2::3::4\n1::2::3::-5\n", "timestamp", "'-5'"),
    ("ml-20m", "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3,Infinity\n", "timestamp", "'Infinity'"),
    ("yelp", "review.json", jsonl([{"user_id": "u", "business_id": "b", "stars": 4, "date": "2018-07-07"},
                                   {"user_id": "u", "business_id": "b", "stars": 4, "date": "1960-01-01"}]),
     "date", "'1960-01-01'"),
]


@pytest.mark.parametrize("fmt,name,text,field,shown", ABSURD_TIMES,
                         ids=[f"{case[0]}:{case[4]}" for case in ABSURD_TIMES])
def test_times_outside_1970_2100_are_bad_rows(tmp_path, fmt, name, text, field, shown):
    """Every format refuses a time before 1970 or after 2100 (or not finite), checked in unix seconds after
    any unit conversion (Amazon 2023 milliseconds, ISO dates), as a bad row naming file, line and field."""
    write(tmp_path / name, text)
    line = 3 if fmt in ("csv", "ml-20m") else 2
    with pytest.raises(DataError) as err:
        load_ratings(tmp_path / name, fmt)
    assert str(err.value) == f"{name} line {line}: field '{field}': {shown} is not a time between 1970 and 2100"
    data = load_ratings(tmp_path / name, fmt, skip_bad_rows=True)
    assert len(data.ratings) == 1 and data.skipped == 1


def test_damaged_gzip_files_are_one_line(tmp_path):
    """A corrupt ratings .gz raised zlib.error, a truncated metadata .gz EOFError: now a DataError naming
    the file and the line where reading stopped."""
    import zlib

    rows = jsonl([{"reviewerID": f"u{i}", "asin": "a", "overall": 5, "unixReviewTime": 1000 + i} for i in range(400)])
    whole = gzip.compress(rows.encode())
    corrupt = tmp_path / "r.json.gz"
    corrupt.write_bytes(whole[:40] + bytes(b ^ 0xFF for b in whole[40:80]) + whole[80:])
    with pytest.raises(DataError, match=r"^r.json.gz line \d+: unreadable"):
        load_ratings(corrupt, "amazon")
    (tmp_path / "ok.json").write_text(rows)
    (tmp_path / "meta.json.gz").write_bytes(gzip.compress(jsonl([{"asin": "a", "title": "T"}] * 300).encode())[:-30])
    with pytest.raises(DataError, match=r"^meta.json.gz line \d+: unreadable"):
        load_ratings(tmp_path / "ok.json", "amazon", tmp_path / "meta.json.gz")
    assert zlib  # zlib.error is one of the errors caught


@pytest.mark.parametrize("fmt, name, text", [("ml-1m", "ratings.dat", "1::10::5::978300760\n"),
                                             ("ml-100k", "u.data", "1\t10\t4\t881250949\n")])
def test_a_byte_order_mark_is_not_part_of_the_first_user(tmp_path, fmt, name, text):
    """A UTF-8 BOM (some editors write one) made the first user '\\ufeff1', a user of their own."""
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_ratings(tmp_path / name, fmt).ratings[0].user_id == "1"


def test_amazon_2023_times_in_seconds_are_read_as_seconds_with_a_warning(tmp_path, capsys):
    """Amazon 2023 times are milliseconds; a file in seconds used to put every rating in January 1970,
    silently. A file whose first time is plainly seconds (below 1e11) is read as seconds, with a warning."""
    write(tmp_path / "r.jsonl", jsonl([{"user_id": "u", "asin": "a", "rating": 5, "timestamp": 1588615855},
                                       {"user_id": "v", "asin": "a", "rating": 4, "timestamp": 1588615900}]))
    assert [r.time for r in load_ratings(tmp_path / "r.jsonl", "amazon2023").ratings] == [1588615855, 1588615900]
    assert "the first time, 1.58862e+09, is in seconds" in capsys.readouterr().err


def test_a_nul_byte_in_an_id_is_a_bad_row(tmp_path):
    """A NUL byte in an id (a damaged file) made a phantom item; now a bad row naming the field."""
    write(tmp_path / "r.csv", CSV_HEAD + "u,i,4,1\nu,i\x00,4,2\n")
    with pytest.raises(DataError, match=r"^r.csv line 3: field 'item_id': 'i\\x00' holds a NUL byte"):
        load_ratings(tmp_path / "r.csv", "csv")


def test_times_at_the_ends_of_the_range_are_kept(tmp_path):
    """The epoch itself and the last second of 2100 are valid times."""
    write(tmp_path / "r.csv", CSV_HEAD + "u,i,4,0\nu,i,4,2100-12-31T23:59:59\nu,i,4,4133980799\n")
    assert [r.time for r in load_ratings(tmp_path / "r.csv", "csv").ratings] == [0, 4133980799, 4133980799]


HUGE = "9" * 5_000_000
HUGE_ROWS = [  # (format, file name, text, the message's start); a 5 MB value must not be echoed whole
    ("amazon", "r.json", jsonl([{"reviewerID": "u", "asin": "a", "overall": HUGE, "unixReviewTime": 1}]),
     "r.json line 1: field 'overall': '" + "9" * 79 + "... (5,000,000 characters) is outside the scale 1-5"),
    ("amazon", "r.json", jsonl([{"reviewerID": "u", "asin": "a", "overall": "x" + HUGE, "unixReviewTime": 1}]),
     "r.json line 1: field 'overall': 'x" + "9" * 78 + "... (5,000,001 characters) is not a number"),
    ("amazon", "r.json", jsonl([{"reviewerID": "u", "asin": "a", "overall": 3, "unixReviewTime": "x" + HUGE}]),
     "r.json line 1: field 'unixReviewTime': 'x" + "9" * 78 + "... (5,000,001 characters) is neither"),
    ("amazon", "r.json", jsonl([{"reviewerID": "u", "asin": "a", "overall": 3, "unixReviewTime": HUGE}]),
     "r.json line 1: field 'unixReviewTime': '" + "9" * 79 + "... (5,000,000 characters) is not a time"),
    ("ml-100k", "u.data", f"1\t2\tx{HUGE}\t4\n", "u.data line 1: field 'rating': 'x" + "9" * 78 + "... (5,000,001"),
    ("csv", "r.csv", ",".join(["col"] * 200_000) + "\n", "r.csv line 1: header lacks column 'user_id' (has ['col', "),
]


@pytest.mark.parametrize("fmt,name,text,start", HUGE_ROWS, ids=[f"{case[0]}-{k}" for k, case in enumerate(HUGE_ROWS)])
def test_huge_values_are_cut_in_messages(tmp_path, fmt, name, text, start):
    """A raw value echoed in an error is cut to 80 characters plus its size, whatever its length."""
    write(tmp_path / name, text)
    with pytest.raises(DataError) as err:
        load_ratings(tmp_path / name, fmt)
    assert str(err.value).startswith(start) and len(str(err.value)) < 250


def test_metadata_file_that_yields_no_item_is_an_error(tmp_path):
    """A metadata file given (or found next to the ratings) that yields no item, or no item of the ratings,
    is a DataError naming it; absent optional metadata still loads."""
    reviews = write(tmp_path / "r.json", jsonl([{"reviewerID": "U", "asin": "A", "overall": 5, "unixReviewTime": 1}]))
    for text, message in (
            ("", "meta.json: no item metadata read (0 of 0 lines usable)"),
            ("<html>\nnot metadata\n\n[1, 2]\n", "meta.json: no item metadata read (0 of 3 lines usable)"),
            (jsonl([{"asin": "B"}, {"asin": "C"}]), "no item in meta.json matches an item of the ratings in r.json")):
        write(tmp_path / "meta.json", text)
        with pytest.raises(DataError) as err:
            load_ratings(reviews, "amazon", tmp_path / "meta.json")
        assert str(err.value) == message
    assert load_ratings(reviews, "amazon").items == {}  # no --meta: ratings alone
    write(tmp_path / "r.csv", CSV_HEAD[:-1] + ",title\nu,i,4,1,Tea\n")
    write(tmp_path / "m.csv", "item_id,title\ni,\nj,\n")
    with pytest.raises(DataError, match=r"^m.csv: no item metadata read \(0 of 2 rows usable\)$"):
        load_ratings(tmp_path / "r.csv", "csv", tmp_path / "m.csv")
    assert load_ratings(tmp_path / "r.csv", "csv").items["i"].title == "Tea"
    ml = tmp_path / "ml"
    ml.mkdir()
    write(ml / "u.data", "1\t10\t4\t881250949\n")
    assert load_ratings(ml, "ml-100k").items == {}  # u.item absent: fine
    write(ml / "u.item", "11|Other (1995)|01-Jan-1995||http://x|" + "|".join(["0"] * 19) + "\n")
    with pytest.raises(DataError, match=r"^no item in u.item matches an item of the ratings in u.data$"):
        load_ratings(ml, "ml-100k")


def test_missing_header_column_and_explicit_scale(tmp_path):
    """A CSV without a required column fails on line 1; an explicit scale overrides the default."""
    write(tmp_path / "r.csv", "user,item_id,rating,timestamp\n")
    with pytest.raises(DataError, match=r"line 1: header lacks column 'user_id'"):
        load_ratings(tmp_path / "r.csv", "csv")
    write(tmp_path / "s.csv", CSV_HEAD + "u,i,10,1\n")
    assert load_ratings(tmp_path / "s.csv", "csv", scale=(1, 10)).ratings[0].rating == 10.0


def test_missing_files(tmp_path):
    """Missing files or standard names raise a DataError that is also a FileNotFoundError."""
    for call in (lambda: load_ratings(tmp_path / "nope.json", "amazon"),
                 lambda: load_ratings(tmp_path, "ml-1m"),
                 lambda: load_ratings(write(tmp_path / "r.json", ""), "amazon", tmp_path / "meta.json")):
        with pytest.raises(DataFileNotFoundError) as err:
            call()
        assert isinstance(err.value, FileNotFoundError) and str(tmp_path) in str(err.value)
    with pytest.raises(ValueError, match="unknown format"):
        load_ratings(tmp_path / "r.json", "netflix")
    assert "amazon2023" in FORMATS


def test_directory_for_a_file_format(tmp_path):
    """A directory where the format reads one file (e.g. a MovieLens folder as amazon) is a DataError
    naming the directory and what the format reads, not "[Errno 21] Is a directory"."""
    write(tmp_path / "u.data", "1\t10\t4\t881250949\n")
    for fmt, wants in (("amazon", ".json or .json.gz"), ("amazon2023", ".jsonl"), ("csv", "user_id,item_id")):
        with pytest.raises(DataError) as err:
            load_ratings(tmp_path, fmt)
        assert str(err.value).startswith(f"{tmp_path}: a directory, but --data-format {fmt} reads one ")
        assert wants in str(err.value)
    with pytest.raises(DataError, match=r"a directory, but --meta expects one metadata file"):
        load_ratings(write(tmp_path / "r.json", ""), "amazon", meta_path=tmp_path)


def test_other_file_for_a_directory_format(tmp_path):
    """A file that is not the format's ratings file (Amazon reviews as ml-1m, say) fails on line 1 with
    what the format reads: its directory and the standard file names in it."""
    reviews = write(tmp_path / "r.json", jsonl([{"reviewerID": "U", "asin": "A", "overall": 5, "unixReviewTime": 1}]))
    for fmt, names in (("ml-100k", "u.data (and u.item"), ("ml-1m", "ratings.dat (and movies.dat"),
                       ("ml-20m", "ratings.csv (and movies.csv"),
                       ("yelp", "yelp_academic_dataset_review.json or review.json (and")):
        with pytest.raises(DataError) as err:
            load_ratings(reviews, fmt)
        assert str(err.value).startswith("r.json line 1: ")
        assert f"(--data-format {fmt} reads a directory holding {names}" in str(err.value)
    # the format's own ratings file with a bad first row gets no such hint: its format is right
    with pytest.raises(DataError) as err:
        load_ratings(write(tmp_path / "u.data", "1\t2\t3\n"), "ml-100k")
    assert "reads a directory" not in str(err.value)


# ---------------------------------------------------------------- splits


def random_data(seed: int = 0, n: int = 600, users: int = 25, items: int = 15) -> RatingData:
    """A seeded dataset with many timestamp ties and repeated (user, item) pairs."""
    rng = np.random.default_rng(seed)
    rows = [Rating(f"u{rng.integers(users)}", f"i{rng.integers(items)}", float(rng.integers(1, 6)),
                   int(rng.integers(0, 60))) for _ in range(n)]
    return RatingData("random", sorted(rows, key=lambda r: r.time), {"i0": Item("i0", "Zero")})


def test_user_last_split():
    """user-last: each user's last rating is test, the one before valid; users with < 3 all train."""
    data = random_data()
    data.ratings.append(Rating("solo", "i1", 3.0, 99))
    split = split_by_time(data, "user-last")
    by_user = defaultdict(list)
    for r in data.ratings:
        by_user[r.user_id].append(r)
    assert sorted(split.test, key=lambda r: r.user_id) == sorted(
        (rs[-1] for rs in by_user.values() if len(rs) >= 3), key=lambda r: r.user_id)
    assert {r.user_id: r for r in split.valid} == {u: rs[-2] for u, rs in by_user.items() if len(rs) >= 3}
    assert Rating("solo", "i1", 3.0, 99) in split.train
    assert len(split.train) + len(split.valid) + len(split.test) == len(data.ratings)


def test_global_split_respects_ties():
    """global: sizes are about the fractions, every test time is after every valid/train time."""
    data = random_data(seed=1)
    split = split_by_time(data, "global", valid_frac=0.1, test_frac=0.1)
    assert len(split.train) + len(split.valid) + len(split.test) == len(data.ratings)
    assert max(r.time for r in split.train) < min(r.time for r in split.valid)
    assert max(r.time for r in split.valid) < min(r.time for r in split.test)
    assert len(split.test) >= 60 and len(split.valid) >= 1
    assert split_by_time(data, "global", 0.0, 0.0).train == data.ratings
    with pytest.raises(ValueError):
        split_by_time(data, "random")


# ---------------------------------------------------------------- histories


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histories_are_leak_free(seed):
    """Every history entry is strictly earlier, item history excludes the target user, user history
    the target item (the user's own earlier ratings of it), means are exact."""
    data = random_data(seed)
    examples = build_examples(data, data.ratings, min_total=1)
    assert len(examples) > len(data.ratings) // 2
    for ex in examples:
        t = ex.target
        earlier_user = [r.rating for r in data.ratings
                        if r.user_id == t.user_id and r.item_id != t.item_id and r.time < t.time]
        earlier_item = [r for r in data.ratings
                        if r.item_id == t.item_id and r.user_id != t.user_id and r.time < t.time]
        assert all(r.time < t.time and r.user_id == t.user_id and r.item_id != t.item_id for r, _ in ex.user_history)
        assert all(r.time < t.time and r.user_id != t.user_id and r.item_id == t.item_id
                   for r in ex.item_history)
        assert ex.user_avg == pytest.approx(np.mean(earlier_user))
        assert ex.item_avg == pytest.approx(np.mean([r.rating for r in earlier_item]))
        assert ex.item_history == earlier_item[-10:]
        assert len(ex.user_history) == min(10, len(earlier_user))
        assert [r.time for r, _ in ex.user_history] == sorted(r.time for r, _ in ex.user_history)
        assert ex.item.item_id == t.item_id and ex.label == t.rating
        assert all(item.item_id == r.item_id for r, item in ex.user_history)
    assert any(item.title == "Zero" for ex in examples for _, item in ex.user_history)


def test_a_users_own_earlier_rating_of_the_target_never_enters_its_prompt(tmp_path):
    """A file where users rate the same items again, with the same ratings: the second rating's prompt
    used to show the first (the label itself) in the user's history and average. Now neither history
    nor either average holds the user's own earlier rating of the target item."""
    rows = [f"u{u},i{i},{1 + (u * 3 + i) % 5},{t + 100 * u + i}" for t in (0, 10_000) for u in range(8) for i in range(6)]
    data = load_ratings(write(tmp_path / "r.csv", CSV_HEAD + "\n".join(rows) + "\n"), "csv")
    repeats = [e for e in build_examples(data, data.ratings, min_total=1) if e.target.time >= 10_000]
    assert len(repeats) > 30
    for e in repeats:
        t = e.target
        assert all(r.item_id != t.item_id for r, _ in e.user_history)
        assert all(r.user_id != t.user_id for r in e.item_history)
        others = [r.rating for r in data.ratings if r.user_id == t.user_id and r.item_id != t.item_id and r.time < t.time]
        assert e.user_avg == pytest.approx(np.mean(others))
        assert f"item {t.item_id}," not in render_user_message(e).split("target_item")[0]


def test_build_examples_drops_thin_histories():
    """Targets with an empty user or item history, or fewer than min_total entries, are dropped."""
    ratings = [rating("a", "x", 5, 1), rating("b", "x", 4, 2), rating("a", "y", 3, 3),
               rating("c", "y", 2, 4), rating("a", "x", 1, 5)]
    data = RatingData("tiny", ratings, {})
    first_ever, new_item_for_c, repeat = ratings[0], ratings[3], ratings[4]
    assert build_examples(data, [first_ever], min_total=1) == []  # nothing earlier at all
    assert build_examples(data, [rating("c", "z", 3, 9)], min_total=1) == []  # item never seen
    ex = build_examples(data, [new_item_for_c, repeat], min_total=1)
    assert [e.target for e in ex] == [repeat]  # c had no earlier rating
    assert [r.user_id for r in ex[0].item_history] == ["b"]  # a's own earlier rating of x excluded
    assert [r.item_id for r, _ in ex[0].user_history] == ["y"]  # ... from both sides
    assert ex[0].item_avg == 4.0 and ex[0].user_avg == pytest.approx(3.0)
    assert build_examples(data, [repeat], min_total=5) == []  # 3 + 1 entries < 5
    assert len(build_examples(data, [repeat], max_user_history=1, min_total=2)[0].user_history) == 1


def brute_force_histories(ratings, t, k_user, k_item):
    """The plain definition, in O(n) per target: the last k of the user's earlier ratings of other items, and
    of the item's earlier ratings by other users, in time order (file order within a time)."""
    ordered = sorted(ratings, key=lambda r: r.time)
    mine = [r for r in ordered if r.user_id == t.user_id and r.time < t.time and r.item_id != t.item_id]
    others = [r for r in ordered if r.item_id == t.item_id and r.time < t.time and r.user_id != t.user_id]
    return mine[-k_user:], others[-k_item:]


def test_histories_with_many_repeats_equal_the_plain_definition():
    """Users who re-rate the same few items again and again (what made history building quadratic: the
    walk back through an item's ratings passed every one of the user's own) give the histories of the
    plain definition, entry for entry."""
    rng = np.random.default_rng(0)
    ratings = [Rating(f"u{rng.integers(4)}", f"i{rng.integers(3)}", float(rng.integers(1, 6)), int(rng.integers(200)))
               for _ in range(600)]
    data = RatingData("repeats", ratings, {})
    examples = build_examples(data, ratings, max_user_history=4, max_item_history=3, min_total=1)
    assert len(examples) > 300
    for e in examples:
        mine, others = brute_force_histories(ratings, e.target, 4, 3)
        assert [r for r, _ in e.user_history] == mine and e.item_history == others
