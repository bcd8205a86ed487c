"""Fine-tune MaskFormer with any backbone on a local dataset, on one process or many (``torchrun``).

    timm-backbone train --backbone resnet50.a1_in1k --pretrained-backbone --data ADEChallengeData2016 \\
        --format ade20k --output runs/r50 --epochs 20 --batch-size 16 --lr 1e-4 --precision bf16
    torchrun --nproc_per_node 4 -m timm_backbone.train --backbone ... (the same arguments)

Each epoch ends with an evaluation (mIoU and pixel accuracy, or PQ/SQ/RQ) and checkpoints: ``OUTPUT/last`` and
``OUTPUT/best`` hold ``save_pretrained`` folders of the model and its processor, ``last`` also the training state
that ``--resume`` continues from. ``OUTPUT/log.jsonl`` gets one JSON record per logged step and per evaluation.
Randomness is a function of the seed, the epoch, the sample and the step (data order and augmentation per epoch,
dropout per step), so a resumed run replays an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import (
    STATE_NAME,
    JsonLog,
    config_differences,
    load_training_state,
    recover_folder,
    save_checkpoint,
)
from .datasets import FORMATS, SegmentationDataset, build_dataset, check_dataset
from .evaluation import MAIN_METRIC, constant_baseline, evaluate, format_results
from .models.maskformer import MaskFormerConfig, MaskFormerForInstanceSegmentation, MaskFormerImageProcessor

SCHEDULES = ("poly", "cosine")
PRECISIONS = ("fp32", "bf16")


# command line -------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``timm-backbone train`` and ``python -m timm_backbone.train``."""
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", help="timm name or tag, folder or hub id (anything AutoBackbone takes)")
    model.add_argument("--config", help="a MaskFormerConfig config.json (file or folder) instead of --backbone")
    model.add_argument(
        "--pretrained-backbone", action="store_true", help="load the backbone's pretrained weights (from --backbone)"
    )
    model.add_argument("--fpn-dim", type=int, help="FPN and mask feature channels (default 256, a multiple of 32)")
    model.add_argument("--hidden-dim", type=int, help="query decoder width d_model (default 256)")
    model.add_argument("--num-queries", type=int, help="queries (default 100)")
    model.add_argument("--decoder-layers", type=int, help="query decoder layers (default 6)")
    model.add_argument(
        "--dropout", type=float, default=0.0, help="query decoder dropout (default 0.0, as Mask2Former; DETR: 0.1)"
    )
    model.add_argument(
        "--frozen-stages", type=int, help="backbone.freeze_stages(K): 0 freezes the stem, K also the first K stages"
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="dataset folder")
    data.add_argument("--format", required=True, choices=FORMATS, help="dataset layout (see docs/training.md)")
    data.add_argument("--num-labels", type=int, help="number of classes when the dataset does not name them")
    data.add_argument("--image-size", type=int, default=512, help="training crop and evaluation size (default 512)")
    data.add_argument(
        "--scale-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"), help="rescale range"
    )
    data.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    data.add_argument("--skip-data-check", action="store_true", help="skip reading every training label first")
    opt = parser.add_argument_group("optimisation")
    length = opt.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="passes over the training split (default 10)")
    length.add_argument("--steps", type=int, help="optimizer steps, instead of --epochs")
    opt.add_argument("--batch-size", type=int, default=8, help="images per process and step (default 8)")
    opt.add_argument("--grad-accum", type=int, default=1, help="batches accumulated per optimizer step (default 1)")
    opt.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of AdamW (default 1e-4)")
    opt.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    opt.add_argument("--layer-decay", type=float, help="layer-wise learning-rate decay (timm's layer_decay)")
    opt.add_argument("--schedule", choices=SCHEDULES, default="poly", help="learning-rate schedule (default poly)")
    opt.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    opt.add_argument("--clip-grad", type=float, default=0.01, help="max gradient norm, 0 for none (default 0.01)")
    opt.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16 runs under autocast")
    opt.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("run")
    run.add_argument("--output", required=True, help="run folder: log.jsonl, last/, best/")
    run.add_argument("--resume", action="store_true", help="continue the run in OUTPUT/last")
    run.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint (default OUTPUT/last) and stop")
    run.add_argument("--checkpoint", help="model folder for --eval-only")
    run.add_argument("--eval-batch-size", type=int, help="images per evaluation step (default --batch-size)")
    run.add_argument("--log-every", type=int, default=20, help="steps between log records (default 20)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run.add_argument("--threads", type=int, help="torch CPU threads per process")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m timm_backbone.train ARGS`` is ``timm-backbone train ARGS``."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


def cmd_train(args: argparse.Namespace) -> int:
    run(args)
    return 0


# model, optimizer, schedule -----------------------------------------------------------------------------------------
def build_config(args: argparse.Namespace, dataset: SegmentationDataset) -> MaskFormerConfig:
    """The model config: ``--config``, or MaskFormer over ``--backbone`` with the head-size options; the classes are
    the dataset's.

    Raises:
        ValueError: neither or both of ``--backbone``/``--config`` (``--backbone`` may join ``--config`` only as the
            source of ``--pretrained-backbone``), or a ``--config`` that is not a MaskFormer config.
    """
    from .auto import AutoBackbone

    if args.config is None and args.backbone is None:
        raise ValueError("give --backbone (a timm name, folder or hub id) or --config (a MaskFormer config.json)")
    if args.config is not None:
        if args.backbone is not None and not args.pretrained_backbone:
            raise ValueError(
                "--config already names the backbone; --backbone goes with it only for --pretrained-backbone"
            )
        config = MaskFormerConfig.from_pretrained(args.config)
        config.id2label = dict(dataset.id2label)
        return config
    # no dropout by default: with it, short runs learned to tell the queries apart through the dropout noise alone,
    # and at evaluation (dropout off) every query predicted the same mask (docs/training.md)
    decoder: dict[str, Any] = {"dropout": args.dropout}
    if args.hidden_dim is not None:
        decoder.update(
            d_model=args.hidden_dim,
            decoder_ffn_dim=8 * args.hidden_dim,
            decoder_attention_heads=math.gcd(args.hidden_dim, 8),
        )
    if args.num_queries is not None:
        decoder["num_queries"] = args.num_queries
    if args.decoder_layers is not None:
        decoder["decoder_layers"] = args.decoder_layers
    sizes = {} if args.fpn_dim is None else {"fpn_feature_size": args.fpn_dim, "mask_feature_size": args.fpn_dim}
    return MaskFormerConfig(
        backbone_config=AutoBackbone.config_for(args.backbone),
        decoder_config=decoder,
        use_auxiliary_loss=True,
        id2label=dict(dataset.id2label),
        **sizes,
    )


def build_processor(dataset: SegmentationDataset, image_size: int, backbone: str | None) -> MaskFormerImageProcessor:
    """``MaskFormerImageProcessor`` for ``image_size`` squares, with the dataset's label rules and the backbone's
    normalisation (its own image processor's mean and std when it has one, else ImageNet's)."""
    from .cli import image_processor

    normalise = {}
    source = image_processor(backbone) if backbone is not None else None
    if source is not None:
        normalise = {"image_mean": source.image_mean, "image_std": source.image_std}
    return MaskFormerImageProcessor(
        size={"height": image_size, "width": image_size},
        size_divisor=32,
        num_labels=dataset.num_labels,
        **dataset.processor_kwargs,
        **normalise,
    )


def freeze_backbone_stages(model: MaskFormerForInstanceSegmentation, stages: int) -> None:
    """Freeze the backbone's first ``stages`` stages through its ``freeze_stages``.

    Raises:
        ValueError: the backbone has no ``freeze_stages``.
    """
    encoder = model.model.pixel_level_module.encoder
    if not hasattr(encoder, "freeze_stages"):
        raise ValueError(
            f"--frozen-stages: {type(encoder).__name__} does not support freezing stages yet (it has no freeze_stages)"
        )
    encoder.freeze_stages(stages)


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None
) -> torch.optim.Optimizer:
    """AdamW through ``timm.optim.create_optimizer_v2`` (no weight decay on biases, norms and the model's
    ``no_weight_decay()``), with layer-wise learning-rate decay when ``layer_decay`` is given.

    Raises:
        ValueError: ``layer_decay`` for a model without ``group_matcher`` (timm would put every parameter in one
            layer and silently not decay anything).
    """
    from timm.optim import create_optimizer_v2

    if layer_decay is None:
        return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay)
    if not hasattr(model, "group_matcher"):
        raise ValueError(
            f"--layer-decay needs a model that groups its layers (timm's group_matcher); {type(model).__name__} has "
            f"none yet"
        )
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int) -> Any:
    """timm's per-step poly (power 0.9) or cosine schedule with linear warm-up; it honours the per-group
    ``lr_scale`` that layer decay sets."""
    from timm.scheduler import CosineLRScheduler, PolyLRScheduler

    common = {"t_initial": total_steps, "warmup_t": warmup_steps, "warmup_lr_init": 0.0, "t_in_epochs": False}
    if schedule == "poly":
        return PolyLRScheduler(optimizer, power=0.9, **common)
    return CosineLRScheduler(optimizer, **common)


# processes ----------------------------------------------------------------------------------------------------------
class Processes:
    """This process's place under ``torchrun`` (or alone): rank, world size, device; starts ``torch.distributed``."""

    def __init__(self, device: str = "auto") -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if use_cuda and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu")
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        # the group that sums the metrics' counts, which live on the CPU: the default one, or gloo beside nccl
        self.metrics_group = None
        if self.world_size > 1:
            torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
            if use_cuda:
                self.metrics_group = torch.distributed.new_group(backend="gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.item() / self.world_size

    def close(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one optimizer step on one process (dropout), independent of what ran before."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class TrainCollate:
    """Batches for training: the processor's ``pixel_values``, ``mask_labels`` and ``class_labels`` of augmented
    samples (already ``image_size`` squares, so not resized again)."""

    def __init__(self, processor: MaskFormerImageProcessor) -> None:
        self.processor = processor

    def __call__(self, samples: list) -> dict[str, Any]:
        mappings = [s.instance_classes for s in samples]
        return self.processor(
            [s.image for s in samples],
            [s.segmentation for s in samples],
            instance_id_to_semantic_id=None if mappings[0] is None else mappings,
            do_resize=False,
            return_tensors="pt",
        )


# the run ------------------------------------------------------------------------------------------------------------
def _check_args(args: argparse.Namespace) -> None:
    positive = {"--batch-size": args.batch_size, "--grad-accum": args.grad_accum, "--log-every": args.log_every}
    positive.update({"--epochs": args.epochs, "--steps": args.steps, "--eval-batch-size": args.eval_batch_size})
    for name, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if args.image_size < 32 or args.image_size % 32:
        raise ValueError(
            f"--image-size must be a positive multiple of 32 (the backbone's stride), got {args.image_size}"
        )
    if args.resume and args.eval_only:
        raise ValueError("--resume and --eval-only exclude each other: --eval-only --checkpoint DIR scores a folder")
    if args.pretrained_backbone and args.backbone is None:
        raise ValueError("--pretrained-backbone loads the weights of --backbone; give --backbone")
    if args.warmup_steps < 0 or args.workers < 0:
        raise ValueError("--warmup-steps and --workers must be >= 0")


@dataclass
class RunResult:
    """What :func:`run` leaves: the last evaluation's metrics, the model (unwrapped, on its device) and processor,
    and the step reached."""

    metrics: dict[str, float]
    model: MaskFormerForInstanceSegmentation
    processor: MaskFormerImageProcessor
    step: int


def _check_extras() -> None:
    import importlib.util

    missing = [name for name in ("scipy", "torchmetrics") if importlib.util.find_spec(name) is None]
    if missing:
        raise OSError(
            f"timm-backbone train needs {' and '.join(missing)} (the [train] extra): pip install 'timm-backbone[train]'"
        )


def run(args: argparse.Namespace) -> RunResult:
    """Train (or with ``eval_only`` evaluate) as the command line describes.

    Everything that can be wrong with the input (arguments, folders, files, labels, the model source, a ``--resume``
    folder of another model) raises before the first step and before anything is written.

    Raises:
        ValueError: bad arguments, labels outside the classes, a resume folder of another model.
        OSError: missing or unreadable folders and files.
    """
    _check_args(args)
    _check_extras()
    procs = Processes(args.device)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _run(args, procs)
    finally:
        procs.close()


def _prepare_model(
    args: argparse.Namespace, val_set: SegmentationDataset, checkpoint: Path | None
) -> tuple[MaskFormerForInstanceSegmentation, MaskFormerImageProcessor]:
    """The model and processor: from ``checkpoint`` (``--eval-only``, ``--resume``), else built from the arguments."""
    torch.manual_seed(args.seed)
    if checkpoint is None:
        config = build_config(args, val_set)
        if args.pretrained_backbone:
            # MaskFormer builds its backbone from this source's weights (the hub cache when offline); the head and
            # pixel decoder stay random, and saved checkpoints hold the weights, so they never read the source again
            config.backbone_config.name_or_path = args.backbone
            config.use_pretrained_backbone = True
        model = MaskFormerForInstanceSegmentation(config)
        return model, build_processor(val_set, args.image_size, args.backbone)
    if args.resume and (args.backbone is not None or args.config is not None):
        # the model built from the arguments (which fills in the backbone's stages) against the saved one
        asked = MaskFormerForInstanceSegmentation(build_config(args, val_set)).config
        differences = config_differences(MaskFormerConfig.from_pretrained(checkpoint).to_dict(), asked.to_dict())
        if differences:
            raise ValueError(
                f"--resume: {checkpoint} holds another model than the one asked for (saved vs asked): "
                + "; ".join(differences[:8])
            )
    model = MaskFormerForInstanceSegmentation.from_pretrained(checkpoint, strict=True)
    return model, MaskFormerImageProcessor.from_pretrained(checkpoint)


def _run(args: argparse.Namespace, procs: Processes) -> RunResult:
    output = Path(args.output)
    last, best = output / "last", output / "best"
    progress = procs.main and not args.no_progress
    val_set = build_dataset(args.format, args.data, "val", args.num_labels)
    train_set = None if args.eval_only else build_dataset(args.format, args.data, "train", args.num_labels)
    if train_set is not None and not args.skip_data_check:
        check_dataset(train_set, args.workers, progress)
    val_counts = check_dataset(val_set, args.workers, progress)
    if procs.main:
        recover_folder(last)
        recover_folder(best)
    procs.barrier()
    checkpoint = None
    if args.eval_only:
        checkpoint = Path(args.checkpoint) if args.checkpoint else (last if last.is_dir() else None)
        if checkpoint is not None and not checkpoint.is_dir():
            raise OSError(f"--checkpoint {checkpoint} is not a folder")
    elif args.resume:
        if not (last / STATE_NAME).is_file():
            raise OSError(f"--resume: {last} holds no training state ({STATE_NAME}); start without --resume")
        checkpoint = last
    elif last.exists():
        raise OSError(
            f"{output} already holds a run ({last}); pass --resume to continue it, or choose another --output"
        )
    model, processor = _prepare_model(args, val_set, checkpoint)
    if model.config.num_labels != val_set.num_labels:
        raise ValueError(
            f"the model predicts {model.config.num_labels} classes but the dataset has {val_set.num_labels}"
        )
    if args.frozen_stages is not None:
        freeze_backbone_stages(model, args.frozen_stages)
    model.to(procs.device)
    eval_kwargs = {
        "batch_size": args.eval_batch_size or args.batch_size,
        "device": procs.device,
        "precision": args.precision,
        "workers": args.workers,
        "progress": progress,
        "process_group": procs.metrics_group,
    }
    most_frequent = int(val_counts.argmax())
    if args.eval_only:
        state = (
            load_training_state(checkpoint / STATE_NAME) if checkpoint and (checkpoint / STATE_NAME).is_file() else {}
        )
        baseline = constant_baseline(val_set, most_frequent, procs.metrics_group)
        results = evaluate(model, processor, val_set, **eval_kwargs)
        step = state.get("step", 0)
        if procs.main:
            record = {"type": "eval", "step": step, "epoch": state.get("epoch", 0), **results}
            JsonLog(output / "log.jsonl").write({**record, "checkpoint": str(checkpoint)})
            title = f"{checkpoint or 'untrained model'} on {len(val_set)} {val_set.split} images"
            print(format_results(results, baseline, title))
        return RunResult(results, model, processor, step)

    model.train()
    optimizer = build_optimizer(model, args.lr, args.weight_decay, args.layer_decay)
    trainer = _Trainer(args, procs, model, processor, optimizer, train_set, val_set, eval_kwargs)
    if args.resume:
        trainer.restore(load_training_state(last / STATE_NAME), last)
    baseline = constant_baseline(val_set, most_frequent, procs.metrics_group) if trainer.state["step"] == 0 else None
    if procs.main:
        trainer.open_log(output / "log.jsonl", baseline, val_set.id2label[most_frequent])
    results = trainer.train(last, best, baseline)
    return RunResult(results, model, processor, trainer.state["step"])


class _Trainer:
    """The optimisation loop: epochs of seeded, sharded batches; evaluation and checkpoints after each."""

    def __init__(
        self,
        args: argparse.Namespace,
        procs: Processes,
        model: MaskFormerForInstanceSegmentation,
        processor: MaskFormerImageProcessor,
        optimizer: torch.optim.Optimizer,
        train_set: SegmentationDataset,
        val_set: SegmentationDataset,
        eval_kwargs: dict[str, Any],
    ) -> None:
        from .datasets.transforms import AugmentedDataset

        self.args, self.procs, self.model, self.processor, self.optimizer = args, procs, model, processor, optimizer
        self.val_set, self.eval_kwargs = val_set, eval_kwargs
        self.sampler = torch.utils.data.DistributedSampler(
            train_set, num_replicas=procs.world_size, rank=procs.rank, shuffle=True, seed=args.seed
        )
        self.augmented = AugmentedDataset(train_set, args.image_size, args.seed, args.scale_range)
        self.batches_per_epoch = math.ceil(len(self.sampler) / args.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / args.grad_accum)
        self.total_steps = args.steps or (args.epochs or 10) * self.steps_per_epoch
        self.scheduler = build_scheduler(optimizer, args.schedule, self.total_steps, args.warmup_steps)
        self.state: dict[str, Any] = {
            "step": 0,
            "epoch": 0,
            "batches_done": 0,
            "best_metric": None,
            "best_step": None,
            "elapsed": 0.0,
        }
        self.log: JsonLog | None = None
        self.ddp = model
        if procs.world_size > 1:
            device_ids = [procs.device.index] if procs.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def restore(self, saved: dict[str, Any], folder: Path) -> None:
        if saved["step"] >= self.total_steps:
            raise ValueError(
                f"--resume: {folder} is at step {saved['step']}, which reaches the {self.total_steps} steps asked for; "
                f"raise --steps or --epochs to train further"
            )
        self.optimizer.load_state_dict(saved["optimizer"])
        self.state.update({k: saved[k] for k in self.state})

    def open_log(self, path: Path, baseline: dict[str, float] | None, baseline_class: str) -> None:
        self.log = JsonLog(path)
        self.log.truncate_after(self.state["step"] if self.args.resume else -1)
        if baseline is not None:
            self.log.write({"type": "baseline", "step": 0, "class": baseline_class, **baseline})
        self.log.write(
            {
                "type": "start",
                "step": self.state["step"],
                "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.procs.world_size,
                "device": str(self.procs.device),
                "parameters": self.model.num_parameters(),
                "trainable_parameters": self.model.num_parameters(only_trainable=True),
                "train_images": len(self.augmented),
                "val_images": len(self.val_set),
            }
        )

    def train(self, last: Path, best: Path, baseline: dict[str, float] | None) -> dict[str, float]:
        from tqdm.auto import tqdm

        args, state = self.args, self.state
        self.scheduler.step_update(state["step"])
        self.bar = tqdm(
            total=self.total_steps,
            initial=state["step"],
            desc="train",
            unit="step",
            disable=not self.procs.main or args.no_progress,
        )
        self.start = time.perf_counter() - state["elapsed"]
        self.window = {"loss": 0.0, "count": 0, "images": 0, "since": time.perf_counter()}
        results: dict[str, float] = {}
        while state["step"] < self.total_steps:
            self.train_epoch()
            results = self.evaluate_and_save(last, best, baseline)
        self.bar.close()
        return results

    def train_epoch(self) -> None:
        """Train until the epoch or the run ends (an epoch interrupted by ``--steps`` resumes where it stopped)."""
        args, state, procs = self.args, self.state, self.procs
        self.sampler.set_epoch(state["epoch"])
        self.augmented.set_epoch(state["epoch"])
        indices = list(self.sampler)[state["batches_done"] * args.batch_size :]
        loader = torch.utils.data.DataLoader(
            self.augmented,
            batch_size=args.batch_size,
            sampler=indices,
            num_workers=args.workers,
            collate_fn=TrainCollate(self.processor),
        )
        remaining, micro = len(loader), 0
        for batch in loader:
            if micro == 0:
                torch.manual_seed(step_seed(args.seed, state["step"], procs.rank))
                group = min(args.grad_accum, remaining)
            micro += 1
            remaining -= 1
            sync = micro == group
            no_sync = self.ddp.no_sync() if (not sync and self.ddp is not self.model) else contextlib.nullcontext()
            with no_sync:
                with torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                    loss = self.ddp(
                        pixel_values=batch["pixel_values"].to(procs.device),
                        mask_labels=[m.to(procs.device) for m in batch["mask_labels"]],
                        class_labels=[c.to(procs.device) for c in batch["class_labels"]],
                    ).loss
                (loss / group).backward()
            self.window["loss"] += loss.item() / group
            self.window["images"] += len(batch["pixel_values"]) * procs.world_size
            state["batches_done"] += 1
            if sync:
                micro = 0
                self.optimizer_step()
                if state["step"] >= self.total_steps:
                    break
        if state["batches_done"] >= self.batches_per_epoch:
            state["epoch"] += 1
            state["batches_done"] = 0

    def optimizer_step(self) -> None:
        args, state = self.args, self.state
        if args.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        self.scheduler.step_update(state["step"])
        self.window["count"] += 1
        self.bar.update(1)
        if state["step"] % args.log_every and state["step"] != self.total_steps:
            return
        loss = self.procs.mean(self.window["loss"] / self.window["count"])
        speed = self.window["images"] / (time.perf_counter() - self.window["since"])
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{speed:.1f}", lr=f"{lr:.2e}")
        if self.log is not None:
            record = {"type": "train", "step": state["step"], "epoch": state["epoch"], "loss": loss, "lr": lr}
            self.log.write({**record, "images_per_second": speed, "time": time.perf_counter() - self.start})
        self.window = {"loss": 0.0, "count": 0, "images": 0, "since": time.perf_counter()}

    def evaluate_and_save(self, last: Path, best: Path, baseline: dict[str, float] | None) -> dict[str, float]:
        state, main_metric = self.state, MAIN_METRIC[self.val_set.task]
        eval_start = time.perf_counter()
        results = evaluate(self.model, self.processor, self.val_set, **self.eval_kwargs)
        improved = state["best_metric"] is None or results[main_metric] > state["best_metric"]
        if improved:
            state["best_metric"], state["best_step"] = results[main_metric], state["step"]
        state["elapsed"] = time.perf_counter() - self.start
        if self.procs.main:
            record = {"type": "eval", "step": state["step"], "epoch": state["epoch"], **results}
            self.log.write({**record, "eval_seconds": time.perf_counter() - eval_start, "time": state["elapsed"]})
            split = f"{len(self.val_set)} {self.val_set.split} images"
            title = f"step {state['step']}/{self.total_steps}, epoch {state['epoch']}, {split}"
            self.bar.write(format_results(results, baseline, title))
            files = {"eval_results.json": json.dumps({"step": state["step"], **results}, indent=2) + "\n"}
            training_state = {
                **state,
                "optimizer": self.optimizer.state_dict(),
                "seed": self.args.seed,
                "world_size": self.procs.world_size,
                "schedule": {
                    "name": self.args.schedule,
                    "total_steps": self.total_steps,
                    "warmup_steps": self.args.warmup_steps,
                },
            }
            save_checkpoint(last, self.model, self.processor, training_state, files)
            if improved:
                save_checkpoint(best, self.model, self.processor, None, files)
        self.procs.barrier()
        return results


if __name__ == "__main__":
    sys.exit(main())
