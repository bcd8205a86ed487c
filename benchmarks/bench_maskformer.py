"""MaskFormerForInstanceSegmentation forward: this package against transformers, same weights, CPU.

For each backbone (ResNet-50, Swin-T) a random transformers MaskFormer (150 labels, 100 queries, d_model 256) is saved
to a temporary folder and loaded by both libraries. Contenders run in eval mode under ``torch.inference_mode`` in one
process, interleaved with the order rotated every repeat; the table reports median milliseconds per forward, the
speed-up over transformers and the largest difference of the mask logits relative to their largest magnitude.

    python benchmarks/bench_maskformer.py                  # both backbones, batch 2 at 384 px, 10 repeats
    python benchmarks/bench_maskformer.py --quick          # 3 repeats
    python benchmarks/bench_maskformer.py --backbone resnet50 --batch 1 --size 512 --output results/mf.json

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

from timm_backbone import MaskFormerForInstanceSegmentation
from timm_backbone.benchmark import machine_info, time_interleaved

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


def build(backbone: str) -> dict[str, torch.nn.Module]:
    reference = transformers_model(backbone)
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        contenders = {"transformers": reference, "ours": MaskFormerForInstanceSegmentation.from_pretrained(folder)}
        contenders["ours_inference"] = MaskFormerForInstanceSegmentation.from_pretrained(
            folder
        ).optimize_for_inference()
    return {name: model.eval() for name, model in contenders.items()}


def run_one(backbone: str, args: argparse.Namespace) -> dict:
    models = build(backbone)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.inference_mode():
        masks = {name: m(x).masks_queries_logits for name, m in models.items()}
        reference = masks["transformers"]
        scale = float(reference.abs().max())
        diffs = {name: float((m - reference).abs().max()) / scale for name, m in masks.items()}
        calls = {name: (lambda m=m: m(x)) for name, m in models.items()}
        times = time_interleaved(calls, repeats=args.repeats, warmup=args.warmup)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        name: {
            "median_ms": seconds * 1e3,
            "speedup_vs_transformers": medians["transformers"] / seconds,
            "max_rel_diff_vs_transformers": diffs[name],
        }
        for name, seconds in medians.items()
    }


def markdown(report: dict) -> str:
    lines = [
        f"MaskFormerForInstanceSegmentation, batch {report['batch']} at {report['size']} px, fp32 eval, CPU, median of "
        f"{report['repeats']}; threads {report['machine']['torch_threads']}",
        "",
        "| backbone | contender | ms | vs transformers | mask logits rel diff |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for backbone, rows in report["results"].items():
        for name, row in rows.items():
            lines.append(
                f"| {backbone} | {name} | {row['median_ms']:.0f} | {row['speedup_vs_transformers']:.2f}x | "
                f"{row['max_rel_diff_vs_transformers']:.1e} |"
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
        "machine": machine_info("cpu"),
        "results": {backbone: run_one(backbone, args) for backbone in backbones},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
