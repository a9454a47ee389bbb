"""Figures like the paper's (PR curve, precision@top-N, semantic-feature heat maps), retrieval examples
(a few queries and their top-k database images, relevant ones framed green), and one self-contained
HTML report (figures inline as base64, no scripts, no external links).
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFINITIONS = (
    "Relevant = shares at least one label. Ranking by Hamming distance, ties broken by database index. "
    "AP@K is normalised by the relevant items retrieved within K; a query without relevant items counts 0. "
    "Tie-aware mAP (He et al. 2018) is the expectation over orders inside tie groups. PR by Hamming radius; "
    "a query that retrieves nothing within a radius has precision 0."
)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _line_figure(path: Path, x, y, **axes) -> Path:
    """One line plot with markers, axes set by `axes` (labels, title, limits), saved to `path`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(x, y, marker="o", ms=3)
    ax.set(**axes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_figures(rep, lab_feats: np.ndarray | None, img_feats: np.ndarray | None, out: Path) -> dict[str, Path]:
    """Write pr_curve.png, precision_at_n.png and heatmaps.png under `out`; return their paths.
    The heat maps show the semantic features that exist (none for ITQ and LSH, no LabNet panel
    for the other methods than DSEH)."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    paths = {}

    paths["pr_curve"] = _line_figure(
        out / "pr_curve.png", rep.pr_recall, rep.pr_precision, xlabel="recall", ylabel="precision",
        title=f"PR curve by Hamming radius ({rep.bits} bits)", xlim=(0, 1.02), ylim=(0, 1.02),
    )  # fmt: skip
    ns = sorted(rep.precision_at)
    paths["precision_at_n"] = _line_figure(
        out / "precision_at_n.png", ns, [rep.precision_at[n] for n in ns], xlabel="number of top returned images",
        ylabel="precision", title=f"precision@top-N ({rep.bits} bits)", ylim=(0, 1.02),
    )  # fmt: skip

    panels = [(f, name) for f, name in ((lab_feats, "LabNet f^l"), (img_feats, "ImgNet f^v")) if f is not None]
    if not panels:
        return paths
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (feats, name) in zip(axes[0], panels):
        im = ax.imshow(feats, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set(
            title=f"{name}: {len(feats)} sampled training items",
            xlabel="feature dimension",
            ylabel="item (grouped by label set)",
        )
        fig.colorbar(im, ax=ax, fraction=0.046)
    paths["heatmaps"] = out / "heatmaps.png"
    fig.tight_layout()
    fig.savefig(paths["heatmaps"], dpi=90)
    plt.close(fig)
    return paths


# the figures' captions in the report (others: the file's name)
CAPTIONS = {
    "retrieval": "retrieval examples: each row a query (blue frame) and its top database images by Hamming "
    "distance d, ties by database index; green frame: shares a label with the query (relevant), red: shares none",
}
FRAME_COLORS = {"query": (31, 119, 180), "relevant": (44, 160, 44), "irrelevant": (214, 39, 40)}


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def write_html(
    path: Path, metrics: dict, precision_at: dict, recall_at: dict, figures: dict[str, Path], config: dict
) -> None:
    """One HTML file a browser or the KFP UI opens as it is."""
    rows = []
    for key, value in metrics.items():
        if isinstance(value, float):
            rows.append((key, f"{value:.4f}"))
        elif isinstance(value, int):
            rows.append((key, str(value)))
    for key, value in metrics.get("labnet", {}).items():
        rows.append((f"labnet.{key}", f"{value:.4f}" if isinstance(value, float) else str(value)))
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    ptable = "".join(
        f"<tr><th>{n}</th><td>{v:.4f}</td><td>{recall_at[n]:.4f}</td></tr>" for n, v in precision_at.items()
    )
    figs = "".join(_img(p, CAPTIONS.get(name, name.replace("_", " "))) for name, p in figures.items())
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>DSEH evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}}figure{{display:inline-block;margin:0 1em 1em 0}}
img{{max-width:100%}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head>
<body><h1>DSEH retrieval evaluation</h1>
<p>{html.escape(DEFINITIONS)}</p>
<h2>mAP</h2><table id="map-table">{table}</table>
<h2>Precision and recall at N</h2><table id="precision-table"><tr><th>N</th><th>precision</th><th>recall</th></tr>{ptable}</table>
<h2>Figures</h2>{figs}
<h2>Resolved configuration</h2><pre>{html.escape(json.dumps(config, indent=2))}</pre>
</body></html>
"""
    path.write_text(doc)


def heatmap_rows(seed: int, n_items: int, train_labels: np.ndarray, *features: np.ndarray | None) -> tuple:
    """The training items the heat maps show: a seeded sample of n_items, rows grouped by label set
    as in the paper's figure; each of `features` (rows over the training items) at those rows."""
    rng = np.random.default_rng(seed)
    n_train = len(train_labels)
    sample = rng.choice(n_train, size=min(n_items, n_train), replace=False)
    sample = sample[np.lexsort(train_labels[sample].T[::-1])]
    return tuple(None if f is None else f[sample] for f in features)


def example_queries(q_labels: np.ndarray, n: int) -> np.ndarray:
    """Positions of min(n, queries) queries spread over classes and label sets, in the order picked:
    each is the first query (in split order) of a label set not shown yet that adds the most classes
    not shown yet; once every label set is shown, the first queries not picked yet."""
    labels = np.asarray(q_labels).astype(bool)
    _, firsts = np.unique(labels, axis=0, return_index=True)
    candidates = list(np.sort(firsts))
    covered = np.zeros(labels.shape[1], dtype=bool)
    picked: list[int] = []
    while candidates and len(picked) < n:
        gains = (labels[candidates] & ~covered).sum(axis=1)
        pos = candidates.pop(int(np.argmax(gains)))  # argmax: the first of equal gains
        covered |= labels[pos]
        picked.append(int(pos))
    rest = np.setdiff1d(np.arange(len(labels)), picked)
    return np.concatenate([np.asarray(picked, dtype=np.int64), rest[: n - len(picked)]])


@dataclass
class RetrievalExamples:
    """A few queries, each with its top-k database items as the evaluation ranks them."""

    queries: np.ndarray  # (n,) positions in the query split
    results: np.ndarray  # (n, k) positions in the database split, by rank
    distances: np.ndarray  # (n, k) Hamming distances
    relevant: np.ndarray  # (n, k) bool: shares at least one label with its query


def retrieval_examples(
    q_packed: np.ndarray, db_packed: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray, n: int, k: int
) -> RetrievalExamples:
    """example_queries(q_labels, n) and each one's top-k database rows by Hamming distance, ties by
    database index (the evaluation's ranking), with their relevance."""
    from dseh.evaluation import hamming_topk_packed

    queries = example_queries(q_labels, n)
    ids, dist = hamming_topk_packed(np.asarray(q_packed)[queries], db_packed, k)
    shared = np.asarray(q_labels)[queries][:, None, :].astype(bool) & np.asarray(db_labels)[ids].astype(bool)
    return RetrievalExamples(queries, ids, dist, shared.any(axis=2))


def _panel(image: np.ndarray, size: int) -> np.ndarray:
    """An (h, w, 3) uint8 image at size x size: pixel blocks when smaller, bilinear when larger."""
    from PIL import Image

    if image.shape[:2] == (size, size):
        return image
    im = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(im.resize((size, size), Image.NEAREST if image.shape[0] < size else Image.BILINEAR))


def retrieval_grid(
    query_images: np.ndarray, result_images: np.ndarray, relevant: np.ndarray, panel: int = 80, frame: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """(grid, boxes): one uint8 RGB picture of n rows, each a query (blue frame) then its k results
    (green frame when relevant, red when not), with a text band under each row; boxes (n, k + 1, 4)
    holds each framed panel's (top, left, bottom, right) pixel bounds."""
    n, k = relevant.shape
    cell, pad, band, gap = panel + 2 * frame, 4, 30, 16
    height, width = n * (cell + band) + pad, (k + 1) * (cell + pad) + gap + pad
    grid = np.full((height, width, 3), 255, dtype=np.uint8)
    boxes = np.zeros((n, k + 1, 4), dtype=np.int64)
    for i in range(n):
        for j in range(k + 1):
            top, left = pad + i * (cell + band), pad + j * (cell + pad) + (gap if j else 0)
            kind = "query" if j == 0 else "relevant" if relevant[i, j - 1] else "irrelevant"
            grid[top : top + cell, left : left + cell] = FRAME_COLORS[kind]
            image = query_images[i] if j == 0 else result_images[i, j - 1]
            grid[top + frame : top + frame + panel, left + frame : left + frame + panel] = _panel(image, panel)
            boxes[i, j] = (top, left, top + cell, left + cell)
    return grid, boxes


def _label_text(labels: np.ndarray, classes: list[str], width: int = 14) -> str:
    text = ",".join(classes[c] for c in np.flatnonzero(labels)) or "(none)"
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def retrieval_figure(path: Path, ex: RetrievalExamples, data) -> Path:
    """The retrieval-examples figure of a prepared dataset (`data`: a dseh.data.PreparedData) at
    `path`: retrieval_grid of the examples' images, each panel captioned with its labels (and the
    results with their distance)."""
    q_items, r_items = data.query[ex.queries], data.database[ex.results]
    grid, boxes = retrieval_grid(np.asarray(data.images[q_items]), np.asarray(data.images[r_items]), ex.relevant)
    plt = pyplot()
    dpi = 100
    fig = plt.figure(figsize=(grid.shape[1] / dpi, grid.shape[0] / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    for i in range(len(ex.queries)):
        for j in range(ex.results.shape[1] + 1):
            top, left, bottom, right = boxes[i, j]
            item = q_items[i] if j == 0 else r_items[i, j - 1]
            head = "query" if j == 0 else f"{j}. d={ex.distances[i, j - 1]}"
            text = f"{head}\n{_label_text(data.labels[item], data.classes)}"
            ax.text((left + right) / 2, bottom + 2, text, ha="center", va="top", fontsize=6.5, linespacing=1.1)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_examples(out: Path, ex: RetrievalExamples, data) -> dict[str, Path]:
    """figures/retrieval.png (retrieval_figure) and figures/retrieval.json, the same examples as
    item numbers of the prepared dataset: each query's item, its results', distances and relevance."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "query_item": int(data.query[q]),
            "result_items": [int(r) for r in data.database[ex.results[i]]],
            "distances": [int(d) for d in ex.distances[i]],
            "relevant": [bool(r) for r in ex.relevant[i]],
        }
        for i, q in enumerate(ex.queries)
    ]
    (out / "retrieval.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    return {"retrieval": retrieval_figure(out / "retrieval.png", ex, data)}


def write_evaluation(
    out: Path,
    rep,
    metrics: dict,
    lab_feats: np.ndarray | None,
    img_feats: np.ndarray | None,
    config: dict,
    examples: RetrievalExamples | None = None,
    data=None,
) -> None:
    """Everything `evaluate` writes beside metrics.json: the DVC plot data (PR curve by radius,
    precision/recall@N as CSV), the figures (with `examples`, the retrieval examples of the prepared
    dataset `data`) and the HTML report."""
    from dseh import artifacts

    artifacts.write_csv(
        out / artifacts.PR_CURVE,
        ["radius", "precision", "recall"],
        [[r, f"{p:.6f}", f"{q:.6f}"] for r, (p, q) in enumerate(zip(rep.pr_precision, rep.pr_recall))],
    )
    artifacts.write_csv(
        out / artifacts.PRECISION_AT,
        ["n", "precision", "recall"],
        [[n, f"{rep.precision_at[n]:.6f}", f"{rep.recall_at[n]:.6f}"] for n in rep.precision_at],
    )
    figs = make_figures(rep, lab_feats, img_feats, out / artifacts.FIGURES)
    if examples is not None:
        figs.update(write_examples(out / artifacts.FIGURES, examples, data))
    write_html(out / artifacts.REPORT, metrics, rep.precision_at, rep.recall_at, figs, config)
