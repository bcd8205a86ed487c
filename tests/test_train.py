"""``timm-backbone train``: the generated datasets and their readers, augmentation, metrics, the training loop on each
layout (log, checkpoints, resume, evaluation), the optimizer and schedule wiring, every input error, and two
``torchrun`` processes."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from timm_backbone import MaskFormerForInstanceSegmentation, MaskFormerImageProcessor, TimmBackbone, TimmBackboneConfig
from timm_backbone.checkpoint import STATE_NAME, load_training_state, recover_folder, replace_folder
from timm_backbone.cli import build_parser
from timm_backbone.cli import main as cli_main
from timm_backbone.datasets import IGNORE_INDEX, Sample, build_dataset, check_dataset
from timm_backbone.datasets.synthetic import main as synthetic_main
from timm_backbone.datasets.synthetic import write_dataset
from timm_backbone.datasets.transforms import AugmentedDataset, random_resized_crop_flip
from timm_backbone.evaluation import SegmentationMetrics
from timm_backbone.train import (
    build_optimizer,
    build_scheduler,
    freeze_backbone_stages,
    run,
)

pytest.importorskip("torchmetrics")
pytest.importorskip("scipy")

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("ade20k", "folder", "coco-panoptic")
HEAD = ["--fpn-dim", "32", "--hidden-dim", "32", "--num-queries", "8", "--decoder-layers", "2"]
RUN = ["--image-size", "64", "--batch-size", "4", "--workers", "0", "--log-every", "1", "--lr", "1e-3"]
RUN += ["--no-progress", "--threads", "1"]
TINY = ["--backbone", "test_resnet", *HEAD, *RUN]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Each layout: 8 training and 4 validation images of about 64 px."""
    root = tmp_path_factory.mktemp("data")
    return {fmt: write_dataset(root / fmt, fmt, train=8, val=4, size=64, seed=0) for fmt in FORMATS}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """``trained(fmt)``: one 2-epoch run per layout, made on first use and shared (tests only read it)."""
    runs = {}

    def get(fmt: str):
        if fmt not in runs:
            out = tmp_path_factory.mktemp(f"run-{fmt}") / "run"
            runs[fmt] = out, train(data[fmt], fmt, out, "--epochs", "2")
        return runs[fmt]

    return get


def _copy(data: dict[str, Path], fmt: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(data[fmt], tmp_path / f"{fmt}-copy"))


def _args(data_dir: Path, fmt: str, output: Path, *extra: object, base: list[str] = TINY):
    argv = ["train", "--data", data_dir, "--format", fmt, "--output", output, *base, *extra]
    return build_parser().parse_args([str(a) for a in argv])


def train(data_dir: Path, fmt: str, output: Path, *extra: object, base: list[str] = TINY):
    return run(_args(data_dir, fmt, output, *extra, base=base))


def _records(output: Path, kind: str | None = None) -> list[dict]:
    lines = (output / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r for r in records if kind is None or r["type"] == kind]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# generated data and readers -------------------------------------------------------------------------------------------
def test_generator_writes_each_layout_reproducibly(data, tmp_path):
    ade = data["ade20k"]
    assert sorted(p.name for p in (ade / "images" / "training").iterdir())[:1] == ["ADE_training_00000001.jpg"]
    assert len(list((ade / "annotations" / "validation").glob("*.png"))) == 4
    assert json.loads((ade / "id2label.json").read_text()) == {
        "0": "background",
        "1": "circle",
        "2": "square",
        "3": "triangle",
    }
    labels = np.asarray(Image.open(next((ade / "annotations" / "training").glob("*.png"))))
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4} and 0 in labels and 1 in labels  # borders unlabelled
    folder = np.asarray(Image.open(data["folder"] / "masks" / "train" / "00000.png"))
    assert set(np.unique(folder)) <= {0, 1, 2, 3, 255} and 255 in folder
    coco = json.loads((data["coco-panoptic"] / "annotations" / "panoptic_train2017.json").read_text())
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 200]
    assert [c["isthing"] for c in coco["categories"]] == [1, 1, 1, 0]
    # the same seed writes the same files; another seed others
    again = write_dataset(tmp_path / "again", "folder", train=8, val=4, size=64, seed=0)
    other = write_dataset(tmp_path / "other", "folder", train=8, val=4, size=64, seed=1)
    name = Path("masks/train/00003.png")
    assert (again / name).read_bytes() == (data["folder"] / name).read_bytes()
    assert (other / name).read_bytes() != (data["folder"] / name).read_bytes()


def test_generator_command_line(tmp_path, capsys):
    assert (
        synthetic_main([str(tmp_path / "s"), "--format", "folder", "--train", "2", "--val", "1", "--size", "32"]) == 0
    )
    assert "wrote 2 training and 1 validation images (folder layout)" in capsys.readouterr().out
    assert synthetic_main([str(tmp_path / "t"), "--format", "folder", "--train", "0"]) == 2
    assert "train >= 1" in capsys.readouterr().err


def test_readers_see_the_same_classes_in_every_layout(data):
    ade, folder, coco = (build_dataset(f, data[f], "val") for f in FORMATS)
    assert len(ade) == len(folder) == len(coco) == 4
    assert ade.processor_kwargs == {"ignore_index": 255, "do_reduce_labels": True}
    assert coco.thing_ids == {0, 1, 2} and coco.id2label[3] == "background"
    for i in range(4):
        a, f, c = ade[i], folder[i], coco[i]
        torch.testing.assert_close(a.image, f.image)
        assert a.image.dtype == torch.uint8 and a.image.shape[0] == 3
        classes_a = ade.class_map(a.segmentation, None)
        torch.testing.assert_close(classes_a, folder.class_map(f.segmentation, None))
        # panoptic: things are classes 0..2 and background 3 (semantic: background 0, shapes 1..3)
        classes_c = coco.class_map(c.segmentation, c.instance_classes)
        both = (classes_a != IGNORE_INDEX) & (classes_c != IGNORE_INDEX)
        torch.testing.assert_close(classes_c[both], (classes_a[both] - 1) % 4)
        assert set(c.instance_classes.values()) <= {0, 1, 2, 3} and c.segmentation.max() >= 200000
    counts = check_dataset(folder, progress=False)
    assert counts.sum() == sum(int((folder.class_map(folder[i].segmentation, None) != 255).sum()) for i in range(4))


def test_augmentation_keeps_image_and_labels_aligned_and_replays():
    labels = torch.zeros(48, 80, dtype=torch.int64)
    labels[10:40, 5:35], labels[5:30, 50:75] = 1, 2
    image = (labels * 100).to(torch.uint8)[None].expand(3, -1, -1).clone()
    sample = Sample(image, labels, None, "x")
    out = random_resized_crop_flip(sample, 32, torch.Generator().manual_seed(3), fill=255)
    assert out.image.shape == (3, 32, 32) and out.segmentation.shape == (32, 32)
    assert set(out.segmentation.unique().tolist()) <= {0, 1, 2, 255}
    labelled = out.segmentation != 255
    # away from region edges (which antialiasing blurs) each pixel shows its own label
    neighbourhood = torch.nn.functional.max_pool2d(out.segmentation[None].float(), 3, 1, 1)
    inner = labelled & (
        neighbourhood[0] == -torch.nn.functional.max_pool2d(-out.segmentation[None].float(), 3, 1, 1)[0]
    )
    error = out.image[0][inner].int() - out.segmentation[inner] * 100
    assert inner.sum() > 200 and (error.abs() <= 10).all()
    assert (out.image[:, ~labelled] == 0).all()  # padding

    class One(torch.utils.data.Dataset):
        fill_value = 255

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return sample

    augmented = AugmentedDataset(One(), 32, seed=0)
    first = augmented[0]
    assert torch.equal(first.image, augmented[0].image)
    augmented.set_epoch(1)
    assert not torch.equal(first.segmentation, augmented[0].segmentation)


# metrics --------------------------------------------------------------------------------------------------------------
def _panoptic_maps() -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.zeros(8, 8, 2, dtype=torch.long)
    target[..., 0] = 3  # stuff
    target[:4, :4] = torch.tensor([1, 5])
    target[5:, 5:] = torch.tensor([0, 7])
    prediction = target.clone()
    prediction[:3, :5] = torch.tensor([1, 5])
    prediction[6:, :2] = torch.tensor([2, 9])
    return prediction, target


def test_panoptic_metrics_are_torchmetrics_and_count_unpredicted_segments():
    from torchmetrics.detection import PanopticQuality

    prediction, target = _panoptic_maps()
    ours = SegmentationMetrics("panoptic", 4, [0, 1, 2])
    ours.update(prediction, target)
    plain = PanopticQuality({0, 1, 2}, {3}, return_sq_and_rq=True)
    expected = plain(prediction[None], target[None]).tolist()
    assert list(ours.compute().values()) == pytest.approx(expected)
    nothing = torch.stack([torch.full((8, 8), 4), torch.zeros(8, 8, dtype=torch.long)], -1)  # no segment anywhere
    ours = SegmentationMetrics("panoptic", 4, [0, 1, 2])
    ours.update(nothing, target)
    assert ours.compute() == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    ours = SegmentationMetrics("panoptic", 4, [0, 1, 2])
    ours.update(target, target)
    assert ours.compute() == {"pq": 1.0, "sq": 1.0, "rq": 1.0}


def test_semantic_metrics_ignore_unlabelled_pixels():
    target = torch.tensor([[0, 0, 1, 1], [0, 255, 1, 2]])
    prediction = torch.tensor([[0, 0, 1, 0], [0, 2, 1, 2]])
    metrics = SegmentationMetrics("semantic", 3)
    metrics.update(prediction, target)
    result = metrics.compute()
    # IoU: class 0 3/4, class 1 2/3, class 2 1/1; accuracy 6 of 7 labelled pixels
    assert result["miou"] == pytest.approx((3 / 4 + 2 / 3 + 1) / 3)
    assert result["pixel_accuracy"] == pytest.approx(6 / 7)


# training on each layout ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_train_each_layout_logs_evaluates_and_saves(data, trained, fmt):
    out, result = trained(fmt)
    types = [r["type"] for r in _records(out)]
    assert types == ["baseline", "start", "train", "train", "eval", "train", "train", "eval"]
    start = _records(out, "start")[0]
    assert start["total_steps"] == 4 and start["steps_per_epoch"] == 2 and start["world_size"] == 1
    trains = _records(out, "train")
    assert [r["step"] for r in trains] == [1, 2, 3, 4] and [r["epoch"] for r in trains] == [0, 0, 1, 1]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 and r["images_per_second"] > 0 for r in trains)
    assert trains[-1]["lr"] == 0.0 < trains[0]["lr"] <= 1e-3  # poly schedule down to zero
    keys = {"miou", "pixel_accuracy"} if fmt != "coco-panoptic" else {"pq", "sq", "rq"}
    evals = _records(out, "eval")
    assert [r["step"] for r in evals] == [2, 4]
    for record in [*evals, _records(out, "baseline")[0]]:
        assert keys <= set(record) and all(0.0 <= record[k] <= 1.0 for k in keys), record
    assert result.metrics == {k: evals[-1][k] for k in keys} and result.step == 4
    # the background is the most frequent class; predicting it everywhere is the constant baseline
    assert _records(out, "baseline")[0]["class"] == "background"
    # checkpoints: last holds the training state, best the better of the two evaluations
    main = "pq" if fmt == "coco-panoptic" else "miou"
    state = load_training_state(out / "last" / STATE_NAME)
    assert (state["step"], state["epoch"], state["batches_done"]) == (4, 2, 0)
    assert state["best_metric"] == max(r[main] for r in evals)
    assert json.loads((out / "best" / "eval_results.json").read_text())["step"] == state["best_step"]
    assert not (out / "best" / STATE_NAME).exists()
    loaded = MaskFormerForInstanceSegmentation.from_pretrained(out / "last", strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = result.model.eval()(x)
        actual = loaded(x)
    torch.testing.assert_close(actual.masks_queries_logits, expected.masks_queries_logits, rtol=0, atol=0)
    torch.testing.assert_close(actual.class_queries_logits, expected.class_queries_logits, rtol=0, atol=0)
    processor = MaskFormerImageProcessor.from_pretrained(out / "last")
    assert processor.size == {"height": 64, "width": 64} and processor.num_labels == loaded.config.num_labels
    assert processor.do_reduce_labels == (fmt == "ade20k")
    assert loaded.config.id2label == build_dataset(fmt, data[fmt], "val").id2label


def test_eval_only_scores_the_saved_model_again(data, trained, tmp_path, capsys):
    run_dir, result = trained("folder")
    out = Path(shutil.copytree(run_dir, tmp_path / "run"))
    capsys.readouterr()
    again = train(data["folder"], "folder", out, "--eval-only", base=RUN)  # OUTPUT/last
    assert again.metrics == result.metrics and again.step == 4
    record = _records(out)[-1]
    assert record["type"] == "eval" and record["checkpoint"] == str(out / "last") and record["step"] == 4
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "pixel accuracy" in printed and "constant" in printed
    best = train(data["folder"], "folder", tmp_path / "best", "--eval-only", "--checkpoint", out / "best", base=RUN)
    best_step = json.loads((out / "best" / "eval_results.json").read_text())["step"]
    assert best.metrics == {k: v for k, v in _records(out, "eval")[best_step // 2 - 1].items() if k in best.metrics}


def test_config_file_builds_the_model(data, trained, tmp_path):
    out, _ = trained("folder")
    config = json.loads((out / "last" / "config.json").read_text())
    config["decoder_config"]["num_queries"] = 5
    config["id2label"] = {"0": "only"}  # the dataset's classes replace the file's
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = train(
        data["folder"], "folder", tmp_path / "run", "--eval-only", base=["--config", tmp_path / "config.json", *RUN]
    )
    assert result.model.config.num_queries == 5 and result.model.config.id2label[3] == "triangle"
    assert result.model.class_predictor.out_features == 5  # 4 classes + no object
    assert 0.0 <= result.metrics["miou"] <= 1.0


def test_resume_continues_from_the_saved_step(data, tmp_path):
    out = tmp_path / "run"
    train(data["ade20k"], "ade20k", out, "--steps", "1")  # stops inside the first epoch
    state = load_training_state(out / "last" / STATE_NAME)
    assert (state["step"], state["epoch"], state["batches_done"]) == (1, 0, 1)
    result = train(data["ade20k"], "ade20k", out, "--steps", "3", "--resume", base=RUN)  # model from OUTPUT/last
    assert result.step == 3
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3]
    assert [r["step"] for r in _records(out, "start")] == [0, 1]
    assert [r["epoch"] for r in _records(out, "eval")] == [0, 1, 1]  # epoch 0 finishes at step 2
    with pytest.raises(ValueError, match="reaches the 3 steps"):
        train(data["ade20k"], "ade20k", out, "--steps", "3", "--resume", base=RUN)


def test_resumed_run_equals_an_uninterrupted_one(data, tmp_path, monkeypatch):
    """Bit for bit: data order and augmentation are seeded per epoch, dropout (on here) per step."""
    whole = tmp_path / "whole"
    train(data["folder"], "folder", whole, "--epochs", "2", "--dropout", "0.1")

    import timm_backbone.train as train_module

    calls = []
    save = train_module.save_checkpoint

    def crash_after_first_epoch(*args, **kwargs):
        calls.append(args[0])
        if len(calls) > 2:  # epoch 1 saved last and best; the run dies in epoch 2's save
            raise KeyboardInterrupt
        save(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_first_epoch)
    parts = tmp_path / "parts"
    with pytest.raises(KeyboardInterrupt):
        train(data["folder"], "folder", parts, "--epochs", "2", "--dropout", "0.1")
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    assert load_training_state(parts / "last" / STATE_NAME)["step"] == 2
    train(data["folder"], "folder", parts, "--epochs", "2", "--resume", "--dropout", "0.1")
    expected, actual = _weights(whole / "last"), _weights(parts / "last")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    losses = [(r["step"], r["loss"]) for r in _records(parts, "train")]
    assert losses == [(r["step"], r["loss"]) for r in _records(whole, "train")]


def test_bf16_and_gradient_accumulation(data, tmp_path):
    """8 images in batches of 3 (3 + 3 + 2), two batches per step: 2 steps per epoch, the last of one batch."""
    out = tmp_path / "run"
    result = train(
        data["folder"], "folder", out, "--epochs", "1", "--batch-size", "3", "--grad-accum", "2", "--precision", "bf16"
    )
    start = _records(out, "start")[0]
    assert start["steps_per_epoch"] == 2 and start["total_steps"] == 2 and result.step == 2
    losses = [r["loss"] for r in _records(out, "train")]
    assert len(losses) == 2 and all(np.isfinite(losses)) and all(loss > 0 for loss in losses)
    assert load_training_state(out / "last" / STATE_NAME)["epoch"] == 1
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast, weights stay fp32


def test_checkpoint_loads_in_transformers(data, tmp_path):
    transformers = pytest.importorskip("transformers")
    from timm_backbone import ResNetConfig

    backbone = tmp_path / "resnet"
    ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]).save_pretrained(backbone)
    out = tmp_path / "run"
    result = train(data["ade20k"], "ade20k", out, "--steps", "2", base=["--backbone", str(backbone), *HEAD, *RUN])
    hf, info = transformers.MaskFormerForInstanceSegmentation.from_pretrained(out / "last", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.config.id2label[1] == "circle"
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    hf_inputs = transformers.MaskFormerImageProcessor.from_pretrained(out / "last")(image, return_tensors="pt")
    ours = result.processor(image, return_tensors="pt")
    torch.testing.assert_close(hf_inputs["pixel_values"], ours["pixel_values"], atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = result.model.eval()(ours["pixel_values"]).masks_queries_logits
        # transformers computes the auxiliary logits the config asks for only with output_hidden_states=True
        actual = hf.eval()(hf_inputs["pixel_values"], output_hidden_states=True).masks_queries_logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


# backbone options -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["folder", "hub id"])
def test_pretrained_backbone_weights_reach_the_model(data, tmp_path, monkeypatch, source):
    from hub_cache import make_hub_cache, use_hub_cache

    torch.manual_seed(7)
    backbone = TimmBackbone(TimmBackboneConfig("test_resnet"))
    backbone.save_pretrained(tmp_path / "backbone")
    src = str(tmp_path / "backbone")
    if source == "hub id":  # from the offline hub cache, as a user's download would be found
        make_hub_cache(tmp_path / "hub", "org/tiny-resnet", tmp_path / "backbone")
        use_hub_cache(monkeypatch, tmp_path / "hub")
        src = "org/tiny-resnet"
    base = ["--backbone", src, "--pretrained-backbone", *HEAD, *RUN]
    result = train(data["folder"], "folder", tmp_path / "run", "--eval-only", base=base)
    encoder = result.model.model.pixel_level_module.encoder.state_dict()
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(encoder[key], value, rtol=0, atol=0, msg=key)
    missing = ["--backbone", str(tmp_path / "nope"), "--pretrained-backbone", *HEAD, *RUN]
    with pytest.raises(OSError, match="nope"):
        train(data["folder"], "folder", tmp_path / "run2", "--eval-only", base=missing)


def test_frozen_stages_freeze_the_backbone(data, trained, tmp_path):
    model = MaskFormerForInstanceSegmentation.from_pretrained(trained("folder")[0] / "last")
    model.model.pixel_level_module.encoder = torch.nn.Identity()  # a backbone without freeze_stages
    with pytest.raises(ValueError, match="--frozen-stages: Identity does not support freezing stages yet"):
        freeze_backbone_stages(model, 1)
    out = tmp_path / "b"
    result = train(data["folder"], "folder", out, "--steps", "1", "--frozen-stages", "1", "--lr", "0.1")
    start = _records(out, "start")[0]
    assert 0 < start["trainable_parameters"] < start["parameters"]
    encoder = result.model.model.pixel_level_module.encoder
    assert encoder.config.frozen_stages == 1
    frozen = {n for n, p in encoder.named_parameters() if not p.requires_grad}
    stem_and_stage1 = {id(p) for i in (0, 1) for p in encoder.stage_parameters(i)}
    assert {id(p) for n, p in encoder.named_parameters() if n in frozen} == stem_and_stage1
    assert all(p.grad is None for n, p in encoder.named_parameters() if n in frozen)


def test_layer_decay_uses_the_models_group_matcher(data, tmp_path):
    with pytest.raises(ValueError, match=r"--layer-decay needs a model that groups its layers .*Linear has none"):
        build_optimizer(torch.nn.Linear(2, 2), lr=1.0, weight_decay=0.05, layer_decay=0.5)
    result = train(data["folder"], "folder", tmp_path / "b", "--steps", "1", "--layer-decay", "0.5")
    model = result.model
    optimizer = build_optimizer(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in optimizer.param_groups})
    assert len(scales) >= 3 and scales[-1] == 1.0 and scales[0] < 1.0
    by_id = {id(p): n for n, p in model.named_parameters()}
    head = [g["lr_scale"] for g in optimizer.param_groups for p in g["params"] if "encoder." not in by_id[id(p)]]
    assert set(head) == {1.0}  # the head is the last group: full learning rate
    scheduler = build_scheduler(optimizer, "cosine", total_steps=10, warmup_steps=0)
    scheduler.step_update(0)
    assert all(g["lr"] == pytest.approx(g["lr_scale"]) for g in optimizer.param_groups)
    decay = {g["weight_decay"] for g in optimizer.param_groups}
    assert decay == {0.0, 0.05}  # biases and norms are not decayed


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_schedules_warm_up_then_decay_to_zero(schedule):
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    scheduler = build_scheduler(optimizer, schedule, total_steps=100, warmup_steps=10)
    lrs = []
    for step in range(101):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.05) and lrs[9] == pytest.approx(0.09)  # linear warm-up
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:])) and lrs[100] == pytest.approx(0.0, abs=1e-9)
    # the decay runs over all 100 steps, warm-up included: cosine halves at 50, poly (power 0.9) is a bit above
    assert lrs[50] == pytest.approx(0.05 if schedule == "cosine" else 0.1 * 0.5**0.9)


# files ----------------------------------------------------------------------------------------------------------------
def test_checkpoint_folders_are_replaced_whole(tmp_path):
    folder = tmp_path / "last"
    replace_folder(folder, lambda tmp: (tmp / "a.txt").write_text("one"))

    def broken(tmp):
        (tmp / "a.txt").write_text("two")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_folder(folder, broken)
    assert (folder / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    folder.rename(tmp_path / ".last.old")  # a crash between the two renames
    recover_folder(folder)
    assert (folder / "a.txt").read_text() == "one"


def test_training_state_holds_plain_data_only(trained, tmp_path):
    out, _ = trained("folder")
    state = torch.load(out / "last" / STATE_NAME, weights_only=True)
    assert state["optimizer"]["state"] and state["seed"] == 0 and state["schedule"]["total_steps"] == 4
    torch.save({"step": 1, "optimizer": torch.nn.Linear(1, 1)}, tmp_path / "bad.pt")
    with pytest.raises(OSError, match="weights_only"):
        load_training_state(tmp_path / "bad.pt")


# errors before training -----------------------------------------------------------------------------------------------
def _put_label(path: Path, value: int) -> None:
    labels = np.asarray(Image.open(path)).copy()
    labels[0, 0] = value
    Image.fromarray(labels).save(path)


def _bad_data(kind: str, data: dict[str, Path], tmp_path: Path) -> tuple[str, Path]:
    if kind == "missing folder":
        return "ade20k", tmp_path / "absent"
    if kind == "missing split":
        root = _copy(data, "ade20k", tmp_path)
        shutil.rmtree(root / "annotations" / "validation")
        return "ade20k", root
    if kind == "image without mask":
        root = _copy(data, "folder", tmp_path)
        (root / "masks" / "train" / "00002.png").unlink()
        return "folder", root
    if kind == "label outside classes":
        root = _copy(data, "folder", tmp_path)
        _put_label(root / "masks" / "train" / "00001.png", 9)
        return "folder", root
    if kind == "ade label outside classes":
        root = _copy(data, "ade20k", tmp_path)
        _put_label(root / "annotations" / "training" / "ADE_training_00000003.png", 7)
        return "ade20k", root
    if kind == "unreadable image":
        root = _copy(data, "folder", tmp_path)
        (root / "images" / "val" / "00001.jpg").write_bytes(b"not a jpeg")
        return "folder", root
    if kind == "size mismatch":
        root = _copy(data, "folder", tmp_path)
        Image.new("RGB", (10, 10)).save(root / "images" / "train" / "00004.jpg")
        return "folder", root
    if kind == "no class names":
        root = _copy(data, "folder", tmp_path)
        (root / "id2label.json").unlink()
        return "folder", root
    root = _copy(data, "coco-panoptic", tmp_path)
    path = root / "annotations" / "panoptic_train2017.json"
    coco = json.loads(path.read_text())
    if kind == "unknown category":
        coco["annotations"][0]["segments_info"][0]["category_id"] = 77
    elif kind == "segment without info":
        coco["annotations"][1]["segments_info"] = coco["annotations"][1]["segments_info"][:1]
    elif kind == "missing segment png":
        (root / "annotations" / "panoptic_train2017" / coco["annotations"][2]["file_name"]).unlink()
    path.write_text(json.dumps(coco))
    return "coco-panoptic", root


BAD_DATA = [
    ("missing folder", OSError, r"absent is not a folder; the layout expected is:\nROOT/images/training"),
    ("missing split", OSError, r"annotations/validation is not a folder"),
    ("image without mask", OSError, r"1 images in .*images/train have no label file .*: 00002\.jpg"),
    (
        "label outside classes",
        ValueError,
        r"00001\.png holds labels \[9\] outside the 4 classes \(valid: 0\.\.3 and 255",
    ),
    (
        "ade label outside classes",
        ValueError,
        r"ADE_training_00000003\.png holds labels \[7\] .*1\.\.4 for the classes",
    ),
    ("unreadable image", OSError, r"cannot read image .*val/00001\.jpg"),
    ("size mismatch", ValueError, r"00004\.jpg is \(10, 10\) but its labels 00004\.png are"),
    ("no class names", ValueError, r"has no id2label\.json: pass --num-labels"),
    ("unknown category", ValueError, r"segments of category ids \[77\] that are not in its categories"),
    ("segment without info", ValueError, r"holds segment ids \[\d+(, \d+)*\] that its segments_info does not list"),
    ("missing segment png", OSError, r"1 images of panoptic_train2017\.json have no segment PNG .*: 000000000003\.png"),
]


@pytest.mark.parametrize(("kind", "error", "message"), BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_fails_before_training(data, tmp_path, kind, error, message):
    fmt, root = _bad_data(kind, data, tmp_path)
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        train(root, fmt, out, "--steps", "1")
    assert not out.exists()


def test_num_labels_settles_unnamed_classes(data, tmp_path):
    fmt, root = _bad_data("no class names", data, tmp_path)
    assert build_dataset(fmt, root, "val", num_labels=4).id2label[3] == "class_3"
    with pytest.raises(ValueError, match=r"--num-labels is 5 but .* names 4 classes"):
        build_dataset("folder", data["folder"], "val", num_labels=5)
    with pytest.raises(ValueError, match="valid formats: ade20k, folder, coco-panoptic"):
        build_dataset("voc", data["folder"], "val")


def test_resume_refuses_another_model(data, trained, tmp_path):
    out, _ = trained("folder")
    before = (out / "log.jsonl").read_text()
    with pytest.raises(OSError, match=r"already holds a run .*pass --resume"):
        train(data["folder"], "folder", out, "--steps", "6")
    with pytest.raises(ValueError, match=r"holds another model .*decoder_config\.num_queries: 8 vs 4"):
        train(data["folder"], "folder", out, "--steps", "6", "--resume", "--num-queries", "4")
    with pytest.raises(ValueError, match=r"backbone_config\.backbone: 'test_resnet' vs 'resnet10t'"):
        train(data["folder"], "folder", out, "--steps", "6", "--resume", "--backbone", "resnet10t")
    with pytest.raises(OSError, match="holds no training state"):
        train(data["folder"], "folder", tmp_path / "fresh", "--steps", "2", "--resume")
    assert (out / "log.jsonl").read_text() == before  # nothing was trained or logged by the refusals


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image-size", "50"], "--image-size must be a positive multiple of 32"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--resume", "--eval-only"], "exclude each other"),
        (["--config", "x.json"], "--config already names the backbone"),
    ],
)
def test_bad_arguments(data, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train(data["folder"], "folder", tmp_path / "run", "--steps", "1", *extra)


def test_command_line_reports_errors_in_one_message(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "--backbone" in capsys.readouterr().out
    argv = ["train", "--data", str(data["folder"]), "--output", str(tmp_path / "run"), *TINY]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--format", "voc"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'voc'" in capsys.readouterr().err
    assert cli_main([*argv, "--format", "ade20k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("timm-backbone train: error: ") and "images/validation is not a folder" in err
    assert len(err.strip().splitlines()) == 4  # the message and the three lines of the layout


# many processes -------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(data_dir: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(_free_port()), "-m", "timm_backbone.train", "--data", str(data_dir)]
    command += ["--format", "folder", "--output", str(output), *TINY, "--batch-size", "2", *extra]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_processes_train_resume_and_evaluate(data, tmp_path):
    out = tmp_path / "run"
    done = _torchrun(data["folder"], out, "--steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    # rank 0 alone writes: one baseline, one start, one record per step
    assert [r["type"] for r in _records(out)] == ["baseline", "start", "train", "train", "eval"]
    start = _records(out, "start")[0]
    assert start["world_size"] == 2 and start["steps_per_epoch"] == 2  # 8 images / 2 processes / batch 2
    assert done.stdout.count("pixel accuracy") == 1
    done = _torchrun(data["folder"], out, "--steps", "4", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3, 4]
    state = load_training_state(out / "last" / STATE_NAME)
    assert state["step"] == 4 and state["world_size"] == 2
    # the metrics reduced over both processes equal one process scoring all four images
    alone = train(data["folder"], "folder", tmp_path / "alone", "--eval-only", "--checkpoint", out / "last", base=RUN)
    distributed = _records(out, "eval")[-1]
    assert alone.metrics == pytest.approx({k: distributed[k] for k in alone.metrics}, abs=1e-6)
    assert MaskFormerForInstanceSegmentation.from_pretrained(out / "last", strict=True).config.num_labels == 4
