"""The DeepHash list-file format: one `relative/path.jpg 0 1 0 ...` line per item, parsed with
one clear error per bad line (see parse_list_file)."""

from __future__ import annotations

import logging
import posixpath
import re
from typing import NamedTuple

import numpy as np

from dseh import storage
from dseh.errors import DsehError

log = logging.getLogger(__name__)

# A label column candidate: any number, so that `2`, `-1` or `0.5` are reported as bad labels
# rather than taken into the path; fields are separated by spaces or tabs only.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_FIELD = re.compile(r"[^ \t]+")


class ListFile(NamedTuple):
    paths: list[str]
    labels: np.ndarray  # (n, c) uint8
    duplicates: int  # duplicate lines dropped


def _trailing_numbers(fields: list[re.Match]) -> int:
    numeric = 0
    for m in reversed(fields):
        if not _NUMBER.fullmatch(m.group()):
            break
        numeric += 1
    return numeric


def _split_line(
    line: str, fields: list[re.Match], where: str, width: int, first_line: int, image_root: str
) -> tuple[str, list[int]]:
    """(path, labels) of one item line whose labels are the last `width` fields; every way it can
    be wrong is one error naming the line."""
    shown = line.strip(" \t")
    numeric = _trailing_numbers(fields)
    if width == 0:
        raise DsehError(f"{where}: no labels after the path in '{shown}' (expected `path 0 1 ...`)")
    if numeric < width:
        raise DsehError(f"{where}: {numeric} labels, but line {first_line} has {width}")
    if len(fields) == width:
        raise DsehError(f"{where}: no image path before the {width} labels in '{shown}'")
    path = line[fields[0].start() : fields[-width - 1].end()]
    if numeric > width:
        raise DsehError(
            f"{where}: ends in {numeric} numbers, but line {first_line} has {width} labels: either the line "
            f"has extra labels or its path '{path}' ends in a number, which cannot be told from a label"
        )
    values = [m.group() for m in fields[-width:]]
    if any(v not in ("0", "1") for v in values):
        raise DsehError(f"{where}: labels must be 0 or 1, got '{' '.join(values)}' after '{path}'")
    try:
        storage.join(image_root, path)  # rejects absolute and escaping paths early, naming them
    except DsehError as exc:
        raise DsehError(f"{where}: {exc}") from None
    return path, [int(v) for v in values]


def parse_list_file(text: str, name: str, image_root: str = "") -> ListFile:
    """DeepHash list format, `relative/path.jpg 0 1 0 ...` per line -> paths, uint8 labels.

    - Fields are separated by spaces or tabs. The label columns are split off from the right,
      so a path may contain spaces (kept as written). The label count is the number of
      numeric fields ending the first item line, and every line must end in exactly that many;
      a line ending in more is refused as ambiguous, naming it: either it has extra labels or
      its path's last space-separated part is a number (`photo 1`), which cannot be told from
      a label column.
    - A UTF-8 byte-order mark at the start is dropped; lines end in \\n or \\r\\n; blank lines
      are skipped.
    - Duplicates are de-duplicated, not refused: a path listed again with the same labels (the
      same line again, or the same path spelled `a/./b.jpg`) is kept once at its first line, and
      the dropped lines are counted (`duplicates`, recorded in the manifest) and logged as a
      warning. The same path with different labels is refused, naming both lines.
    - Paths must be relative and stay inside `image_root`, which the error names.
    """
    text = text.removeprefix("\ufeff")
    paths: list[str] = []
    rows: list[list[int]] = []
    seen: dict[str, int] = {}  # normalised path -> index into paths / rows
    first_at: list[int] = []  # line of each kept path
    dropped: list[tuple[int, int]] = []  # (line, the earlier line it repeats)
    width = first_line = 0
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        fields = list(_FIELD.finditer(line))
        if not fields:
            continue
        if not width:
            width, first_line = _trailing_numbers(fields), lineno
        path, row = _split_line(line, fields, f"{name}:{lineno}", width, first_line, image_root)
        key = posixpath.normpath(path)
        i = seen.get(key)
        if i is None:
            seen[key] = len(paths)
            paths.append(path)
            rows.append(row)
            first_at.append(lineno)
        elif rows[i] == row:
            dropped.append((lineno, first_at[i]))
        else:
            raise DsehError(
                f"{name}:{lineno}: '{path}' is listed again with different labels (first at line {first_at[i]})"
            )
    if not paths:
        raise DsehError(f"{name}: no items (the split is empty)")
    if dropped:
        log.warning(
            "%s: dropped %d duplicate line(s), keeping the first of each; e.g. line %d repeats line %d",
            name,
            len(dropped),
            *dropped[0],
        )
    return ListFile(paths, np.asarray(rows, dtype=np.uint8), len(dropped))
