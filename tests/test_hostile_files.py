"""A checkpoint folder is data, never a program: no network, no files outside it, no hangs, and saves that stay a pair.

Each test attacks one promise the way a hostile or careless file would, on tiny random-initialised models, and
asserts the exact exception type and a stable fragment of its message (or the values of the defined behaviour).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_backbones import RESNET_FIELDS, SWIN_FIELDS, build

from timm_backbone import (
    MaskFormerConfig,
    MaskFormerForInstanceSegmentation,
    ResNetConfig,
    SwinConfig,
    TimmBackbone,
    TimmBackboneConfig,
)
from timm_backbone import hub as hub_module
from timm_backbone.auto import AutoBackbone, AutoConfig
from timm_backbone.benchmark import random_timm_state_dict
from timm_backbone.cli import main
from timm_backbone.hub import load_weights, resolve_source


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (and is recorded, in case the caller swallows the error)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        pytest.fail(f"a network connection was attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield attempts
    assert not attempts


def _edit_config(folder: Path, **changes) -> Path:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return path


# 1. no network, no files outside the folder -------------------------------------------------------------------------
FETCHING = [
    {"pretrained": True, "pretrained_cfg_overlay": {"url": "http://127.0.0.1:9/x.pth"}},
    {"pretrained": True, "pretrained_cfg_overlay": {"file": "/etc/hostname"}},
    {"pretrained_cfg_overlay": {"hf_hub_id": "timm/resnet18.a1_in1k"}},
    {"checkpoint_path": "/etc/hostname"},
    {"pretrained_cfg": {"url": "http://127.0.0.1:9/x.pth"}},
    {"cache_dir": "/tmp"},
]


@pytest.mark.parametrize("model_args", FETCHING, ids=["url", "file", "hf_hub_id", "checkpoint_path", "cfg", "cache"])
def test_config_json_cannot_make_timm_fetch(model_args, tmp_path, no_network):
    build("timm-list").save_pretrained(tmp_path)
    path = _edit_config(tmp_path, model_args=model_args)
    key = re.escape(repr(next(iter(model_args))))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: model_args sets {key}, which makes timm download"):
        TimmBackbone.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"model_args sets {key}"):
        AutoBackbone.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"model_args sets {key}"):
        AutoConfig.from_pretrained(tmp_path)


def test_timm_repo_config_and_task_config_cannot_fetch(tmp_path, no_network):
    (tmp_path / "config.json").write_text(
        json.dumps({"architecture": "test_resnet", "model_args": {"drop_rate": 0.0, "nested": {"url": "http://x"}}})
    )
    with pytest.raises(ValueError, match=r"model_args\['nested'\] sets 'url'"):
        TimmBackboneConfig.from_pretrained(tmp_path)
    task = {
        "model_type": "maskformer",
        "backbone": "test_resnet",
        "use_timm_backbone": True,
        "backbone_kwargs": {"pretrained_cfg_overlay": {"file": "/etc/hostname"}},
    }
    (tmp_path / "config.json").write_text(json.dumps(task))
    with pytest.raises(ValueError, match=r"backbone_kwargs sets 'pretrained_cfg_overlay'"):
        AutoConfig.from_pretrained(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"  # a folder beside this one: not read
    build("resnet").config.save_pretrained(outside)
    for backbone in (str(outside), f"../{outside.name}"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "maskformer", "backbone": backbone}))
        with pytest.raises(ValueError, match=r"names a local path; a config file may name its backbone by timm name"):
            AutoConfig.from_pretrained(tmp_path)


def test_the_same_keys_passed_in_code_are_honoured(tmp_path, no_network):
    source = build("timm-list")._backbone.state_dict()  # timm's own keys
    weights = tmp_path / "weights.pth"
    torch.save({k: v + 1 for k, v in source.items()}, weights)
    overlay = {"file": str(weights), "url": None, "hf_hub_id": None}
    config = TimmBackboneConfig("test_resnet", model_args={"pretrained": True, "pretrained_cfg_overlay": overlay})
    model = TimmBackbone(config)
    loaded = model._backbone.state_dict()
    torch.testing.assert_close(loaded["conv1.0.weight"], source["conv1.0.weight"] + 1)


# 2. sizes are bounded before anything is allocated ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "changes", "field"),
    [
        ("resnet", {"depths": [10**9, 1, 1, 1]}, r"depths\[0\] must be in \[1, 1024\], got 1000000000"),
        ("resnet", {"hidden_sizes": [10**6, 16, 32, 64]}, r"hidden_sizes\[0\] must be in \[1, 65536\]"),
        ("resnet", {"hidden_sizes": [60000, 60000, 60000, 60000]}, r"more than the limit .*hidden_sizes="),
        ("resnet", {"depths": [1000, 1, 1, 1]}, r"does not fit .*model.safetensors.*check .*depths=\[1000, 1, 1, 1\]"),
        ("swin", {"depths": [10**9, 1, 1, 1]}, r"depths\[0\] must be in \[1, 1024\]"),
        ("swin", {"embed_dim": 512, "num_heads": [1, 1, 1, 1]}, r"does not fit .*check embed_dim=512"),
        ("timm-list", {"model_args": {"layers": [10**6, 1, 1, 1]}}, r"model_args\['layers'\]\[0\] is 1000000"),
    ],
    ids=["resnet-depth", "resnet-width", "resnet-params", "resnet-vs-weights", "swin-depth", "swin-vs-weights", "timm"],
)
def test_absurd_or_mismatched_sizes_fail_fast(name, changes, field, tmp_path):
    build(name).save_pretrained(tmp_path)
    path = _edit_config(tmp_path, **changes)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=field) as info:
        AutoBackbone.from_pretrained(tmp_path)
    assert time.perf_counter() - start < 1.0
    assert str(path) in str(info.value)


def test_sizes_are_bounded_for_configs_built_in_code():
    with pytest.raises(ValueError, match=r"about 1.\d+e\+1\d parameters, more than the limit"):
        ResNetConfig(hidden_sizes=[65536] * 4, depths=[1024] * 4)
    with pytest.raises(ValueError, match=r"embed_dim 16384 doubled over 4 stages \(depths\) gives 131072 channels"):
        SwinConfig(embed_dim=16384, depths=[1] * 4, num_heads=[1] * 4)


# 3. a save is one unit ----------------------------------------------------------------------------------------------
def _variant(i: int) -> torch.nn.Module:
    model = build("timm-list", out_indices=(i,))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(i))
    return model


def _assert_one_save(folder: Path, allowed: set[int]) -> None:
    """The folder loads as one save's config with the same save's weights, or is refused as a mixed pair."""
    try:
        model = TimmBackbone.from_pretrained(folder)
    except OSError as err:
        assert "come from two different saves" in str(err)
        return
    which = model.out_indices[0]
    assert which in allowed
    assert all(bool((p == float(which)).all()) for p in model.parameters()), "weights of one save, config of another"


def test_concurrent_savers_never_leave_a_mixed_pair(tmp_path):
    models = {i: _variant(i) for i in (1, 2)}
    errors = []

    def save(i):
        try:
            for _ in range(15):
                models[i].save_pretrained(tmp_path)
        except BaseException as err:  # reported below
            errors.append(err)

    def read():
        try:
            for _ in range(15):
                if (tmp_path / "config.json").exists():
                    model = TimmBackbone.from_pretrained(tmp_path)  # the readers' lock: never a mixed pair
                    which = model.out_indices[0]
                    assert all(bool((p == float(which)).all()) for p in model.parameters())
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=save, args=(i,)) for i in models] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    _assert_one_save(tmp_path, {1, 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("call", [1, 2])
@pytest.mark.parametrize("function", ["replace", "fsync", "chmod"])
def test_an_interrupt_at_any_step_never_gives_a_silent_mixed_pair(function, call, tmp_path, monkeypatch):
    _variant(1).save_pretrained(tmp_path)
    real = getattr(os, function)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(hub_module.os, function, interrupted)
    with pytest.raises(KeyboardInterrupt):
        _variant(2).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert len(calls) == call
    _assert_one_save(tmp_path, {1, 2})
    if function == "replace" and call == 2:  # the weights moved, the config did not: refused, not loaded
        with pytest.raises(OSError, match=r"come from two different saves .* save the model into it again"):
            TimmBackbone.from_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


# 4. saved files are readable as the umask says ----------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_follow_the_umask_and_keep_existing_modes(umask, tmp_path):
    old = os.umask(umask)
    try:
        build("timm-list").save_pretrained(tmp_path)
        for name in ("config.json", "model.safetensors"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
        os.chmod(tmp_path / "model.safetensors", 0o640)
        build("timm-list").save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o640
        TimmBackboneConfig("test_resnet").save_pretrained(tmp_path / "config-only")
        assert (tmp_path / "config-only" / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask
    finally:
        os.umask(old)


# 5. weights that do not fit are refused -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
@pytest.mark.parametrize("name", ["timm-list", "resnet"])
def test_non_floating_weights_are_refused(name, dtype, tmp_path):
    build(name).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = next(k for k, v in state.items() if k.endswith("weight") and v.dim() == 4)
    state[key] = state[key].to(dtype)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"are not floating point but the model's are: {re.escape(key)} \({dtype}\)"):
        AutoBackbone.from_pretrained(tmp_path)


def test_timm_format_weights_of_the_wrong_dtype_are_refused(tmp_path):
    state = build("timm-list")._backbone.state_dict()
    state["conv1.0.weight"] = state["conv1.0.weight"].to(torch.int32)
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"conv1.0.weight \(torch.int32\)"):
        TimmBackbone.from_pretrained(tmp_path / "w.safetensors", backbone="test_resnet")


def test_weights_of_another_model_are_refused(tmp_path):
    build("resnet").save_pretrained(tmp_path)
    # relabelled: a Swin config (as small as the ResNet, so the sizes agree) over ResNet weights
    _edit_config(tmp_path, model_type="swin", **{**SWIN_FIELDS, "embed_dim": 4})
    with pytest.raises(ValueError, match=r"no key of the checkpoint in .*model.safetensors matches SwinBackbone"):
        AutoBackbone.from_pretrained(tmp_path)
    model = build("swin")
    with pytest.raises(ValueError, match="no key of the checkpoint matches SwinBackbone"):
        model.load_checkpoint({"unrelated.weight": torch.zeros(1)})


# 6. a .bin zip bomb is refused before it is read --------------------------------------------------------------------
def _zip_bomb(path: Path, tensors: dict[str, torch.Tensor], size: int) -> None:
    """A torch.save archive whose first storage record is replaced by ``size`` compressed zero bytes."""
    torch.save(tensors, path)
    with zipfile.ZipFile(path) as archive:
        records = [(info, archive.read(info)) for info in archive.infolist()]
    target = next(info.filename for info, _ in records if "/data/" in info.filename)
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in records:
            if info.filename == target:
                archive.writestr(info.filename, bytes(size), compress_type=zipfile.ZIP_DEFLATED)
            else:
                archive.writestr(info, data)


def test_bin_zip_bomb_is_refused_unread(tmp_path, monkeypatch):
    model = build("resnet")
    model.config.save_pretrained(tmp_path)
    _zip_bomb(tmp_path / "pytorch_model.bin", model.state_dict(), 16 * 2**20)
    assert (tmp_path / "pytorch_model.bin").stat().st_size < 2**20

    def never(*args, **kwargs):
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(hub_module.torch, "load", never)
    with pytest.raises(OSError, match=r"compressed tensor record .* declaring 16777216 bytes.*refused unread"):
        AutoBackbone.from_pretrained(tmp_path)


def test_bin_declaring_more_storage_than_the_model_holds(tmp_path, monkeypatch):
    model = build("resnet")
    model.config.save_pretrained(tmp_path)
    torch.save({**model.state_dict(), "padding": torch.zeros(2**24 + 2**20)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match=r"declares \d+ bytes of tensors, more than the \d+ bytes the model can hold"):
        AutoBackbone.from_pretrained(tmp_path)
    with pytest.raises(OSError, match="more than the 1000 bytes"):
        load_weights(tmp_path / "pytorch_model.bin", max_bytes=1000)


# 7. errors are the promised ones, and name the file ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "changes", "error", "fragment"),
    [
        ("resnet", {"id2label": [1, 2]}, TypeError, "id2label must be an object mapping class ids to names"),
        ("resnet", {"id2label": {"x": "cat"}}, ValueError, "id2label keys must be class ids"),
        ("resnet", {"embedding_size": "8"}, TypeError, "embedding_size must be an int, got '8' (str)"),
        ("resnet", {"depths": "1111"}, TypeError, "depths must be a list of ints, got '1111' (str)"),
        ("resnet", {"hidden_sizes": [-8, 16, 32, 64]}, ValueError, "hidden_sizes[0] must be in [1, 65536], got -8"),
        ("resnet", {"num_labels": -1, "id2label": None}, ValueError, "num_labels must be in"),
        ("swin", {"num_heads": [0, 1, 1, 1]}, ValueError, "num_heads[0] must be in [1, 65536], got 0"),
        ("swin", {"layer_norm_eps": "abc"}, TypeError, "layer_norm_eps must be a number, got 'abc' (str)"),
        ("swin", {"mlp_ratio": float("nan")}, ValueError, "mlp_ratio must be finite"),
        ("swin", {"window_size": 7.5}, TypeError, "window_size must be an int"),
        ("timm-list", {"num_channels": True}, TypeError, "num_channels must be an int, got True (bool)"),
        ("timm-list", {"model_args": [1]}, TypeError, "model_args must be an object"),
    ],
)
def test_bad_config_fields_name_the_file_and_field(name, changes, error, fragment, tmp_path):
    build(name).save_pretrained(tmp_path)
    path = _edit_config(tmp_path, **changes)
    with pytest.raises(error, match=re.escape(fragment)) as info:
        AutoBackbone.from_pretrained(tmp_path)
    assert str(info.value).startswith(str(path))
    with pytest.raises(error, match=re.escape(fragment)):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"model_type": "resnet", "x": "\xff\xfe"}', "not UTF-8 text"),
        (b'{"model_type": "resnet", "x": ' + b"9" * 5000 + b"}", "is not valid JSON"),
        (b'{"model_type": ', "is not valid JSON"),
    ],
    ids=["deep", "utf8", "huge-int", "truncated"],
)
def test_unreadable_json_is_an_os_error_naming_the_file(content, fragment, tmp_path):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(OSError, match=re.escape(fragment)) as info:
        AutoConfig.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


@pytest.mark.parametrize("value", [["model.safetensors"], 3, None, {"a": 1}])
def test_shard_index_values_are_checked(value, tmp_path):
    build("timm-list").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "shard.safetensors")
    weight_map = {"a": "shard.safetensors", "b": value}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(OSError, match=r"index.json: weight_map\['b'\] must be a shard file name \(a string\)"):
        TimmBackbone.from_pretrained(tmp_path)


def test_refused_pickle_does_not_advise_weights_only_false(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    model = build("timm-list")
    model.config.save_pretrained(tmp_path)
    torch.save({**model.state_dict(), "x": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="unsupported GLOBAL") as info:
        TimmBackbone.from_pretrained(tmp_path)
    assert "weights_only=False" not in str(info.value) and "set to `False`" not in str(info.value)
    assert "files that need arbitrary code to unpickle are refused" in str(info.value)


def test_cli_reports_bad_files_with_one_message_and_exit_2(tmp_path, capsys):
    build("resnet").save_pretrained(tmp_path)
    _edit_config(tmp_path, id2label=[1, 2])
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("timm-backbone inspect: error: ") and "id2label must be an object" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# 8. MaskFormer labels -----------------------------------------------------------------------------------------------
DECODER = dict(d_model=32, decoder_layers=1, num_queries=4, decoder_attention_heads=2, decoder_ffn_dim=32, dropout=0.0)


@pytest.fixture(scope="module")
def maskformer():
    backbone = ResNetConfig(**RESNET_FIELDS, out_indices=[1, 2, 3, 4])
    config = MaskFormerConfig(
        backbone_config=backbone, decoder_config=DECODER, fpn_feature_size=32, mask_feature_size=32, num_labels=5
    )
    return MaskFormerForInstanceSegmentation(config)


def _labels(dtype=torch.float32, value=1):
    masks = torch.zeros(2, 64, 64, dtype=dtype)
    masks[0, :32], masks[1, 32:] = value, value
    return [masks, masks.clone()]


@pytest.mark.parametrize(("value", "found"), [(255, r"\[255.0\]"), (float("nan"), r"\[nan"), (2, r"\[2.0\]")])
def test_maskformer_masks_must_be_binary(maskformer, value, found):
    with pytest.raises(ValueError, match=rf"mask_labels\[0\] must be binary \(0 and 1\), but holds {found}"):
        maskformer.train()(
            torch.randn(2, 3, 64, 64),
            mask_labels=_labels(value=value),
            class_labels=[torch.ones(2, dtype=torch.int64)] * 2,
        )


def test_maskformer_takes_binary_masks_and_class_ids_of_any_width(maskformer):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    classes = [torch.tensor([1, 3]), torch.tensor([0, 4])]
    model = maskformer.train()
    reference = model(x, mask_labels=_labels(), class_labels=classes).loss
    assert torch.isfinite(reference)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        loss = model(x, mask_labels=_labels(), class_labels=[c.to(dtype) for c in classes]).loss
        torch.testing.assert_close(loss, reference)
    for mask_dtype in (torch.bool, torch.uint8, torch.int64):
        loss = model(x, mask_labels=_labels(mask_dtype), class_labels=classes).loss
        torch.testing.assert_close(loss, reference)
    with pytest.raises(
        ValueError, match=r"class_labels\[0\] must be a 1-D integer tensor of class ids, got torch.bool"
    ):
        model(x, mask_labels=_labels(), class_labels=[c.bool() for c in classes])


def test_maskformer_empty_batch_and_minimum_size(maskformer):
    model = maskformer.eval()
    with torch.no_grad():
        one = model(torch.randn(1, 3, 64, 64))
        empty = model(torch.randn(0, 3, 64, 64))
    for name in ("class_queries_logits", "masks_queries_logits", "encoder_last_hidden_state"):
        assert getattr(empty, name).shape == (0, *getattr(one, name).shape[1:])
    with pytest.raises(ValueError, match=r"a single 32x32 image is too small for MaskFormer .* at least 64 pixels"):
        model(torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).class_queries_logits.shape == (2, 4, 6)  # two images normalise


# 9. smaller promises ------------------------------------------------------------------------------------------------
def test_convert_refuses_to_overwrite_its_source_unless_in_place(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    state_dict = random_timm_state_dict("resnet18", 0, layers=[1, 1, 1, 1], channels=[8, 16, 32, 64])
    save_file(state_dict, weights)
    before = weights.read_bytes()
    assert main(["convert", str(weights), str(weights)]) == 2
    assert "would overwrite the source" in capsys.readouterr().err
    assert weights.read_bytes() == before
    assert main(["convert", str(weights), str(weights), "--in-place"]) == 0
    assert "resnet.embedder.embedder.convolution.weight" in load_file(weights)  # rewritten in transformers' layout


def test_features_size_must_be_positive(capsys):
    with pytest.raises(SystemExit) as info:
        main(["features", "resnet18", "--size", "0"])
    assert info.value.code == 2
    assert "--size takes a positive number of pixels" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["hf-hub:../..", "hf-hub:org/..", "hf-hub:./x"])
def test_hf_hub_prefix_is_never_a_local_path(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf-hub:..").mkdir()
    (tmp_path / "hf-hub:org").mkdir()
    (tmp_path / "hf-hub:.").mkdir()
    with pytest.raises(OSError, match="does not name a hub repo"):
        resolve_source(name)


def test_zero_sized_images_name_the_right_minimum():
    model = build("resnet")
    with pytest.raises(
        ValueError, match=r"is 0x32 .*smaller than the minimum 1x1: ResNetBackbone needs images"
    ) as info:
        model(torch.randn(1, 3, 0, 32))
    assert "stride" not in str(info.value)


def test_numpy_integers_select_stages():
    model = build("resnet", out_indices=np.array([1, -1]).tolist())
    assert build("resnet", out_indices=(np.int64(1), np.int32(-1))).out_indices == model.out_indices == [1, 4]
    with pytest.raises(TypeError, match="out_indices must contain ints"):
        build("resnet", out_indices=(np.float32(1),))
