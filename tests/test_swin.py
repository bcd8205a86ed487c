"""Native Swin: parity with transformers and timm on the same weights, checkpoint layouts, caching, training paths."""

import json
import os

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_backbones import close

import timm_backbone.models.swin as swin_module
from timm_backbone import SwinBackbone, SwinConfig
from timm_backbone.auto import AutoBackbone, AutoConfig
from timm_backbone.models.swin import (
    TIMM_SWIN_VARIANTS,
    SwinWindowAttention,
    swin_timm_to_transformers,
    swin_transformers_to_timm,
)

TINY = dict(image_size=32, embed_dim=16, depths=[1, 2, 1], num_heads=[1, 2, 4], window_size=4)


def _randomise(model: torch.nn.Module, std: float = 0.3) -> None:
    """Non-trivial values everywhere (bias tables and norms are zero/one at init)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)


def _hf_backbone(tmp_path, out_indices=(0, 1, 2, 3), **overrides):
    fields = {**TINY, **overrides}
    config = transformers.SwinConfig(out_indices=list(out_indices), **fields)
    config._attn_implementation = "eager"  # output_attentions needs the eager path
    model = transformers.SwinBackbone(config).eval()
    _randomise(model)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize(
    ("overrides", "size", "out_indices"),
    [
        ({}, (32, 32), (0, 1, 2, 3)),
        ({}, (45, 61), (0, 1, 2, 3)),  # neither the patch nor the window divides
        ({"window_size": 12, "image_size": 96}, (100, 76), (1, 3)),
        ({"window_size": 3, "depths": [2, 2], "num_heads": [2, 4]}, (29, 37), (0, 2)),
        ({"use_absolute_embeddings": True, "qkv_bias": False, "mlp_ratio": 2.0}, (32, 32), (2,)),
    ],
)
def test_parity_with_transformers_backbone(tmp_path, overrides, size, out_indices):
    reference = _hf_backbone(tmp_path, out_indices, **overrides)
    model = SwinBackbone.from_pretrained(tmp_path)
    assert model.out_indices == list(out_indices)
    assert model.load_report.ok, model.load_report
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = reference(x, output_hidden_states=True, output_attentions=True)
        actual = model(x, output_hidden_states=True, output_attentions=True)
    assert len(actual.feature_maps) == len(out_indices)
    for a, e in zip(actual.feature_maps, expected.feature_maps):
        close(a, e)
    assert len(actual.hidden_states) == len(expected.hidden_states)
    for a, e in zip(actual.hidden_states, expected.hidden_states):
        close(a, e)
    assert len(actual.attentions) == len(expected.attentions) == len(model.config.depths)
    for a, e in zip(actual.attentions, expected.attentions):
        assert a.shape == e.shape
        close(a, e)
    # channels and strides describe the real outputs
    assert [f.shape[1] for f in actual.feature_maps] == model.channels
    padded = [-(-size[0] // s) for s in model.strides]
    assert [f.shape[2] for f in actual.feature_maps] == [max(1, p) for p in padded]


def test_swin_tiny_shapes_and_early_exit():
    model = SwinBackbone(SwinConfig(out_indices=(0, 1, 2))).eval()
    calls = []
    for i, stage in enumerate(model.layers):
        stage.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert [list(f.shape) for f in out.feature_maps] == [[1, 96, 56, 56], [1, 96, 56, 56], [1, 192, 28, 28]]
    assert calls == [0, 1]  # stages 3 and 4 never run
    assert model.channels == [96, 96, 192] and model.strides == [4, 4, 8]
    frozen = {n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad and n.startswith("layers.")}
    assert frozen == {"1", "2", "3"}  # stage2's merging, stages 3-4
    assert model.layers[1].blocks[0].norm1.weight.requires_grad


def test_early_selection_matches_full_run(tmp_path):
    _hf_backbone(tmp_path, (0, 1, 2, 3))
    full = SwinBackbone.from_pretrained(tmp_path)
    early = SwinBackbone.from_pretrained(tmp_path, out_indices=(1,))
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        close(early(x).feature_maps[0], full(x).feature_maps[1])


@pytest.mark.parametrize("head", ["SwinModel", "SwinForImageClassification"])
def test_loads_transformers_task_models(tmp_path, head):
    config = transformers.SwinConfig(**TINY)
    reference = getattr(transformers, head)(config).eval()
    _randomise(reference)
    reference.save_pretrained(tmp_path)
    model = SwinBackbone.from_pretrained(tmp_path, out_indices=(1, 2, 3))
    # only the per-stage norms are new: a task model has none
    assert {k.rsplit(".", 1)[0] for k in model.load_report.missing_keys} == {
        "hidden_states_norms.stage1", "hidden_states_norms.stage2", "hidden_states_norms.stage3"
    }  # fmt: skip
    assert not model.load_report.unexpected_keys  # classifier and final norm are known, not reported
    swin = reference if head == "SwinModel" else reference.swin
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        expected = swin(
            x, output_hidden_states=True, always_partition=True, output_hidden_states_before_downsampling=True
        ).reshaped_hidden_states
        actual = model(x, output_hidden_states=True).hidden_states
    for a, e in zip(actual, expected):
        close(a, e)


def test_legacy_bin_and_swin_prefix(tmp_path):
    reference = transformers.SwinForImageClassification(transformers.SwinConfig(**TINY)).eval()
    _randomise(reference)
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")  # transformers-5 in-memory names
    model = SwinBackbone.from_pretrained(tmp_path, out_indices=(3,))
    assert not model.load_report.unexpected_keys
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference.swin(x, output_hidden_states=True, always_partition=True,
                                  output_hidden_states_before_downsampling=True).reshaped_hidden_states[-1]  # fmt: skip
        close(model(x, output_hidden_states=True).hidden_states[-1], expected)


def test_save_loads_in_transformers(tmp_path):
    model = SwinBackbone(SwinConfig(out_indices=(1, 2, 3), **TINY)).eval()
    _randomise(model)
    model.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    assert "encoder.layers.0.blocks.0.attention.self.query.weight" in on_disk
    assert not any("qkv" in k for k in on_disk)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "swin"
    reference, info = transformers.SwinBackbone.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        for a, e in zip(model(x).feature_maps, reference.eval()(x).feature_maps):
            close(a, e)
    reloaded = AutoBackbone.from_pretrained(tmp_path)
    assert isinstance(reloaded, SwinBackbone) and reloaded.load_report.ok
    assert reloaded.config == model.config


def test_config_matches_transformers(tmp_path):
    ours, theirs = SwinConfig().to_dict(), transformers.SwinConfig().to_dict()
    for key in ("image_size", "patch_size", "num_channels", "embed_dim", "depths", "num_heads", "window_size",
                "mlp_ratio", "qkv_bias", "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate",
                "hidden_act", "use_absolute_embeddings", "layer_norm_eps", "initializer_range", "encoder_stride",
                "num_layers", "hidden_size", "stage_names", "out_features", "out_indices"):  # fmt: skip
        assert ours[key] == (list(theirs[key]) if isinstance(theirs[key], tuple) else theirs[key]), key
    transformers.SwinConfig(out_features=["stage2", "stage4"], embed_dim=48).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, SwinConfig) and config.out_indices == [2, 4] and config.embed_dim == 48
    assert config.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]


def test_maskformer_swin_layout(tmp_path):
    config = transformers.MaskFormerSwinConfig(out_features=["stage1", "stage2", "stage3"], **TINY)
    reference = transformers.MaskFormerSwinBackbone(config).eval()
    _randomise(reference)
    reference.save_pretrained(tmp_path)
    model = AutoBackbone.from_pretrained(tmp_path)
    assert isinstance(model, SwinBackbone) and model.out_features == ["stage1", "stage2", "stage3"]
    assert model.load_report.ok, model.load_report
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        for a, e in zip(model(x).feature_maps, reference(x).feature_maps):
            close(a, e)
    # nested in a MaskFormer checkpoint
    nested = {f"model.pixel_level_module.encoder.{k}": v for k, v in reference.state_dict().items()}
    report = SwinBackbone(model.config).load_checkpoint(nested)
    assert report.ok, report


def _timm_tiny(**kwargs):
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 2, 1), num_heads=(1, 2, 4), num_classes=5, **kwargs
    ).eval()
    _randomise(model)
    return model


@pytest.mark.parametrize(("window", "img"), [(4, 64), (6, 96)])
def test_timm_checkpoint_parity(tmp_path, window, img):
    reference = _timm_tiny(window_size=window, img_size=img)
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    args = {"embed_dim": 16, "depths": [1, 2, 1], "num_heads": [1, 2, 4], "window_size": window, "img_size": img}
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "swin_tiny_patch4_window7_224",
                                                      "num_classes": 5, "model_args": args}))  # fmt: skip
    model = SwinBackbone.from_pretrained(tmp_path, out_indices=(1, 2, 3))
    assert model.config.window_semantics == "timm" and model.config.image_size == img
    assert all(k.startswith("hidden_states_norms.") for k in model.load_report.missing_keys)
    assert not model.load_report.unexpected_keys
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)
        actual = model(x, output_hidden_states=True).hidden_states[1:]
    for a, e in zip(actual, expected):
        close(a, e)


def test_timm_conversion_round_trip():
    reference = _timm_tiny(window_size=4, img_size=64)
    state = reference.state_dict()
    hf = swin_timm_to_transformers(state)
    assert "encoder.layers.0.downsample.reduction.weight" in hf and "classifier.weight" in hf
    assert "encoder.layers.1.blocks.1.attention.self.value.bias" in hf
    back = swin_transformers_to_timm(hf)
    persistent = {k for k in state if not k.endswith(("relative_position_index", "attn_mask"))}
    assert set(back) == persistent
    for k in back:
        torch.testing.assert_close(back[k], state[k], rtol=0, atol=0)
    # and the transformers model computes the same stages as timm (transformers window semantics differ only
    # where a map fits in one window, so compare the first two stages)
    model = SwinBackbone(SwinConfig(**{**TINY, "image_size": 64}, out_indices=(1, 2)))
    assert model.load_checkpoint({f"swin.{k}": v for k, v in hf.items()}).missing_keys == [
        "hidden_states_norms.stage1.weight", "hidden_states_norms.stage1.bias",
        "hidden_states_norms.stage2.weight", "hidden_states_norms.stage2.bias",
    ]  # fmt: skip
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)
        actual = model.eval()(x, output_hidden_states=True).hidden_states
    close(actual[1], expected[0])
    close(actual[2], expected[1])


def test_missing_and_unexpected_keys_reported(tmp_path):
    _hf_backbone(tmp_path, (1, 2))
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.layers.0.blocks.0.attention.self.key.weight"]
    del state["embeddings.norm.bias"]
    state["encoder.layers.0.blocks.0.extra.weight"] = torch.zeros(1)
    model = SwinBackbone(SwinConfig(out_indices=(1, 2), **TINY))
    report = model.load_checkpoint(state)
    assert "patch_embed.norm.bias" in report.missing_keys
    assert "layers.0.blocks.0.attn.qkv.weight" in report.missing_keys
    assert "encoder.layers.0.blocks.0.attention.self.query.weight" in report.unexpected_keys
    assert "encoder.layers.0.blocks.0.extra.weight" in report.unexpected_keys
    with pytest.raises(ValueError, match="missing keys"):
        model.load_checkpoint(state, strict=True)
    state = load_file(tmp_path / "model.safetensors")
    state["embeddings.norm.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match="mismatched shapes"):
        model.load_checkpoint(state)


def test_mask_cache_is_bounded_and_tracks_weights(monkeypatch):
    monkeypatch.setattr(SwinWindowAttention, "cache_size", 3)
    model = SwinBackbone(SwinConfig(out_indices=(1, 2, 3), **TINY)).eval()
    _randomise(model)
    attn = model.layers[0].blocks[0].attn
    with torch.no_grad():
        for size in range(16, 16 * 6, 16):  # one more window per side each time: a new geometry
            model(torch.randn(1, 3, size, 16))
        caches = [m._mask_cache for m in model.modules() if isinstance(m, SwinWindowAttention)]
        assert max(len(c) for c in caches) == SwinWindowAttention.cache_size
        x = torch.randn(1, 3, 32, 32)
        before = model(x).feature_maps[0]
        attn.relative_position_bias_table.add_(1.0)  # in-place update (as an optimizer step) invalidates
        after = model(x).feature_maps[0]
        model.set_fast_path(False)
        reference = model(x).feature_maps[0]
    assert not torch.allclose(before, after)
    close(after, reference)


@pytest.mark.parametrize("mask_layout", ["per-window", "windows-in-heads"])
def test_fused_and_reference_paths_agree(monkeypatch, mask_layout):
    if mask_layout == "windows-in-heads":  # the layout for masks too large to repeat per image
        monkeypatch.setattr(swin_module, "_BATCHED_MASK_MAX_NUMEL", 0)
    model = SwinBackbone(SwinConfig(out_indices=(0, 1, 2, 3), **TINY)).eval()
    _randomise(model)
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        fused = model(x, output_hidden_states=True)
        model.set_fast_path(False)
        plain = model(x, output_attentions=True, output_hidden_states=True)
        monkeypatch.setattr(swin_module, "_BATCHED_MASK_MAX_NUMEL", 1 << 22)
        other = model(torch.cat([x, x[:1]]), output_attentions=True)
    for a, b in zip(fused.feature_maps + fused.hidden_states, plain.feature_maps + plain.hidden_states):
        close(a, b)
    for a, b in zip(plain.attentions, other.attentions):
        close(a, b[: a.shape[0]])  # image-major: the first two images' windows come first


def test_training_gradients_checkpointing_and_bias_grad():
    config = SwinConfig(out_indices=(1, 2), drop_path_rate=0.0, **TINY)
    model = SwinBackbone(config).train()
    _randomise(model)
    x = torch.randn(2, 3, 45, 61)

    def grads():
        model.zero_grad()
        sum(f.square().mean() for f in model(x).feature_maps).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    table = "layers.1.blocks.1.attn.relative_position_bias_table"
    assert table in plain and plain[table].abs().sum() > 0
    # DDP's condition for find_unused_parameters=False: every trainable parameter gets a gradient
    assert set(plain) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("layers.2.", "layers.1.downsample")) for n in plain)  # never in the graph
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        close(checkpointed[n], plain[n])


def test_bf16_autocast():
    model = SwinBackbone(SwinConfig(out_indices=(1, 3), **TINY)).eval()
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        full = model(x).feature_maps
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x).feature_maps
    for a, b in zip(half, full):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=0.15, rtol=0.1)


def test_compiles_without_graph_breaks():
    model = SwinBackbone(SwinConfig(**{**TINY, "depths": [2, 1], "num_heads": [1, 2]}, out_indices=(0, 1))).eval()
    x = torch.randn(1, 3, 45, 61)  # padding, a shifted block, the early exit
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


def test_errors():
    with pytest.raises(ValueError, match="window_semantics must be one of"):
        SwinConfig(window_semantics="detectron")
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        SwinBackbone(SwinConfig(embed_dim=16, depths=[1], num_heads=[3]))
    with pytest.raises(ValueError, match="not a standard timm Swin"):
        SwinConfig.from_timm("swin_huge_patch4_window7_224")
    with pytest.raises(ValueError, match="valid stage names"):
        SwinConfig(out_features=["stage9"], **TINY)
    model = SwinBackbone(SwinConfig(**TINY))
    with pytest.raises(ValueError, match="expects 3"):
        model(torch.randn(1, 1, 32, 32))


@pytest.mark.slow  # two spawned processes: ~30 s on two busy cores
def test_ddp_early_out_indices_without_find_unused(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["SWIN_DDP_PORT"] = str(s.getsockname()[1])
    from swin_ddp_worker import run

    torch.multiprocessing.spawn(run, args=(2, str(tmp_path / "grad.pt")), nprocs=2, join=True)
    assert torch.load(tmp_path / "grad.pt").abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TIMM_SWIN_VARIANTS))
def test_timm_standard_variants_load(name):
    """Every standard timm Swin maps onto the native layout key for key and shape for shape; tiny runs at parity."""
    reference = timm.create_model(name).eval()
    state = reference.state_dict()
    model = SwinBackbone(SwinConfig.from_timm(name, out_indices=(1, 2, 3, 4)))
    report = model.load_checkpoint(state, strict=False)
    assert all(k.startswith("hidden_states_norms.") for k in report.missing_keys) and not report.unexpected_keys
    if name == "swin_tiny_patch4_window7_224":
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            expected = reference.forward_intermediates(x, intermediates_only=True)
            for a, e in zip(model.eval()(x, output_hidden_states=True).hidden_states[1:], expected):
                close(a, e)


def test_training_after_inference_mode():
    """Caches filled under torch.inference_mode must not leak inference tensors into autograd later."""
    model = SwinBackbone(SwinConfig(out_indices=(1, 2), **TINY))
    x = torch.randn(2, 3, 45, 61)
    with torch.inference_mode():
        model.eval()(x)
    sum(f.sum() for f in model.train()(x).feature_maps).backward()
    assert model.layers[1].blocks[1].attn.relative_position_bias_table.grad is not None
    model.eval().requires_grad_(False)  # frozen backbone, gradients w.r.t. the input (saliency)
    with torch.inference_mode():
        model(x)
    x.requires_grad_(True)
    sum(f.sum() for f in model(x).feature_maps).backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("window", [(2, 2), (3, 2)])
def test_window_partition_round_trip(window):
    from timm_backbone.layers import window_partition, window_reverse

    x = torch.randn(2, 6, 4, 5)
    windows = window_partition(x, window)
    assert windows.shape == (2, (6 // window[0]) * (4 // window[1]), window[0] * window[1], 5)
    torch.testing.assert_close(windows[0, 1], x[0, : window[0], window[1] : 2 * window[1]].reshape(-1, 5))
    torch.testing.assert_close(window_reverse(windows, window, 6, 4), x)


def test_optimize_for_inference_packs_linears_with_the_same_numbers(tmp_path):
    import copy
    import pickle

    from timm_backbone import layers

    model = SwinBackbone(SwinConfig(**TINY, out_indices=(1, 2, 3))).eval()
    _randomise(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = torch.randn(2, 3, 45, 61)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        plain = model(x).feature_maps
        packed = model.optimize_for_inference()(x).feature_maps
        for a, e in zip(packed, plain):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        if torch.backends.mkldnn.is_available():
            # every linear (attention, MLP, patch merging) read a oneDNN-packed copy; the parameters are untouched
            assert set(layers._PACKED_WEIGHTS) == set(linears)
            assert {entry[1].layout for entry in layers._PACKED_WEIGHTS.values()} == {torch._mkldnn}
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        # other input sizes run on the same packing
        other = torch.randn(1, 3, 32, 40)
        expected = copy.deepcopy(model).optimize_for_inference(False)(other).feature_maps
        for a, e in zip(model(other).feature_maps, expected):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        # new weights are packed again on the next call
        _randomise(model, std=0.2)
        fresh = SwinBackbone(model.config).eval()
        fresh.load_state_dict(model.state_dict())
        expected = fresh(x).feature_maps
        for a, e in zip(model(x).feature_maps, expected):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        # copies and pickles carry no packed tensors, and pack their own
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            for a, e in zip(clone(x).feature_maps, expected):
                torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
            if torch.backends.mkldnn.is_available():
                clone_linears = {m for m in clone.modules() if isinstance(m, torch.nn.Linear)}
                assert clone_linears <= set(layers._PACKED_WEIGHTS)
        model.optimize_for_inference(False)
        assert not set(layers._PACKED_WEIGHTS) & set(linears)
    # with autograd on the parameters are used as they are and get gradients
    model.optimize_for_inference()
    model(x).feature_maps[-1].sum().backward()
    assert model.layers[2].blocks[0].attn.qkv.weight.grad is not None


def test_inference_without_autograd_matches_the_autograd_forward_bit_for_bit():
    """Eval without autograd adds the attention branch's residual in place (into the branch's own temporary); every
    hidden state and output equals the out-of-place forward's, bit for bit (nothing returned is written to)."""
    model = SwinBackbone(SwinConfig(**TINY, out_indices=(1, 2, 3))).eval().requires_grad_(False)
    _randomise(model)
    x = torch.randn(2, 3, 45, 61)
    with torch.enable_grad():  # the same kernels (nothing requires grad), the residual added out of place
        recorded = model(x, output_hidden_states=True)
    with torch.inference_mode():
        plain = model(x, output_hidden_states=True)
    for a, e in zip(plain.hidden_states + plain.feature_maps, recorded.hidden_states + recorded.feature_maps):
        assert torch.equal(a, e)
