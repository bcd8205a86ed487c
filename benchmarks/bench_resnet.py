"""Native ResNetBackbone against transformers' ResNetBackbone and timm's ``features_only`` ResNet, same weights.

All contenders output the four stages (stage1..4), get one random timm checkpoint (BatchNorm statistics perturbed)
in their own layout, run in eval mode under ``torch.inference_mode`` in one process, interleaved with the order
rotated every repeat; the table reports median milliseconds per forward, the ratio against transformers and against
timm's default (NCHW) model, the largest difference from transformers' stage outputs, and the achieved GFLOP/s as a
share of a plain square matmul of the same dtype measured in the same loop (bf16 for ``--dtype bf16``). The JSON
records the machine, its load and its matrix-unit CPU flags (AMX, AVX-512 BF16).

    python benchmarks/bench_resnet.py                 # resnet50, batch 4, 224 px, 15 repeats
    python benchmarks/bench_resnet.py --quick         # 5 repeats
    python benchmarks/bench_resnet.py --threads 1       # on a machine shared with other jobs (OpenMP threads stall)
    python benchmarks/bench_resnet.py --model resnet18 --batch 1 --size 320 --output results/bench_resnet.json
    python benchmarks/bench_resnet.py --dtype bf16             # every model .to(torch.bfloat16), bf16 input
    python benchmarks/bench_resnet.py --dtype bf16 --autocast  # fp32 models under torch.autocast("cpu", bfloat16)

Contenders: ``transformers`` (its ResNetBackbone), ``timm`` (``features_only``, NCHW: timm's default),
``timm_channels_last`` (timm with model and input in channels_last, for reference), ``native`` (this package's
default eager forward) and ``native_inference`` (after ``optimize_for_inference()``: BatchNorm folded, oneDNN fused
kernels on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from timm_backbone import ResNetBackbone, ResNetConfig
from timm_backbone.benchmark import (
    Precision,
    add_precision_arguments,
    load_average,
    machine_info,
    precision_from_args,
    random_timm_state_dict,
    square_matmul,
    time_interleaved,
)
from timm_backbone.models.resnet import resnet_timm_to_transformers

OUT_INDICES = [1, 2, 3, 4]


def build(model: str, folder: str, precision: Precision) -> dict[str, torch.nn.Module]:
    weights = random_timm_state_dict(model, seed=0)
    config = ResNetConfig.from_timm(model, out_indices=OUT_INDICES)
    native = ResNetBackbone(config)
    native.load_checkpoint(resnet_timm_to_transformers(weights), strict=False, source="benchmark weights")
    native.save_pretrained(folder)
    contenders: dict[str, torch.nn.Module] = {}
    try:
        import transformers

        contenders["transformers"] = transformers.ResNetBackbone.from_pretrained(folder, out_indices=OUT_INDICES)
    except ImportError:
        pass
    for name, channels_last in (("timm", False), ("timm_channels_last", True)):
        bare = timm.create_model(model, features_only=True, out_indices=tuple(OUT_INDICES))
        bare.load_state_dict({k: v for k, v in weights.items() if not k.startswith("fc.")})
        contenders[name] = bare.to(memory_format=torch.channels_last) if channels_last else bare
    contenders["native"] = ResNetBackbone.from_pretrained(folder)
    contenders["native_inference"] = ResNetBackbone.from_pretrained(folder)
    contenders = {name: precision.prepare(m) for name, m in contenders.items()}
    contenders["native_inference"].optimize_for_inference()
    return contenders


def stage_outputs(name: str, model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    if name == "timm_channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out = model(x)
    return list(out) if isinstance(out, (list, tuple)) else list(out.feature_maps)


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    precision = precision_from_args(args)
    x = torch.randn(args.batch, 3, args.size, args.size).to(precision.storage_dtype)
    with tempfile.TemporaryDirectory() as folder:
        models = build(args.model, folder, precision)
    matmul, matmul_flops = square_matmul(args.matmul_size, precision.compute_dtype)
    with torch.inference_mode():
        outputs = {name: precision.call(stage_outputs, name, m, x)() for name, m in models.items()}
        reference = outputs.get("transformers", outputs["timm"])
        diffs = {
            name: max(
                float((o.float() - r.float()).abs().max() / r.float().abs().max()) for o, r in zip(outs, reference)
            )
            for name, outs in outputs.items()
        }
        with FlopCounterMode(display=False) as counter:
            models["native"](x)
        model_flops = counter.get_total_flops()
        calls = {name: precision.call(stage_outputs, name, m, x) for name, m in models.items()}
        calls["matmul"] = matmul
        times = time_interleaved(calls, repeats=args.repeats, warmup=args.warmup)
    medians = {name: statistics.median(t) for name, t in times.items()}
    matmul_gflops = matmul_flops / medians.pop("matmul") / 1e9
    rows = {}
    for name, seconds in medians.items():
        gflops = model_flops / seconds / 1e9
        rows[name] = {
            "median_ms": seconds * 1e3,
            "speedup_vs_transformers": medians["transformers"] / seconds if "transformers" in medians else None,
            "speedup_vs_timm": medians["timm"] / seconds,
            "max_rel_diff_vs_reference": diffs[name],
            "gflops": gflops,
            "share_of_matmul": gflops / matmul_gflops,
        }
    return {
        "model": args.model,
        "batch": args.batch,
        "size": args.size,
        "repeats": args.repeats,
        "precision": precision.label,
        "matmul_size": args.matmul_size,
        "reference": "transformers" if "transformers" in outputs else "timm",
        "model_gflop_per_forward": model_flops / 1e9,
        "matmul_gflops": matmul_gflops,
        "machine": machine_info("cpu"),
        "load_average": load_average(),
        "results": rows,
    }


def markdown(report: dict) -> str:
    machine = report["machine"]
    flags = ", ".join(name for name, present in machine["cpu_flags"].items() if present) or "none of interest"
    lines = [
        f"{report['model']}, batch {report['batch']} at {report['size']} px, {report['precision']} eval, stage1..4, "
        f"median of {report['repeats']}; {report['model_gflop_per_forward']:.1f} GFLOP per forward; "
        f"{report['matmul_size']}-square {report['precision'].split()[0]} matmul {report['matmul_gflops']:.1f} "
        f"GFLOP/s; threads {machine['torch_threads']}; load average {report['load_average']} on "
        f"{machine['cpu_count']} cores; CPU {machine['cpu']} ({flags})",
        "",
        f"| contender | ms | vs transformers | vs timm | GFLOP/s | % of matmul | rel diff vs {report['reference']} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in report["results"].items():
        vs_tf = f"{row['speedup_vs_transformers']:.2f}x" if row["speedup_vs_transformers"] else "-"
        lines.append(
            f"| {name} | {row['median_ms']:.1f} | {vs_tf} | {row['speedup_vs_timm']:.2f}x | {row['gflops']:.1f} | "
            f"{100 * row['share_of_matmul']:.0f}% | {row['max_rel_diff_vs_reference']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50", help="timm/torchvision ResNet name (default resnet50)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the reference square matmul")
    add_precision_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="5 repeats, 1 warmup")
    parser.add_argument("--output", default="bench_resnet.json", help="JSON report (the table goes beside it, .md)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 5, 1
    report = run(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    Path(args.output).with_suffix(".md").write_text(markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
