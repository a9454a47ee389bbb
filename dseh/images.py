"""Decoding image files for the prepared dataset and for queries: every PIL mode handled
deliberately, decompression bombs refused from the header before any pixel is decoded; resizing per
image with Pillow (the CPU path) or in batches on a torch device (`resize_batch`)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from dseh.errors import DsehError

MAX_PIXELS = 89_478_485  # data.max_pixels' default: Pillow's own decompression-bomb limit


class BadImage(DsehError):
    """An image file that cannot be used: skipped and counted with data.skip_bad_images."""


# An alpha channel is composited onto this background, as a viewer showing the image on a
# white page would (dropping alpha instead would expose whatever colour transparent pixels hold).
BACKGROUND = (255, 255, 255)


def _to_rgb8(im):
    """Any PIL mode -> an 8-bit RGB image, each mode deliberately:

    - RGB as is; 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX by Pillow's conversion (1 -> 0/255).
    - With transparency (RGBA, LA, PA, premultiplied RGBa / La, P or RGB / L with a
      transparent colour): composited onto the white BACKGROUND.
    - 16-bit and 32-bit integer (I;16, I;16L, I;16B, I;16N, I): samples in 0..65535, as 16-bit
      PNG and TIFF store them, scaled by 255 / 65535 with rounding (a value v * 257 gives v);
      Pillow's own conversion would clip them at 255 and give a white image (a transparent
      colour key on such an image is not applied).
    - 32-bit float (F): samples in 0..1, the usual float-image convention, scaled by 255
      (NaN -> 0, clipped).
    Pillow opens 16-bit RGB / RGBA PNGs as RGB / RGBA (the high byte of each sample) already.
    Any other mode is refused naming it.
    """
    from PIL import Image

    mode = im.mode
    if mode == "RGB" and not im.has_transparency_data:
        return im
    if mode == "I" or mode.startswith("I;16"):
        a = np.asarray(im).astype(np.int64)
        gray = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(gray.astype(np.uint8)).convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
        return Image.fromarray(np.rint(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8)).convert("RGB")
    if im.has_transparency_data:
        rgba = (im.convert("LA") if mode == "La" else im).convert("RGBA")  # Pillow has no La -> RGBA
        background = Image.new("RGBA", im.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return im.convert("RGB")
    raise BadImage(f"unsupported image mode {mode}")


def _open_rgb(data: bytes, max_pixels: int):
    """The decoded 8-bit RGB PIL image of encoded bytes (modes as in `_to_rgb8`), the pixel count
    checked against `max_pixels` from the header first."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: refused by Pillow first
        raise BadImage(f"too large to decode ({exc})") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise BadImage(f"{w}x{h} = {w * h:,} pixels, over data.max_pixels = {max_pixels:,}")
    rgb = _to_rgb8(im)
    rgb.load()
    if rgb is not im:
        im.close()
    return rgb


def decode_image(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> uint8 (size, size, 3) RGB (modes as in `_to_rgb8`), Pillow's bilinear
    resize: the CPU path of `dseh prepare` and the decoding of query images.

    The pixel count is read from the header (Image.open decodes nothing) and an image over
    `max_pixels` is refused before any pixel is decoded, so a small file of huge dimensions (a
    decompression bomb) costs no memory."""
    from PIL import Image

    with _open_rgb(data, max_pixels) as im:
        if im.size != (size, size):
            return np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.uint8)
        return np.asarray(im, dtype=np.uint8)


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> uint8 (h, w, 3) RGB at the image's own size (for `resize_batch`)."""
    with _open_rgb(data, max_pixels) as im:
        return np.asarray(im, dtype=np.uint8)


def resize_device(name: str):
    """data.device -> the torch device that resizes images in batches, or None for the CPU path
    (Pillow, per image in the decoding threads); 'auto' is CUDA when present."""
    from dseh.train.device import resolve_device

    device = resolve_device(name, "data.device")
    return None if device.type == "cpu" else device


def resize_info(device) -> dict:
    """The manifest's record of how file images were resized (device None: the CPU path)."""
    if device is None:
        return {"method": "Pillow bilinear, per image", "device": "cpu"}
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return {"method": "torch bilinear antialias, batched", "device": str(device), "device_name": name}


def resize_batch(images: Sequence[np.ndarray], size: int, device) -> np.ndarray:
    """uint8 (h, w, 3) images of any sizes -> uint8 (n, size, size, 3) on a torch device: images of
    one size are stacked and resized together by bilinear interpolation with antialiasing (torch's
    `interpolate(antialias=True)`, the filter of Pillow's BILINEAR), in float32, rounded. Images
    already at the size pass unchanged, as in decode_image. On the CPU and on a GPU the results agree
    to float rounding; against decode_image's Pillow resize a pixel differs by at most 1 (tests hold
    both)."""
    import torch
    import torch.nn.functional as F

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape, []).append(i)
    for shape, idx in groups.items():
        if shape[:2] == (size, size):
            out[idx] = np.stack([images[i] for i in idx])
            continue
        x = torch.from_numpy(np.stack([images[i] for i in idx])).to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[idx] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return out
