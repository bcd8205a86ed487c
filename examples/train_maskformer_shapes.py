"""Fine-tune a small MaskFormer on generated shapes (see shapes.py) on CPU, and report matched instance mask IoU.

    python examples/train_maskformer_shapes.py --steps 300 --image-size 64 --seed 0

The model is ``MaskFormerForInstanceSegmentation`` over a randomly initialised timm ResNet-18 (through
``TimmBackboneConfig``) with a small query decoder. Every training step draws a fresh batch; evaluation uses a fixed
held-out set. The script prints the loss every ``--log-every`` steps, then the mean matched instance IoU of the
trained model next to two reference points: the same model before training, and a trivial predictor that answers
every instance with the whole image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import CLASSES, ShapesDataset, instance_masks, make_sample, mask_iou, matched_instance_iou

from timm_backbone import (
    MaskFormerConfig,
    MaskFormerForInstanceSegmentation,
    MaskFormerImageProcessor,
    TimmBackboneConfig,
)


def build_model(
    backbone: str = "resnet18", num_queries: int = 6, auxiliary_loss: bool = True
) -> MaskFormerForInstanceSegmentation:
    """A small MaskFormer: random-init timm backbone, 64-channel FPN and masks, a 2-layer 128-wide query decoder
    (with the loss on every decoder layer by default, which speeds up learning)."""
    config = MaskFormerConfig(
        backbone_config=TimmBackboneConfig(backbone),
        decoder_config={
            "d_model": 128,
            "num_queries": num_queries,
            "decoder_layers": 2,
            "decoder_attention_heads": 4,
            "decoder_ffn_dim": 256,
            "dropout": 0.0,
        },
        use_auxiliary_loss=auxiliary_loss,
        fpn_feature_size=64,
        mask_feature_size=64,
        id2label=dict(enumerate(CLASSES)),
    )
    return MaskFormerForInstanceSegmentation(config)


def make_processor(image_size: int) -> MaskFormerImageProcessor:
    # background (instance 0) makes no mask: ignore_index=0
    return MaskFormerImageProcessor(size={"height": image_size, "width": image_size}, size_divisor=32, ignore_index=0)


def collate(samples: list, processor: MaskFormerImageProcessor) -> dict:
    images, maps, classes = zip(*samples)
    return processor(list(images), list(maps), instance_id_to_semantic_id=list(classes), return_tensors="pt")


@torch.no_grad()
def evaluate(
    model: MaskFormerForInstanceSegmentation,
    processor: MaskFormerImageProcessor,
    dataset: ShapesDataset,
    batch_size: int = 16,
    threshold: float = 0.5,
) -> dict[str, float]:
    """Mean matched instance IoU over ``dataset`` (class-agnostic and class-aware), with the whole-image baseline."""
    model.eval()
    agnostic, aware, whole, kept = [], [], [], []
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate(samples, processor)
        outputs = model(pixel_values=batch["pixel_values"])
        sizes = [s[0].shape[:2] for s in samples]
        results = processor.post_process_instance_segmentation(
            outputs, threshold=threshold, target_sizes=sizes, return_binary_maps=True
        )
        for (_, instance_map, classes), result in zip(samples, results):
            gt_masks, gt_labels = instance_masks(instance_map, classes)
            if result["segments_info"]:
                pred_masks = result["segmentation"].bool()
                pred_labels = torch.tensor([s["label_id"] for s in result["segments_info"]])
            else:
                pred_masks, pred_labels = torch.zeros((0, *instance_map.shape), dtype=torch.bool), torch.zeros(0)
            agnostic += matched_instance_iou(pred_masks, gt_masks)
            aware += matched_instance_iou(pred_masks, gt_masks, pred_labels, gt_labels)
            kept.append(len(result["segments_info"]))
            whole += mask_iou(torch.ones((1, *instance_map.shape), dtype=torch.bool), gt_masks)[0].tolist()
    model.train()
    return {
        "iou": float(np.mean(agnostic)),
        "iou_class_aware": float(np.mean(aware)),
        "iou_whole_image": float(np.mean(whole)),
        "predictions_per_image": float(np.mean(kept)),
    }


def train(
    steps: int = 300,
    image_size: int = 64,
    seed: int = 0,
    batch_size: int = 8,
    lr: float = 1e-3,
    log_every: int = 25,
    num_eval: int = 64,
    backbone: str = "resnet18",
    num_queries: int = 6,
    auxiliary_loss: bool = True,
    verbose: bool = True,
) -> dict:
    """Train from scratch for ``steps`` steps and return losses and IoUs (see the module docstring)."""
    torch.manual_seed(seed)
    model = build_model(backbone, num_queries, auxiliary_loss)
    processor = make_processor(image_size)
    eval_set = ShapesDataset(num_eval, image_size, seed=seed + 10_000)
    before = evaluate(model, processor, eval_set)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        batch = collate([make_sample(rng, image_size) for _ in range(batch_size)], processor)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if verbose and (step % log_every == 0 or step == 1):
            recent = np.mean(losses[-log_every:])
            print(f"step {step:5d}  loss {losses[-1]:.3f}  (mean of last {min(log_every, step)}: {recent:.3f})")
    train_seconds = time.perf_counter() - start
    after = evaluate(model, processor, eval_set)
    window = max(1, min(20, steps // 5))
    return {
        "steps": steps,
        "image_size": image_size,
        "seed": seed,
        "loss_start": float(np.mean(losses[:window])) if losses else float("nan"),
        "loss_end": float(np.mean(losses[-window:])) if losses else float("nan"),
        "losses": losses,
        "train_seconds": train_seconds,
        "iou": after["iou"],
        "iou_class_aware": after["iou_class_aware"],
        "iou_untrained": before["iou"],
        "iou_whole_image": after["iou_whole_image"],
        "predictions_per_image": after["predictions_per_image"],
        "model": model,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--num-eval", type=int, default=64, help="held-out images for the IoU")
    parser.add_argument("--backbone", default="resnet18", help="timm model name (random init)")
    parser.add_argument("--num-queries", type=int, default=6)
    parser.add_argument("--no-auxiliary-loss", action="store_true", help="loss on the last decoder layer only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results (without per-step losses)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(
        args.steps,
        args.image_size,
        args.seed,
        args.batch_size,
        args.lr,
        args.log_every,
        args.num_eval,
        args.backbone,
        args.num_queries,
        not args.no_auxiliary_loss,
    )
    result.pop("model")
    print(
        f"loss {result['loss_start']:.3f} -> {result['loss_end']:.3f} in {result['steps']} steps "
        f"({result['train_seconds']:.0f} s)\n"
        f"mean matched instance IoU: {result['iou']:.3f} (class-aware {result['iou_class_aware']:.3f}); "
        f"untrained model {result['iou_untrained']:.3f}, whole-image masks {result['iou_whole_image']:.3f}; "
        f"{result['predictions_per_image']:.1f} predictions per image"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
