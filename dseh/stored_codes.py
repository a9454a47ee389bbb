"""The stored codes of an image-network step output checked against the model: the database
re-encoded on the step's device (`dseh evaluate`, evaluate.verify_codes), and every item encoded
anew (`dseh evaluate --encode`)."""

from __future__ import annotations

import logging

import numpy as np

from dseh.codes import pack
from dseh.config import Config
from dseh.data import PreparedData
from dseh.encoder import encode_images
from dseh.errors import DsehError
from dseh.models.factory import load_imgnet
from dseh.train import device as dev

log = logging.getLogger(__name__)


def encode_packed(cfg: Config, data: PreparedData, imgnet_dir, items, progress: bool, device) -> np.ndarray:
    """Packed codes of `items` (None: every item) by the saved image network on `device`."""
    model = load_imgnet(imgnet_dir)[0].to(device)
    return pack(encode_images(model, data.images, items, cfg.imgnet.encode_batch_size, device, progress)[1])


def encode_all(cfg: Config, data: PreparedData, img, imgnet_dir, progress: bool) -> np.ndarray:
    """`dseh evaluate --encode`: every item's packed codes by the saved image network."""
    if img.kind != "imgnet":
        raise DsehError(f"{imgnet_dir} holds {img.method} codes, not an image network: --encode needs one")
    return encode_packed(cfg, data, imgnet_dir, None, progress, dev.resolve_device(cfg.train.device))


def verify(cfg: Config, data: PreparedData, img, imgnet_dir, codes: np.ndarray, progress: bool) -> dict:
    """With evaluate.verify_codes, re-encode the database with the saved image network on the step's
    device and compare with the stored codes: metrics.json's {"codes_verified": {device, items,
    mismatched}}; a DsehError when more than evaluate.verify_max_mismatch of the items differ (a
    stale or damaged codes file, or a model that is not the one that wrote them). {} for codes from
    features (ITQ, LSH) or when off."""
    ev = cfg.evaluate
    if not ev.verify_codes or img.kind != "imgnet":
        return {}
    device = dev.resolve_device(cfg.train.device)
    fresh = encode_packed(cfg, data, imgnet_dir, data.database, progress, device)
    mismatched = int((fresh != codes[data.database]).any(axis=1).sum())
    share = mismatched / max(1, len(data.database))
    log.info("re-encoded %d database items on %s: %d codes differ from the stored ones", len(fresh), device, mismatched)
    if share > ev.verify_max_mismatch:
        raise DsehError(
            f"{imgnet_dir}: {mismatched} of {len(fresh)} stored database codes ({share:.2%}) differ from the image "
            f"network's codes re-encoded on {device}, more than evaluate.verify_max_mismatch="
            f"{ev.verify_max_mismatch}: the codes file does not come from this model (retrain, or rerun `dvc repro`)"
        )
    return {"codes_verified": {"device": str(device), "items": int(len(fresh)), "mismatched": mismatched}}
