"""Tiny random-initialised backbones of every family, shared by the reliability, export and concurrency tests.

Each entry builds a backbone in eval mode from keyword overrides of its config (``out_indices``...). Families whose
module is not there yet are skipped, so the tests cover each backbone as soon as it lands.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import pytest
from torch import nn

from timm_backbone import TimmBackbone, TimmBackboneConfig


def _native(module: str, config_name: str, model_name: str, fields: dict[str, Any]) -> Callable[..., nn.Module]:
    def build(**overrides: Any) -> nn.Module:
        try:
            mod = importlib.import_module(f"timm_backbone.models.{module}")
        except ModuleNotFoundError:
            pytest.skip(f"timm_backbone.models.{module} is not there yet")
        config = getattr(mod, config_name)(**{**fields, **overrides})
        return getattr(mod, model_name)(config).eval()

    return build


def _timm(name: str, **fields: Any) -> Callable[..., nn.Module]:
    def build(**overrides: Any) -> nn.Module:
        return TimmBackbone(TimmBackboneConfig(name, **{**fields, **overrides})).eval()

    return build


SWIN_FIELDS = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "image_size": 64}
RESNET_FIELDS = {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "embedding_size": 8}

# name -> (builder, an input size every default selection accepts)
BACKBONES: dict[str, tuple[Callable[..., nn.Module], int]] = {
    "timm-list": (_timm("test_resnet"), 32),  # timm FeatureListNet (features_only, module taps)
    "timm-getter": (_timm("test_vit"), 32),  # timm FeatureGetterNet (features_only over forward_intermediates)
    "timm-intermediates": (_timm("test_vit", features_only=False), 32),  # the whole model's forward_intermediates
    "timm-nhwc": (_timm("test_mambaout"), 32),  # timm NHWC features, permuted to NCHW
    "swin": (_native("swin", "SwinConfig", "SwinBackbone", SWIN_FIELDS), 32),
    "resnet": (_native("resnet", "ResNetConfig", "ResNetBackbone", RESNET_FIELDS), 32),
}


def build(name: str, **overrides: Any) -> nn.Module:
    """The tiny backbone ``name`` of :data:`BACKBONES`, in eval mode."""
    return BACKBONES[name][0](**overrides)


@functools.cache
def shared(name: str) -> nn.Module:
    """One default-config instance of ``name`` per session, for tests that only run it (never mutate it)."""
    return build(name)
