"""Hostile inputs to `prepare`: awkward list files (spaces, BOM, encodings, duplicates, escaping
paths), and a property test of the parser."""

import logging
import posixpath

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dseh.data as data_mod
from dseh import stages, storage
from dseh.config import from_dict
from dseh.data import PreparedData, parse_list_file
from dseh.errors import DsehError
from tests.conftest import make_list_collection, tiny_raw

# --------------------------------------------------------------------------- helpers


def _prepare(col, out, **extra):
    data = {"source": "list-files", "image_root": str(col / "images"), "list_dir": str(col), "image_size": 16}
    stages.prepare(from_dict(tiny_raw(data={**data, **extra})), out, progress=False)
    return PreparedData(out)


# --------------------------------------------------------------------------- list files


def test_escaping_path_names_the_real_image_root(tmp_path):
    col = tmp_path / "col"
    make_list_collection(col)
    with open(col / "database.txt", "a") as f:
        f.write("../outside.png 0 1 0 0\n")
    with pytest.raises(DsehError) as e:
        _prepare(col, tmp_path / "out")
    root = str(col / "images")
    assert str(e.value) == (f"{col / 'database.txt'}:10: image path '../outside.png' escapes the image root '{root}'")


def test_paths_with_spaces(tmp_path):
    col = tmp_path / "col"
    make_list_collection(col)
    for name in ("test.txt", "database.txt", "train.txt"):
        text = (col / name).read_text().replace("img/000.png", "my dir/photo 1.png")
        (col / name).write_text(text.replace("img/003.jpg", "img/a  b\tc.jpg"))
    (col / "images/my dir").mkdir()
    (col / "images/img/000.png").rename(col / "images/my dir/photo 1.png")
    (col / "images/img/003.jpg").rename(col / "images/img/a  b\tc.jpg")
    d = _prepare(col, tmp_path / "out")
    assert d.paths[int(d.query[0])] == "my dir/photo 1.png" and "img/a  b\tc.jpg" in d.paths
    assert d.labels.shape == (12, 4)


def test_a_space_is_not_a_bad_label_but_a_trailing_number_is_ambiguous():
    parsed = parse_list_file("my photo.jpg 0 1\nb.jpg\t1 1\n", "train.txt")
    assert parsed.paths == ["my photo.jpg", "b.jpg"] and parsed.labels.tolist() == [[0, 1], [1, 1]]
    with pytest.raises(DsehError, match=r"^train.txt:2: ends in 3 numbers, but line 1 has 2 labels: .*'photo 1'"):
        parse_list_file("a.jpg 0 1\nphoto 1 0 1\n", "train.txt")
    with pytest.raises(DsehError, match=r"^train.txt:1: labels must be 0 or 1, got '0 2 0' after 'a b.jpg'"):
        parse_list_file("a b.jpg 0 2 0\n", "train.txt")
    with pytest.raises(DsehError, match=r"^train.txt:1: no labels after the path in 'a b.jpg'"):
        parse_list_file("a b.jpg\n", "train.txt")
    with pytest.raises(DsehError, match=r"^train.txt:2: no image path before the 2 labels in '0 1'"):
        parse_list_file("a.jpg 0 1\n0 1\n", "train.txt")


def test_utf8_bom_is_stripped(tmp_path):
    col = tmp_path / "col"
    make_list_collection(col)
    for name in ("test.txt", "database.txt", "train.txt"):
        (col / name).write_bytes(b"\xef\xbb\xbf" + (col / name).read_bytes().replace(b"\n", b"\r\n"))
    d = _prepare(col, tmp_path / "out")
    assert d.paths[int(d.query[0])] == "img/000.png" and len(d.labels) == 12


def test_non_utf8_list_file_names_file_and_line(tmp_path):
    col = tmp_path / "col"
    make_list_collection(col)
    lines = (col / "database.txt").read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"img/", "imágenes/".encode("latin-1"))
    (col / "database.txt").write_bytes(b"\n".join(lines))
    at = b"\n".join(lines).index(b"\xe1")
    with pytest.raises(DsehError) as e:
        _prepare(col, tmp_path / "out")
    assert str(e.value) == f"{col / 'database.txt'}:2: not UTF-8 text (byte 0xe1 at offset {at}); save it as UTF-8"
    assert not (tmp_path / "out").exists()


def test_duplicate_lines_are_dropped_counted_and_warned(tmp_path, caplog):
    col = tmp_path / "col"
    make_list_collection(col)
    ref = _prepare(col, tmp_path / "ref")
    lines = (col / "database.txt").read_text().splitlines()
    again = [lines[0], lines[1].replace("img/", "img/./"), lines[0]]
    (col / "database.txt").write_text("\n".join(lines + again) + "\n")
    with caplog.at_level(logging.WARNING, logger="dseh.data"):
        d = _prepare(col, tmp_path / "out")
    assert len(d.database) == len(ref.database) == 9 and d.paths == ref.paths
    db = str(col / "database.txt")
    assert d.manifest["source"]["duplicate_lines_dropped"] == {db: 3}
    assert f"{db}: dropped 3 duplicate line(s), keeping the first of each; e.g. line 10 repeats line 1" in caplog.text
    assert "duplicate_lines_dropped" not in ref.manifest["source"]  # clean collections are unchanged


def test_same_path_with_other_labels_names_both_lines():
    with pytest.raises(
        DsehError, match=r"^db.txt:3: 'a.jpg' is listed again with different labels \(first at line 1\)"
    ):
        parse_list_file("a.jpg 0 1\nb.jpg 1 0\na.jpg 1 1\n", "db.txt")


# --------------------------------------------------------------------------- property test

_SEGMENT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\n\r:\ufeff"), min_size=1, max_size=8
).filter(lambda s: s not in (".", ".."))


def _fine_path(p: str) -> bool:
    """What the format can carry: no surrounding blanks, and a last field that is not a number."""
    fields = p.replace("\t", " ").split(" ")
    return p == p.strip(" \t") and not data_mod._NUMBER.fullmatch(fields[-1])


_PATH = st.lists(_SEGMENT, min_size=1, max_size=3).map("/".join).filter(_fine_path)


@st.composite
def _rows(draw):
    width = draw(st.integers(1, 5))
    paths = draw(st.lists(_PATH, min_size=1, max_size=6, unique_by=posixpath.normpath))
    row = st.lists(st.integers(0, 1), min_size=width, max_size=width)
    return paths, draw(st.lists(row, min_size=len(paths), max_size=len(paths)))


@settings(max_examples=60, deadline=None)
@given(rows=_rows(), sep=st.sampled_from([" ", "\t", "  "]), eol=st.sampled_from(["\n", "\r\n"]), bom=st.booleans())
def test_property_list_file_round_trip(tmp_path_factory, rows, sep, eol, bom):
    paths, labels = rows
    text = eol.join(p + sep + sep.join(map(str, lab)) for p, lab in zip(paths, labels)) + eol
    f = tmp_path_factory.mktemp("lists") / "list.txt"
    f.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    parsed = parse_list_file(storage.read_text(str(f)), str(f), "/images")
    assert parsed.paths == paths and parsed.labels.tolist() == labels and parsed.duplicates == 0


@settings(max_examples=120, deadline=None)
@given(raw=st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode)))
def test_property_malformed_list_files_raise_only_dseh_error(tmp_path_factory, raw):
    f = tmp_path_factory.mktemp("bad") / "list.txt"
    f.write_bytes(raw)
    try:
        parsed = parse_list_file(storage.read_text(str(f)), str(f), "/images")
    except DsehError:
        return
    assert len(parsed.paths) == len(parsed.labels) > 0 and set(np.unique(parsed.labels)) <= {0, 1}
