"""What the registered retrieval model answers with (dseh.tracking's pyfunc), shared with `dseh
search`: label sets as LabNet codes, requests (image or label-set rows) as top-k database items."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dseh.artifacts import Database
from dseh.codes import pack
from dseh.encoder import encode_images
from dseh.errors import DsehError


def label_names(label_set: str) -> list[str]:
    """The class names of a label set written "a,b"."""
    return [n.strip() for n in label_set.split(",") if n.strip()]


def label_vector(label_set: str | list[str], classes: list[str]) -> np.ndarray:
    """The multi-hot float32 vector (classes,) of a label set, given as class names (a list, or one
    string "a,b"); an unknown or missing class is one DsehError naming the classes."""
    names = label_names(label_set if isinstance(label_set, str) else ",".join(map(str, label_set)))
    if not names:
        raise DsehError("a label set needs at least one class name")
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise DsehError(f"unknown label {', '.join(map(repr, unknown))}: the classes are {', '.join(classes)}")
    y = np.zeros(len(classes), np.float32)
    y[[classes.index(n) for n in names]] = 1.0
    return y


def label_codes(labnet: torch.nn.Module, vectors: np.ndarray) -> np.ndarray:
    """Packed LabNet codes sign(h^l) of label vectors (n, classes): queries in ImgNet's Hamming space."""
    from dseh.train.phases import encode_labels

    with torch.no_grad():
        _, h = encode_labels(labnet, torch.from_numpy(np.asarray(vectors, np.float32)))
    return pack(h.numpy())


@dataclass(frozen=True)
class Retriever:
    """What the registered retrieval model holds (dseh.tracking's pyfunc): ImgNet, the round's
    LabNet (None for methods without one), the database, the image size and the encode batch."""

    imgnet: torch.nn.Module
    labnet: torch.nn.Module | None
    db: Database
    image_size: int
    batch: int

    def topk(self, queries: list[tuple[str, object]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the database, Hamming distances), each (queries, k), for ("image", uint8
        (H, W, 3)) and ("labels", class names) queries: the ranking of `dseh search`."""
        from dseh import index as ix

        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(self.db.ids):
            raise DsehError(f"k must be an integer from 1 to {len(self.db.ids)} (the database size), got {k!r}")
        width = self.db.codes.shape[1]
        q = np.zeros((len(queries), width), np.uint8)
        images = [i for i, (kind, _) in enumerate(queries) if kind == "image"]
        sets = [i for i, (kind, _) in enumerate(queries) if kind == "labels"]
        if images:
            x = np.stack([self._image(queries[i][1], i) for i in images])
            q[images] = pack(encode_images(self.imgnet, x, None, self.batch)[1])
        if sets:
            if self.labnet is None:
                raise DsehError("this model has no LabNet (its method trains none): it answers image queries only")
            q[sets] = label_codes(self.labnet, np.stack([label_vector(queries[i][1], self.db.classes) for i in sets]))
        return ix.exact_topk(q, self.db.codes, int(k))

    def _image(self, value, row: int) -> np.ndarray:
        """One query image as uint8 (H, W, 3) from its H * W * 3 values in row-major (H, W, 3) order
        (the served signature's flat `image`; an (H, W, 3) array too), each an integer in 0..255."""
        try:
            x = np.asarray(value if not isinstance(value, np.ndarray) or value.dtype != object else value.tolist())
        except ValueError:
            x = np.asarray([], dtype=object)  # ragged nested lists
        want = (self.image_size, self.image_size, 3)
        if x.shape not in (want, (int(np.prod(want)),)):
            raise DsehError(
                f"query {row}: an image must be {np.prod(want)} uint8 values, an {want} image in row-major "
                f"order, got shape {x.shape}"
            )
        x = x.reshape(want)
        if x.dtype == np.uint8:
            return x
        if x.dtype.kind not in "iuf" or not np.all((x >= 0) & (x <= 255) & (x == np.round(x))):
            raise DsehError(f"query {row}: image values must be integers from 0 to 255")
        return x.astype(np.uint8)

    def answer(self, model_input, k: int):
        """A pandas DataFrame of one row per (query, rank): query, rank, id (the database item's
        index in the prepared data), distance, labels (its class names)."""
        import pandas as pd

        pos, dist = self.topk(served_queries(model_input), k)  # served_queries refuses an empty request
        ids = self.db.ids[pos]
        n, kk = ids.shape
        return pd.DataFrame({
            "query": np.repeat(np.arange(n), kk),
            "rank": np.tile(np.arange(1, kk + 1), n),
            "id": ids.ravel().astype(np.int64),
            "distance": dist.ravel().astype(np.int64),
            "labels": [[self.db.classes[c] for c in np.flatnonzero(self.db.labels[j])] for j in pos.ravel()],
        })  # fmt: skip


def _given(value) -> bool:
    """A DataFrame cell holds a value (not None or NaN)."""
    if value is None:
        return False
    return not (isinstance(value, float) and np.isnan(value))


def served_queries(model_input) -> list[tuple[str, object]]:
    """("image", value) or ("labels", value) per row of the served model's input: a DataFrame (or
    a dict of columns) with an `image` and a `labels` column, one of them given in each row."""
    import pandas as pd

    frame = pd.DataFrame(model_input) if isinstance(model_input, dict) else model_input
    if not isinstance(frame, pd.DataFrame):
        raise DsehError(
            f"the input must be rows with an 'image' or a 'labels' column, got {type(model_input).__name__}"
        )
    if frame.empty:  # no rows, or (over HTTP) rows whose columns the signature does not name
        raise DsehError("no queries: give one or more rows, each with an 'image' or a 'labels' column")
    unknown = sorted(set(frame.columns) - {"image", "labels"})
    if unknown:
        raise DsehError(f"unknown input column(s) {', '.join(map(str, unknown))}: give 'image' or 'labels'")
    queries = []
    for row, cells in enumerate(frame.to_dict("records")):
        given = [(kind, v) for kind, v in cells.items() if _given(v)]
        if len(given) != 1:
            raise DsehError(f"query {row}: give exactly one of 'image' and 'labels'")
        queries.append(given[0])
    return queries
