"""Bad input fails clearly, hostile files run no code, and saves are atomic.

Every backbone family is covered through tiny random-initialised models (tests/tiny_backbones.py); each test asserts
the exact error type and a fragment of its message, or the values of the defined behaviour.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_backbones import BACKBONES, build, shared

import timm_backbone
from timm_backbone import TimmBackbone, TimmBackboneConfig
from timm_backbone import hub as hub_module
from timm_backbone.auto import AutoBackbone, AutoConfig
from timm_backbone.hub import load_weights

ALL = list(BACKBONES)
FAMILIES = ["timm-list", "timm-getter", "swin", "resnet"]  # one per way stages are selected


def _size(name: str) -> int:
    return BACKBONES[name][1]


def _images(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, _size(name), _size(name))


# selections ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(
    ("selection", "fragment"),
    [
        (lambda n: {"out_indices": (n,)}, "out of range"),
        (lambda n: {"out_indices": (-n - 1,)}, "out of range"),
        (lambda n: {"out_indices": (1, 1)}, "more than once"),
        (lambda n: {"out_indices": (2, 1)}, "must follow stage order"),
        (lambda n: {"out_indices": ()}, "must not be empty"),
        (lambda n: {"out_features": ["no_such_stage"]}, "unknown stage 'no_such_stage'"),
        (lambda n: {"out_indices": (1,), "out_features": "LAST"}, "select different stages"),
    ],
    ids=["out-of-range", "too-negative", "duplicate", "unordered", "empty", "unknown-name", "disagreeing"],
)
def test_bad_selection_names_the_valid_choices(name, selection, fragment):
    stage_names = shared(name).stage_names
    kwargs = selection(len(stage_names))
    if kwargs.get("out_features") == "LAST":
        kwargs["out_features"] = [stage_names[-1]]
    with pytest.raises(ValueError, match=re.escape(fragment)) as info:
        build(name, **kwargs)
    assert repr(stage_names[-1]) in str(info.value) or stage_names[-1] in str(info.value)


@pytest.mark.parametrize("name", ["timm-list", "swin", "resnet"])
def test_bad_selection_on_reload_and_setter(name, tmp_path):
    model = build(name)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="out of range"):
        type(model).from_pretrained(tmp_path, out_indices=(99,))
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        model.config.out_features = ["nope"]
    assert model.config.out_indices == [len(model.stage_names) - 1]  # the failed setter changed nothing


@pytest.mark.parametrize("bad", [(1.0,), ("1",), (True,)], ids=["float", "str", "bool"])
def test_selection_of_the_wrong_type(bad):
    with pytest.raises(TypeError, match="out_indices must contain ints"):
        build("timm-list", out_indices=bad)


# tensors ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_bad_tensors_raise_clear_errors(name):
    model = shared(name)
    size = _size(name)
    with pytest.raises(ValueError, match=r"4-D batch .* got shape \(3, 32, 32\).*pixel_values\[None\]"):
        model(torch.randn(3, size, size))
    with pytest.raises(ValueError, match="4-D batch"):
        model(torch.randn(1, 1, 3, size, size))
    with pytest.raises(ValueError, match="has 4 channels but the backbone expects 3"):
        model(torch.randn(1, 4, size, size))
    with pytest.raises(ValueError, match=r"has 32 channels but the backbone expects 3.*NCHW"):
        model(torch.randn(1, size, size, 3))  # NHWC by mistake
    with pytest.raises(TypeError, match=r"floating point tensor, got torch.uint8"):
        model(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor, got ndarray"):
        model(np.zeros((1, 3, size, size), dtype=np.float32))
    with pytest.raises(TypeError, match=r"torch.float16 but the weights are torch.float32"):
        model(torch.randn(1, 3, size, size, dtype=torch.float16))


# native ResNet opts out (min_size=1): like transformers' ResNet it pads any size down to 1x1 maps
ANY_SIZE = {"resnet"}


@pytest.mark.parametrize("name", sorted(set(ALL) - ANY_SIZE))
def test_images_smaller_than_the_deepest_stride_name_the_minimum(name):
    model = shared(name)
    deepest = model.stage_strides[-1]
    assert model.min_input_size == deepest
    last = re.escape(model.stage_names[-1])
    with pytest.raises(ValueError, match=rf"smaller than the minimum {deepest}x{deepest}.*stage '{last}' has stride"):
        model(torch.randn(1, 3, deepest - 1, 4 * deepest))
    with pytest.raises(ValueError, match=rf"is {4 * deepest}x8 \(height x width\)"):
        model(torch.randn(1, 3, 4 * deepest, 8))
    out = model(torch.randn(1, 3, deepest, deepest))  # exactly the minimum runs: one cell in the deepest map
    assert out.feature_maps[-1].shape[-2:] == (1, 1)


@pytest.mark.parametrize("name", sorted(ANY_SIZE))
def test_any_size_backbones_give_defined_output_for_tiny_images(name):
    model = build(name, out_indices=(1, 2, 3, 4))
    with torch.no_grad():
        maps = model(torch.randn(2, 3, 8, 8)).feature_maps
    assert [tuple(f.shape[-2:]) for f in maps] == [(2, 2), (1, 1), (1, 1), (1, 1)]
    assert all(f.isfinite().all() for f in maps)


@pytest.mark.parametrize("name", ["timm-list", "swin"])
def test_minimum_size_follows_the_selection(name):
    model = build(name, out_indices=(1,))
    stride = model.stage_strides[1]
    assert model.min_input_size == stride < model.stage_strides[-1]
    assert model(torch.randn(1, 3, stride, stride)).feature_maps[0].shape[-2:] == (1, 1)
    with pytest.raises(ValueError, match=f"minimum {stride}x{stride}"):
        model(torch.randn(1, 3, stride - 1, stride))


def test_timm_resnet18_rejects_8x8():
    model = TimmBackbone(TimmBackboneConfig("resnet18", out_indices=(1, 2, 3, 4))).eval()
    with pytest.raises(ValueError, match=r"8x8 .*minimum 32x32: the deepest selected stage 'layer4' has stride 32"):
        model(torch.randn(1, 3, 8, 8))
    assert [f.shape[-1] for f in model(torch.randn(1, 3, 33, 33)).feature_maps] == [9, 5, 3, 2]  # any size >= 32


def test_timm_vit_fixed_and_patch_multiple_sizes():
    fixed = build("timm-getter", model_args={"dynamic_img_size": False})  # timm: one image size only
    with pytest.raises(ValueError, match=r"'test_vit' takes 160x160 images only, got 64x64.*img_size"):
        fixed(torch.randn(1, 3, 64, 64))
    assert fixed(torch.randn(1, 3, 160, 160)).feature_maps[0].shape == (1, 64, 10, 10)
    dynamic = build("timm-getter")  # dynamic_img_size: any multiple of the patch size
    with pytest.raises(ValueError, match=r"divisible by its patch size 16x16, got 40x48.*dynamic_img_pad"):
        dynamic(torch.randn(1, 3, 40, 48))
    assert dynamic(torch.randn(1, 3, 48, 64)).feature_maps[0].shape == (1, 64, 3, 4)
    padded = build("timm-getter", model_args={"dynamic_img_pad": True})
    assert padded(torch.randn(1, 3, 40, 50)).feature_maps[0].shape == (1, 64, 3, 4)  # padded up to 48x64


def test_timm_asserts_surface_as_value_error(monkeypatch):
    model = build("timm-list")

    def failing(*args, **kwargs):
        raise AssertionError  # timm's asserts often carry no message

    monkeypatch.setattr(model._backbone, "forward", failing)
    monkeypatch.setattr(model, "_runs_at", lambda size: size == (64, 64))  # what the meta-device copy would find
    with pytest.raises(
        ValueError,
        match=r"timm model 'test_resnet' cannot run pixel_values of shape \(1, 3, 32, 32\) \(AssertionError without a "
        r"message\); it runs 64x64",
    ):
        model(torch.randn(1, 3, 32, 32))
    monkeypatch.setattr(model, "_runs_at", lambda size: True)  # the size runs: not a size problem, timm's error stays
    with pytest.raises(AssertionError):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name", ALL)
def test_nan_and_inf_pass_through_without_leaking_across_the_batch(name):
    model = shared(name)
    x = _images(name)
    x[0, 0, 0, 0] = float("nan")
    x[0, 1, 5, 5] = float("inf")
    with torch.no_grad():
        out = model(x).feature_maps
        alone = model(x[1:]).feature_maps
    assert all(f[0].isnan().any() for f in out)  # the poisoned image shows it
    for f, ref in zip(out, alone):
        assert f[1].isfinite().all()
        torch.testing.assert_close(f[1:], ref, rtol=1e-4, atol=1e-5)  # its neighbour is untouched


@pytest.mark.parametrize("name", ALL)
def test_empty_batch_and_strided_input(name):
    model = shared(name)
    x = _images(name, batch=2)
    with torch.no_grad():
        empty = model(x[:0]).feature_maps
        ref = model(x).feature_maps
        strided = model(x.to(memory_format=torch.channels_last)).feature_maps
    assert [tuple(f.shape) for f in empty] == [(0, *f.shape[1:]) for f in ref]
    torch.testing.assert_close(strided, ref, rtol=1e-4, atol=1e-5)


def test_timm_attentions_are_refused():
    with pytest.raises(ValueError, match="cannot return attentions"):
        shared("timm-list")(torch.randn(1, 3, 32, 32), output_attentions=True)


# names and files ----------------------------------------------------------------------------------------------------
def test_unknown_timm_names_suggest_close_matches():
    with pytest.raises(ValueError, match="unknown timm model 'resnet5O'; close matches: resnet50"):
        TimmBackbone(TimmBackboneConfig("resnet5O"))
    with pytest.raises(OSError, match=r"unknown timm model 'resnett18'; close matches: .*resnet18"):
        TimmBackbone.from_pretrained("resnett18")
    with pytest.raises(OSError, match=r"unknown timm model 'resnett18'; close matches: .*resnet18"):
        AutoBackbone.from_pretrained("resnett18")
    with pytest.raises(ValueError, match=r"unknown timm model 'qwertyuiop'; see timm\.list_models"):
        TimmBackbone(TimmBackboneConfig("qwertyuiop"))
    with pytest.raises(ValueError, match=r"no pretrained weights 'resnet18.no_such_tag'; valid .*resnet18.a1_in1k"):
        TimmBackbone.from_pretrained("resnet18.no_such_tag")
    with pytest.raises(TypeError, match="backbone must be a timm model name"):
        TimmBackboneConfig(backbone=18)


def test_missing_folders_and_files(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(OSError, match=re.escape(repr(str(missing)))):
        TimmBackbone.from_pretrained(missing)
    with pytest.raises(OSError, match=re.escape(str(missing))):
        AutoBackbone.from_pretrained(missing)
    with pytest.raises(OSError, match=re.escape(str(missing))):
        AutoConfig.from_pretrained(missing)
    with pytest.raises(OSError, match=r"tried it as\n.*does not exist\n  - a hub repo: it is not an id of the form"):
        TimmBackboneConfig.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match=r"has no config\.json"):
        TimmBackboneConfig.from_pretrained(empty)
    build("timm-list").config.save_pretrained(empty)  # a config without weights
    with pytest.raises(OSError, match=r"has none of the weight files \['model.safetensors'"):
        TimmBackbone.from_pretrained(empty)


def test_unknown_hub_ids_offline(tmp_path):
    cache = tmp_path / "hub"
    for load in (TimmBackbone.from_pretrained, AutoBackbone.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(OSError, match=r"'nobody/nothing' is not a local folder and is not in the hub cache"):
            load("nobody/nothing", cache_dir=cache)
    with pytest.raises(OSError, match=r"'resnet18.a1_in1k' are in hub repo 'timm/resnet18.a1_in1k'.*not in the hub"):
        TimmBackbone.from_pretrained("resnet18.a1_in1k", cache_dir=cache)


@pytest.mark.parametrize(("name", "foreign"), [("timm-list", "swin"), ("swin", "timm_backbone"), ("resnet", "swin")])
def test_config_json_of_another_model_type(name, foreign, tmp_path):
    model = build(name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": foreign, "backbone": "resnet18"}))
    save_file({}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"model_type {foreign!r}, but {type(model.config).__name__} reads"):
        type(model).from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"model_type {foreign!r}"):
        type(model.config).from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["timm-list", "swin", "resnet"])
@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],
        lambda data: data[:5],
        lambda data: b"",
        lambda data: os.urandom(len(data)),
        lambda data: (10**12).to_bytes(8, "little") + data[8:],  # a header length far past the end of the file
    ],
    ids=["truncated", "header-cut", "empty", "random", "huge-header"],
)
def test_corrupt_safetensors_name_the_file(name, damage, tmp_path):
    build(name).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(OSError, match=rf"could not read {re.escape(str(weights))}: .*truncated or corrupt"):
        type(build(name)).from_pretrained(tmp_path)


def test_safetensors_offsets_past_the_end(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(OSError, match=re.escape(str(path))):
        load_weights(path)


def test_corrupt_config_json_names_the_file(tmp_path):
    build("timm-list").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "timm_backbone", ')
    with pytest.raises(OSError, match=rf"{re.escape(str(tmp_path / 'config.json'))} is not valid JSON"):
        TimmBackbone.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(OSError, match="must hold a JSON object, got list"):
        TimmBackbone.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["timm-list", "swin", "resnet"])
def test_weight_shape_mismatch_names_the_key(name, tmp_path):
    model = build(name)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = next(k for k, v in state.items() if v.dim() >= 2)
    state[key] = torch.zeros(*[s + 1 for s in state[key].shape])
    save_file(state, tmp_path / "model.safetensors")
    # Swin reports its own module names for keys it renames on load; the others name the key as it is in the file
    shown = "patch_embed.proj.weight" if name == "swin" else key
    weights = re.escape(str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"mismatched shapes: .*{re.escape(shown)}: checkpoint .* loading {weights}"):
        type(model).from_pretrained(tmp_path)


def test_config_that_does_not_fit_the_weights(tmp_path):
    build("timm-list").save_pretrained(tmp_path)  # test_resnet weights; resnet18 has the same stage names
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "backbone": "resnet18"}))
    with pytest.raises(ValueError, match=r"checkpoint does not fit TimmBackbone: .*\d+ keys with mismatched shapes"):
        TimmBackbone.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "backbone": "test_convnext"}))
    with pytest.raises(ValueError, match=r"stage_names .* do not match the stages of timm model 'test_convnext'"):
        TimmBackbone.from_pretrained(tmp_path)


def test_strict_loading_reports_missing_and_unexpected_keys(tmp_path):
    model = build("timm-list")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dropped = sorted(state)[0]
    del state[dropped]
    state["_backbone.extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"1 missing keys .*{re.escape(dropped)}.*1 unexpected keys .*extra.weight"):
        TimmBackbone.from_pretrained(tmp_path, strict=True)
    report = TimmBackbone.from_pretrained(tmp_path).load_report  # lenient: loads and reports
    assert report.missing_keys == [dropped] and report.unexpected_keys == ["_backbone.extra.weight"]


def test_shard_index_problems(tmp_path):
    build("timm-list").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(OSError, match=r"shard 'model-00001-of-00002.safetensors' named in .* was not found"):
        TimmBackbone.from_pretrained(tmp_path)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(OSError, match="has no 'weight_map' object"):
        TimmBackbone.from_pretrained(tmp_path)
    outside = tmp_path.parent / "outside.safetensors"
    save_file({"a": torch.zeros(1)}, outside)
    for shard in ("../outside.safetensors", str(outside)):  # never read files outside the checkpoint folder
        index.write_text(json.dumps({"weight_map": {"a": shard}}))
        with pytest.raises(OSError, match="not a file inside the checkpoint folder"):
            TimmBackbone.from_pretrained(tmp_path)


# hostile files ------------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if a loader runs code from the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _hostile_bin(path: Path, marker: Path, tensors: dict[str, torch.Tensor]) -> None:
    torch.save({**tensors, "payload": _Payload(marker)}, path)


def test_the_payload_is_live(tmp_path):
    """Control: an unsafe loader does run it, so the tests below would see it if our loaders did."""
    marker = tmp_path / "pwned"
    _hostile_bin(tmp_path / "evil.bin", marker, {})
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert marker.exists()


def test_pickled_code_in_pytorch_model_bin_never_runs(tmp_path):
    model = build("timm-list")
    model.config.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    _hostile_bin(tmp_path / "pytorch_model.bin", marker, model.state_dict())
    with pytest.raises(OSError, match=r"pytorch_model.bin as plain tensors with torch.load\(weights_only=True\)"):
        TimmBackbone.from_pretrained(tmp_path)
    with pytest.raises(OSError, match="files that need arbitrary code to unpickle are refused"):
        AutoBackbone.from_pretrained(tmp_path)
    weights_file = tmp_path / "weights.pth"  # a bare weights file with backbone=
    _hostile_bin(weights_file, marker, {})
    with pytest.raises(OSError, match="weights_only=True"):
        TimmBackbone.from_pretrained(weights_file, backbone="test_resnet")
    renamed = tmp_path / "renamed" / "model.safetensors"  # a pickle posing as safetensors
    renamed.parent.mkdir()
    shutil.copy(tmp_path / "pytorch_model.bin", renamed)
    model.config.save_pretrained(renamed.parent)
    with pytest.raises(OSError, match="truncated or corrupt"):
        TimmBackbone.from_pretrained(renamed.parent)
    assert not marker.exists()


def test_plain_pytorch_model_bin_still_loads(tmp_path):
    model = build("timm-list")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = TimmBackbone.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x).feature_maps, model(x).feature_maps)
    torch.save({"state_dict": {"w": "not a tensor"}}, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="does not hold a state dict of tensors"):
        TimmBackbone.from_pretrained(tmp_path)


def test_remote_code_is_never_imported(tmp_path, monkeypatch):
    model = build("timm-list")
    model.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "evil_modeling.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass EvilBackbone: pass\n")
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_modeling.EvilConfig", "AutoBackbone": "evil_modeling.EvilBackbone"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = AutoBackbone.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded) is TimmBackbone
    assert type(AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)) is TimmBackboneConfig
    assert type(TimmBackbone.from_pretrained(tmp_path, trust_remote_code=True)) is TimmBackbone
    assert not marker.exists()


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _call_name(call: ast.Call) -> str:
    func = call.func
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_package_source_has_no_code_execution_paths():
    """Static guard: no eval/exec/pickle, every torch.load is weights_only=True, imports only from the registry."""
    root = Path(timm_backbone.__file__).parent
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _calls(tree):
            name = _call_name(call)
            where = f"{path.relative_to(root)}:{call.lineno}"
            if isinstance(call.func, ast.Name):  # the builtins, not methods such as model.eval()
                assert name not in {"eval", "exec", "compile", "__import__"}, where
            assert not name.startswith(("pickle.", "marshal.", "dill.")), where
            if name.endswith("torch.load"):
                kwargs = {kw.arg: kw.value for kw in call.keywords}
                assert isinstance(kwargs.get("weights_only"), ast.Constant), where
                assert kwargs["weights_only"].value is True, where
            if name.endswith("import_module"):
                assert path.name == "auto.py", f"{where}: dynamic imports belong to the auto registry only"
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                raise AssertionError(f"{path.relative_to(root)}: trust_remote_code passed on to a loader")


# atomic saves -------------------------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class _DiskFull:
    """A file object that writes half of what it is given, then fails as a full disk does."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


@pytest.mark.parametrize("name", ["timm-list", "swin", "resnet"])
@pytest.mark.parametrize("failing_file", [0, 1], ids=["first-file", "second-file"])
def test_interrupted_save_leaves_the_previous_files(name, failing_file, tmp_path, monkeypatch):
    old = build(name)
    old.save_pretrained(tmp_path)
    before = _snapshot(tmp_path)
    new = build(name)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
    new.config.some_new_field = "changed"
    opened = []
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        opened.append(f)
        return _DiskFull(f) if len(opened) - 1 == failing_file else f

    monkeypatch.setattr(hub_module.os, "fdopen", fdopen)
    with pytest.raises(OSError, match="No space left on device"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before  # same names (no temporary files left) and same bytes
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(type(old).from_pretrained(tmp_path)(x).feature_maps, old(x).feature_maps)


def test_save_failing_before_writing_touches_nothing(tmp_path, monkeypatch):
    old = build("timm-list")
    old.save_pretrained(tmp_path)
    before = _snapshot(tmp_path)

    def broken(*args, **kwargs):
        raise KeyboardInterrupt  # interrupted while serialising the weights

    monkeypatch.setattr("timm_backbone.modeling.safetensors_bytes", broken)
    new = build("timm-list", out_indices=(1,))
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    assert _snapshot(tmp_path) == before


def test_interrupted_config_save_keeps_the_old_config(tmp_path, monkeypatch):
    config = TimmBackboneConfig("test_resnet", out_indices=(1,))
    config.save_pretrained(tmp_path)
    before = _snapshot(tmp_path)

    def fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(hub_module.os, "fsync", fsync)
    with pytest.raises(OSError, match="I/O error"):
        TimmBackboneConfig("test_resnet", out_indices=(2,)).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before
    assert TimmBackboneConfig.from_pretrained(tmp_path).out_indices == [1]


def test_save_into_a_file_path_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(OSError, match="is a file; save_pretrained needs a folder"):
        build("timm-list").save_pretrained(target)
    assert target.read_text() == "keep me"


def test_resave_over_an_existing_folder_replaces_both_files(tmp_path):
    build("timm-list", out_indices=(1,)).save_pretrained(tmp_path)
    new = build("timm-list", out_indices=(2, 3))
    new.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = TimmBackbone.from_pretrained(tmp_path)
    assert loaded.out_indices == [2, 3]
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x).feature_maps, new(x).feature_maps)
