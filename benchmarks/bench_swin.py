"""Native Swin (plain and after ``optimize_for_inference()``) vs transformers' SwinBackbone vs timm features_only,
side by side in one process (CPU, eval).

    python benchmarks/bench_swin.py --quick
    python benchmarks/bench_swin.py --batch 4 --size 224 --repeats 15 --compile --json swin_bench.json
    python benchmarks/bench_swin.py --dtype bf16               # every model .to(torch.bfloat16), bf16 input
    python benchmarks/bench_swin.py --dtype bf16 --autocast    # fp32 models under torch.autocast("cpu", bfloat16)

Contenders run interleaved (one forward each per round, order rotated every round) with a plain square matmul of
the same dtype, and the medians are compared, so machine load hits them alike. The native model's achieved GFLOP/s
is reported against that matmul's; the results record the CPU's matrix-unit flags (AMX, AVX-512 BF16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from timm_backbone import SwinBackbone, SwinConfig
from timm_backbone.benchmark import (
    Precision,
    add_precision_arguments,
    machine_info,
    precision_from_args,
    square_matmul,
    time_interleaved,
)


def model_flops(model: SwinBackbone, x: torch.Tensor) -> int:
    """FLOPs of one forward, counted on the reference path (the counter does not see oneDNN's fused linears)."""
    model.set_fast_path(False)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.set_fast_path(True)
    return counter.get_total_flops()


def build(args: argparse.Namespace, precision: Precision) -> dict[str, torch.nn.Module]:
    """The contenders; all are Swin-T with all four stages unless named otherwise."""
    import timm
    import transformers

    contenders: dict[str, torch.nn.Module] = {}
    contenders["native"] = SwinBackbone(SwinConfig(out_indices=(1, 2, 3, 4)))
    contenders["native optimized"] = SwinBackbone(SwinConfig(out_indices=(1, 2, 3, 4))).optimize_for_inference()
    contenders["native out_indices=(0, 1)"] = SwinBackbone(SwinConfig(out_indices=(0, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = transformers.SwinConfig(out_indices=[1, 2, 3, 4])
        contenders["transformers SwinBackbone"] = transformers.SwinBackbone(hf_config)
    contenders["timm features_only"] = timm.create_model(
        "swin_tiny_patch4_window7_224", features_only=True, img_size=args.size
    )
    contenders = {name: precision.prepare(model) for name, model in contenders.items()}
    if args.compile:
        contenders["native compiled"] = torch.compile(
            precision.prepare(SwinBackbone(SwinConfig(out_indices=(1, 2, 3, 4))))
        )
    return contenders


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = precision_from_args(args)
    x = torch.randn(args.batch, 3, args.size, args.size).to(precision.storage_dtype)
    contenders = build(args, precision)
    matmul, matmul_flops = square_matmul(args.matmul_size, precision.compute_dtype)
    calls: dict[str, Callable[[], object]] = {name: precision.call(model, x) for name, model in contenders.items()}
    calls["matmul"] = matmul
    with torch.inference_mode():
        times = time_interleaved(calls, repeats=args.repeats, warmup=args.warmup)
    medians = {name: statistics.median(t) for name, t in times.items()}
    matmul_gflops = matmul_flops / medians.pop("matmul") / 1e9
    flops = model_flops(contenders["native"], x)
    native = medians["native"]
    result = {
        "setup": {
            "batch": args.batch,
            "size": args.size,
            "repeats": args.repeats,
            "precision": precision.label,
            "matmul_size": args.matmul_size,
        },
        "machine": machine_info("cpu"),
        "median_ms": {name: 1e3 * m for name, m in medians.items()},
        "speedup_vs_transformers": medians["transformers SwinBackbone"] / native,
        "speedup_vs_timm": medians["timm features_only"] / native,
        "all_stages_over_out_indices_0_1": native / medians["native out_indices=(0, 1)"],
        "native_gflops": flops / native / 1e9,
        "matmul_gflops": matmul_gflops,
        "fraction_of_matmul": flops / native / 1e9 / matmul_gflops,
        "model_gflop_per_forward": flops / 1e9,
    }
    optimized = medians["native optimized"]
    result["optimized"] = {
        "speedup_vs_transformers": medians["transformers SwinBackbone"] / optimized,
        "speedup_vs_timm": medians["timm features_only"] / optimized,
        "speedup_vs_native": native / optimized,
        "fraction_of_matmul": flops / optimized / 1e9 / matmul_gflops,
    }
    if "native compiled" in medians:
        result["compiled_speedup_vs_eager"] = native / medians["native compiled"]
    return result


def markdown(result: dict) -> str:
    setup, machine = result["setup"], result["machine"]
    flags = ", ".join(name for name, present in machine["cpu_flags"].items() if present) or "none of interest"
    native = result["median_ms"]["native"]
    lines = [
        f"Swin-T, batch {setup['batch']} at {setup['size']} px, {setup['precision']}, eval, median of "
        f"{setup['repeats']}; threads {machine['torch_threads']}; load average {machine['load_average']}; "
        f"CPU {machine['cpu']} ({flags})",
        "",
        "| contender | median ms | native speed-up |",
        "| --- | ---: | ---: |",
    ]
    for name, ms in result["median_ms"].items():
        lines.append(f"| {name} | {ms:.1f} | {ms / native:.2f}x |")
    lines += [
        "",
        f"- native vs transformers SwinBackbone: **{result['speedup_vs_transformers']:.2f}x**",
        f"- native vs timm features_only: **{result['speedup_vs_timm']:.2f}x**",
        f"- all stages / out_indices=(0, 1): **{result['all_stages_over_out_indices_0_1']:.2f}x**",
        f"- native: {result['native_gflops']:.1f} GFLOP/s ({result['model_gflop_per_forward']:.1f} GFLOP per "
        f"forward); {setup['matmul_size']}-square {setup['precision'].split()[0]} matmul: "
        f"{result['matmul_gflops']:.1f} GFLOP/s -> **{result['fraction_of_matmul']:.0%}**",
    ]
    opt = result["optimized"]
    lines.append(
        f"- native after `optimize_for_inference()` (pre-packed linear weights): "
        f"**{opt['speedup_vs_transformers']:.2f}x** transformers, **{opt['speedup_vs_timm']:.2f}x** timm, "
        f"{opt['speedup_vs_native']:.2f}x native, {opt['fraction_of_matmul']:.0%} of the matmul"
    )
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
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the reference square matmul")
    add_precision_arguments(parser)
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
