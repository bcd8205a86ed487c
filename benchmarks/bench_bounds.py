"""Where each contender's time goes, and how fast the native model could at most be against its peers.

One forward of every contender is recorded op by op (a ``TorchDispatchMode`` sees each aten / oneDNN call with its
real inputs, after autocast's casts). The calls are sorted into three groups and each group is replayed alone,
interleaved with the real forwards and a square matmul of the same dtype:

- ``gemm``: the FLOP-carrying products (linear, matmul, batched matmul, convolution, oneDNN's fused linear/conv);
- ``attention``: fused scaled-dot-product attention kernels;
- ``other``: everything else (norms, activations, adds, copies, gathers, casts).

Because the native model and its peers compute the same products, the native ``gemm`` replay is a floor: even if
every other op cost nothing, the native forward could not beat a peer by more than ``peer forward / native gemm``
(the *ceiling*, taken over the native contenders' fastest gemm group). The report gives that ceiling next to the
measured speed-up of the fastest native contender, and the GFLOP/s of each gemm group against the square matmul.

    python benchmarks/bench_bounds.py --model swin-t                       # fp32, batch 4 at 224
    python benchmarks/bench_bounds.py --model resnet50 --dtype bf16
    python benchmarks/bench_bounds.py --model swin-t --dtype bf16 --autocast --json results/bounds/swin_bf16.json
    python benchmarks/bench_bounds.py --model maskformer-resnet50 --batch 2 --size 384
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_maskformer
import bench_resnet
import bench_swin

from timm_backbone.benchmark import (
    Precision,
    add_precision_arguments,
    machine_info,
    precision_from_args,
    square_matmul,
    time_interleaved,
)

GEMM_OPS = {
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution", "aten::mkldnn_convolution",
    "aten::_convolution", "aten::conv2d", "aten::linear", "aten::matmul", "aten::mkldnn_linear",
    "mkldnn::_linear_pointwise", "mkldnn::_convolution_pointwise",
}  # fmt: skip
GROUPS = ("gemm", "attention", "other")
MODELS = ["swin-t", "resnet50", "resnet18", "maskformer-resnet50", "maskformer-swin-t"]


def group_of(name: str) -> str:
    if name.split(".")[0] in GEMM_OPS:
        return "gemm"
    if "scaled_dot_product" in name:
        return "attention"
    return "other"


def gemm_flops(name: str, args: tuple, out: torch.Tensor) -> int:
    """FLOPs of one product: 2 x output elements x contraction length (``.binary`` ops take the addend second)."""
    base, binary = name.split(".")[0], name.endswith(".binary")
    if base in ("aten::addmm", "aten::baddbmm"):
        return 2 * out.numel() * args[1].shape[-1]
    if base in ("aten::mm", "aten::bmm", "aten::matmul"):
        return 2 * out.numel() * args[0].shape[-1]
    weight = args[2 if binary else 1]
    if "conv" in base:  # weight: out channels, in channels per group, kernel
        return 2 * out.numel() * weight.shape[1:].numel()
    return 2 * out.numel() * weight.shape[-1]  # linears: weight (out features, in features)


class Recorder(TorchDispatchMode):
    """Keeps every call (op, args, kwargs) of the forward it wraps, with the FLOPs of the products."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, list[tuple[Any, tuple, dict]]] = {group: [] for group in GROUPS}
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.name()
        group = group_of(name)
        self.calls[group].append((func, args, kwargs))
        if group == "gemm":
            self.flops += gemm_flops(name, args, out)
        return out


def replay(calls: list[tuple[Any, tuple, dict]]) -> Callable[[], None]:
    def run() -> None:
        for func, args, kwargs in calls:
            func(*args, **kwargs)

    return run


def contenders(model: str, precision: Precision, size: int, folder: str) -> dict[str, tuple[torch.nn.Module, Any]]:
    """name -> (model, the call taking the input); the native model first."""
    if model == "swin-t":
        args = argparse.Namespace(size=size, compile=False)
        built = bench_swin.build(args, precision)
        names = {"native": "native", "native_inference": "native optimized",
                 "transformers": "transformers SwinBackbone", "timm": "timm features_only"}  # fmt: skip
        return {short: (built[long], built[long]) for short, long in names.items()}
    if model.startswith("maskformer-"):
        built = bench_maskformer.build(model.removeprefix("maskformer-"), precision)
        names = {"native": "ours", "native_inference": "ours_inference", "transformers": "transformers"}
        return {short: (built[long], built[long]) for short, long in names.items()}
    built = bench_resnet.build(model, folder, precision)
    return {
        name: (built[name], lambda x, name=name, m=built[name]: bench_resnet.stage_outputs(name, m, x))
        for name in ("native", "native_inference", "transformers", "timm")
    }


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    precision = precision_from_args(args)
    x = torch.randn(args.batch, 3, args.size, args.size).to(precision.storage_dtype)
    with tempfile.TemporaryDirectory() as folder:
        models = contenders(args.model, precision, args.size, folder)
    matmul, matmul_flops = square_matmul(args.matmul_size, precision.compute_dtype)
    calls: dict[str, Callable[[], Any]] = {"matmul": matmul}
    flops: dict[str, int] = {}
    with torch.inference_mode():
        for name, (_, forward) in models.items():
            call = precision.call(forward, x)
            call()  # builds caches (attention masks, cast weights) outside the recording
            with Recorder() as recorder:
                call()
            flops[name] = recorder.flops
            calls[name] = call
            for group in GROUPS:
                if recorder.calls[group]:
                    calls[f"{name} {group}"] = replay(recorder.calls[group])
        times = time_interleaved(calls, repeats=args.repeats, warmup=args.warmup)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    matmul_gflops = matmul_flops / ms.pop("matmul") / 1e6
    rows = {}
    for name in models:
        gemm = ms.get(f"{name} gemm", 0.0)
        rows[name] = {
            "forward_ms": ms[name],
            **{f"{group}_ms": ms.get(f"{name} {group}", 0.0) for group in GROUPS},
            "gemm_gflop": flops[name] / 1e9,
            "gemm_share_of_matmul": flops[name] / gemm / 1e6 / matmul_gflops if gemm else None,
        }
    # the fastest native forward, and the least time native products took: if nothing else cost anything
    native_best = min(row["forward_ms"] for name, row in rows.items() if name.startswith("native"))
    native_gemm = min(row["gemm_ms"] for name, row in rows.items() if name.startswith("native"))
    for row in rows.values():
        row["native_speedup"] = row["forward_ms"] / native_best
        row["native_ceiling"] = row["forward_ms"] / native_gemm
    return {
        "setup": {
            "model": args.model,
            "batch": args.batch,
            "size": args.size,
            "repeats": args.repeats,
            "precision": precision.label,
            "matmul_size": args.matmul_size,
        },
        "machine": machine_info("cpu"),
        "matmul_gflops": matmul_gflops,
        "contenders": rows,
    }


def markdown(result: dict) -> str:
    setup = result["setup"]
    lines = [
        f"{setup['model']}, {setup['precision']}, batch {setup['batch']} at {setup['size']}, "
        f"{setup['repeats']} interleaved repeats; square matmul {result['matmul_gflops']:.0f} GFLOP/s",
        "",
        "| contender | forward ms | gemm ms | attention ms | other ms | gemm GFLOP | gemm % of matmul "
        "| fastest native: speed-up | ceiling |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in result["contenders"].items():
        share = row["gemm_share_of_matmul"]
        lines.append(
            f"| {name} | {row['forward_ms']:.1f} | {row['gemm_ms']:.1f} | {row['attention_ms']:.1f} "
            f"| {row['other_ms']:.1f} | {row['gemm_gflop']:.1f} | {100 * share:.0f}% "
            f"| {row['native_speedup']:.2f}x | {row['native_ceiling']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="swin-t", choices=MODELS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    add_precision_arguments(parser)
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
