"""Deployment paths: torch.export, ONNX checked with onnxruntime, torch.compile and TorchScript tracing.

Each backbone family runs as a tiny random-initialised model; every exported or compiled program is compared with
the eager model on a batch size other than the one it was traced with.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from tiny_backbones import build, close
from torch import nn
from torch.export import Dim

from timm_backbone import BackboneOutput

# selections with several outputs, so that every exported program returns more than one map
SELECTIONS = {
    "timm-list": (1, 2, 3, 4),  # timm FeatureListNet
    "timm-getter": (1, 3, 5),  # timm FeatureGetterNet over forward_intermediates
    "timm-intermediates": (2, 5),  # features_only=False: the whole model's forward_intermediates
    "timm-nhwc": (1, 2, 3),  # NHWC features permuted to NCHW
    "swin": (1, 2, 3, 4),
    "resnet": (1, 2, 3, 4),
}
EXPORTED = ["timm-list", "timm-getter", "timm-intermediates", "swin", "resnet"]
SIZE = 64


def _some_slow(names: list[str], fast: set[str], **marks: pytest.MarkDecorator) -> list:
    """``names`` as parameters, those outside ``fast`` marked slow (the default run stays quick on 2 cores)."""
    return [
        pytest.param(n, marks=[marks[n]] if n in marks else [])
        if n in fast
        else pytest.param(n, marks=[pytest.mark.slow, *([marks[n]] if n in marks else [])])
        for n in names
    ]


_CACHE: dict[str, tuple[nn.Module, torch.export.ExportedProgram]] = {}


def _model(name: str) -> nn.Module:
    return build(name, out_indices=SELECTIONS[name])


def _exported(name: str) -> tuple[nn.Module, torch.export.ExportedProgram]:
    """The model and its export with a dynamic batch, made once per session (ONNX reuses it)."""
    if name not in _CACHE:
        model = _model(name)
        x = torch.randn(2, 3, SIZE, SIZE)
        program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
        _CACHE[name] = model, program
    return _CACHE[name]


class TupleOutput(nn.Module):
    """A backbone returning a plain tuple of feature maps, the form tracers and some runtimes want."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.backbone(pixel_values, return_dict=False)[0]


# torch.export -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _some_slow(EXPORTED, {"timm-list", "timm-getter", "swin", "resnet"}))
def test_torch_export_with_dynamic_batch(name):
    model, program = _exported(name)
    for batch in (1, 3):
        x = torch.randn(batch, 3, SIZE, SIZE)
        out = program.module()(x)
        assert isinstance(out, BackboneOutput)  # the output dataclass survives export (a registered pytree node)
        with torch.no_grad():
            close(out.feature_maps, model(x).feature_maps)
    assert [f.shape[1] for f in out.feature_maps] == model.channels


SWIN_GRID = pytest.mark.xfail(
    raises=AssertionError, strict=False, reason="Swin's export specialises the window grid of the example size"
)


@pytest.mark.parametrize("name", _some_slow(["timm-list", "swin", "resnet"], {"timm-list", "resnet"}, swin=SWIN_GRID))
def test_torch_export_with_dynamic_height_and_width(name):
    model = _model(name)
    x = torch.randn(2, 3, SIZE, SIZE)  # not 1: export specialises sizes 0 and 1
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},))
    y = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        close(program.module()(y).feature_maps, model(y).feature_maps)


def test_exported_program_saves_and_loads(tmp_path):
    model, program = _exported("timm-list")
    torch.export.save(program, tmp_path / "backbone.pt2")
    loaded = torch.export.load(tmp_path / "backbone.pt2")
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        close(loaded.module()(x).feature_maps, model(x).feature_maps)


def test_export_keeps_the_input_checks():
    """The channel check runs at trace time; the exported program itself guards the input shape."""
    model, program = _exported("timm-list")
    with pytest.raises(ValueError, match="has 1 channels but the backbone expects 3"):
        torch.export.export(model, (torch.randn(2, 1, SIZE, SIZE),))
    with pytest.raises((RuntimeError, AssertionError), match=r"batch|shape|size|expected"):
        program.module()(torch.randn(2, 3, SIZE, SIZE + 32))  # the height and width are static in this program


# ONNX ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _some_slow(EXPORTED, {"timm-list", "timm-getter", "swin", "resnet"}))
def test_onnx_export_matches_eager_in_onnxruntime(name, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, program = _exported(name)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(program, dynamo=True, optimize=False, verbose=False).save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (input_name,) = [i.name for i in session.get_inputs()]
    assert input_name == "pixel_values"
    assert len(session.get_outputs()) == len(model.out_indices)
    for batch in (1, 3):  # the batch dimension stays dynamic in the ONNX graph
        x = torch.randn(batch, 3, SIZE, SIZE)
        outputs = session.run(None, {input_name: x.numpy()})
        with torch.no_grad():
            close([torch.from_numpy(o) for o in outputs], model(x).feature_maps)


# torch.compile -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _some_slow([*EXPORTED, "timm-nhwc"], {"timm-list", "swin", "resnet"}))
def test_compile_fullgraph_matches_eager(name):
    model = _model(name)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # the graph capture, without code generation
    with torch.no_grad():
        for batch in (2, 3):
            x = torch.randn(batch, 3, SIZE, SIZE)
            close(compiled(x).feature_maps, model(x).feature_maps)


def test_compiled_model_still_raises_clear_errors():
    compiled = torch.compile(_model("timm-list"), backend="eager")
    with torch.no_grad():
        compiled(torch.randn(1, 3, SIZE, SIZE))
        with pytest.raises(ValueError, match="smaller than the minimum 32x32"):
            compiled(torch.randn(1, 3, 16, 16))


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPORTED)
def test_compile_inductor_matches_eager(name):
    model = _model(name)
    compiled = torch.compile(model)
    with torch.no_grad():
        x = torch.randn(2, 3, SIZE, SIZE)
        close(compiled(x).feature_maps, model(x).feature_maps)


# TorchScript ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _some_slow(EXPORTED, {"timm-list", "resnet", "swin"}))
def test_torchscript_trace_of_the_tuple_output(name, tmp_path):
    model = _model(name)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python shape checks, which hold for traced sizes
        traced = torch.jit.trace(TupleOutput(model), torch.randn(2, 3, SIZE, SIZE), check_trace=False)
    torch.jit.save(traced, tmp_path / "traced.pt")
    loaded = torch.jit.load(tmp_path / "traced.pt")
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        close(loaded(x), model(x).feature_maps)


@pytest.mark.slow
def test_torchscript_script_of_timm_feature_list():
    """timm's FeatureListNet (inside TimmBackbone) scripts; the wrapper itself is traced, exported or compiled."""
    model = _model("timm-list")
    scripted = torch.jit.script(model._backbone)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        close(scripted(x), [model(x, output_hidden_states=True).hidden_states[i] for i in model._held])


# MaskFormer ----------------------------------------------------------------------------------------------------------
def _maskformer() -> nn.Module:
    from timm_backbone import MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig

    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1] * 4, out_indices=[1, 2, 3, 4])
    decoder = {"d_model": 32, "decoder_layers": 2, "num_queries": 10, "decoder_attention_heads": 2}
    config = MaskFormerConfig(
        backbone_config=backbone,
        decoder_config={**decoder, "decoder_ffn_dim": 64, "dropout": 0.0},
        fpn_feature_size=32,
        mask_feature_size=32,
        num_labels=5,
    )
    return MaskFormerForInstanceSegmentation(config).eval()


@pytest.mark.slow
def test_maskformer_exports_to_torch_export_and_onnx(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _maskformer()
    program = torch.export.export(
        model, (torch.randn(2, 3, SIZE, SIZE),), dynamic_shapes=({0: Dim("batch", min=1, max=64)},)
    )
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
    got = program.module()(x)
    close(
        [got.class_queries_logits, got.masks_queries_logits],
        [expected.class_queries_logits, expected.masks_queries_logits],
    )
    path = tmp_path / "maskformer.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(program, dynamo=True, optimize=False, verbose=False).save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    close([torch.from_numpy(o) for o in outputs[:2]], [expected.class_queries_logits, expected.masks_queries_logits])
