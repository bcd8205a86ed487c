"""Winograd F(2x2, 3x3) against oneDNN's direct convolution, per layer shape and in the models that use it (CPU, fp32,
inference).

For each shape a ``Conv3x3`` layer runs three ways, interleaved with the order rotated every repeat: torch's direct
convolution on an NCHW input (``F.conv2d``, what ``nn.Conv2d`` does), Winograd on the same NCHW input, and Winograd
on a channels-last input. The table gives median milliseconds, the speed-up of Winograd over the direct convolution
and both methods' largest error against a float64 convolution (relative to the output's largest magnitude). The
shapes are MaskFormer's pixel decoder at batch 2 and 384 px (stem 2048 -> 256 at stride 32, the FPN's 256 -> 256 at
strides 16, 8 and 4, the mask projection), the finest level of ViTDet's simple feature pyramid over ViT-S/16 at 224
and ViT-B/16 at 512, plus narrower and smaller layers, which is where the rule in
``timm_backbone.winograd.winograd_applies`` comes from.

A second table times whole ``TimmBackbone`` ViTs with ``feature_pyramid="simple"`` (ViT-S/16 at 224, batch 4; ViT-B/16
at 512, batch 1) and their pyramid alone, each against a copy with the same weights whose 3x3 convolutions are plain
``nn.Conv2d``, and gives the largest difference of the pyramid's maps between the two.

    python benchmarks/bench_winograd.py [--repeats 9] [--json results/winograd/fp32.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from timm_backbone import TimmBackbone, TimmBackboneConfig
from timm_backbone.benchmark import machine_info, time_interleaved
from timm_backbone.winograd import Conv3x3, winograd_conv3x3

# (timm name, image size, batch) of the ViTs timed with the simple feature pyramid
PYRAMIDS = [("vit_small_patch16_224", 224, 4), ("vit_base_patch16_224", 512, 1)]

# (batch, C_in, C_out, height, width)
SHAPES = [
    (2, 2048, 256, 12, 12),
    (2, 256, 256, 24, 24),
    (2, 256, 256, 48, 48),
    (2, 256, 256, 96, 96),
    (4, 384, 384, 56, 56),
    (1, 768, 768, 128, 128),
    (1, 256, 256, 95, 127),
    (4, 256, 256, 14, 14),
    (4, 512, 512, 7, 7),
    (1, 256, 256, 8, 8),
    (4, 128, 128, 28, 28),
    (4, 64, 64, 56, 56),
]


def run_shape(shape: tuple[int, ...], repeats: int) -> dict:
    n, c_in, c_out, height, width = shape
    torch.manual_seed(0)
    conv = Conv3x3(c_in, c_out, bias=False)
    x = torch.randn(n, c_in, height, width)
    x_last = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        reference = F.conv2d(x.double(), conv.weight.double(), padding=1)
        scale = reference.abs().max().item()
        errors = {
            "direct": (F.conv2d(x, conv.weight, padding=1).double() - reference).abs().max().item() / scale,
            "winograd": (winograd_conv3x3(x, conv).double() - reference).abs().max().item() / scale,
        }
        times = time_interleaved(
            {
                "direct": lambda: F.conv2d(x, conv.weight, padding=1),
                "winograd": lambda: winograd_conv3x3(x, conv),
                "winograd_channels_last": lambda: winograd_conv3x3(x_last, conv),
            },
            repeats=repeats,
            warmup=2,
        )
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {
        "shape": {"batch": n, "in_channels": c_in, "out_channels": c_out, "height": height, "width": width},
        "direct_gflop": 2 * n * height * width * c_in * c_out * 9 / 1e9,
        "median_ms": ms,
        "speedup": ms["direct"] / ms["winograd"],
        "speedup_channels_last": ms["direct"] / ms["winograd_channels_last"],
        "max_rel_error_vs_float64": errors,
    }


def run_pyramid(name: str, size: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    config = TimmBackboneConfig(name, feature_pyramid="simple", features_only=False, model_args={"img_size": size})
    winograd = TimmBackbone(config).eval()
    direct = TimmBackbone(config).eval()
    direct.load_state_dict(winograd.state_dict())
    for module in direct.modules():
        if isinstance(module, Conv3x3):
            module.__class__ = nn.Conv2d  # same parameters, torch's forward
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        hidden = winograd(x, output_hidden_states=True).hidden_states
        taps = [hidden[i] for i in winograd.config.out_indices]
        maps = [(a - b).abs().max().item() for a, b in zip(winograd.neck(taps), direct.neck(taps))]
        model_times = time_interleaved({"winograd": lambda: winograd(x), "direct": lambda: direct(x)}, repeats, 2)
        neck_times = time_interleaved(
            {"winograd": lambda: winograd.neck(taps), "direct": lambda: direct.neck(taps)}, repeats, 2
        )
    model_ms = {k: statistics.median(t) * 1e3 for k, t in model_times.items()}
    neck_ms = {k: statistics.median(t) * 1e3 for k, t in neck_times.items()}
    return {
        "model": name,
        "size": size,
        "batch": batch,
        "model_ms": model_ms,
        "neck_ms": neck_ms,
        "model_speedup": model_ms["direct"] / model_ms["winograd"],
        "neck_speedup": neck_ms["direct"] / neck_ms["winograd"],
        "max_abs_diff_of_levels": max(maps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    results = [run_shape(shape, args.repeats) for shape in SHAPES]
    print(
        "| N x C_in -> C_out @ H x W | GFLOP | direct ms | Winograd ms | speed-up (channels-last in) "
        "| error direct / Winograd |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        s, ms, err = r["shape"], r["median_ms"], r["max_rel_error_vs_float64"]
        print(
            f"| {s['batch']} x {s['in_channels']} -> {s['out_channels']} @ {s['height']} x {s['width']} "
            f"| {r['direct_gflop']:.2f} | {ms['direct']:.2f} | {ms['winograd']:.2f} "
            f"| {r['speedup']:.2f}x ({r['speedup_channels_last']:.2f}x) | {err['direct']:.1e} / {err['winograd']:.1e} |"
        )
    pyramids = [run_pyramid(*spec, args.repeats) for spec in PYRAMIDS]
    print()
    print("| ViT with the simple pyramid | whole model ms: Winograd / direct | speed-up | pyramid ms | speed-up "
          "| max abs diff of the levels |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in pyramids:
        m, n = r["model_ms"], r["neck_ms"]
        print(
            f"| {r['model']}, {r['size']} px, batch {r['batch']} | {m['winograd']:.0f} / {m['direct']:.0f} "
            f"| {r['model_speedup']:.2f}x | {n['winograd']:.0f} / {n['direct']:.0f} | {r['neck_speedup']:.2f}x "
            f"| {r['max_abs_diff_of_levels']:.1e} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "precision": "fp32",
            "repeats": args.repeats,
            "machine": machine_info("cpu"),
            "results": results,
            "pyramids": pyramids,
        }
        args.json.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
