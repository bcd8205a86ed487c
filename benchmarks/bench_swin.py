"""Native Swin vs transformers' SwinBackbone vs timm features_only, side by side in one process (CPU, eval).

    python benchmarks/bench_swin.py --quick
    python benchmarks/bench_swin.py --batch 4 --size 224 --repeats 15 --compile --json swin_bench.json

Contenders run interleaved (one forward each per round) and the medians are compared, so machine load hits them
alike. Also reports the achieved GFLOP/s of the native model against a plain matmul on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from timm_backbone import SwinBackbone, SwinConfig


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_gflops(repeats: int, size: int = 1536) -> float:
    """Median GFLOP/s of a plain fp32 ``size``-cubed matmul."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = [_time(lambda: torch.mm(a, b)) for _ in range(repeats)]
    return 2 * size**3 / statistics.median(times) / 1e9


def model_flops(model: SwinBackbone, x: torch.Tensor) -> int:
    """FLOPs of one forward, counted on the reference path (the counter does not see oneDNN's fused linears)."""
    model.set_fast_path(False)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.set_fast_path(True)
    return counter.get_total_flops()


def build(args: argparse.Namespace) -> dict[str, Callable[[torch.Tensor], object]]:
    """The contenders, each a callable on a batch; all are Swin-T with all four stages unless named otherwise."""
    import timm
    import transformers

    contenders: dict[str, Callable[[torch.Tensor], object]] = {}
    ours = SwinBackbone(SwinConfig(out_indices=(1, 2, 3, 4))).eval()
    contenders["native"] = ours
    contenders["native out_indices=(0, 1)"] = SwinBackbone(SwinConfig(out_indices=(0, 1))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = transformers.SwinConfig(out_indices=[1, 2, 3, 4])
        contenders["transformers SwinBackbone"] = transformers.SwinBackbone(hf_config).eval()
    contenders["timm features_only"] = timm.create_model(
        "swin_tiny_patch4_window7_224", features_only=True, img_size=args.size
    ).eval()
    if args.compile:
        compiled = torch.compile(SwinBackbone(SwinConfig(out_indices=(1, 2, 3, 4))).eval())
        contenders["native compiled"] = compiled
    return contenders


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.size, args.size)
    contenders = build(args)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.inference_mode():
        for model in contenders.values():  # warm-up (and compilation)
            for _ in range(args.warmup):
                model(x)
        for _ in range(args.repeats):
            for name, model in contenders.items():
                times[name].append(_time(lambda model=model: model(x)))
    medians = {name: statistics.median(t) for name, t in times.items()}
    flops = model_flops(contenders["native"], x)
    peak = matmul_gflops(max(5, args.repeats))
    native = medians["native"]
    result = {
        "setup": {
            "batch": args.batch,
            "size": args.size,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "median_ms": {name: 1e3 * m for name, m in medians.items()},
        "speedup_vs_transformers": medians["transformers SwinBackbone"] / native,
        "speedup_vs_timm": medians["timm features_only"] / native,
        "all_stages_over_out_indices_0_1": native / medians["native out_indices=(0, 1)"],
        "native_gflops": flops / native / 1e9,
        "matmul_gflops": peak,
        "fraction_of_matmul": flops / native / 1e9 / peak,
        "model_gflop_per_forward": flops / 1e9,
    }
    if "native compiled" in medians:
        result["compiled_speedup_vs_eager"] = native / medians["native compiled"]
    return result


def markdown(result: dict) -> str:
    native = result["median_ms"]["native"]
    lines = ["| contender | median ms | native speed-up |", "| --- | ---: | ---: |"]
    for name, ms in result["median_ms"].items():
        lines.append(f"| {name} | {ms:.1f} | {ms / native:.2f}x |")
    lines += [
        "",
        f"- native vs transformers SwinBackbone: **{result['speedup_vs_transformers']:.2f}x** (goal >= 1.3x)",
        f"- native vs timm features_only: **{result['speedup_vs_timm']:.2f}x** (goal >= 1.4x)",
        f"- all stages / out_indices=(0, 1): **{result['all_stages_over_out_indices_0_1']:.2f}x** (goal >= 3x)",
        f"- native: {result['native_gflops']:.1f} GFLOP/s ({result['model_gflop_per_forward']:.1f} GFLOP per "
        f"forward); plain matmul: {result['matmul_gflops']:.1f} GFLOP/s -> **{result['fraction_of_matmul']:.0%}**",
    ]
    if "compiled_speedup_vs_eager" in result:
        lines.append(f"- torch.compile: {result['compiled_speedup_vs_eager']:.2f}x over eager native")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the native model")
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    parser.add_argument("--json", default="", help="write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 5, 1
    result = run(args)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
