"""Minor page faults per forward, beside the time, for each Swin-T or ResNet-50 contender (CPU, eval).

glibc's malloc hands large freed blocks back to the kernel (``munmap``, heap trimming); the next forward then
page-faults fresh, zeroed pages in again. Contenders that allocate more temporaries pay more, and how much depends on
the allocator's settings, so the same code measures differently from run to run and between environments. Run it as
is and with the allocator told to keep its memory, and compare:

    python benchmarks/page_faults.py --model swin-t --json results/page_faults/swin_t_default.json
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 \\
        python benchmarks/page_faults.py --model swin-t --json results/page_faults/swin_t_malloc_kept.json

Contenders run interleaved (order rotated every repeat) after warm-up; medians of time and of faults per call.
The JSON records the allocator settings (``machine.allocator_env``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_resnet
import bench_swin

from timm_backbone.benchmark import Precision, machine_info, time_interleaved


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def contenders(model: str, folder: str) -> dict[str, torch.nn.Module]:
    if model == "swin-t":
        built = bench_swin.build(argparse.Namespace(size=224, compile=False), Precision("fp32"))
        return {name: m for name, m in built.items() if "out_indices" not in name}
    built = bench_resnet.build("resnet50", folder, Precision("fp32"))
    return {name: m for name, m in built.items() if name != "timm_channels_last"}


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        models = contenders(args.model, folder)
    x = torch.randn(args.batch, 3, 224, 224)
    faults: dict[str, list[int]] = {name: [] for name in models}

    def counted(name: str) -> Callable[[], None]:
        def call() -> None:
            before = minor_faults()
            models[name](x)
            faults[name].append(minor_faults() - before)

        return call

    with torch.inference_mode():
        times = time_interleaved({name: counted(name) for name in models}, args.repeats, args.warmup)
    faults = {name: counts[args.warmup :] for name, counts in faults.items()}  # the timed calls only
    return {
        "setup": {"model": args.model, "batch": args.batch, "size": 224, "repeats": args.repeats, "precision": "fp32"},
        "machine": machine_info("cpu"),
        "contenders": {
            name: {"median_ms": 1e3 * statistics.median(times[name]), "minor_faults": statistics.median(faults[name])}
            for name in models
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="swin-t", choices=["swin-t", "resnet50"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args(argv)
    result = run(args)
    env = result["machine"]["allocator_env"] or "glibc defaults"
    print(f"{args.model}, fp32, batch {args.batch} at 224, {args.repeats} interleaved repeats; allocator: {env}\n")
    print("| contender | median ms | minor page faults per forward |\n| --- | ---: | ---: |")
    for name, row in result["contenders"].items():
        print(f"| {name} | {row['median_ms']:.1f} | {row['minor_faults']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
