"""MaskFormerForInstanceSegmentation forward: this package against transformers, same weights, CPU.

For each backbone (ResNet-50, Swin-T) a random transformers MaskFormer (150 labels, 100 queries, d_model 256) is saved
to a temporary folder and loaded by both libraries. Contenders run in eval mode under ``torch.inference_mode`` in one
process, interleaved with the order rotated every repeat; the table reports median milliseconds per forward, the
speed-up over transformers, the largest difference of the mask logits relative to their largest magnitude, and the
achieved GFLOP/s (FLOPs counted on transformers' forward) against a plain square matmul of the same dtype timed in
the same loop. The JSON records the machine, its load and its matrix-unit CPU flags (AMX, AVX-512 BF16).

    python benchmarks/bench_maskformer.py                  # both backbones, batch 2 at 384 px, 10 repeats
    python benchmarks/bench_maskformer.py --quick          # 3 repeats
    python benchmarks/bench_maskformer.py --backbone resnet50 --batch 1 --size 512 --output results/mf.json
    python benchmarks/bench_maskformer.py --dtype bf16             # every model .to(torch.bfloat16), bf16 input
    python benchmarks/bench_maskformer.py --dtype bf16 --autocast  # fp32 models under torch.autocast("cpu", bf16)

Contenders: ``transformers`` (its MaskFormerForInstanceSegmentation), ``ours`` (this package's default forward) and
``ours_inference`` (after ``model.optimize_for_inference()``: the mask projection folded into the query embeddings,
plus the backbone's own inference path where it has one, e.g. ResNet's BatchNorm folded into fused oneDNN
convolutions; parameters untouched, ``pixel_decoder_last_hidden_state`` not computed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from timm_backbone import MaskFormerForInstanceSegmentation
from timm_backbone.benchmark import (
    Precision,
    add_precision_arguments,
    machine_info,
    precision_from_args,
    square_matmul,
    time_interleaved,
)

STAGES = ["stage1", "stage2", "stage3", "stage4"]


def transformers_model(backbone: str):
    import transformers

    if backbone == "resnet50":
        backbone_config = transformers.ResNetConfig(out_features=STAGES)  # transformers' defaults are ResNet-50
    elif backbone == "swin-t":
        backbone_config = transformers.SwinConfig(
            embed_dim=96,
            depths=[2, 2, 6, 2],
            num_heads=[3, 6, 12, 24],
            window_size=7,
            image_size=224,
            out_features=STAGES,
        )
    else:
        raise ValueError(f"unknown backbone {backbone!r}; choose resnet50 or swin-t")
    torch.manual_seed(0)
    config = transformers.MaskFormerConfig(backbone_config=backbone_config, num_labels=150)
    return transformers.MaskFormerForInstanceSegmentation(config).eval()


def build(backbone: str, precision: Precision) -> dict[str, torch.nn.Module]:
    reference = transformers_model(backbone)
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        contenders = {"transformers": reference, "ours": MaskFormerForInstanceSegmentation.from_pretrained(folder)}
        contenders["ours_inference"] = MaskFormerForInstanceSegmentation.from_pretrained(folder)
    contenders = {name: precision.prepare(model) for name, model in contenders.items()}
    contenders["ours_inference"].optimize_for_inference()
    return contenders


def run_one(backbone: str, args: argparse.Namespace) -> dict:
    precision = precision_from_args(args)
    models = build(backbone, precision)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size).to(precision.storage_dtype)
    matmul, matmul_flops = square_matmul(args.matmul_size, precision.compute_dtype)
    with torch.inference_mode():
        masks = {name: precision.call(m, x)().masks_queries_logits.float() for name, m in models.items()}
        reference = masks["transformers"]
        scale = float(reference.abs().max())
        diffs = {name: float((m - reference).abs().max()) / scale for name, m in masks.items()}
        with FlopCounterMode(display=False) as counter:
            models["transformers"](x)
        flops = counter.get_total_flops()
        calls = {name: precision.call(m, x) for name, m in models.items()}
        calls["matmul"] = matmul
        times = time_interleaved(calls, repeats=args.repeats, warmup=args.warmup)
    medians = {name: statistics.median(t) for name, t in times.items()}
    matmul_gflops = matmul_flops / medians.pop("matmul") / 1e9
    return {
        "model_gflop_per_forward": flops / 1e9,
        "matmul_gflops": matmul_gflops,
        "contenders": {
            name: {
                "median_ms": seconds * 1e3,
                "speedup_vs_transformers": medians["transformers"] / seconds,
                "max_rel_diff_vs_transformers": diffs[name],
                "gflops": flops / seconds / 1e9,
                "share_of_matmul": flops / seconds / 1e9 / matmul_gflops,
            }
            for name, seconds in medians.items()
        },
    }


def markdown(report: dict) -> str:
    machine = report["machine"]
    flags = ", ".join(name for name, present in machine["cpu_flags"].items() if present) or "none of interest"
    lines = [
        f"MaskFormerForInstanceSegmentation, batch {report['batch']} at {report['size']} px, {report['precision']} "
        f"eval, CPU, median of {report['repeats']}; threads {machine['torch_threads']}; load average "
        f"{machine['load_average']}; CPU {machine['cpu']} ({flags})",
        "",
        "| backbone | contender | ms | vs transformers | GFLOP/s | % of matmul | mask logits rel diff |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backbone, result in report["results"].items():
        for name, row in result["contenders"].items():
            lines.append(
                f"| {backbone} | {name} | {row['median_ms']:.0f} | {row['speedup_vs_transformers']:.2f}x | "
                f"{row['gflops']:.1f} | {100 * row['share_of_matmul']:.0f}% | "
                f"{row['max_rel_diff_vs_transformers']:.1e} |"
            )
    for backbone, result in report["results"].items():
        lines.append(
            f"\n{backbone}: {result['model_gflop_per_forward']:.1f} GFLOP per forward; "
            f"{report['matmul_size']}-square {report['precision'].split()[0]} matmul {result['matmul_gflops']:.1f} "
            "GFLOP/s"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=["resnet50", "swin-t", "both"], default="both")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the reference square matmul")
    add_precision_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warmup")
    parser.add_argument("--output", default="bench_maskformer.json", help="where to write the JSON report")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    backbones = ["resnet50", "swin-t"] if args.backbone == "both" else [args.backbone]
    report = {
        "batch": args.batch,
        "size": args.size,
        "repeats": args.repeats,
        "precision": precision_from_args(args).label,
        "matmul_size": args.matmul_size,
        "machine": machine_info("cpu"),
        "results": {backbone: run_one(backbone, args) for backbone in backbones},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
