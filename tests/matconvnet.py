"""Small and full-size CNN-F files in both MatConvNet layouts, written with scipy.io.savemat
(used by the model tests and the training benchmark; the real imagenet-vgg-f.mat is never needed)."""

import numpy as np
import scipy.io

# (name, H, W, Cin, Cout, stride, pad) of a narrow CNN-F: same kernels, strides and pads, few channels
CONVS = [
    ("conv1", 11, 11, 3, 4, 4, [0, 0, 0, 0]),
    ("conv2", 5, 5, 4, 6, 1, [2, 2, 2, 2]),
    ("conv3", 3, 3, 6, 6, 1, [1, 1, 1, 1]),
    ("conv4", 3, 3, 6, 6, 1, [1, 1, 1, 1]),
    ("conv5", 3, 3, 6, 6, 1, [1, 1, 1, 1]),
    ("fc6", 6, 6, 6, 8, 1, [0, 0, 0, 0]),
    ("fc7", 1, 1, 8, 8, 1, [0, 0, 0, 0]),
    ("fc8", 1, 1, 8, 5, 1, [0, 0, 0, 0]),
]
ORDER = [
    "conv1",
    "relu1",
    "norm1",
    "pool1",
    "conv2",
    "relu2",
    "norm2",
    "pool2",
    "conv3",
    "relu3",
    "conv4",
    "relu4",
    "conv5",
    "relu5",
    "pool5",
    "fc6",
    "relu6",
    "fc7",
    "relu7",
    "fc8",
    "prob",
]
MARK = (2, 0, 1, 3)  # kernel index (h, w, cin, cout) that holds a marker value


def cnnf_layers(skip=(), convs=None, std=0.05, lrn_type="lrn", types=None):
    """MatConvNet layer records of CNN-F (cell array of structs for scipy.io.savemat); each conv
    kernel holds the marker value 100 + its layer index at MARK. LRN layers are typed `lrn_type`
    (`lrn`, or `normalize` as in MatConvNet's own imagenet-vgg-f.mat); `types` maps layer names
    to a type that replaces theirs."""
    rng = np.random.default_rng(0)
    convs = {c[0]: c for c in (convs or CONVS)}
    layers = []
    for i, name in enumerate(ORDER):
        if name in skip:
            continue
        if name in convs:
            _, h, w, cin, cout, stride, pad = convs[name]
            kernel = (rng.standard_normal((h, w, cin, cout), dtype=np.float32) * std).astype(np.float32)
            kernel[tuple(min(m, s - 1) for m, s in zip(MARK, kernel.shape))] = 100.0 + i
            bias = np.arange(cout, dtype=np.float32)[:, None] * 0.01
            weights = np.empty((1, 2), dtype=object)
            weights[0, 0], weights[0, 1] = kernel, bias
            layer = {
                "name": name,
                "type": "conv",
                "weights": weights,
                "stride": np.array([[stride, stride]], float),
                "pad": np.array([pad], float),
            }
        elif name.startswith("relu"):
            layer = {"name": name, "type": "relu"}
        elif name.startswith("norm"):
            layer = {"name": name, "type": lrn_type, "param": np.array([[5, 2, 1e-4, 0.75]])}
        elif name.startswith("pool"):
            layer = {
                "name": name,
                "type": "pool",
                "method": "max",
                "pool": np.array([[3, 3]], float),
                "stride": np.array([[2, 2]], float),
                "pad": np.array([[0, 1, 0, 1] if name == "pool1" else [0, 0, 0, 0]], float),
            }
        else:
            layer = {"name": name, "type": "softmax"}
        layer["type"] = (types or {}).get(name, layer["type"])
        layers.append(layer)
    cell = np.empty((1, len(layers)), dtype=object)
    for i, layer in enumerate(layers):
        cell[0, i] = layer
    return cell


def write_cnnf(path, layout="new", skip=(), avg=None, convs=None, std=0.05, lrn_type="lrn", types=None):
    """A CNN-F file in MatConvNet's `new` (meta.normalization) or `old` (normalization, classes)
    layout; the other arguments as in cnnf_layers."""
    layers = cnnf_layers(skip, convs, std, lrn_type, types)
    avg = np.full((224, 224, 3), 100.0, dtype=np.float32) if avg is None else avg
    if layout == "new":
        content = {
            "layers": layers,
            "meta": {"normalization": {"averageImage": avg, "imageSize": [224, 224, 3]}},
        }
    else:
        content = {
            "layers": layers,
            "normalization": {"averageImage": avg},
            "classes": {"name": np.array(["a", "b"], dtype=object)},
        }
    scipy.io.savemat(path, content)
    return path


# the real CNN-F widths (Chatfield et al. 2014)
FULL_CONVS = [
    ("conv1", 11, 11, 3, 64, 4, [0, 0, 0, 0]),
    ("conv2", 5, 5, 64, 256, 1, [2, 2, 2, 2]),
    ("conv3", 3, 3, 256, 256, 1, [1, 1, 1, 1]),
    ("conv4", 3, 3, 256, 256, 1, [1, 1, 1, 1]),
    ("conv5", 3, 3, 256, 256, 1, [1, 1, 1, 1]),
    ("fc6", 6, 6, 256, 4096, 1, [0, 0, 0, 0]),
    ("fc7", 1, 1, 4096, 4096, 1, [0, 0, 0, 0]),
    ("fc8", 1, 1, 4096, 1000, 1, [0, 0, 0, 0]),
]
