"""DeepLabV3+ on a torchvision ResNet, for 4-class mammogram segmentation.

ResNet encoder (dilated to output stride 16 or 8) -> torchvision's ASPP -> V3+ decoder that fuses
the stride-4 layer1 features; 1-channel input by default, optional local/ImageNet ResNet weights.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.models.segmentation.deeplabv3 import ASPP

SUPPORTED_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
# Layers to dilate (instead of stride), each with (dilation before it, its dilation), and ASPP
# rates for each output stride; torchvision's replace_stride_with_dilation [F, F, T] / [F, T, T].
_DILATIONS = {16: {"layer4": (1, 2)}, 8: {"layer3": (1, 2), "layer4": (2, 4)}}
_ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def _dilate(layer: nn.Module, previous: int, dilation: int) -> None:
    # torchvision's replace_stride_with_dilation semantics, which it does not implement for
    # BasicBlock (resnet18/34), so every backbone uses this: the strided convs (the first
    # block's strided 3x3 and its 1x1 downsample) get stride 1 and keep the previous dilation,
    # every 3x3 conv after them gets `dilation` (padding = dilation keeps the size). Each
    # pretrained filter then sees its taps as far apart, in input pixels, as in pretraining,
    # and the dilated stage's output at every stride-th pixel is the strided stage's output.
    for conv in layer.modules():
        if isinstance(conv, nn.Conv2d):
            rate = previous if conv.stride != (1, 1) else dilation
            conv.stride = (1, 1)
            if conv.kernel_size == (3, 3):
                conv.dilation = (rate, rate)
                conv.padding = (rate, rate)


class ResNetEncoder(nn.Module):
    """ResNet trunk without avgpool/fc; returns (layer1 features, layer4 features)."""

    def __init__(self, resnet: models.ResNet, in_channels: int) -> None:
        super().__init__()
        # Same init as torchvision gives the convs it builds.
        conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
        self.stem = nn.Sequential(
            OrderedDict(conv1=conv1, bn1=resnet.bn1, relu=resnet.relu, maxpool=resnet.maxpool)
        )
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        self.out_channels = resnet.fc.in_features
        self.low_level_channels = self.out_channels // 8  # layer1 width in every ResNet

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.layer1(self.stem(x))
        return low, self.layer4(self.layer3(self.layer2(low)))


def _conv_bn_relu(cin: int, cout: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _upsample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return nn.functional.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class Decoder(nn.Module):
    """V3+ decoder: project low-level features to 48 ch, concat upsampled ASPP output, refine."""

    def __init__(self, low_level_channels: int, channels: int = 256) -> None:
        super().__init__()
        self.low_level = _conv_bn_relu(low_level_channels, 48, 1)
        self.fuse = nn.Sequential(
            _conv_bn_relu(channels + 48, channels, 3), _conv_bn_relu(channels, channels, 3)
        )

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        low = self.low_level(low)
        high = _upsample(high, low)
        return self.fuse(torch.cat([high, low], dim=1))


class DeepLabV3Plus(nn.Module):
    """ResNet encoder -> ASPP -> V3+ decoder -> 1x1 classifier, logits at the input size."""

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 4,
        in_channels: int = 1,
        output_stride: int = 16,
        decoder_channels: int = 256,
    ) -> None:
        super().__init__()
        if backbone not in SUPPORTED_BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {SUPPORTED_BACKBONES}")
        if output_stride not in _DILATIONS:
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        resnet = models.get_model(backbone, weights=None)
        for name, (previous, dilation) in _DILATIONS[output_stride].items():
            _dilate(getattr(resnet, name), previous, dilation)
        self.backbone = ResNetEncoder(resnet, in_channels)
        # The paper's width is 256; narrower (e.g. 64) cuts most of the FLOPs at small sizes.
        self.aspp = ASPP(self.backbone.out_channels, _ASPP_RATES[output_stride],
                         out_channels=decoder_channels)
        self.decoder = Decoder(self.backbone.low_level_channels, decoder_channels)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.backbone(x)
        logits = self.classifier(self.decoder(low, self.aspp(high)))
        return _upsample(logits, x)


def pretrained_file(pretrained: str, backbone: str) -> Path | None:
    """The local state dict file `pretrained` names, or None where it is a torchvision weights
    name of `backbone` (downloaded when used); ValueError when it is neither."""
    if Path(pretrained).is_file():
        return Path(pretrained)
    names = list(models.get_model_weights(backbone).__members__)
    if pretrained not in names:
        raise ValueError(f"{pretrained!r} is neither a file nor a torchvision {backbone} weights "
                         f"name: pass a .pth path or one of {', '.join(names)}")
    return None


def _resnet_state_dict(pretrained: str, backbone: str) -> dict[str, torch.Tensor]:
    path = pretrained_file(pretrained, backbone)
    if path is not None:
        return torch.load(path, map_location="cpu", weights_only=True)
    weights = models.get_model_weights(backbone)
    try:
        return weights[pretrained].get_state_dict(progress=True)
    except OSError as err:  # URLError and socket errors: no network
        raise RuntimeError(
            f"could not download {backbone} weights {pretrained!r} (offline?): {err}. Save a "
            f"torchvision {backbone} state dict on a machine with network, e.g. "
            f"torch.save(torchvision.models.{backbone}(weights='{pretrained}').state_dict(), "
            f"'{backbone}.pth'), and pass pretrained='{backbone}.pth'"
        ) from err


def _load_encoder_weights(encoder: ResNetEncoder, pretrained: str, backbone: str) -> None:
    state = _resnet_state_dict(pretrained, backbone)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    conv1 = state.get("conv1.weight")
    in_channels = encoder.stem.conv1.in_channels
    if conv1 is not None and conv1.shape[1] == 3 and in_channels != 3:
        # Each channel gets sum / k of the RGB filters: k copies of a grey image then give the
        # response of the same image in RGB (k = 1: the summed filters).
        grey = conv1.sum(1, keepdim=True) / in_channels
        state["conv1.weight"] = grey.repeat(1, in_channels, 1, 1)
    state = {("stem." + k if k.startswith(("conv1.", "bn1.")) else k): v for k, v in state.items()}
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(
            f"{pretrained!r} does not hold a torchvision {backbone} state dict: {err}"
        ) from err


def build_model(
    backbone: str = "resnet50",
    num_classes: int = 4,
    in_channels: int = 1,
    output_stride: int = 16,
    pretrained: str | None = None,
    decoder_channels: int = 256,
) -> DeepLabV3Plus:
    """DeepLabV3+; `pretrained` is None, a local ResNet state dict file or a weights name."""
    model = DeepLabV3Plus(backbone, num_classes, in_channels, output_stride, decoder_channels)
    if pretrained is not None:
        _load_encoder_weights(model.backbone, str(pretrained), backbone)
    return model
