"""Image processors against their references on the same pictures: transformers (ViT, ConvNeXt, the processor a
Swin repo names) and timm's evaluation transforms; config forms, input kinds and errors."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from timm_backbone import AutoImageProcessor, ConvNextImageProcessor, TimmImageProcessor, ViTImageProcessor
from timm_backbone.image_processing import BatchFeature, get_output_size, normalize_size, pad, resize

transformers = pytest.importorskip("transformers")
from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil  # noqa: E402
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil  # noqa: E402

# the preprocessor_config.json files hub repos carry, legacy keys included
SWIN_REPO = {
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": 224,
}
RESNET_REPO = {
    "crop_pct": 0.875,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ConvNextFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": 224,
}
VIT_MODERN = {
    "image_processor_type": "ViTImageProcessor",
    "size": {"height": 96, "width": 128},
    "resample": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
}
CONVNEXT_LARGE = {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 384}, "resample": 3}
CONVNEXT_SMALL = {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 96}, "crop_pct": 0.9}
# resize + centre crop families, with their class defaults for everything the file leaves out
DEIT = {"image_processor_type": "DeiTImageProcessor", "size": {"height": 72, "width": 72}, "crop_size": 64}
CLIP = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 64}, "crop_size": 56}
BIT = {"image_processor_type": "BitImageProcessor", "size": 80, "crop_size": {"height": 64, "width": 72}}

SIZES = [(61, 97), (150, 100)]  # upscaling and downscaling, odd margins


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: exercises interpolation more than pure noise or flat colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    ramps = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (height + width)], -1)
    return (0.7 * ramps + 0.3 * rng.integers(0, 256, (height, width, 3))).astype(np.uint8)


def _image(kind: str, height: int, width: int):
    """(our input, the reference's input): the same picture; references get what they accept."""
    array = _picture(height, width)
    if kind == "pil":
        return Image.fromarray(array), Image.fromarray(array)
    if kind == "pil_gray":
        image = Image.fromarray(array).convert("L")
        return image, image
    if kind == "pil_rgba":
        image = Image.fromarray(array).convert("RGBA")
        image.putalpha(Image.fromarray(_picture(height, width, seed=1)[..., 0]))
        return image, image
    if kind == "pil_palette":
        image = Image.fromarray(array).convert("P")
        return image, image
    if kind == "numpy":
        return array, array
    if kind == "numpy_gray":
        return array[..., 0], array[..., :1]  # transformers takes no 2-D arrays
    if kind == "numpy_float":
        return array.astype(np.float32), array.astype(np.float32)
    if kind == "torch":
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return tensor, tensor
    if kind == "torch_float":
        tensor = torch.from_numpy(array).permute(2, 0, 1).float()
        return tensor, tensor
    raise AssertionError(kind)


KINDS = ["pil", "pil_gray", "pil_rgba", "pil_palette", "numpy", "numpy_gray", "numpy_float", "torch", "torch_float"]


def _reference(config: dict, backend: str):
    """transformers' processor for a config dict, through its own AutoImageProcessor logic (legacy keys included)."""
    name = config.get("image_processor_type") or config["feature_extractor_type"].replace("FeatureExtractor", "")
    name = name.replace("ImageProcessor", "")
    classes = {
        ("ViT", "torchvision"): transformers.ViTImageProcessor,
        ("ViT", "pil"): ViTImageProcessorPil,
        ("ConvNext", "torchvision"): transformers.ConvNextImageProcessor,
        ("ConvNext", "pil"): ConvNextImageProcessorPil,
        ("DeiT", "torchvision"): transformers.DeiTImageProcessor,
        ("CLIP", "torchvision"): transformers.CLIPImageProcessor,
        ("Bit", "torchvision"): transformers.BitImageProcessor,
    }
    kwargs = {k: v for k, v in config.items() if k not in ("image_processor_type", "feature_extractor_type")}
    return classes[name, backend](**kwargs, do_convert_rgb=True)


PARITY_CASES = [
    # (config, image kinds, picture sizes): the hub repos' 224-px files on every input kind, one size each to stay
    # fast; the small custom sizes on both sizes
    *[(SWIN_REPO, [kind], [SIZES[i % 2]]) for i, kind in enumerate(KINDS)],
    *[(RESNET_REPO, [kind], [SIZES[(i + 1) % 2]]) for i, kind in enumerate(KINDS)],
    (VIT_MODERN, KINDS, SIZES),
    (CONVNEXT_SMALL, KINDS, SIZES),
    (CONVNEXT_LARGE, ["pil", "numpy_float"], SIZES[:1]),
]
PARITY_CASES = [(*case, backend) for case in PARITY_CASES for backend in ("torchvision", "pil")] + [
    # the resize + crop families share every operation with the above: compared on the default backend
    (config, ["pil", "pil_rgba", "numpy_gray", "torch_float"], SIZES, "torchvision")
    for config in (DEIT, CLIP, BIT)
]


@pytest.mark.parametrize(
    "config, kinds, sizes, backend",
    PARITY_CASES,
    ids=[f"{c.get('feature_extractor_type', c.get('image_processor_type'))}-{k[0]}-{b}" for c, k, _, b in PARITY_CASES],
)
def test_parity_with_transformers(tmp_path, config, kinds, sizes, backend):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
    ref = _reference(config, backend)
    for kind in kinds:
        for height, width in sizes:
            mine, theirs = _image(kind, height, width)
            got = ours(mine, return_tensors="pt")
            want = ref(theirs, return_tensors="pt")["pixel_values"]
            assert isinstance(got, BatchFeature) and list(got) == ["pixel_values"]
            assert got.pixel_values.dtype == torch.float32
            assert got.pixel_values.shape == want.shape, kind
            diff = (got.pixel_values - want).abs()
            if backend == "pil" and kind.endswith("float"):
                # transformers' Pillow path casts float pictures to uint8 before resizing (clipping bicubic
                # overshoot, rounding); ours resizes the floats themselves in Pillow's 32-bit float mode
                assert diff.mean() < 0.01 and diff.max() < 0.2, (kind, diff.mean(), diff.max())
            else:
                # measured: 0 (torchvision backend), <= 2.4e-7 (Pillow: rescale and normalise in two float steps)
                assert diff.max() <= 1e-5, (kind, height, width, diff.max())


def test_auto_picks_the_class_each_file_names(tmp_path):
    cases = {
        "swin": (SWIN_REPO, ViTImageProcessor, {"height": 224, "width": 224}),
        "resnet": (RESNET_REPO, ConvNextImageProcessor, {"shortest_edge": 224}),
        "fast": ({**VIT_MODERN, "image_processor_type": "ViTImageProcessorFast"}, ViTImageProcessor, None),
        "pil": ({**VIT_MODERN, "image_processor_type": "ViTImageProcessorPil"}, ViTImageProcessor, None),
    }
    for name, (config, cls, size) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "preprocessor_config.json").write_text(json.dumps(config))
        processor = AutoImageProcessor.from_pretrained(tmp_path / name)
        assert type(processor) is cls
        assert processor.size == (size or config["size"])
        assert processor.resample == config["resample"]
    # a file that names no class: config.json's model_type decides
    (tmp_path / "untyped").mkdir()
    (tmp_path / "untyped" / "preprocessor_config.json").write_text(json.dumps({"size": 64}))
    (tmp_path / "untyped" / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    processor = AutoImageProcessor.from_pretrained(tmp_path / "untyped")
    assert type(processor) is ConvNextImageProcessor and processor.size == {"shortest_edge": 64}
    # the JSON file itself, with an override
    processor = AutoImageProcessor.from_pretrained(tmp_path / "swin" / "preprocessor_config.json", size=32)
    assert processor.size == {"height": 32, "width": 32}


def test_auto_errors(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "BeitImageProcessor"}))
    with pytest.raises(ValueError, match=r"unknown image processor 'BeitImageProcessor'; known: .*ViTImageProcessor"):
        AutoImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "swin"}))
    with pytest.raises(OSError, match=r"has no preprocessor_config.json, and its config.json is not a timm model"):
        AutoImageProcessor.from_pretrained(tmp_path)


def test_maskformer_processor_resolves_lazily(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "MaskFormerImageProcessor", "size": {"shortest_edge": 64}})
    )
    try:
        from timm_backbone.models.maskformer.image_processing import MaskFormerImageProcessor
    except ImportError:
        with pytest.raises(ValueError, match="MaskFormerImageProcessor is not available"):
            AutoImageProcessor.from_pretrained(tmp_path)
        return
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is MaskFormerImageProcessor


def test_saved_config_round_trips_and_loads_in_transformers(tmp_path):
    ours = ViTImageProcessor(size=(48, 64), resample="bicubic", image_mean=0.4, image_std=0.3)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 48, "width": 64} and saved["resample"] == 3
    assert saved["image_processor_type"] == "ViTImageProcessor" and "backend" not in saved
    assert AutoImageProcessor.from_pretrained(tmp_path) == ours
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    image = Image.fromarray(_picture(70, 50))
    torch.testing.assert_close(
        ours(image, return_tensors="pt").pixel_values,
        theirs(image, return_tensors="pt")["pixel_values"],
        atol=1e-5,
        rtol=0,
    )
    ConvNextImageProcessor(size=96, crop_pct=0.5, backend="pil").save_pretrained(tmp_path / "c")
    reloaded = AutoImageProcessor.from_pretrained(tmp_path / "c")
    assert (reloaded.crop_pct, reloaded.backend, reloaded.size) == (0.5, "pil", {"shortest_edge": 96})


# ------------------------------------------------------------------------------------------------------- timm
TIMM_CFGS = {
    "resnet50.a1_in1k": None,  # from timm's registry: crop_pct 0.95, bicubic
    "resnet50.tv_in1k": None,  # bilinear, crop_pct 0.875
    "convnext_small.fb_in22k_ft_in1k_384": None,  # crop_mode squash
    "vit_base_patch16_clip_224.openai": None,  # CLIP mean/std
    "non_square_center": {"input_size": (3, 96, 128), "crop_pct": 0.9, "interpolation": "bicubic"},
    "border": {"input_size": (3, 64, 64), "crop_pct": 0.95, "crop_mode": "border", "interpolation": "bilinear"},
    "squash_non_square": {"input_size": (3, 80, 64), "crop_pct": 1.0, "crop_mode": "squash"},
}


@pytest.mark.parametrize("name", list(TIMM_CFGS))
def test_timm_processor_matches_timm_eval_transform(name):
    import timm
    from timm.data import create_transform, resolve_data_config

    cfg = TIMM_CFGS[name] or timm.models.get_pretrained_cfg(name).to_dict()
    if TIMM_CFGS[name] is None:
        ours = TimmImageProcessor.from_timm_name(name)
    else:
        ours = TimmImageProcessor.from_pretrained_cfg(cfg)
    reference = create_transform(**resolve_data_config(pretrained_cfg=cfg), is_training=False)
    for kind, (height, width) in [("pil", SIZES[0]), ("pil_gray", SIZES[1]), ("numpy", SIZES[1])]:
        mine, _ = _image(kind, height, width)
        picture = Image.fromarray(_picture(height, width))
        want = reference(picture.convert("L").convert("RGB") if kind == "pil_gray" else picture)[None]
        got = ours(mine, return_tensors="pt").pixel_values
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5, kind  # measured <= 7.2e-7


def test_timm_processor_matches_transformers_timm_wrapper(tmp_path):
    import timm

    cfg = timm.models.get_pretrained_cfg("resnet50.a1_in1k").to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet50", "pretrained_cfg": cfg}))
    ours = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(ours) is TimmImageProcessor
    assert (ours.crop_pct, ours.resample, ours.size) == (0.95, "bicubic", {"height": 224, "width": 224})
    theirs = transformers.TimmWrapperImageProcessor(pretrained_cfg=cfg)
    images = [Image.fromarray(_picture(h, w)) for h, w in SIZES]
    torch.testing.assert_close(
        ours(images, return_tensors="pt").pixel_values, theirs(images)["pixel_values"], atol=1e-5, rtol=0
    )


def test_timm_names_and_timm_backbone_folders_give_timm_processors(tmp_path):
    processor = AutoImageProcessor.from_pretrained("resnet50.a1_in1k")
    assert type(processor) is TimmImageProcessor and processor.crop_pct == 0.95
    assert AutoImageProcessor.from_pretrained("resnet50") == TimmImageProcessor.from_timm_name("resnet50")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "timm_backbone", "backbone": "resnet50.tv_in1k"}))
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert (processor.crop_pct, processor.resample) == (0.875, "bilinear")
    with pytest.raises(ValueError, match="crop_mode must be one of"):
        TimmImageProcessor(crop_mode="zoom")


# ------------------------------------------------------------------------------------------- inputs and forms
def test_batches_in_every_form_match_single_images():
    processor = ViTImageProcessor(size=32)
    arrays = [_picture(40, 60, seed=i) for i in range(3)]
    singles = torch.cat([processor(a, return_tensors="pt").pixel_values for a in arrays])
    assert singles.shape == (3, 3, 32, 32)
    for batch in (arrays, np.stack(arrays), torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), [arrays]):
        torch.testing.assert_close(processor(batch, return_tensors="pt").pixel_values, singles, atol=0, rtol=0)
    as_list = processor(arrays).pixel_values
    assert isinstance(as_list, list) and len(as_list) == 3 and as_list[0].shape == (3, 32, 32)
    as_numpy = processor(arrays, return_tensors="np").pixel_values
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32


def test_call_overrides_and_model_accepts_batch():
    from timm_backbone import TimmBackbone, TimmBackboneConfig

    processor = ViTImageProcessor()
    inputs = processor(Image.fromarray(_picture(50, 50)), return_tensors="pt", size={"height": 64, "width": 96})
    assert inputs.pixel_values.shape == (1, 3, 64, 96)
    model = TimmBackbone(TimmBackboneConfig("resnet18", out_indices=(1, 2))).eval()
    with torch.no_grad():
        out = model(**inputs)
    assert [list(f.shape) for f in out.feature_maps] == [[1, 64, 16, 24], [1, 128, 8, 12]]
    half = inputs.to(torch.float16)
    assert half.pixel_values.dtype == torch.float16 and isinstance(half, BatchFeature)


def test_float_images_in_unit_range_warn_when_rescaled(caplog):
    image = _picture(20, 20).astype(np.float32) / 255
    with caplog.at_level(logging.WARNING, logger="timm_backbone"):
        scaled_twice = ViTImageProcessor(size=20)(image, return_tensors="pt").pixel_values
    assert "pass do_rescale=False" in caplog.text
    right = ViTImageProcessor(size=20, do_rescale=False)(image, return_tensors="pt").pixel_values
    want = ViTImageProcessor(size=20)(_picture(20, 20).astype(np.float32), return_tensors="pt").pixel_values
    torch.testing.assert_close(right, want, atol=1e-5, rtol=0)
    assert scaled_twice.max() < -0.9  # every value near (0 - 0.5) / 0.5


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda p: p("not an image"), TypeError, "must be a PIL image, numpy array or torch tensor"),
        (lambda p: p([]), ValueError, "no images given"),
        (lambda p: p(np.zeros((1, 1, 8, 8, 3), np.uint8)), ValueError, "2 \\(H, W\\), 3 .* or 4 \\(batch\\)"),
        (lambda p: p(np.zeros((8, 8, 7), np.uint8)), ValueError, "cannot tell the channel axis"),
        (lambda p: p(np.full((8, 8, 4), 2.0, np.float32)), ValueError, "float RGBA image must hold values in"),
        (lambda p: p(_picture(8, 8), sise=3), ValueError, "unknown arguments \\['sise'\\]; valid: "),
        (lambda p: p(_picture(8, 8), return_tensors="tf"), ValueError, "return_tensors must be 'pt', 'np' or None"),
        (
            lambda p: p([_picture(8, 8), _picture(9, 8)], do_resize=False, return_tensors="pt"),
            ValueError,
            "cannot stack pixel_values of different sizes",
        ),
        (lambda p: p(_picture(8, 8), resample="cubic"), ValueError, "unknown resample 'cubic'"),
        (lambda p: p(_picture(8, 8), backend="cv2"), ValueError, "backend must be one of"),
        (lambda p: p(_picture(8, 8), data_format="channels_last"), ValueError, "data_format must be 'channels_first'"),
    ],
)
def test_input_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(ViTImageProcessor(size=8))


@pytest.mark.parametrize(
    "size, square, max_size, expected",
    [
        (224, True, None, {"height": 224, "width": 224}),
        (224, False, None, {"shortest_edge": 224}),
        (800, False, 1333, {"shortest_edge": 800, "longest_edge": 1333}),
        ((32, 48), True, None, {"height": 32, "width": 48}),
        ({"shortest_edge": 96}, True, None, {"shortest_edge": 96}),
        (None, False, 512, {"longest_edge": 512}),
    ],
)
def test_normalize_size_legacy_forms(size, square, max_size, expected):
    assert normalize_size(size, square, max_size) == expected


def test_size_errors_and_output_sizes():
    with pytest.raises(ValueError, match=r"size \{'short': 3\} is not understood; use an int"):
        normalize_size({"short": 3})
    assert get_output_size(100, 50, {"shortest_edge": 20}) == (40, 20)
    assert get_output_size(50, 101, {"shortest_edge": 20}) == (20, 40)
    assert get_output_size(100, 50, {"shortest_edge": 40, "longest_edge": 60}) == (60, 30)
    assert get_output_size(100, 50, {"longest_edge": 10}) == (10, 5)
    assert get_output_size(100, 50, {"max_height": 20, "max_width": 20}) == (20, 10)
    # legacy DETR-style max_size on the processor itself
    assert ConvNextImageProcessor(size=800, max_size=1333).size == {"shortest_edge": 800, "longest_edge": 1333}


def test_pad_and_resize_helpers():
    image = torch.arange(12, dtype=torch.uint8).view(1, 3, 4)
    padded, mask = pad(image, (5, 6), fill=7)
    assert padded.shape == (1, 5, 6) and padded[0, 4, 5] == 7 and torch.equal(padded[:, :3, :4], image)
    assert mask.sum() == 12 and mask.dtype == torch.int64
    with pytest.raises(ValueError, match="cannot pad an image of size"):
        pad(image, (2, 2))
    gray = torch.from_numpy(_picture(30, 40)[..., 0].copy())[None]
    want = np.asarray(Image.fromarray(gray[0].numpy()).resize((20, 15), Image.Resampling.BICUBIC))
    assert torch.equal(resize(gray, (15, 20), "bicubic", backend="pil")[0], torch.from_numpy(want.copy()))
    as_float = resize(gray.float(), (15, 20), 3, backend="pil")
    assert as_float.dtype == torch.float32 and (as_float - torch.from_numpy(want.copy()).float()).abs().max() <= 1


def test_output_sizes_match_transformers_arithmetic():
    from transformers.image_transforms import get_size_with_aspect_ratio

    for height in range(20, 400, 17):
        for width in range(20, 400, 23):
            for shortest, longest in [(32, 50), (64, 120), (100, 1333), (800, 1333)]:
                capped = get_output_size(height, width, {"shortest_edge": shortest, "longest_edge": longest})
                assert capped == get_size_with_aspect_ratio((height, width), shortest, longest), (height, width)
                plain = get_output_size(height, width, {"shortest_edge": shortest})
                assert plain == get_size_with_aspect_ratio((height, width), shortest), (height, width)
