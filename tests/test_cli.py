"""The command line: inspect and features, their output and their errors."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from timm_backbone.cli import main


def test_inspect_prints_stage_table_without_weights(capsys):
    assert main(["inspect", "resnet50", "--out-indices", "1,-1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "resnet50: TimmBackbone, 5 stages"
    assert lines[1].split() == ["index", "stage", "channels", "stride", "selected"]
    assert lines[2].split() == ["0", "act1", "64", "2"]
    assert lines[3].split() == ["1", "layer1", "256", "4", "*"]
    assert lines[6].split() == ["4", "layer4", "2048", "32", "*"]


def test_features_prints_every_stage_shape(capsys):
    assert main(["features", "resnet18", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "resnet18 (TimmBackbone, random weights) on generated 64x64 test image" in out
    assert "[0] act1: [1, 64, 32, 32]  stride 2" in out
    assert "[4] layer4: [1, 512, 2, 2]  stride 32" in out


def test_features_on_image_file_with_selection_and_save(tmp_path, capsys):
    from PIL import Image

    Image.new("L", (40, 30), color=128).save(tmp_path / "gray.png")
    code = main(
        [
            "features",
            "resnet18",
            "--image",
            str(tmp_path / "gray.png"),
            "--size",
            "64",
            "--out-indices",
            "2,4",
            "--save",
            str(tmp_path / "f.safetensors"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "[2] layer2: [1, 128, 8, 8]" in out and "[1]" not in out
    tensors = load_file(tmp_path / "f.safetensors")
    assert sorted(tensors) == ["layer2", "layer4"] and tensors["layer4"].shape == torch.Size([1, 512, 2, 2])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["features", "resnt50"], "unknown timm model 'resnt50'; close matches: resnet50"),
        (["features", "resnet18", "--out-indices", "7"], "out_indices entry 7 is out of range"),
        (["features", "resnet18", "--image", "/nonexistent.png"], "cannot read image /nonexistent.png"),
        (["inspect", "/nonexistent/folder/x"], "/nonexistent/folder/x does not exist"),
    ],
)
def test_errors_are_clear_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"timm-backbone {argv[0]}: error: ") and message in err and "Traceback" not in err


def test_debug_shows_the_traceback_of_bad_input():
    with pytest.raises(OSError, match="unknown timm model 'resnt50'"):
        main(["--debug", "features", "resnt50"])


def test_our_own_bugs_are_not_reported_as_bad_input(monkeypatch):
    import timm_backbone.cli as cli

    monkeypatch.setattr(cli, "build_backbone", lambda *args, **kwargs: {}["a bug"])
    with pytest.raises(KeyError, match="a bug"):
        main(["features", "resnet18"])


def test_bad_out_indices_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["features", "resnet18", "--out-indices", "a,b"])
    assert info.value.code == 2
    assert "--out-indices takes integers" in capsys.readouterr().err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "timm_backbone.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("inspect", "features"):
        assert command in result.stdout
