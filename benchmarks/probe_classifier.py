r"""What the image network's backbone supports on a single-label prepared dataset without hashing:
the backbone trained as a plain classifier (cross-entropy, the same training split, image size, flips
and epochs). Prints its accuracy on the query and database splits, the mAP@ALL of ranking the database
by the real-valued class probabilities (inner product of the softmax vectors, no codes), and that of
hashing every item to its predicted class's code (one code per class: the hard assignment a
single-label hash can at best learn, ties by index as ever). The runs behind
docs/results.md#fashion-mnist-real-images:

    .venv/bin/dseh prepare -S data.source=fashion-mnist -S tracking.enabled=false --out outputs-fashion/fashion-mnist/data
    .venv/bin/python benchmarks/probe_classifier.py outputs-fashion/fashion-mnist/data --epochs 20 --threads 1

About 3 minutes on 2 cores for 20 epochs of 5,000 images and the 70,000-image encode. A better-trained
classifier (a one-cycle schedule, more epochs) tells whether the ceiling is the training recipe's:

    .venv/bin/python benchmarks/probe_classifier.py outputs-fashion/fashion-mnist/data --epochs 30 \
        --schedule onecycle --lr 0.003 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from torch import nn

from dseh import evaluation
from dseh.codes import pack
from dseh.data import PreparedData
from dseh.errors import DsehError
from dseh.models.backbones import SmallCNN


def probabilities(backbone: nn.Module, head: nn.Module, images, idx: np.ndarray, batch: int = 1024) -> np.ndarray:
    """Softmax class probabilities of the items idx."""
    backbone.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(idx), batch):
            x = torch.from_numpy(np.asarray(images[idx[s : s + batch]]))
            out.append(torch.softmax(head(backbone(backbone.preprocess(x))), 1).numpy())
    return np.concatenate(out)


def map_by_scores(p_q: np.ndarray, p_db: np.ndarray, y_q: np.ndarray, y_db: np.ndarray, chunk: int = 50) -> float:
    """mAP@ALL of ranking the database by descending p_q . p_db (ties by index)."""
    aps = []
    for s in range(0, len(p_q), chunk):
        order = np.argsort(-(p_q[s : s + chunk] @ p_db.T), axis=1, kind="stable")
        aps.append(evaluation.ap_from_relevance(y_db[order] == y_q[s : s + chunk, None]))
    return float(np.concatenate(aps).mean())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="probe_classifier.py"
    )
    ap.add_argument("data", help="a prepared single-label dataset (dseh prepare --out ...)")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    ap.add_argument("--lr", type=float, default=10**-3.5, help="Adam's learning rate (DSEH's: 10^-3.5)")
    ap.add_argument(
        "--schedule",
        choices=("constant", "onecycle"),
        default="constant",
        help="constant: --lr throughout; onecycle: --lr is the peak of a one-cycle schedule (warm-up, cosine decay)",
    )
    ap.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    ap.add_argument("--seed", type=int, default=0, help="torch and sampling seed (default 0)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    data = PreparedData(args.data)
    labels = np.asarray(data.labels)
    if (labels.sum(axis=1) != 1).any():
        raise DsehError(f"{args.data}: every item needs exactly one label for a class-code ceiling")
    target = labels.argmax(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    backbone = SmallCNN(image_size=data.images.shape[1])
    head = nn.Linear(backbone.out_dim, labels.shape[1])
    opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=args.lr)
    train = np.asarray(data.train)
    steps = args.epochs * -(-len(train) // args.batch_size)
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps) if args.schedule == "onecycle" else None
    )
    start = time.perf_counter()
    for _ in range(args.epochs):
        backbone.train()
        order = rng.permutation(train)
        for s in range(0, len(train), args.batch_size):
            batch = np.sort(order[s : s + args.batch_size])  # sorted: memory-mapped reads in file order
            x = torch.from_numpy(np.asarray(data.images[batch]))
            flip = torch.from_numpy(rng.random(len(x)) < 0.5)
            x[flip] = x[flip].flip(2)  # NHWC: axis 2 is the width
            y = torch.from_numpy(target[batch])
            loss = nn.functional.cross_entropy(head(backbone(backbone.preprocess(x))), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    train_s = time.perf_counter() - start
    p_q = probabilities(backbone, head, data.images, np.asarray(data.query))
    p_db = probabilities(backbone, head, data.images, np.asarray(data.database))
    pred_q, pred_db = p_q.argmax(1), p_db.argmax(1)
    by_scores = map_by_scores(p_q, p_db, target[data.query], target[data.database])
    acc_q = float((pred_q == target[data.query]).mean())
    acc_db = float((pred_db == target[data.database]).mean())
    codes = np.where(np.eye(labels.shape[1]) > 0, 1, -1).astype(np.int8)  # one code per class
    bits = codes.shape[1]
    rep = evaluation.retrieval_report(
        pack(codes[pred_q]), pack(codes[pred_db]), labels[data.query], labels[data.database], bits, 1000
    )
    print(
        f"classifier, {args.epochs} epochs, {args.schedule} lr {args.lr:.2g} ({train_s:.0f} s): accuracy query {acc_q:.4f} database {acc_db:.4f}\n"
        f"ranking by class probabilities: mAP@ALL {by_scores:.4f}\n"
        f"class-code retrieval: mAP@ALL {rep.map_all:.4f} tie-aware {rep.map_tie_aware:.4f} mAP@1000 {rep.map_topk:.4f}"
    )


if __name__ == "__main__":
    try:
        main()
    except DsehError as exc:  # one line, as the dseh command prints it
        print(f"probe_classifier.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
