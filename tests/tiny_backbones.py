"""What the tests share: tiny random-initialised backbones of every family, tolerance-based comparison, norm
perturbation (so that mapping mistakes show), and timm hub repos written to disk.

Each entry of :data:`BACKBONES` builds a backbone in eval mode from keyword overrides of its config
(``out_indices``...).
A family module that fails to import fails the tests that use it.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from timm_backbone import TimmBackbone, TimmBackboneConfig


def _native(module: str, config_name: str, model_name: str, fields: dict[str, Any]) -> Callable[..., nn.Module]:
    def build(**overrides: Any) -> nn.Module:
        mod = importlib.import_module(f"timm_backbone.models.{module}")
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


def close(actual: Any, expected: Any, tol: float = 1e-4) -> None:
    """``assert_close`` with the same absolute and relative tolerance, over tensors or sequences of them."""
    if isinstance(actual, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            close(a, e, tol)
        return
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def perturb_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm non-trivial affine terms and BatchNorm statistics (fresh ones are the identity at eval, which
    would hide a mapping mistake); returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and ("norm" in name or "bn" in name or "running" in name):
                noise = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(noise + 0.5 if "running_var" in name else tensor + 0.2 * (noise - 0.5))
    return model.eval()


def write_timm_repo(folder: Path, architecture: str, state_dict: dict[str, torch.Tensor], **config: Any) -> Path:
    """A timm hub repo on disk: ``config.json`` naming ``architecture`` (plus ``config``) and ``model.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    content = {"architecture": architecture, "pretrained_cfg": {"tag": architecture.partition(".")[2] or "test",
               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, **config}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(content))
    save_file({k: v.contiguous() for k, v in state_dict.items()}, folder / "model.safetensors")
    return folder
