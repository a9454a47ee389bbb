"""Hostile inputs to `prepare`: every image mode, decompression bombs, symlinks out of the image
root, awkward list files (spaces, BOM, encodings, duplicates), and a property test of the parser."""

import io
import logging
import os
import posixpath
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import dseh.data as data_mod
from dseh import listfile, stages, storage
from dseh.config import from_dict
from dseh.data import PreparedData, parse_list_file
from dseh.errors import DsehError
from dseh.images import _to_rgb8, decode_image
from tests.helpers import make_list_collection, tiny_raw

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
    return p == p.strip(" \t") and not listfile._NUMBER.fullmatch(fields[-1])


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


# --------------------------------------------------------------------------- image helpers


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(rows, width: int, height: int, depth: int, color_type: int) -> bytes:
    """A PNG written by hand from filter-0 scanlines (an iterable of bytes), streamed through
    zlib, so 16-bit RGB (which Pillow cannot write) and huge all-zero images cost no memory."""
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\x00" + row) for row in rows) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _png16(a: np.ndarray, color_type: int) -> bytes:
    return _png((row.astype(">u2").tobytes() for row in a), a.shape[1], a.shape[0], 16, color_type)


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


# A 32x32 picture with smooth gradients (mean about 125, as in the issue) and its gray version.
_X = np.linspace(0.0, 1.0, 32)
RGB = np.stack(
    [np.outer(_X, np.ones(32)) * 250, np.outer(np.ones(32), _X) * 250, np.full((32, 32), 125.0)], axis=-1
).astype(np.uint8)
GRAY = RGB[..., 0] // 2 + RGB[..., 1] // 2
ALPHA = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))  # transparent left, opaque right


def _over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    c = color if color.ndim == 3 else np.repeat(color[..., None], 3, axis=2)
    return np.rint(c * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _gray_rgb(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=2)


def _palette_cases():
    p = Image.fromarray(RGB).quantize(64)
    ref = np.asarray(p.convert("RGB"))
    pt = p.copy()
    pt.info["transparency"] = 0  # palette index 0 transparent
    idx = np.asarray(p)
    ref_t = np.where((idx == 0)[..., None], 255, ref).astype(np.uint8)
    pa = p.convert("PA")
    pa.putalpha(Image.fromarray(ALPHA))
    return {
        "P": (_encode(p, "PNG"), ref),
        "P+transparency": (_encode(pt, "PNG"), ref_t),
        "PA": (_encode(pa, "TIFF"), _over_white(ref, ALPHA)),
    }


def _mode_cases():
    """mode -> (encoded file, the 8-bit RGB reference of the same picture, tolerance)."""
    g16 = GRAY.astype(np.uint16) * 257
    rgba = np.dstack([RGB, ALPHA])
    la = np.dstack([GRAY, ALPHA])
    bw = GRAY > 127
    cases = {
        "RGB": (_encode(Image.fromarray(RGB), "PNG"), RGB, 0),
        "L": (_encode(Image.fromarray(GRAY), "PNG"), _gray_rgb(GRAY), 0),
        "1": (_encode(Image.fromarray(bw), "PNG"), _gray_rgb(bw.astype(np.uint8) * 255), 0),
        "I;16 (16-bit gray PNG)": (_encode(Image.fromarray(g16), "PNG"), _gray_rgb(GRAY), 0),
        "I;16B (TIFF)": (
            _encode(Image.frombytes("I;16B", (32, 32), g16.astype(">u2").tobytes()), "TIFF"),
            _gray_rgb(GRAY),
            0,
        ),
        "I (32-bit TIFF)": (_encode(Image.fromarray(g16.astype(np.int32)), "TIFF"), _gray_rgb(GRAY), 0),
        "F (float TIFF, 0..1)": (
            _encode(Image.fromarray((GRAY / 255.0).astype(np.float32)), "TIFF"),
            _gray_rgb(GRAY),
            0,
        ),
        "16-bit RGB PNG": (_png16(RGB.astype(np.uint16) * 257, 2), RGB, 0),
        "16-bit RGBA PNG": (_png16(rgba.astype(np.uint16) * 257, 6), _over_white(RGB, ALPHA), 1),
        "16-bit LA PNG": (_png16(la.astype(np.uint16) * 257, 4), _over_white(GRAY, ALPHA), 1),
        "RGBA": (_encode(Image.fromarray(rgba), "PNG"), _over_white(RGB, ALPHA), 1),
        "LA": (_encode(Image.fromarray(la, "LA"), "PNG"), _over_white(GRAY, ALPHA), 1),
        "CMYK": (_encode(Image.fromarray(RGB).convert("CMYK"), "TIFF"), RGB, 0),
        "YCbCr": (_encode(Image.fromarray(RGB).convert("YCbCr"), "TIFF"), RGB, 2),
        "LAB": (_encode(Image.fromarray(RGB).convert("LAB"), "TIFF"), RGB, 2),
    }
    cases.update({k: (f, ref, 0) for k, (f, ref) in _palette_cases().items()})
    return cases


MODE_CASES = _mode_cases()

# --------------------------------------------------------------------------- image modes


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_every_mode_decodes_like_the_8bit_rgb_picture(case):
    data, ref, tol = MODE_CASES[case]
    full = decode_image(data, 32)  # no resize: the conversion alone, pixel by pixel
    assert full.dtype == np.uint8 and full.shape == (32, 32, 3)
    assert np.abs(full.astype(int) - ref).mean() <= tol  # 0: exact
    # and after the resize prepare does, against the reference resized the same way
    small, ref_small = decode_image(data, 16), decode_image(_encode(Image.fromarray(ref), "PNG"), 16)
    assert abs(small.mean() - ref_small.mean()) <= 0.5 + tol


def test_16bit_png_is_not_white():
    # the numbers: a 16-bit PNG decoded nearly white (mean 254.5), not as its 8-bit twin
    data, ref, _ = MODE_CASES["I;16 (16-bit gray PNG)"]
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert abs(decode_image(data, 16).mean() - ref.mean()) < 1 and ref.mean() < 200


@pytest.mark.parametrize("mode", ["HSV", "RGBX", "RGBa", "La", "I;16L", "I;16N"])
def test_modes_no_file_format_writes_are_converted_too(mode):
    # modes Pillow produces but PNG/TIFF do not write: converted in memory against the reference
    rgb = Image.fromarray(RGB)
    if mode in ("I;16L", "I;16N"):
        im, ref = Image.frombytes(mode, (32, 32), (GRAY.astype("<u2") * 257).tobytes()), _gray_rgb(GRAY)
    elif mode == "La":
        opaque = Image.fromarray(np.dstack([GRAY, np.full_like(GRAY, 255)]), "LA")
        im, ref = opaque.convert("La"), _gray_rgb(GRAY)  # opaque: premultiplying changes nothing
    elif mode == "RGBa":
        im, ref = rgb.convert("RGBA").convert("RGBa"), RGB
    else:
        im, ref = rgb.convert(mode), RGB
    got = np.asarray(_to_rgb8(im))
    assert np.abs(got.astype(int) - ref).mean() <= 1


def test_unknown_mode_is_a_bad_image():
    class Odd:  # a mode this code has no rule for (Pillow adds some now and then)
        mode = "XYZ"
        has_transparency_data = False

    with pytest.raises(DsehError, match="unsupported image mode XYZ"):
        _to_rgb8(Odd())


# --------------------------------------------------------------------------- decompression bombs


def _bomb(side: int) -> bytes:
    """A 1-bit side x side PNG of zeros: a few KB on disk, side**2 bytes once Pillow decodes it."""
    row = bytes(-(-side // 8))
    return _png((row for _ in range(side)), side, side, 1, 0)


@pytest.fixture
def no_decode_over(monkeypatch):
    """Fails the test if any image of more than 1e6 pixels gets its pixels decoded."""
    from PIL import ImageFile

    real = ImageFile.ImageFile.load

    def load(self):
        assert self.size[0] * self.size[1] <= 1_000_000, f"decoded a {self.size} image"
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_refused_from_the_header_or_skipped(tmp_path, no_decode_over):
    col = tmp_path / "col"
    make_list_collection(col)
    bomb = _bomb(13000)
    assert len(bomb) < 100_000
    (col / "images/img/004.png").write_bytes(bomb)
    with pytest.raises(DsehError) as e:
        _prepare(col, tmp_path / "out")
    msg = str(e.value)
    assert "img/004.png (13000x13000 = 169,000,000 pixels, over data.max_pixels = 89,478,485)" in msg
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["col"]
    d = _prepare(col, tmp_path / "out", skip_bad_images=True)
    assert d.manifest["skipped_images"] == 1 and d.manifest["skipped_examples"] == ["img/004.png"]
    assert len(d.labels) == 11


def test_max_pixels_is_a_params_key(tmp_path):
    col = tmp_path / "col"
    make_list_collection(col)  # 12x12 images = 144 pixels
    with pytest.raises(DsehError, match=r"12x12 = 144 pixels, over data.max_pixels = 100"):
        _prepare(col, tmp_path / "out", max_pixels=100)
    with pytest.raises(DsehError, match="data.max_pixels' must be at least 1"):
        _prepare(col, tmp_path / "out", max_pixels=0)
    assert _prepare(col, tmp_path / "out", max_pixels=144).images.shape[0] == 12


def test_bomb_beyond_pillows_own_limit_is_a_bad_image_too(no_decode_over):
    with pytest.raises(DsehError, match="too large to decode"):
        decode_image(_bomb(20000), 16, max_pixels=10**12)  # Pillow refuses over 2 x 89,478,485 first


def test_decoding_holds_at_most_a_chunk_whatever_the_workers(tmp_path, monkeypatch):
    col = tmp_path / "col"
    make_list_collection(col)
    ref = _prepare(col, tmp_path / "ref", workers=1)
    lock, state = threading.Lock(), {"now": 0, "peak": 0}
    real = data_mod.decode_image

    def counting(*args, **kwargs):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        try:
            time.sleep(0.02)  # long enough for every free worker to start one
            return real(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(data_mod, "decode_image", counting)
    d = _prepare(col, tmp_path / "out", workers=16, chunk_size=3)
    assert 2 <= state["peak"] <= 3  # parallel, but never more than a chunk
    assert np.array_equal(np.asarray(d.images), np.asarray(ref.images))


# --------------------------------------------------------------------------- symlinks


def test_symlink_out_of_the_image_root_is_refused(tmp_path):
    col = tmp_path / "col"
    make_list_collection(col)
    secret = tmp_path / "secret.png"
    (col / "images/img/000.png").rename(secret)
    (col / "images/img/000.png").symlink_to(secret)
    root = str(col / "images")
    for skip in (False, True):  # not a bad image to skip: the list or the tree must be fixed
        with pytest.raises(DsehError) as e:
            _prepare(col, tmp_path / "out", skip_bad_images=skip)
        assert str(e.value) == (
            f"image path 'img/000.png' resolves to '{os.path.realpath(secret)}', outside the image root "
            f"'{root}' (symlinks are followed)"
        )
        assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["col", "secret.png"]


def test_symlinks_inside_the_root_and_a_linked_root_are_fine(tmp_path):
    col = tmp_path / "col"
    make_list_collection(col)
    ref = _prepare(col, tmp_path / "ref")
    (col / "images/img/001.jpg").rename(col / "images/moved.jpg")
    (col / "images/img/001.jpg").symlink_to("../moved.jpg")
    (tmp_path / "linked").symlink_to(col / "images")
    d = _prepare(col, tmp_path / "out", image_root=str(tmp_path / "linked"))
    assert np.array_equal(np.asarray(d.images), np.asarray(ref.images))
