"""The ``timm-backbone`` command: inspect a backbone's stages, and run it on an image."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch


def synthetic_image(size: int = 224) -> Any:
    """A deterministic test picture (coloured shapes on a gradient), so the CLI runs without any file."""
    from PIL import Image, ImageDraw

    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    draw = ImageDraw.Draw(image)
    s = size
    draw.ellipse((s * 0.1, s * 0.1, s * 0.45, s * 0.45), fill=(220, 40, 40))
    draw.rectangle((s * 0.55, s * 0.2, s * 0.9, s * 0.5), fill=(40, 180, 60))
    draw.polygon([(s * 0.2, s * 0.9), (s * 0.5, s * 0.55), (s * 0.8, s * 0.9)], fill=(40, 80, 220))
    return image


def build_backbone(
    src: str, out_indices: Sequence[int] | str | None, pretrained: bool, meta: bool = False
) -> torch.nn.Module:
    """A backbone from a timm name, a folder or a hub id; random weights unless ``pretrained``.

    ``out_indices="all"`` selects every stage; ``meta`` builds it without allocating weights (for inspection).
    """
    from .auto import AutoBackbone

    if out_indices == "all":
        with torch.device("meta"):
            probe = AutoBackbone.from_config(AutoBackbone.config_for(src))
        out_indices = list(range(len(probe.stage_names)))
    overrides = {"out_indices": list(out_indices)} if out_indices is not None else {}
    if meta:
        with torch.device("meta"):
            return AutoBackbone.from_config(AutoBackbone.config_for(src, **overrides))
    if pretrained:
        return AutoBackbone.from_pretrained(src, **overrides)
    return AutoBackbone.from_config(AutoBackbone.config_for(src, **overrides)).eval()


def _stage_table(model: Any) -> str:
    rows = [("index", "stage", "channels", "stride", "selected")]
    for i, name in enumerate(model.stage_names):
        rows.append(
            (
                str(i),
                name,
                str(model.num_features[i]),
                str(model.stage_strides[i]),
                "*" if i in model.out_indices else "",
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def cmd_inspect(args: argparse.Namespace) -> int:
    model = build_backbone(args.model, args.out_indices, pretrained=False, meta=True)
    print(f"{args.model}: {type(model).__name__}, {len(model.stage_names)} stages")
    print(_stage_table(model))
    return 0


def load_image(path: str | None, size: int) -> Any:
    from PIL import Image

    if path is None:
        return synthetic_image(size)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as err:
        raise OSError(f"cannot read image {path}: {err}") from err


def to_pixel_values(image: Any, size: int) -> torch.Tensor:
    """Resize to ``size`` and normalise with ImageNet statistics (the CLI's default processing)."""
    import numpy as np
    from PIL import Image

    image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return ((array - mean) / std)[None]


def image_processor(src: str) -> Any:
    """The model's own image processor (``preprocessor_config.json`` or timm's pretrained config), or ``None``."""
    from .auto import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(src)
    except (OSError, ValueError):
        return None


def cmd_features(args: argparse.Namespace) -> int:
    model = build_backbone(args.model, args.out_indices, pretrained=args.pretrained)
    processor = image_processor(args.model) if args.size is None else None
    size = args.size or 224
    image = load_image(args.image, size)
    if processor is not None:
        pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    else:
        pixel_values = to_pixel_values(image, size)
    with torch.inference_mode():
        outputs = model(pixel_values)
    source = args.image or f"generated {size}x{size} test image"
    weights = "pretrained" if args.pretrained else "random"
    how = f", preprocessed by {type(processor).__name__}" if processor is not None else ""
    print(f"{args.model} ({type(model).__name__}, {weights} weights) on {source}{how}")
    for name, index, fmap in zip(model.out_features, model.out_indices, outputs.feature_maps):
        print(f"  [{index}] {name}: {list(fmap.shape)}  stride {model.stage_strides[index]}")
    if getattr(args, "save", None):
        from .hub import save_safetensors_atomic

        tensors = {name: f for name, f in zip(model.out_features, outputs.feature_maps)}
        save_safetensors_atomic(tensors, args.save, {"model": args.model})
        print(f"saved feature maps to {args.save}")
    if getattr(args, "save_plot", None):
        from .visualize import save_feature_plot

        save_feature_plot(outputs.feature_maps, model.out_features, args.save_plot, image=image)
        print(f"saved feature-map picture to {args.save_plot}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import run_from_args

    return run_from_args(args)


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    result = convert_checkpoint(
        args.src, args.dst, to=args.to, architecture=args.arch, config=args.config, in_place=args.in_place
    )
    print(result.summary())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import cmd_train as run_train

    return run_train(args)


def _positive_size(text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"--size takes a positive number of pixels such as 224, got {text!r}")
    return size


def _indices(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--out-indices takes integers such as 0,1,2 or -1, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="timm-backbone",
        description="Backbones for dense prediction: any timm model, native Swin and ResNet.",
    )
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="print the stage table (index, name, channels, stride) without running it")
    p.add_argument("model", help="a timm name (resnet50), a folder, or a hub id")
    p.add_argument("--out-indices", type=_indices, default=None, help="stages to mark as selected, e.g. '1,2,3'")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("features", help="run a backbone on an image and print each stage's feature-map shape")
    p.add_argument("model", help="a timm name (resnet50), a folder, or a hub id")
    p.add_argument("--image", default=None, help="image file (default: a generated test picture)")
    p.add_argument(
        "--size",
        type=_positive_size,
        default=None,
        help="resize to SIZE x SIZE with ImageNet statistics (default: the model's image processor, else 224)",
    )
    p.add_argument(
        "--out-indices",
        type=_indices,
        default=None,
        help="stages to output, e.g. '0,1,2' or '-1' (default: every stage)",
    )
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="load pretrained weights (from a folder, or the hub and its cache); default random weights",
    )
    p.add_argument("--save", metavar="PATH", default=None, help="write the feature maps to a .safetensors file")
    p.add_argument("--save-plot", metavar="PATH", default=None, help="write a PNG picture of the feature maps")
    p.set_defaults(func=cmd_features)

    from .benchmark import add_arguments as add_bench_arguments

    p = sub.add_parser(
        "bench",
        help="timm vs native (vs transformers) per stage: max abs difference, latency, throughput, peak memory",
        description="Same weights in every implementation; JSON, markdown and PNG written to --output. Defaults are "
        "quick (resnet18 and swin_t, batch 1, 5 repeats); --all-models, --batch 1 8, --dtype fp32 bf16 and "
        "--compile widen it.",
    )
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "convert",
        help="convert a Swin or ResNet checkpoint between timm's and transformers' layouts (safetensors out)",
        description="SRC is a folder (config.json + weights; timm's or transformers'), a hub id in the local cache, "
        "or a weights file (then --arch names the timm architecture or --config a transformers config.json). DST is "
        "a folder (config.json + model.safetensors) or a .safetensors file.",
    )
    p.add_argument("src", help="checkpoint folder, hub id, or weights file")
    p.add_argument("dst", help="output folder, or a .safetensors file for the weights alone")
    p.add_argument("--to", choices=["timm", "transformers"], default=None, help="target layout (default: the other)")
    p.add_argument("--arch", default=None, help="timm architecture of a timm weights file (e.g. resnet50)")
    p.add_argument("--config", default=None, help="transformers config.json of a transformers weights file")
    p.add_argument("--in-place", action="store_true", help="allow DST to be SRC (the source is rewritten)")
    p.set_defaults(func=cmd_convert)

    from .train import add_arguments as add_train_arguments

    p = sub.add_parser(
        "train",
        help="fine-tune MaskFormer with any backbone on a local dataset (ade20k, folder or coco-panoptic layout)",
        description="Trains MaskFormerForInstanceSegmentation over --backbone (or --config) on --data, evaluates each "
        "epoch (mIoU / PQ) and writes OUTPUT/log.jsonl, OUTPUT/last and OUTPUT/best. Under torchrun each process "
        "trains on its share of the data (DistributedDataParallel). See docs/training.md.",
    )
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "features" and args.out_indices is None:
        args.out_indices = "all"
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as err:  # bad input; anything else is a bug and keeps its traceback
        if args.debug:
            raise
        print(f"timm-backbone {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
