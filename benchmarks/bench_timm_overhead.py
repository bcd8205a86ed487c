"""Wrapper overhead: TimmBackbone against bare ``timm.create_model(features_only=True)`` on the same weights.

Both contenders select the same stages, run in one process, interleaved with the order rotated every repeat;
the table reports median milliseconds per forward and the median ratio (wrapper / timm; 1.00 = no overhead).
A second copy of the bare timm model runs alongside as the noise floor: its ratio to the first copy is what
identical work measures as on this machine (where each model's weights sit in memory moves it by a few percent).
The wrapper's own cost is isolated by also calling the timm module it holds directly, on the same weights.

    python benchmarks/bench_timm_overhead.py            # resnet50, swin_tiny, vit_small at batch 4, 224 px
    python benchmarks/bench_timm_overhead.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import timm
import torch

from timm_backbone import TimmBackbone, TimmBackboneConfig
from timm_backbone.benchmark import machine_info, time_interleaved

# name -> out_indices used by both contenders (timm's own default for the ViT: its last three blocks)
MODELS = {
    "resnet50": [1, 2, 3, 4],
    "swin_tiny_patch4_window7_224": [0, 1, 2, 3],
    "vit_small_patch16_224": [9, 10, 11],
}


def measure(name: str, out_indices: list[int], batch: int, size: int, repeats: int, warmup: int) -> dict:
    ours = TimmBackbone(TimmBackboneConfig(name, out_indices=out_indices)).eval()
    bare = timm.create_model(name, features_only=True, out_indices=tuple(out_indices)).eval()
    bare.load_state_dict(ours._backbone.state_dict())
    bare_copy = copy.deepcopy(bare)
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        for a, b in zip(ours(x).feature_maps, bare(x)):
            if a.shape != b.shape:
                b = b.permute(0, 3, 1, 2)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        calls = {
            "timm": lambda: bare(x),
            "timm_copy": lambda: bare_copy(x),
            "wrapper": lambda: ours(x),
            "held_timm_module": lambda: ours._backbone(x),
        }
        times = time_interleaved(calls, repeats, warmup)
    ratios = [w / t for w, t in zip(times["wrapper"], times["timm"])]
    floor = [c / t for c, t in zip(times["timm_copy"], times["timm"])]
    own = [w / h for w, h in zip(times["wrapper"], times["held_timm_module"])]
    return {
        "model": name,
        "out_indices": out_indices,
        "timm_ms": 1e3 * statistics.median(times["timm"]),
        "wrapper_ms": 1e3 * statistics.median(times["wrapper"]),
        "median_ratio": statistics.median(ratios),
        "noise_floor_ratio": statistics.median(floor),
        "wrapper_over_held_module": statistics.median(own),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 repeats, 1 warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default="benchmarks/results/timm_overhead.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        print(f"measuring {name} ...", file=sys.stderr)
        rows.append(measure(name, MODELS[name], args.batch, args.size, args.repeats, args.warmup))
    report = {
        "machine": machine_info("cpu"),
        "batch": args.batch,
        "size": args.size,
        "repeats": args.repeats,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(
        "| model | stages | timm features_only (ms) | TimmBackbone (ms) | median ratio | noise floor (timm copy) "
        "| wrapper / its own timm module |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {r['out_indices']} | {r['timm_ms']:.1f} | {r['wrapper_ms']:.1f} | "
            f"{r['median_ratio']:.3f} | {r['noise_floor_ratio']:.3f} | {r['wrapper_over_held_module']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
