"""Figures like the paper's (PR curve, precision@top-N, semantic-feature heat maps) and one
self-contained HTML report (figures inline as base64, no scripts, no external links).
"""

from __future__ import annotations

import base64
import html
import json
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
    figs = "".join(_img(p, name.replace("_", " ")) for name, p in figures.items())
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


def write_evaluation(
    out: Path, rep, metrics: dict, lab_feats: np.ndarray | None, img_feats: np.ndarray | None, config: dict
) -> None:
    """Everything `evaluate` writes beside metrics.json: the DVC plot data (PR curve by radius,
    precision/recall@N as CSV), the figures and the HTML report."""
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
    write_html(out / artifacts.REPORT, metrics, rep.precision_at, rep.recall_at, figs, config)
