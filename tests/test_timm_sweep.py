"""The wrapper over a deterministic sample of timm architectures, one from every timm model module: it builds, its maps
are NCHW with the reported channels and strides, equal bare timm's with the same weights, selection by index and by
name picks the same maps, and a saved model reloads to the same outputs. Random weights, small inputs; an input the
model cannot run is a ``ValueError`` naming the sizes that do.

The whole sample is slow (``--runslow``); a few architectures that exercise the unusual cases run by default.
"""

from __future__ import annotations

import math
import time

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg

from timm_backbone import TimmBackbone, TimmBackboneConfig

# name fragments of small variants, most preferred first: the sample takes the smallest-looking model of each module
_SMALL = ("test_", "atto", "femto", "pico", "nano", "micro", "xxs", "tiny", "xs", "small", "b0", "lite", "s_", "_s")
TINY_INPUT = 64
BUDGET_SECONDS = 300.0  # per architecture, build to reload; the largest sampled (deepseek_vit_412m) takes ~220 s


def _rank(name: str) -> tuple:
    hits = [i for i, fragment in enumerate(_SMALL) if fragment in name]
    cfg = get_pretrained_cfg(name)
    size = cfg.input_size[-1] if cfg is not None and cfg.input_size else 10**4
    return (min(hits) if hits else len(_SMALL), size, len(name), name)


# modules whose smallest-looking name is not their smallest model (parameter counts of timm 1.0.31 on the meta device)
_SMALLEST = {
    "byoanet": "halonet_h1",
    "cspnet": "cs3darknet_focus_s",
    "dla": "dla46x_c",
    "fasternet": "fasternet_t0",
    "gcvit": "gcvit_xxtiny",
    "levit": "levit_128s",
    "metaformer": "poolformerv2_s12",
    "mlp_mixer": "gmlp_ti16_224",
    "regnet": "regnetx_002",
    "senet": "legacy_seresnet18",
}


def sample_architectures() -> list[str]:
    """One architecture per timm model module (a known small one, else the smallest-looking name, then the smallest
    default input), sorted: the same list for a timm version."""
    picks = []
    for module in sorted(timm.list_modules()):
        names = timm.list_models(module=module)
        picks.append(_SMALLEST[module] if _SMALLEST.get(module) in names else min(names, key=_rank))
    return sorted(picks)


# unusual cases, run by default, shrunk through model_args: an empty feature module name (tresnet), a name shared by
# several stages (coat), an inner patch embed (visformer), a size limit inside the model (levit), and a plain
# FeatureGetterNet (the other common shapes run in every contract test through tests/tiny_backbones.py)
FAST = {
    "tresnet_m": {"layers": [1, 1, 1, 1], "width_factor": 0.25},
    "coat_tiny": {"img_size": 64, "embed_dims": (16, 16, 16, 16), "serial_depths": (1, 1, 1, 1), "parallel_depth": 1},
    "visformer_tiny": {"img_size": 64, "depth": (1, 1, 1), "embed_dim": 48},
    "levit_128s": {"img_size": 64, "depth": (1, 1, 1)},
    "test_vit": {},
}


# models that resize their input to a fixed size internally: their strides hold at timm's default input size only
RESIZES_INPUT = ("crossvit_",)


def _run_small(model: TimmBackbone) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """An input and its maps: the tiny input when the model runs it, else the smallest square size the model names as
    one that runs (the error for the tiny input must be a ValueError)."""
    size = TINY_INPUT
    if model.config.backbone.startswith(RESIZES_INPUT):
        size = timm.get_pretrained_cfg(model.config.backbone).input_size[-1]
    x = torch.randn(1, model.config.num_channels, size, size)
    try:
        with torch.no_grad():
            return x, model(x).feature_maps
    except ValueError:
        sizes = model.supported_input_sizes(limit=1)
        assert sizes, f"{model.config.backbone}: no square size up to 1024 runs"
    x = torch.randn(1, model.config.num_channels, sizes[0], sizes[0])
    with torch.no_grad():
        return x, model(x).feature_maps


def check_architecture(arch: str, tmp_path, model_args: dict | None = None) -> None:
    """Every check of the sweep on one architecture (see the module docstring)."""
    start = time.perf_counter()
    torch.manual_seed(0)
    model = TimmBackbone(TimmBackboneConfig(arch, model_args=model_args)).eval()  # the last stage: holds them all
    n = len(model.stage_names)
    assert len(set(model.stage_names)) == n, f"{arch}: stage names repeat: {model.stage_names}"
    model.out_indices = list(range(n))
    x, maps = _run_small(model)
    size = x.shape[-1]
    assert [f.shape[1] for f in maps] == model.channels, arch
    for f, stride in zip(maps, model.strides):
        assert f.dim() == 4 and f.shape[0] == 1, arch
        # padded convolutions give size / stride rounded; unpadded ones (inception) lose a few pixels more
        expected = size / stride
        assert math.floor(expected) - 3 <= f.shape[-2] <= math.ceil(expected), f"{arch}: {tuple(f.shape)} at {stride}"
    bare = _bare_timm(model)
    with torch.no_grad():
        expected = [f.permute(0, 3, 1, 2) if model._nhwc else f for f in bare(x)]
    torch.testing.assert_close(list(maps), list(expected)[:n], msg=f"{arch}: differs from bare timm")
    first, last = model.stage_names[0], model.stage_names[-1]
    with torch.no_grad():
        model.out_indices = [0, n - 1] if n > 1 else [0]
        by_index = model(x).feature_maps
        model.out_features = [first, last] if n > 1 else [first]
        by_name = model(x).feature_maps
    torch.testing.assert_close(by_index, by_name)
    torch.testing.assert_close(by_index[-1], maps[-1])
    model.save_pretrained(tmp_path)
    reloaded = TimmBackbone.from_pretrained(tmp_path)
    assert reloaded.stage_names == model.stage_names and reloaded.out_features == model.out_features
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).feature_maps, by_index)
    elapsed = time.perf_counter() - start
    assert elapsed < BUDGET_SECONDS, f"{arch} took {elapsed:.0f}s"


@pytest.mark.parametrize("arch", sorted(FAST))
def test_unusual_architectures(arch, tmp_path):
    check_architecture(arch, tmp_path, FAST[arch])


@pytest.mark.slow
@pytest.mark.parametrize("arch", sample_architectures())
def test_every_timm_module(arch, tmp_path):
    check_architecture(arch, tmp_path)


def test_sample_covers_every_module():
    sample = sample_architectures()
    assert len(sample) == len(timm.list_modules()) and sample == sample_architectures()


def _bare_timm(model: TimmBackbone) -> torch.nn.Module:
    """Bare timm's feature extractor built with the same arguments, holding the wrapper's weights."""
    arch, kwargs, indices = model._timm_args
    if model.config.features_only:
        bare = timm.create_model(arch, features_only=True, out_indices=indices, **kwargs)
    else:
        bare = timm.create_model(arch, **kwargs)
    bare.load_state_dict(model._backbone.state_dict())
    return bare.eval()


def test_a_size_limit_inside_the_model_is_a_value_error_naming_the_sizes_that_run():
    model = TimmBackbone(TimmBackboneConfig("levit_128s", model_args=FAST["levit_128s"])).eval()
    assert model.min_input_size == 64  # the stride rule lets 96 through; levit's attention biases do not
    with pytest.raises(ValueError, match=r"'levit_128s' cannot run pixel_values of shape \(1, 3, 96, 96\) \(.+\); "):
        model(torch.randn(1, 3, 96, 96))
    assert model.supported_input_sizes() == [64]
    with pytest.raises(ValueError, match=r"it runs 64x64 \(model.supported_input_sizes\(\) lists"):
        model(torch.randn(1, 3, 128, 128))


def test_repeated_and_empty_module_names_become_unique_stage_names():
    coat = TimmBackbone(TimmBackboneConfig("coat_tiny", model_args=FAST["coat_tiny"]))
    assert coat.stage_names == ["serial_blocks1", "parallel_blocks:1", "parallel_blocks:2", "parallel_blocks:3"]
    coat.out_features = ["parallel_blocks:2"]
    assert coat.out_indices == [2]
    tresnet = TimmBackbone(TimmBackboneConfig("tresnet_m", model_args=FAST["tresnet_m"], out_indices=[0, 1]))
    assert tresnet.stage_names[:2] == ["feature:0", "body.layer1"] and tresnet.strides == [4, 4]
