"""Image processors against their references on the same pictures: max |difference| of pixel_values and time per
call (medians, interleaved), written as JSON and printed as a markdown table.

    python benchmarks/processor_parity.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image

KINDS = ("pil", "pil_gray", "pil_rgba", "numpy", "numpy_float", "torch")


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    ramps = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (height + width)], -1)
    return (0.7 * ramps + 0.3 * rng.integers(0, 256, (height, width, 3))).astype(np.uint8)


def image(kind: str, height: int, width: int):
    array = picture(height, width)
    if kind == "pil":
        return Image.fromarray(array)
    if kind == "pil_gray":
        return Image.fromarray(array).convert("L")
    if kind == "pil_rgba":
        rgba = Image.fromarray(array).convert("RGBA")
        rgba.putalpha(Image.fromarray(picture(height, width, 1)[..., 0]))
        return rgba
    if kind == "numpy":
        return array
    if kind == "numpy_float":
        return array.astype(np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def contenders():
    """(name, ours, reference, takes a kind?) for each processor family."""
    import timm
    import transformers
    from timm.data import create_transform, resolve_data_config
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    import timm_backbone as tb

    swin_repo = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": 224}
    resnet_repo = {**swin_repo, "crop_pct": 0.875}
    rgb = {"do_convert_rgb": True}

    def hf(p):
        return lambda x: p(x, return_tensors="pt")["pixel_values"]

    def ours(p):
        return lambda x: p(x, return_tensors="pt").pixel_values

    cfg = timm.models.get_pretrained_cfg("resnet50.a1_in1k").to_dict()
    timm_tf = create_transform(**resolve_data_config(pretrained_cfg=cfg), is_training=False)
    wrapper = transformers.TimmWrapperImageProcessor(pretrained_cfg=cfg)
    return [
        (
            "ViT (swin repo file) / torchvision",
            ours(tb.ViTImageProcessor(**swin_repo)),
            hf(transformers.ViTImageProcessor(**swin_repo, **rgb)),
            KINDS,
        ),
        (
            "ViT (swin repo file) / pil",
            ours(tb.ViTImageProcessor(**swin_repo, backend="pil")),
            hf(ViTImageProcessorPil(**swin_repo, **rgb)),
            KINDS,
        ),
        (
            "ConvNeXt (resnet repo file) / torchvision",
            ours(tb.ConvNextImageProcessor(**resnet_repo)),
            hf(transformers.ConvNextImageProcessor(**resnet_repo, **rgb)),
            KINDS,
        ),
        (
            "ConvNeXt (resnet repo file) / pil",
            ours(tb.ConvNextImageProcessor(**resnet_repo, backend="pil")),
            hf(ConvNextImageProcessorPil(**resnet_repo, **rgb)),
            KINDS,
        ),
        ("DeiT / torchvision", ours(tb.DeiTImageProcessor()), hf(transformers.DeiTImageProcessor(**rgb)), KINDS),
        ("CLIP / torchvision", ours(tb.CLIPImageProcessor()), hf(transformers.CLIPImageProcessor()), KINDS),
        (
            "timm resnet50.a1_in1k vs timm eval transform",
            ours(tb.TimmImageProcessor.from_pretrained_cfg(cfg)),
            lambda x: timm_tf(x)[None],
            ("pil",),
        ),
        (
            "timm resnet50.a1_in1k vs transformers TimmWrapper",
            ours(tb.TimmImageProcessor.from_pretrained_cfg(cfg)),
            lambda x: wrapper(x)["pixel_values"],
            ("pil",),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one picture size, 3 timing repeats")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: processors run per image)")
    parser.add_argument("--out", default="benchmarks/results/processor_parity.json")
    args = parser.parse_args()
    sizes = [(480, 640)] if args.quick else [(480, 640), (61, 97), (1024, 768)]
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    rows = []
    for name, mine, theirs, kinds in contenders():
        worst, t_ours, t_ref = 0.0, [], []
        for kind in kinds:
            for height, width in sizes:
                x = image(kind, height, width)
                a, b = mine(x), theirs(x)
                if a.shape != b.shape:
                    raise SystemExit(f"{name} {kind}: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
                if not (kind == "numpy_float" and "pil" in name):  # transformers' PIL path quantises floats
                    worst = max(worst, (a - b).abs().max().item())
        x = image("pil", *sizes[0])
        for _ in range(repeats):  # interleaved
            start = time.perf_counter()
            mine(x)
            t_ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            theirs(x)
            t_ref.append(time.perf_counter() - start)
        ms_ours, ms_ref = statistics.median(t_ours) * 1e3, statistics.median(t_ref) * 1e3
        rows.append({"processor": name, "max_abs_diff": worst, "ours_ms": ms_ours, "reference_ms": ms_ref})
    import os

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"sizes": sizes, "kinds": KINDS, "rows": rows}, f, indent=2)
    print("| processor | max abs diff | ours ms | reference ms | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = r["ours_ms"] / r["reference_ms"]
        times = f"{r['ours_ms']:.1f} | {r['reference_ms']:.1f} | {ratio:.2f}"
        print(f"| {r['processor']} | {r['max_abs_diff']:.2e} | {times} |")


if __name__ == "__main__":
    main()
