from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from model import SUPPORTED_BACKBONES, DeepLabV3Plus, build_model

H, W = 96, 64  # small, non-square


def _hooked_shapes(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple]:
    """Run x through model; return each named module's input and output shapes."""
    shapes: dict[str, tuple] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, inp, out, name=name: shapes.__setitem__(
                name, (tuple(inp[0].shape), tuple(out.shape))
            )
        )
        for name in names
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return shapes


@pytest.mark.parametrize("backbone", SUPPORTED_BACKBONES)
def test_output_shape_every_backbone(backbone: str) -> None:
    model = build_model(backbone, num_classes=4).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, H, W))
    assert out.shape == (1, 4, H, W)
    # Built as asked: the backbone's blocks, 1 input channel, 4 classes, output stride 16 and the
    # 256-channel decoder (the checkpoint's config, not the model, records these).
    resnet = torchvision.models.get_model(backbone)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        ours, reference = getattr(model.backbone, name), getattr(resnet, name)
        assert [type(b) for b in ours] == [type(b) for b in reference]
    assert model.backbone.stem.conv1.in_channels == 1 and model.classifier.out_channels == 4
    with torch.no_grad():
        assert model.backbone(torch.randn(1, 1, H, W))[1].shape[-2:] == (H // 16, W // 16)
    assert model.classifier.in_channels == 256


def test_decoder_width_is_a_flag_away() -> None:
    model = build_model("resnet18", decoder_channels=64)
    assert model.aspp.project[0].out_channels == 64
    assert model.decoder.fuse[-1][0].out_channels == 64 and model.classifier.in_channels == 64
    assert model.decoder.low_level[0].out_channels == 48  # the V3+ low-level projection stays
    out = model.train()(torch.randn(2, 1, H, W))
    assert out.shape == (2, 4, H, W)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
@pytest.mark.parametrize("size", [(H, W), (200, 136), (37, 53)])
def test_output_shape_os8_and_odd_sizes(backbone: str, size: tuple[int, int]) -> None:
    model = build_model(backbone, num_classes=3, in_channels=2, output_stride=8).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 2, *size))
    assert out.shape == (2, 3, *size)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
@pytest.mark.parametrize("output_stride", [16, 8])
def test_features_at_stated_stride(backbone: str, output_stride: int) -> None:
    model = build_model(backbone, output_stride=output_stride).eval()
    shapes = _hooked_shapes(model, ["backbone.layer1", "backbone.layer4"], torch.randn(1, 1, H, W))
    assert shapes["backbone.layer1"][1][-2:] == (H // 4, W // 4)
    assert shapes["backbone.layer4"][1][-2:] == (H // output_stride, W // output_stride)


@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilation_is_torchvisions_replace_stride_with_dilation(output_stride: int) -> None:
    # torchvision keeps the previous dilation in the first block of a dilated stage.
    dilate = {16: [False, False, True], 8: [False, True, True]}[output_stride]
    reference = torchvision.models.resnet50(replace_stride_with_dilation=dilate)
    ours = build_model("resnet50", output_stride=output_stride).backbone
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        expected = [(n, c.stride, c.dilation, c.padding) for n, c in
                    getattr(reference, layer).named_modules() if isinstance(c, nn.Conv2d)]
        got = [(n, c.stride, c.dilation, c.padding) for n, c in
               getattr(ours, layer).named_modules() if isinstance(c, nn.Conv2d)]
        assert got == expected


# resnet50 at stride 8 covers both Bottleneck cases (previous dilation 1 and 2).
@pytest.mark.parametrize(("backbone", "output_stride"),
                         [("resnet18", 16), ("resnet18", 8), ("resnet50", 8)])
def test_dilated_encoder_sees_what_the_strided_resnet_saw(backbone: str,
                                                          output_stride: int) -> None:
    # Replacing a stride s by dilation is exact: with the same weights, the dilated encoder's
    # output at every (32 / output_stride)-th pixel is the plain stride-32 ResNet's output (even
    # sizes at every stage). It holds for BasicBlock (resnet18) as for Bottleneck only if the
    # first block's formerly strided conv keeps the previous dilation and every 3x3 conv after it
    # takes the new one.
    torch.manual_seed(0)
    model = build_model(backbone, in_channels=3, output_stride=output_stride).eval()
    resnet = torchvision.models.get_model(backbone, weights=None)
    state = {key.removeprefix("stem."): value for key, value in model.backbone.state_dict().items()}
    loaded = resnet.load_state_dict(state, strict=False)
    assert set(loaded.missing_keys) == {"fc.weight", "fc.bias"} and not loaded.unexpected_keys
    trunk = nn.Sequential(*list(resnet.children())[:-2]).eval()  # without avgpool and fc
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = trunk(x)
        _, high = model.backbone(x)
    step = 32 // output_stride
    assert reference.shape[-2:] == (3, 2) and high.shape[-2:] == (3 * step, 2 * step)
    torch.testing.assert_close(high[..., ::step, ::step], reference, rtol=1e-4, atol=1e-4)


def test_is_v3_plus() -> None:
    model = build_model("resnet50").eval()
    assert isinstance(model, DeepLabV3Plus)
    assert type(model.aspp) is ASPP
    proj = model.decoder.low_level[0]
    assert isinstance(proj, nn.Conv2d) and proj.out_channels == 48 and proj.kernel_size == (1, 1)
    # The projection is fed layer1's output (stride 4) and the classifier sees stride 4 too.
    shapes = _hooked_shapes(
        model, ["backbone.layer1", "decoder.low_level", "classifier"], torch.randn(1, 1, H, W)
    )
    assert shapes["decoder.low_level"][0] == shapes["backbone.layer1"][1]
    assert shapes["decoder.low_level"][1] == (1, 48, H // 4, W // 4)
    assert shapes["classifier"][0] == (1, 256, H // 4, W // 4)


def _save_resnet(path: Path, backbone: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = torchvision.models.get_model(backbone, weights=None).state_dict()
    torch.save(state, path)
    return state


def test_pretrained_from_local_file(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    state = _save_resnet(path, "resnet18")
    model = build_model("resnet18", pretrained=str(path))
    enc = model.backbone
    torch.testing.assert_close(enc.stem.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(enc.stem.bn1.running_var, state["bn1.running_var"])
    torch.testing.assert_close(enc.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    torch.testing.assert_close(enc.layer4[1].bn2.weight, state["layer4.1.bn2.weight"])

    rgb = build_model("resnet18", in_channels=3, pretrained=path)
    torch.testing.assert_close(rgb.backbone.stem.conv1.weight, state["conv1.weight"])
    # k copies of a grey image give the response of the same grey image in RGB, for any k.
    grey = torch.rand(1, 1, 20, 16, generator=torch.Generator().manual_seed(0))
    expected = nn.functional.conv2d(grey.repeat(1, 3, 1, 1), state["conv1.weight"], stride=2,
                                    padding=3)
    for k in (1, 2, 4, 5):
        conv1 = build_model("resnet18", in_channels=k, pretrained=path).backbone.stem.conv1
        with torch.no_grad():
            torch.testing.assert_close(conv1(grey.repeat(1, k, 1, 1)), expected)


def test_pretrained_wrong_backbone_file(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    _save_resnet(path, "resnet34")
    with pytest.raises(RuntimeError, match=r"resnet34\.pth.*torchvision resnet18"):
        build_model("resnet18", pretrained=str(path))


def test_pretrained_bad_name() -> None:
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        build_model("resnet18", pretrained="no_such_weights")


def test_pretrained_offline_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*_args: object, **_kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    weights = torchvision.models.get_model_weights("resnet18")
    monkeypatch.setattr(weights, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="offline.*pretrained="):
        build_model("resnet18", pretrained="DEFAULT")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="resnet50"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="8 or 16"):
        build_model("resnet18", output_stride=32)


def test_backward_gives_grads() -> None:
    model = build_model("resnet18").train()
    # Batch 2: ASPP's image-pooling branch has a BatchNorm on a 1x1 map.
    x = torch.randn(2, 1, H, W)
    target = torch.randint(0, 4, (2, H, W))
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    grad = model.backbone.stem.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.classifier.weight.grad is not None
