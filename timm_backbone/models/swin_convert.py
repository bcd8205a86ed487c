"""Swin checkpoint layouts: timm's, transformers' (legacy and v5 names, ``swin.`` prefix), MaskFormer's Swin, and the
native module's own (fused q/k/v), with the mappings between them.

Native module keys: ``patch_embed.{proj,norm,position_embeddings}``, ``layers.i.blocks.j.{norm1, attn.qkv,
attn.relative_position_bias_table, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``layers.i.downsample.{norm,reduction}``
(merging at the end of stage i, as transformers), ``hidden_states_norms.<stage>``. Final norm and classifier travel
as ``layernorm.*`` / ``classifier.*``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F

from ..hub import unwrap_state_dict

# key mappings ----------------------------------------------------------------------------------------------
# block parameters: this module's suffix -> transformers' (q/k/v handled apart)
_BLOCK_TO_HF = {
    "norm1": "layernorm_before",
    "attn.relative_position_bias_table": "attention.self.relative_position_bias_table",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
# transformers >= 5 in-memory names, accepted on load as well
_HF5_ALIASES = {
    "attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_TO_BLOCK = {**{v: k for k, v in _BLOCK_TO_HF.items()}, **_HF5_ALIASES}
_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
_TOP_TO_HF = {"patch_embed.proj.": "embeddings.patch_embeddings.projection.", "patch_embed.norm.": "embeddings.norm.",
              "patch_embed.position_embeddings": "embeddings.position_embeddings"}  # fmt: skip
_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias|relative_position_bias_table)$")
_HF_BLOCK_KEY = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_SKIP = re.compile(r"(relative_position_index|attn_mask)$")


def _split_param(key: str) -> tuple[str, str]:
    """``a.b.weight`` -> (``a.b``, ``weight``); the bias table is a parameter of its own."""
    if key.endswith("relative_position_bias_table"):
        return key, ""
    module, _, param = key.rpartition(".")
    return module, param


def native_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$", key)
        if match:
            prefix = f"encoder.layers.{match[1]}.blocks.{match[2]}."
            module, param = _split_param(match[3])
            if module == "attn.qkv":
                for name, part in zip(_QKV_NAMES[0], value.chunk(3, dim=0)):
                    out[f"{prefix}attention.self.{name}.{param}"] = part.clone()
                continue
            hf = _BLOCK_TO_HF.get(module, module)
            out[prefix + hf + (f".{param}" if param else "")] = value
        elif key.startswith("layers."):
            out["encoder." + key] = value
        else:
            for ours, theirs in _TOP_TO_HF.items():
                if key.startswith(ours):
                    key = theirs + key[len(ours) :]
                    break
            out[key] = value
    return out


def _transformers_to_internal(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = _HF_BLOCK_KEY.match(key)
        if match:
            prefix = f"layers.{match[1]}.blocks.{match[2]}."
            module, param = _split_param(match[3])
            for names in _QKV_NAMES:
                for j, name in enumerate(names):
                    if module in (f"attention.self.{name}", f"attention.{name}"):
                        qkv.setdefault((prefix, param), {})[j] = value
                        break
                else:
                    continue
                break
            else:
                ours = _HF_TO_BLOCK.get(module)
                out[(prefix + ours + (f".{param}" if param else "")) if ours else key] = value
        elif key.startswith("encoder.layers."):
            out[key[len("encoder.") :]] = value
        else:
            for ours, theirs in _TOP_TO_HF.items():
                if key.startswith(theirs):
                    key = ours + key[len(theirs) :]
                    break
            out[key] = value
    for (prefix, param), parts in qkv.items():
        if len(parts) == 3:
            out[f"{prefix}attn.qkv.{param}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
        else:  # incomplete: keep what is there under transformers' names so the report shows it
            for j, part in parts.items():
                out[f"encoder.{prefix}attention.self.{_QKV_NAMES[0][j]}.{param}"] = part
    return out


def _timm_to_internal(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # timm merges patches at the start of stages 1..N-1; the original Swin (and transformers) at the end of 0..N-2
    downsample_at_start = "layers.0.downsample.reduction.weight" not in state_dict
    out = {}
    for key, value in state_dict.items():
        if downsample_at_start:
            key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) - 1}.downsample.", key)
        key = re.sub(r"^absolute_pos_embed$", "patch_embed.position_embeddings", key)
        key = re.sub(r"^norm\.", "layernorm.", key)
        key = re.sub(r"^head\.(fc\.)?", "classifier.", key)
        out[key] = value
    return out


def _internal_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample.", key)
        key = re.sub(r"^patch_embed\.position_embeddings$", "absolute_pos_embed", key)
        key = re.sub(r"^layernorm\.", "norm.", key)
        key = re.sub(r"^classifier\.", "head.fc.", key)
        out[key] = value
    return out


def swin_timm_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ``SwinTransformer`` state dict in transformers' ``SwinModel`` layout.

    ``norm`` becomes ``layernorm`` and ``head.fc`` becomes ``classifier`` (prefix those two and the rest with
    ``swin.`` for ``SwinForImageClassification``); timm's non-persistent buffers are dropped.
    """
    state_dict = {k: v for k, v in unwrap_state_dict(state_dict).items() if not _SKIP.search(k)}
    return native_to_transformers(_timm_to_internal(state_dict))


def swin_transformers_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers Swin state dict (any of its layouts, or maskformer-swin) in timm's ``SwinTransformer`` layout.

    Per-stage backbone norms (``hidden_states_norms``) have no place in timm and are dropped.
    """
    internal = native_keys_from_any(state_dict)
    return _internal_to_timm({k: v for k, v in internal.items() if not k.startswith("hidden_states_norms.")})


def native_keys_from_any(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detect the layout (transformers with/without ``swin.``, maskformer-swin, timm/original Swin) and convert."""
    state_dict = {k: v for k, v in unwrap_state_dict(state_dict).items() if not _SKIP.search(k)}
    prefixes = (("model.pixel_level_module.encoder.", ""), ("swin.", "embeddings."), ("model.", "embeddings."))
    for prefix, marker in prefixes:
        if any(k.startswith(prefix + marker) for k in state_dict):
            state_dict = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
    # maskformer-swin numbers its per-stage norms from stage1
    state_dict = {
        re.sub(r"^hidden_states_norms\.(\d+)\.", lambda m: f"hidden_states_norms.stage{int(m[1]) + 1}.", k): v
        for k, v in state_dict.items()
    }
    if any(k.startswith("patch_embed.") for k in state_dict):
        return _timm_to_internal(state_dict)
    return _transformers_to_internal(state_dict)


# what conversion, the benchmark and MaskFormer need to know about Swin ------------------------------------------
def detect_layout(state_dict: dict[str, Any]) -> str | None:
    """``"timm"``, ``"transformers"`` (any of its Swin layouts) or ``None`` when the keys are not a Swin's."""
    if "patch_embed.proj.weight" in state_dict and any(k.startswith("layers.0.blocks.") for k in state_dict):
        return "timm"
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state_dict):
        return "transformers"
    return None


def timm_architecture(config: Any) -> tuple[str, dict[str, Any]]:
    """The timm architecture and ``model_args`` building the Swin that ``config`` describes: a standard variant by
    name, other sizes as ``swin_tiny_patch4_window7_224`` with arguments.

    Raises:
        ValueError: absolute position embeddings, which timm's SwinTransformer does not have.
    """
    from .swin import TIMM_SWIN_VARIANTS

    if getattr(config, "use_absolute_embeddings", False):
        raise ValueError("timm's SwinTransformer has no absolute position embeddings; cannot convert this model")
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    ours = (config.embed_dim, tuple(config.depths), tuple(config.num_heads), config.window_size, size)
    name = next((n for n, v in TIMM_SWIN_VARIANTS.items() if v == ours and config.patch_size == 4), None)
    args: dict[str, Any] = {}
    if name is None:
        name = "swin_tiny_patch4_window7_224"
        args = dict(embed_dim=config.embed_dim, depths=tuple(config.depths), num_heads=tuple(config.num_heads),
                    window_size=config.window_size, img_size=size, patch_size=config.patch_size)  # fmt: skip
    if config.mlp_ratio != 4.0:
        args["mlp_ratio"] = config.mlp_ratio
    if not config.qkv_bias:
        args["qkv_bias"] = False
    if config.num_channels != 3:
        args["in_chans"] = config.num_channels
    return name, args


def complete_timm_state_dict(state_dict: dict[str, torch.Tensor], config: Any | None, notes: list[str]) -> dict:
    """timm's Swin needs its final norm; a backbone checkpoint has none, so an identity norm is written."""
    if "norm.weight" in state_dict:
        return state_dict
    if config is not None:
        width = int(config.embed_dim * 2 ** (len(config.depths) - 1))
    else:  # a bare weights file: the last block's width
        width = int([v for k, v in state_dict.items() if k.endswith("mlp.fc2.bias")][-1].shape[0])
    notes.append("the source has no final norm (a backbone checkpoint): timm's norm is written as identity (1, 0)")
    return {**state_dict, "norm.weight": torch.ones(width), "norm.bias": torch.zeros(width)}


COMPARISON_NOTE = (
    "native stage k = timm layers.(k-1), compared after applying the native stage norm (hidden_states_norms) "
    "to timm's output, which timm leaves unnormalised; timm has no stem output. The native backbone is built "
    "with timm's window semantics (SwinConfig.from_timm): where a stage's map fits in one window (stage4 at 224) "
    "transformers still shifts and pads its windows, so native-vs-transformers differs there by design "
    "(SwinConfig(window_semantics='transformers') matches transformers exactly)"
)


def timm_stage(native_index: int) -> int | None:
    """timm's feature index of native stage ``native_index`` (timm's Swin has no stem tap)."""
    return native_index - 1 if native_index > 0 else None


def timm_as_native(stage_name: str, feature: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """timm's stage output passed through the native stage norm, as the native backbone returns it."""
    weight = weights.get(f"hidden_states_norms.{stage_name}.weight")
    bias = weights.get(f"hidden_states_norms.{stage_name}.bias")
    x = feature.permute(0, 2, 3, 1).float()
    w = weight.float().to(x.device) if weight is not None else None
    b = bias.float().to(x.device) if bias is not None else None
    return F.layer_norm(x, x.shape[-1:], w, b, eps=1e-5).permute(0, 3, 1, 2)


def to_maskformer_layout(state_dict: dict[str, torch.Tensor], backbone: Any) -> dict[str, torch.Tensor]:
    """transformers' ``SwinBackbone`` keys -> ``MaskFormerSwinBackbone`` keys (what transformers' MaskFormer reads):
    ``model.`` before the Swin itself, per-stage norms numbered from 0 for stage1. The buffers and the final
    ``layernorm`` that file holds but no backbone output depends on are written too (the relative position indices,
    the norm at its initial value), so that transformers finds a complete file."""
    from .swin import _relative_position_index

    window = backbone.config.window_size
    out = {}
    for key, value in state_dict.items():
        norm = re.match(r"^hidden_states_norms\.stage(\d+)\.(.+)$", key)
        if norm:
            out[f"hidden_states_norms.{int(norm[1]) - 1}.{norm[2]}"] = value
            continue
        out["model." + key] = value
        if key.endswith(".relative_position_bias_table"):
            index_key = "model." + key.replace("relative_position_bias_table", "relative_position_index")
            out[index_key] = _relative_position_index((window, window), window).clone()
    channels, dtype = backbone.num_features[-1], next(iter(state_dict.values())).dtype
    out.setdefault("model.layernorm.weight", torch.ones(channels, dtype=dtype))
    out.setdefault("model.layernorm.bias", torch.zeros(channels, dtype=dtype))
    return out
