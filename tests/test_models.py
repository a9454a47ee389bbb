"""Networks: CNN-F from MatConvNet files (both layouts), torchvision-layout weights, LabNet/ImgNet."""

import numpy as np
import pytest
import torch

from dseh.errors import DsehError
from dseh.models.backbones import BACKBONES, CNNF, create_backbone
from dseh.models.nets import ImgNet, LabNet
from tests.matconvnet import MARK, ORDER, cnnf_layers, write_cnnf


@pytest.mark.parametrize("layout,avg", [("new", None), ("old", np.array([[[120.0, 110.0, 100.0]]], dtype=np.float32))])
def test_cnnf_every_layer_lands_where_it_should(tmp_path, layout, avg):
    path = write_cnnf(tmp_path / "vgg-f.mat", layout, avg=avg)
    net = CNNF(str(path), 224)
    mods = dict(net.features.named_children())
    for i, name in enumerate(ORDER):
        if name.startswith(("conv", "fc")) and name != "fc8":
            w = mods[name].weight  # (Cout, Cin, H, W) = kernel.transpose(3, 2, 0, 1)
            h, wd, cin, cout = (min(m, s - 1) for m, s in zip(MARK, (w.shape[2], w.shape[3], w.shape[1], w.shape[0])))
            assert float(w[cout, cin, h, wd].detach()) == 100.0 + i, name
            assert float(mods[name].bias[-1]) == pytest.approx((w.shape[0] - 1) * 0.01)
    assert "fc8" not in mods and "prob" not in mods
    assert isinstance(mods["drop6"], torch.nn.Dropout) and isinstance(mods["drop7"], torch.nn.Dropout)
    lrn = mods["norm1"]
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, pytest.approx(5e-4), 0.75, 2.0)
    assert mods["pool1_pad"].pad == (0, 1, 0, 1)  # MatConvNet [top bottom left right] -> F.pad order
    assert net.out_dim == 8
    x = torch.full((2, 224, 224, 3), 100, dtype=torch.uint8)
    feats = net(net.preprocess(x))
    assert feats.shape == (2, 8)
    # the average image is subtracted on input
    if layout == "new":
        assert torch.allclose(net.preprocess(x), torch.zeros(2, 3, 224, 224))
    else:
        assert net.preprocess(x)[0, :, 5, 5].tolist() == [-20.0, -10.0, 0.0]


def test_cnnf_conv1_matches_a_direct_correlation(tmp_path):
    path = write_cnnf(tmp_path / "f.mat")
    net = CNNF(str(path), 224).eval()
    kernel = cnnf_layers()[0, 0]["weights"][0, 0]  # H W Cin Cout, as written
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = net.features.conv1(x)
    patch = x[0, :, 8:19, 12:23].numpy()  # output (2, 3) at stride 4 starts at row 8, col 12
    ref = sum(patch[c] * kernel[:, :, c, 1] for c in range(3)).sum() + 0.01
    assert float(out[0, 1, 2, 3]) == pytest.approx(float(ref), rel=1e-4, abs=1e-4)


def test_cnnf_missing_layer_is_named(tmp_path):
    path = write_cnnf(tmp_path / "f.mat", skip=("conv3", "relu3"))
    with pytest.raises(DsehError, match="conv4.*6 input channels|conv3"):
        CNNF(str(path), 224)
    path = write_cnnf(tmp_path / "g.mat", skip=("fc7", "relu7", "fc8", "prob"))
    with pytest.raises(DsehError, match="layer 'fc7' is missing"):
        CNNF(str(path), 224)


@pytest.mark.parametrize("layout", ["new", "old"])
def test_cnnf_lrn_spellings_build_the_same_network(tmp_path, layout):
    """`normalize` (MatConvNet's imagenet-vgg-f.mat) and `lrn` are the same LRN layer."""
    nets = [CNNF(str(write_cnnf(tmp_path / f"{t}.mat", layout, lrn_type=t)), 224).eval() for t in ("lrn", "normalize")]
    a, b = (dict(n.features.named_children()) for n in nets)
    assert list(a) == list(b) and {"norm1", "norm2"} <= set(a)
    for name in ("norm1", "norm2"):
        assert isinstance(b[name], torch.nn.LocalResponseNorm)
        assert (b[name].size, b[name].alpha, b[name].beta, b[name].k) == (5, pytest.approx(5e-4), 0.75, 2.0)
    for (ka, va), (kb, vb) in zip(nets[0].state_dict().items(), nets[1].state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    x = torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(nets[0](nets[0].preprocess(x)), nets[1](nets[1].preprocess(x)))


def test_cnnf_unknown_layer_type_is_refused(tmp_path):
    path = write_cnnf(tmp_path / "f.mat", types={"norm2": "bnorm"})
    with pytest.raises(DsehError, match=r"f\.mat: layer 'norm2' has type 'bnorm'"):
        CNNF(str(path), 224)
    # after relu7 (fc8, softmax) nothing is read
    assert CNNF(str(write_cnnf(tmp_path / "g.mat", types={"prob": "bnorm"})), 224).out_dim == 8


def test_cnnf_missing_or_bad_file(tmp_path):
    with pytest.raises(DsehError, match="does not exist"):
        CNNF(str(tmp_path / "nope.mat"), 224)
    (tmp_path / "bad.mat").write_bytes(b"garbage")
    with pytest.raises(DsehError, match="bad.mat"):
        CNNF(str(tmp_path / "bad.mat"), 224)


def test_cnnf_wrong_image_size_is_explained(tmp_path):
    path = write_cnnf(tmp_path / "f.mat")
    with pytest.raises(DsehError, match="fc6|image size"):
        CNNF(str(path), 256)


@pytest.mark.parametrize("name", ["alexnet", "resnet50"])
def test_torchvision_layout_weights_load_and_mismatch(tmp_path, name):
    src = create_backbone(name)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    head = {
        "alexnet": {"classifier.6.weight": torch.zeros(1000, 4096)},
        "resnet50": {"fc.weight": torch.zeros(1000, 2048)},
    }[name]
    torch.save({**state, **head}, tmp_path / "w.pth")
    model = create_backbone(name, str(tmp_path / "w.pth"))
    assert model.pretrained
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    key = next(iter(state))
    bad = dict(state)
    bad[key] = torch.zeros(3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(DsehError, match=key.replace(".", r"\.")):
        create_backbone(name, str(tmp_path / "bad.pth"))
    del bad[key]
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(DsehError, match="missing"):
        create_backbone(name, str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("name", [b for b in BACKBONES if b != "cnnf"])
def test_backbones_forward(name):
    torch.manual_seed(0)
    size = 32 if name == "small" else 64
    model = ImgNet(create_backbone(name, image_size=size), bits=12).eval()
    f, u = model(torch.randint(0, 255, (2, size, size, 3), dtype=torch.uint8))
    assert f.shape == (2, 512) and u.shape == (2, 12) and (f >= 0).all()


def test_labnet_shapes_and_init():
    torch.manual_seed(0)
    net = LabNet(n_classes=7, bits=16, hidden=64)
    f, h, logits = net(torch.eye(7)[:3])
    assert f.shape == (3, 512) and h.shape == (3, 16) and logits.shape == (3, 7)
    assert (h.abs() < 1).all() and (f >= 0).all()
    w = net.fc2.weight
    assert w.abs().max() <= 0.02 + 1e-7 and 0.005 < float(w.std()) < 0.01  # truncated at 2 sigma
    assert LabNet(7, 16, 64, lrn=False).lrn is None


def test_imgnet_hash_from_pre_or_post_relu():
    torch.manual_seed(0)
    model = ImgNet(create_backbone("small"), 8, "pre_relu").eval()
    x = torch.randint(0, 255, (4, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        z = model.fc8(model.backbone(model.backbone.preprocess(x)))
        _, u = model(x)
        assert torch.allclose(u, model.fc9(z))
        model.hash_from = "post_relu"
        _, u2 = model(x)
        assert torch.allclose(u2, model.fc9(torch.relu(z)))


def test_unknown_backbone_and_missing_weights():
    with pytest.raises(DsehError, match="imgnet.weights"):
        create_backbone("cnnf")
    with pytest.raises(DsehError, match="does not exist"):
        create_backbone("alexnet", "/nonexistent/alexnet.pth")
