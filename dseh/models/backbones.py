"""ImgNet backbones: CNN-F read from MatConvNet's imagenet-vgg-f.mat, torchvision-layout AlexNet,
VGG-16 and ResNet-50 (weights from a local .pth), and a small CNN for the built-in 32x32 data.

Every backbone maps uint8 NHWC images to a feature vector (`out_dim`), with its own input
normalisation in `preprocess`. Weights only ever come from local files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dseh.errors import DsehError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """A feature extractor with its input normalisation; `pretrained` when weights were loaded."""

    out_dim: int
    pretrained: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.ones(1, 3, 1, 1), persistent=False)
        self.scale = 1.0  # multiply raw 0-255 values by this before (x - mean) / std

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float (B, 3, H, W), channels-last in memory."""
        x = images.permute(0, 3, 1, 2).float() * self.scale
        mean = self.mean
        if mean.shape[-1] > 1 and mean.shape[-2:] != x.shape[-2:]:
            mean = F.interpolate(mean, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return (x - mean) / self.std


# --------------------------------------------------------------------------- small CNN


class SmallCNN(Backbone):
    """32-64-128 conv blocks (BN, ReLU, 2x2 max-pool) and one 512-unit fully connected layer."""

    def __init__(self, image_size: int = 32, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in (32, 64, 128):
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(128 * 16, 512), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.out_dim = 512
        self.mean.fill_(127.5)
        self.std.fill_(64.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# --------------------------------------------------------------------------- CNN-F (MatConvNet)


def _unwrap(x):
    while isinstance(x, np.ndarray) and x.dtype == object and x.size == 1:
        x = x.flat[0]
    return x


def _has(rec, name: str) -> bool:
    rec = _unwrap(rec)
    return name in getattr(rec, "_fieldnames", ())


def _get(rec, name: str, where: str):
    rec = _unwrap(rec)
    if not _has(rec, name):
        raise DsehError(f"{where}: field '{name}' is missing")
    return _unwrap(getattr(rec, name))


def _text(x) -> str:
    x = _unwrap(x)
    if isinstance(x, np.ndarray):
        return "".join(str(v) for v in x.ravel())
    return str(x)


def _ints(x, n: int) -> list[int]:
    vals = [int(v) for v in np.asarray(_unwrap(x)).ravel()]
    if len(vals) == 1:
        vals = vals * n
    return vals


class _Pad(nn.Module):
    """MatConvNet padding [top, bottom, left, right] with a fill value."""

    def __init__(self, pad: list[int], value: float):
        super().__init__()
        top, bottom, left, right = pad
        self.pad = (left, right, top, bottom)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad, value=self.value)


def read_matconvnet(path: str | Path) -> tuple[list, np.ndarray]:
    """(layer records, average image H x W x 3) from a MatConvNet model, either file layout:
    new (`layers`, `meta.normalization.averageImage`) or old (`layers`, `normalization`, `classes`)."""
    import scipy.io

    path = str(path)
    if not Path(path).is_file():
        raise DsehError(f"CNN-F weights file {path} does not exist (params key imgnet.weights)")
    try:
        mat = scipy.io.loadmat(path, struct_as_record=False, squeeze_me=False)
    except Exception as exc:  # noqa: BLE001 - scipy raises several types for bad files
        raise DsehError(f"{path} is not a readable MatConvNet .mat file: {exc}") from exc
    if "layers" not in mat:
        raise DsehError(f"{path}: no top-level 'layers' (not a MatConvNet model)")
    if "meta" in mat:
        norm = _get(_get(mat["meta"], "normalization", f"{path}: meta"), "averageImage", f"{path}: meta.normalization")
    elif "normalization" in mat:
        norm = _get(mat["normalization"], "averageImage", f"{path}: normalization")
    else:
        raise DsehError(f"{path}: neither 'meta' nor 'normalization' holds the average image")
    avg = np.asarray(norm, dtype=np.float32)
    if avg.size == 3:
        avg = avg.reshape(1, 1, 3)
    if avg.ndim != 3 or avg.shape[2] != 3:
        raise DsehError(f"{path}: averageImage has shape {avg.shape}, expected H x W x 3 or 1 x 1 x 3")
    layers = [_unwrap(x) for x in np.asarray(mat["layers"]).ravel()]
    return layers, avg


def _conv_weights(rec, name: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    where = f"{path}: layer '{name}'"
    if _has(rec, "weights"):
        w = [_unwrap(v) for v in np.asarray(_get(rec, "weights", where), dtype=object).ravel()]
        if len(w) != 2:
            raise DsehError(f"{where}: 'weights' should hold (kernel, bias), found {len(w)} arrays")
        kernel, bias = w
    else:
        kernel, bias = _get(rec, "filters", where), _get(rec, "biases", where)
    kernel = np.asarray(kernel, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32).ravel()
    if kernel.ndim == 3:  # MATLAB drops a trailing singleton Cout
        kernel = kernel[..., None]
    if kernel.ndim != 4 or bias.shape[0] != kernel.shape[3]:
        raise DsehError(f"{where}: kernel {kernel.shape} and bias {bias.shape} do not form H x W x Cin x Cout")
    return kernel, bias


def _stride_pad(rec, where: str) -> tuple[list[int], list[int]]:
    stride = _ints(_get(rec, "stride", where), 2) if _has(rec, "stride") else [1, 1]
    pad = _ints(_get(rec, "pad", where), 4) if _has(rec, "pad") else [0, 0, 0, 0]
    return stride, pad


def _conv_layer(rec, name: str, weights: str, channels: int, seq: dict[str, nn.Module]) -> int:
    """Add a MatConvNet conv layer (and its padding) to `seq`; returns its output channels."""
    where = f"{weights}: layer '{name}'"
    kernel, bias = _conv_weights(rec, name, weights)
    kh, kw, cin, cout = kernel.shape
    if cin != channels:
        raise DsehError(f"{where}: kernel expects {cin} input channels, the previous layer gives {channels}")
    stride, pad = _stride_pad(rec, where)
    conv = nn.Conv2d(cin, cout, (kh, kw), stride=tuple(stride))
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(bias))
    if any(pad):
        seq[f"{name}_pad"] = _Pad(pad, 0.0)
    seq[name] = conv
    return cout


def _pool_layer(rec, name: str, where: str, seq: dict[str, nn.Module]) -> None:
    """Add a MatConvNet pooling layer (and its padding) to `seq`."""
    size = _ints(_get(rec, "pool", where), 2)
    stride, pad = _stride_pad(rec, where)
    method = _text(_get(rec, "method", where)) if _has(rec, "method") else "max"
    if any(pad):
        seq[f"{name}_pad"] = _Pad(pad, float("-inf") if method == "max" else 0.0)
    pool_cls: Callable = nn.MaxPool2d if method == "max" else nn.AvgPool2d
    seq[name] = pool_cls(tuple(size), stride=tuple(stride))


def _lrn_layer(rec, where: str) -> nn.Module:
    """MatConvNet's cross-channel normalisation, param [N kappa alpha beta]:
    x / (kappa + alpha * sum of N squares)^beta, which is PyTorch's LRN with alpha * N."""
    param = [float(v) for v in np.asarray(_get(rec, "param", where)).ravel()]
    if len(param) != 4:
        raise DsehError(f"{where}: 'param' should hold [N kappa alpha beta], found {len(param)} values")
    n, kappa, alpha, beta = param
    return nn.LocalResponseNorm(int(n), alpha=alpha * n, beta=beta, k=kappa)


# the layer types of CNN-F's conv1..relu7; `lrn` and `normalize` (imagenet-vgg-f.mat's) are one layer
CNNF_LAYER_TYPES = ("conv", "relu", "lrn", "normalize", "pool")


def _add_layer(rec, name: str, weights: str, channels: int, dropout: float, seq: dict[str, nn.Module]) -> int:
    """Add one MatConvNet layer of conv1..relu7 to `seq`; returns the channels after it.
    A type outside CNNF_LAYER_TYPES is refused, naming the file, the layer and the type."""
    where = f"{weights}: layer '{name}'"
    kind = _text(_get(rec, "type", where))
    if kind == "conv":
        return _conv_layer(rec, name, weights, channels, seq)
    if kind == "relu":
        seq[name] = nn.ReLU(inplace=True)
        if name in ("relu6", "relu7"):
            seq[name.replace("relu", "drop")] = nn.Dropout(dropout)
    elif kind in ("lrn", "normalize"):
        seq[name] = _lrn_layer(rec, where)
    elif kind == "pool":
        _pool_layer(rec, name, where, seq)
    else:
        raise DsehError(f"{where} has type '{kind}', not one of CNN-F's {', '.join(CNNF_LAYER_TYPES)}")
    return channels


CNNF_REQUIRED = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")


class CNNF(Backbone):
    """CNN-F (Chatfield et al. 2014) conv1..fc7 built from a MatConvNet file, dropout after fc6/fc7.

    Layers are read by field name; LRN layers typed `lrn` or `normalize` are the same layer, and
    any other type before relu7 is refused; kernels H x W x Cin x Cout map to PyTorch by
    transpose(3, 2, 0, 1); the file's average image is subtracted on input (0-255 RGB).
    """

    def __init__(self, weights: str, image_size: int = 224, dropout: float = 0.5):
        super().__init__()
        layers, avg = read_matconvnet(weights)
        seq: dict[str, nn.Module] = {}
        names = []
        channels = 3
        for rec in layers:
            name = _text(_get(rec, "name", f"{weights}: a layer"))
            names.append(name)
            channels = _add_layer(rec, name, weights, channels, dropout, seq)
            if name == "relu7":
                break
        missing = [n for n in CNNF_REQUIRED if n not in names]
        if missing:
            raise DsehError(f"{weights}: layer '{missing[0]}' is missing (CNN-F needs {', '.join(CNNF_REQUIRED)})")
        self.features = nn.Sequential()
        for name, module in seq.items():
            self.features.add_module(name, module)
        self.out_dim = channels
        self.pretrained = True
        self.register_buffer("mean", torch.from_numpy(avg.transpose(2, 0, 1).copy())[None], persistent=False)
        with torch.no_grad():
            try:
                out = self.features(torch.zeros(1, 3, image_size, image_size))
            except RuntimeError as exc:
                raise DsehError(f"{weights}: CNN-F does not fit {image_size}x{image_size} inputs: {exc}") from exc
        if out.shape[-2:] != (1, 1):
            raise DsehError(
                f"{weights}: layer 'fc6' leaves a {tuple(out.shape[-2:])} map at image size {image_size}; "
                "set data.image_size to the size the weights were trained for (224)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)


# --------------------------------------------------------------------------- torchvision layouts


class AlexNet(Backbone):
    """torchvision's AlexNet layout (state_dict keys match), without the last classifier layer."""

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        r = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), r(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), r(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), r(),
            nn.Conv2d(384, 256, 3, padding=1), r(),
            nn.Conv2d(256, 256, 3, padding=1), r(), nn.MaxPool2d(3, 2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(256 * 36, 4096), r(), nn.Dropout(dropout), nn.Linear(4096, 4096), r()
        )
        self.out_dim = 4096
        _imagenet_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class VGG16(Backbone):
    """torchvision's VGG-16 layout, without the last classifier layer."""

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c_in = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 49, 4096),
            nn.ReLU(True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(dropout),
        )
        self.out_dim = 4096
        _imagenet_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class _Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * 4
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


class ResNet50(Backbone):
    """torchvision's ResNet-50 layout, without the final fc; features are the pooled 2048-d vector."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for i, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
            mods = []
            for b in range(blocks):
                mods.append(_Bottleneck(c_in, width, stride if b == 0 else 1))
                c_in = width * 4
            setattr(self, f"layer{i}", nn.Sequential(*mods))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 2048
        _imagenet_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def _imagenet_norm(b: Backbone) -> None:
    b.scale = 1.0 / 255.0
    b.mean.copy_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
    b.std.copy_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))


def load_torchvision_weights(model: Backbone, path: str) -> None:
    """Load a torchvision ImageNet state_dict from a local file; the classifier head is ignored."""
    if not path:
        return
    if not Path(path).is_file():
        raise DsehError(f"backbone weights file {path} does not exist (params key imgnet.weights)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise DsehError(f"{path} is not a readable PyTorch weights file: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    for key, tensor in own.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key not in state:
            raise DsehError(f"{path}: layer '{key}' is missing from the weights file")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise DsehError(
                f"{path}: layer '{key}' has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}"
            )
    model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    model.pretrained = True


def _small(weights: str, image_size: int, dropout: float) -> Backbone:
    if weights:
        raise DsehError("imgnet.backbone=small trains from scratch; leave imgnet.weights empty")
    return SmallCNN(image_size, dropout)


def _cnnf(weights: str, image_size: int, dropout: float) -> Backbone:
    if not weights:
        raise DsehError("imgnet.backbone=cnnf needs imgnet.weights: a local imagenet-vgg-f.mat")
    return CNNF(weights, image_size, dropout)


def _torchvision(make: Callable[[float], Backbone]) -> Callable[[str, int, float], Backbone]:
    def create(weights: str, _image_size: int, dropout: float) -> Backbone:
        model = make(dropout)
        load_torchvision_weights(model, weights)
        return model

    return create


# the backbone registry: imgnet.backbone -> (local weights path, image size, dropout) -> Backbone
BACKBONES: dict[str, Callable[[str, int, float], Backbone]] = {
    "small": _small,
    "cnnf": _cnnf,
    "alexnet": _torchvision(AlexNet),
    "vgg16": _torchvision(VGG16),
    "resnet50": _torchvision(lambda _dropout: ResNet50()),
}
NEEDS_FILE = ("cnnf",)  # backbones whose layer shapes come from their weights file: rebuilt only with it


def create_backbone(name: str, weights: str = "", image_size: int = 32, dropout: float = 0.5) -> Backbone:
    """The backbone called `name`; pretrained weights from the local path `weights` if given."""
    if name not in BACKBONES:
        raise DsehError(f"unknown imgnet.backbone '{name}'; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name](weights, image_size, dropout)
