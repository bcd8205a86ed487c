"""Winograd F(2x2, 3x3) against oneDNN's direct convolution, per layer shape (CPU, fp32, inference).

For each shape a ``Conv3x3`` layer runs three ways, interleaved with the order rotated every repeat: torch's direct
convolution on an NCHW input (``F.conv2d``, what ``nn.Conv2d`` does), Winograd on the same NCHW input, and Winograd
on a channels-last input. The table gives median milliseconds, the speed-up of Winograd over the direct convolution
and both methods' largest error against a float64 convolution (relative to the output's largest magnitude). The
shapes are MaskFormer's pixel decoder at batch 2 and 384 px (stem 2048 -> 256 at stride 32, the FPN's 256 -> 256 at
strides 16, 8 and 4, the mask projection) plus narrower and smaller layers, which is where the rule in
``timm_backbone.winograd.winograd_applies`` comes from.

    python benchmarks/bench_winograd.py [--repeats 9] [--json results/winograd/fp32.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from timm_backbone.benchmark import machine_info, time_interleaved
from timm_backbone.winograd import Conv3x3, winograd_conv3x3

# (batch, C_in, C_out, height, width)
SHAPES = [
    (2, 2048, 256, 12, 12),
    (2, 256, 256, 24, 24),
    (2, 256, 256, 48, 48),
    (2, 256, 256, 96, 96),
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
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"precision": "fp32", "repeats": args.repeats, "machine": machine_info("cpu"), "results": results}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
