"""study.py's presets: the preset fills every flag the command line left out, and only those."""

from __future__ import annotations

import study


def resolved(*argv: str):
    return study.resolve_preset(study.get_args_parser().parse_args(["run", *argv]))


def test_preset_fills_only_the_flags_left_out():
    cpu = resolved()
    assert (cpu.native_size, cpu.backbone, cpu.patch_scale) == ([1024, 608], "resnet18", 1.0)
    full = resolved("--preset", "full")
    assert (full.native_size, full.backbone, full.patch_scale) == ([4096, 2432], "resnet50", 0.5)
    assert full.pretrained is None and full.device == "auto"
    mixed = resolved("--preset", "full", "--patch-scale", "0.7", "--backbone", "resnet18")
    assert (mixed.patch_scale, mixed.backbone, mixed.batch_size) == (0.7, "resnet18", 16)
