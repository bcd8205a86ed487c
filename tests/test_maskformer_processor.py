"""MaskFormerImageProcessor against transformers' (torchvision backend) on the same inputs and model outputs."""

import functools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from timm_backbone.models.maskformer.image_processing import MaskFormerImageProcessor, output_size

transformers = pytest.importorskip("transformers")
Reference = transformers.MaskFormerImageProcessor

SIZES = [(50, 70), (90, 40)]


def _images(kind: str, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]
    if kind == "numpy":
        return arrays
    if kind == "pil":
        return [Image.fromarray(a) for a in arrays]
    if kind == "torch":
        return [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]
    if kind == "float":
        return [a.astype(np.float32) / 255 for a in arrays]
    raise AssertionError(kind)


def _maps(num_ids: int = 5, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # blocky maps so nearest resizing keeps every id
    return [np.kron(rng.integers(0, num_ids, (h // 10, w // 10)), np.ones((10, 10))).astype(np.uint8) for h, w in SIZES]


CONFIGS = [
    {"size": {"shortest_edge": 64, "longest_edge": 100}},
    {"size": {"shortest_edge": 64, "longest_edge": 100}, "size_divisor": 0},
    {"size": {"height": 48, "width": 80}, "size_divisor": 16},
    {"size": {"max_height": 60, "max_width": 60}, "size_divisor": 0},
    {
        "size": {"shortest_edge": 32, "longest_edge": 200},
        "resample": 3,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    },
    {"size": {"height": 40, "width": 40}, "do_normalize": False},
    {"do_resize": False, "size_divisor": 0},
    {"size": {"shortest_edge": 48, "longest_edge": 100}, "pad_size": {"height": 128, "width": 160}},
]


def _assert_batch_equal(ours, ref, atol: float = 1e-5) -> None:
    assert ours.pixel_values.shape == ref.pixel_values.shape
    assert ours.pixel_values.dtype == torch.float32
    torch.testing.assert_close(ours.pixel_values, ref.pixel_values, atol=atol, rtol=0)
    torch.testing.assert_close(ours.pixel_mask, ref.pixel_mask, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("kind", ["numpy", "pil", "torch"])
def test_pixel_values_match_transformers(kwargs, kind):
    ours = MaskFormerImageProcessor(**kwargs)(_images(kind), return_tensors="pt")
    ref = Reference(**kwargs)(_images(kind), return_tensors="pt")
    # uint8 images are resized as uint8 in both, so the values agree bit for bit
    _assert_batch_equal(ours, ref, atol=0)


def test_float_images_match_transformers():
    kwargs = {"size": {"shortest_edge": 40, "longest_edge": 80}, "do_rescale": False}
    _assert_batch_equal(
        MaskFormerImageProcessor(**kwargs)(_images("float"), return_tensors="pt"),
        Reference(**kwargs)(_images("float"), return_tensors="pt"),
    )


def test_single_image_and_batched_tensor():
    image = _images("torch")[0]
    proc = MaskFormerImageProcessor(size={"height": 32, "width": 32})
    single, batched = proc(image, return_tensors="pt"), proc(torch.stack([image, image]), return_tensors="pt")
    assert single.pixel_values.shape == (1, 3, 32, 32)
    torch.testing.assert_close(batched.pixel_values, single.pixel_values.expand(2, -1, -1, -1))
    assert batched["pixel_mask"].dtype == torch.int64 and bool(batched.pixel_mask.all())


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"ignore_index": 0},
        {"ignore_index": 255, "do_reduce_labels": True, "size_divisor": 0},
        {"size": {"height": 48, "width": 80}, "ignore_index": 3},
    ],
)
def test_semantic_targets_match_transformers(kwargs):
    kwargs = {"size": {"shortest_edge": 64, "longest_edge": 100}, **kwargs}
    ours = MaskFormerImageProcessor(**kwargs)(_images("numpy"), _maps(), return_tensors="pt")
    ref = Reference(**kwargs)(_images("numpy"), _maps(), return_tensors="pt")
    _assert_batch_equal(ours, ref, atol=0)
    for i, (mine, theirs) in enumerate(zip(ours.mask_labels, ref.mask_labels)):
        assert mine.dtype == torch.float32 and mine.shape == theirs.shape
        height, width = ref.pixel_mask[i].sum(0).max(), ref.pixel_mask[i].sum(1).max()
        torch.testing.assert_close(mine[:, :height, :width], theirs[:, :height, :width], atol=0, rtol=0)
        # padding holds no mask pixels here; transformers fills it with ignore_index (see test below)
        assert mine.sum() == mine[:, :height, :width].sum()
    for mine, theirs in zip(ours.class_labels, ref.class_labels):
        assert mine.dtype == torch.int64
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)
    expected = {(): [0, 1, 2, 3, 4], (0,): [1, 2, 3, 4], (255,): [0, 1, 2, 3], (3,): [0, 1, 2, 4]}
    key = (kwargs["ignore_index"],) if "ignore_index" in kwargs else ()
    assert ours.class_labels[0].tolist() == expected[key]


def test_mask_labels_padding_is_zero_not_ignore_index():
    """Deliberate difference: transformers pads the binary masks with ignore_index (255), which a mask loss would
    read as a target of 255; here padding is 0, a pixel no mask covers."""
    kwargs = {"size": {"shortest_edge": 64, "longest_edge": 100}, "ignore_index": 255}
    ours = MaskFormerImageProcessor(**kwargs)(_images("numpy"), _maps(), return_tensors="pt")
    ref = Reference(**kwargs)(_images("numpy"), _maps(), return_tensors="pt")
    valid = ref.pixel_mask[0].bool()
    torch.testing.assert_close(ours.mask_labels[0][:, valid], ref.mask_labels[0][:, valid], atol=0, rtol=0)
    assert set(ref.mask_labels[0][:, ~valid].unique().tolist()) == {255.0}
    assert set(ours.mask_labels[0][:, ~valid].unique().tolist()) == {0.0}


@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("per_image", [False, True])
def test_instance_targets_match_transformers(reduce, per_image):
    maps = _maps(num_ids=6, seed=2)  # instance ids 0..5, 0 is background
    mapping = {0: 0, 1: 3, 2: 1, 3: 3, 4: 2, 5: 1} if not reduce else {0: 9, 1: 4, 2: 2, 3: 4, 4: 3, 5: 2}
    mappings = [mapping, {**mapping, 1: mapping[2]}] if per_image else mapping
    kwargs = {"size": {"shortest_edge": 64, "longest_edge": 100}, "ignore_index": 255 if reduce else 0}
    kwargs["do_reduce_labels"] = reduce
    ours = MaskFormerImageProcessor(**kwargs)(
        _images("numpy"), maps, instance_id_to_semantic_id=mappings, return_tensors="pt"
    )
    ref = Reference(**kwargs)(_images("numpy"), maps, instance_id_to_semantic_id=mappings, return_tensors="pt")
    for i in range(2):
        valid = ref.pixel_mask[i].bool()
        torch.testing.assert_close(ours.mask_labels[i][:, valid], ref.mask_labels[i][:, valid], atol=0, rtol=0)
        torch.testing.assert_close(ours.class_labels[i], ref.class_labels[i], atol=0, rtol=0)
    assert ours.class_labels[0].tolist() == [3, 1, 3, 2, 1]  # the reduce mapping is shifted up by one on purpose


def test_missing_instance_id_names_the_known_ids():
    with pytest.raises(ValueError, match=r"instance id 3 .* \(ids there: \[1, 2\]\)"):
        MaskFormerImageProcessor(ignore_index=0)(
            _images("numpy")[:1], _maps()[:1], instance_id_to_semantic_id={1: 0, 2: 1}
        )


# post-processing -----------------------------------------------------------------------------------------------------
def _outputs(batch: int = 2, queries: int = 12, classes: int = 4, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        class_queries_logits=torch.randn(batch, queries, classes + 1, generator=g) * 4,
        masks_queries_logits=torch.randn(batch, queries, 6, 8, generator=g)
        .repeat_interleave(4, -1)
        .repeat_interleave(4, -2)
        * 3,
    )


TARGETS = [None, [(50, 60), (31, 45)]]


def _same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    else:
        assert a == b


@pytest.mark.parametrize("target_sizes", TARGETS)
@pytest.mark.parametrize("scores", [False, True])
def test_semantic_post_processing_matches(target_sizes, scores):
    outputs = _outputs()
    ours = MaskFormerImageProcessor().post_process_semantic_segmentation(outputs, target_sizes, scores)
    ref = Reference().post_process_semantic_segmentation(outputs, target_sizes, scores)
    for i, (mine, theirs) in enumerate(zip(ours, ref)):
        if scores:
            _same(mine.segmentation, theirs.segmentation)
            torch.testing.assert_close(mine["segmentation_scores"], theirs.segmentation_scores)
            mine = mine.segmentation
        expected = target_sizes[i] if target_sizes else (24, 32)
        assert tuple(mine.shape) == tuple(expected)
        _same(mine, theirs if not scores else theirs.segmentation)


@pytest.mark.parametrize("target_sizes", TARGETS)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"threshold": 0.05}, {"threshold": 0.05, "return_binary_maps": True}, {"return_coco_annotation": True}],
)
def test_instance_post_processing_matches(target_sizes, kwargs):
    outputs = _outputs()
    ours = MaskFormerImageProcessor().post_process_instance_segmentation(outputs, target_sizes=target_sizes, **kwargs)
    ref = Reference().post_process_instance_segmentation(outputs, target_sizes=target_sizes, **kwargs)
    assert sum(len(r["segments_info"]) for r in ref) > 0
    for mine, theirs in zip(ours, ref):
        _same(mine["segmentation"], theirs["segmentation"])
        assert mine["segments_info"] == theirs["segments_info"]


@pytest.mark.parametrize("target_sizes", TARGETS)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 0.3, "overlap_mask_area_threshold": 0.5},
        {"threshold": 0.3, "overlap_mask_area_threshold": 0.5, "label_ids_to_fuse": {0, 1, 2, 3}},
        {"threshold": 0.999999},  # nothing kept: a map of -1
    ],
)
def test_panoptic_post_processing_matches(target_sizes, kwargs):
    outputs = _outputs(seed=3)
    kwargs = {"label_ids_to_fuse": set(), **kwargs}
    ours = MaskFormerImageProcessor().post_process_panoptic_segmentation(outputs, target_sizes=target_sizes, **kwargs)
    ref = Reference().post_process_panoptic_segmentation(outputs, target_sizes=target_sizes, **kwargs)
    for i, (mine, theirs) in enumerate(zip(ours, ref)):
        expected = target_sizes[i] if target_sizes else (24, 32)
        assert tuple(mine["segmentation"].shape) == tuple(expected)
        _same(mine["segmentation"], theirs["segmentation"])
        assert mine["segments_info"] == theirs["segments_info"]
    if kwargs["threshold"] < 0.5:
        assert sum(len(r["segments_info"]) for r in ref) >= 2


def test_post_processing_reads_dict_outputs_and_checks_sizes():
    outputs = _outputs()
    proc = MaskFormerImageProcessor()
    as_dict = {
        "class_queries_logits": outputs.class_queries_logits,
        "masks_queries_logits": outputs.masks_queries_logits,
    }
    _same(proc.post_process_semantic_segmentation(as_dict)[0], proc.post_process_semantic_segmentation(outputs)[0])
    with pytest.raises(ValueError, match="target_sizes has 1 entries but the outputs hold 2 images"):
        proc.post_process_semantic_segmentation(outputs, target_sizes=[(4, 4)])
    with pytest.raises(TypeError, match="class_queries_logits and masks_queries_logits"):
        proc.post_process_instance_segmentation({"logits": outputs.class_queries_logits})
    with pytest.raises(ValueError, match="cannot both be True"):
        proc.post_process_instance_segmentation(outputs, return_coco_annotation=True, return_binary_maps=True)


# files -------------------------------------------------------------------------------------------------------------
LEGACY = {
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "MaskFormerFeatureExtractor",
    "ignore_index": 255,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "max_size": 100,
    "reduce_labels": True,
    "size": 64,
    "size_divisibility": 16,
}


def test_from_pretrained_reads_legacy_keys(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LEGACY))
    proc = MaskFormerImageProcessor.from_pretrained(tmp_path)
    assert proc.size == {"shortest_edge": 64, "longest_edge": 100}
    assert (proc.size_divisor, proc.do_reduce_labels, proc.ignore_index) == (16, True, 255)
    # the same settings in transformers' current spelling give the same tensors
    modern = {"size": proc.size, "size_divisor": 16, "do_reduce_labels": True, "ignore_index": 255}
    ours, ref = (
        proc(_images("numpy"), _maps(), return_tensors="pt"),
        Reference(**modern)(_images("numpy"), _maps(), return_tensors="pt"),
    )
    _assert_batch_equal(ours, ref, atol=0)
    assert [c.tolist() for c in ours.class_labels] == [c.tolist() for c in ref.class_labels]
    assert MaskFormerImageProcessor.from_pretrained(tmp_path, size_divisor=0).size_divisor == 0
    assert MaskFormerImageProcessor.from_pretrained(tmp_path / "preprocessor_config.json") == proc


@pytest.mark.parametrize(
    "size, max_size, expected",
    [
        (384, None, {"shortest_edge": 384, "longest_edge": 1333}),
        (384, 600, {"shortest_edge": 384, "longest_edge": 600}),
        (None, 600, {"shortest_edge": 800, "longest_edge": 600}),
        (None, None, {"shortest_edge": 800, "longest_edge": 1333}),
        ((30, 40), None, {"height": 30, "width": 40}),
        ({"shortest_edge": 10}, None, {"shortest_edge": 10}),
    ],
)
def test_size_forms(size, max_size, expected):
    assert MaskFormerImageProcessor(size=size, max_size=max_size).size == expected
    assert MaskFormerImageProcessor.from_dict({"size": size, "max_size": max_size}).size == expected


def test_output_size_follows_shortest_edge_and_divisor():
    assert output_size(50, 70, {"shortest_edge": 64, "longest_edge": 100}) == (64, 89)
    assert output_size(50, 70, {"shortest_edge": 64, "longest_edge": 100}, 32) == (64, 96)
    assert output_size(90, 40, {"shortest_edge": 64, "longest_edge": 100}) == (100, 44)
    assert output_size(20, 40, {"shortest_edge": 10}) == (10, 20)


@pytest.mark.parametrize("direction", ["ours_to_transformers", "transformers_to_ours"])
def test_save_pretrained_round_trips_with_transformers(tmp_path, direction):
    kwargs = {"size": {"shortest_edge": 48, "longest_edge": 90}, "size_divisor": 16, "ignore_index": 0, "resample": 3}
    if direction == "ours_to_transformers":
        MaskFormerImageProcessor(**kwargs).save_pretrained(tmp_path)
    else:
        Reference(**kwargs).save_pretrained(tmp_path)
    ours = MaskFormerImageProcessor.from_pretrained(tmp_path)
    ref = Reference.from_pretrained(tmp_path)
    assert (ours.size, ours.size_divisor, ours.ignore_index, ours.resample) == (kwargs["size"], 16, 0, 3)
    _assert_batch_equal(
        ours(_images("pil"), _maps(), return_tensors="pt"), ref(_images("pil"), _maps(), return_tensors="pt"), atol=0
    )
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "MaskFormerImageProcessor"


def test_save_pretrained_is_atomic(tmp_path, monkeypatch):
    MaskFormerImageProcessor(size_divisor=8).save_pretrained(tmp_path)
    before = (tmp_path / "preprocessor_config.json").read_text()

    def broken(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(MaskFormerImageProcessor, "to_dict", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        MaskFormerImageProcessor(size_divisor=64).save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["preprocessor_config.json"]


def test_unknown_keys_survive_a_round_trip(tmp_path):
    MaskFormerImageProcessor(custom_field=[1, 2]).save_pretrained(tmp_path)
    assert MaskFormerImageProcessor.from_pretrained(tmp_path).to_dict()["custom_field"] == [1, 2]


def test_missing_file_is_an_oserror(tmp_path):
    with pytest.raises(OSError, match=r"has no preprocessor_config\.json"):
        MaskFormerImageProcessor.from_pretrained(tmp_path)


# inputs and errors -------------------------------------------------------------------------------------------------
def test_gray_and_rgba_become_rgb():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    proc = functools.partial(MaskFormerImageProcessor(size={"height": 20, "width": 30}), return_tensors="pt")
    rgb = proc(np.repeat(gray[..., None], 3, -1)).pixel_values
    torch.testing.assert_close(proc(gray).pixel_values, rgb)
    torch.testing.assert_close(proc(Image.fromarray(gray)).pixel_values, rgb)
    opaque = Image.fromarray(np.dstack([np.repeat(gray[..., None], 3, -1), np.full_like(gray, 255)]), "RGBA")
    torch.testing.assert_close(proc(opaque).pixel_values, rgb)
    clear = Image.fromarray(np.zeros((20, 30, 4), dtype=np.uint8), "RGBA")  # transparent -> white
    white = proc(np.full((20, 30, 3), 255, dtype=np.uint8)).pixel_values
    torch.testing.assert_close(proc(clear).pixel_values, white)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: MaskFormerImageProcessor(size={"width": 3}), ValueError, "is not understood"),
        (lambda: MaskFormerImageProcessor(resample=9), ValueError, "unknown resample"),
        (lambda: MaskFormerImageProcessor()(_images("numpy"), _maps()[:1]), ValueError, "2 images but 1 segmentation"),
        (
            lambda: MaskFormerImageProcessor()(_images("numpy")[:1], _maps()[1:]),
            ValueError,
            r"map 0 has size \(90, 40\)",
        ),
        (
            lambda: MaskFormerImageProcessor(do_reduce_labels=True)(_images("numpy"), _maps()),
            ValueError,
            "needs an ignore_index",
        ),
        (lambda: MaskFormerImageProcessor()(_images("numpy"), sizee=3), ValueError, r"unknown arguments \['sizee'\]"),
        (lambda: MaskFormerImageProcessor()(_images("numpy"), return_tensors="tf"), ValueError, "return_tensors"),
        (lambda: MaskFormerImageProcessor()("image.png"), TypeError, "must be a PIL image, numpy array"),
        (lambda: MaskFormerImageProcessor()(np.zeros((5, 6, 7), np.uint8)), ValueError, "cannot tell the channel axis"),
        (
            lambda: MaskFormerImageProcessor(pad_size={"height": 8, "width": 8})(_images("numpy")),
            ValueError,
            "cannot pad an image of size",
        ),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_per_call_overrides_do_not_stick():
    proc = MaskFormerImageProcessor(size={"height": 32, "width": 32})
    assert proc(_images("numpy"), size=16, max_size=20, return_tensors="pt").pixel_values.shape[-2:] == (
        32,
        32,
    )  # 16/20 -> divisor 32
    assert proc(_images("numpy"), size=(16, 24), size_divisor=0, return_tensors="pt").pixel_values.shape[-2:] == (
        16,
        24,
    )
    assert proc(_images("numpy"), return_tensors="pt").pixel_values.shape[-2:] == (32, 32)


def test_auto_image_processor_reads_legacy_maskformer_files(tmp_path):
    from timm_backbone import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LEGACY))
    proc = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(proc) is MaskFormerImageProcessor
    assert (proc.size_divisor, proc.do_reduce_labels) == (16, True)
