"""Feature-map pictures: colour map, channel choice, layout, errors, and the ``features --save-plot`` command."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from timm_backbone.cli import main, synthetic_image
from timm_backbone.visualize import (
    colorize,
    feature_plot,
    normalize_map,
    principal_components,
    save_feature_plot,
    select_channels,
)


def test_colorize_endpoints_and_clipping():
    out = colorize(np.array([-1.0, 0.0, 0.5, 1.0, 2.0, np.nan]))
    assert out.dtype == np.uint8 and out.shape == (6, 3)
    assert out[0].tolist() == out[1].tolist() == [68, 1, 84]
    assert out[2].tolist() == [33, 144, 141]
    assert out[3].tolist() == out[4].tolist() == [253, 231, 37]
    assert out[5].tolist() == [68, 1, 84]


@pytest.mark.parametrize(
    "plane, expected",
    [
        (np.full((4, 4), 3.0), np.zeros((4, 4))),
        (np.arange(4.0).reshape(2, 2), np.array([[0.0, 1 / 3], [2 / 3, 1.0]])),
    ],
)
def test_normalize_map(plane, expected):
    np.testing.assert_allclose(normalize_map(plane, 0.0, 100.0), expected, atol=1e-6)


def test_select_channels_takes_largest_spread_in_channel_order():
    fmap = torch.zeros(6, 4, 4)
    for c, scale in enumerate([0.1, 5.0, 0.0, 3.0, 0.5, 4.0]):
        fmap[c] = torch.linspace(0, scale, 16).view(4, 4)
    assert select_channels(fmap, 3) == [1, 3, 5]
    assert select_channels(fmap, 10) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_channels, columns, rows", [(16, 8, (1, 2)), (4, 2, (2, 2)), (1, 8, (1, 1))])
def test_feature_plot_layout_and_pixels(dtype, max_channels, columns, rows):
    cell, gap, pad, header = 40, 2, 12, 26  # 10 px per feature-map pixel
    ramp = torch.linspace(0, 1, 16).view(4, 4)
    maps = [ramp.expand(1, 5, 4, 4).to(dtype) * 2, torch.rand(2, 32, 2, 2).to(dtype)]
    picture = feature_plot(maps, ["stem", "stage1"], max_channels=max_channels, columns=columns, cell=cell)
    assert picture.mode == "RGB"
    cols = min(columns, max(min(max_channels, 5 + 1), min(max_channels, 32 + 1)))
    assert picture.width == max(cols * (cell + gap) - gap, 360) + 2 * pad
    block = [r * (cell + gap) - gap for r in rows]
    assert picture.height == pad + sum(header + h + pad for h in block)
    # first cell: the principal components as RGB; the five equal channels have one (the ramp), drawn in red
    pixels = np.asarray(picture).astype(int)
    level = normalize_map(ramp.numpy())
    x0, y0 = pad, pad + header
    for row, col in [(3, 0), (3, 3), (1, 2), (2, 1)]:  # pixel centres outside the label box
        expected = [round(255 * level[row, col]), 0, 0]
        np.testing.assert_allclose(pixels[y0 + 10 * row + 5, x0 + 10 * col + 5], expected, atol=3)
    if max_channels > 1:  # the next cell is a channel in viridis
        x1 = x0 + cell + gap
        colors = colorize(level).astype(int)
        np.testing.assert_allclose(pixels[y0 + 35, x1 + 35], colors[3, 3], atol=3)


def test_principal_components():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 6), torch.linspace(-1, 1, 5), indexing="ij")
    a, b = xx, yy * 0.5
    fmap = torch.stack([a, 2 * a, b, torch.zeros_like(a), -b])
    comps = principal_components(fmap)
    assert comps.shape == (3, 6, 5)
    torch.testing.assert_close(comps[0] / comps[0].norm(), a / a.norm(), atol=1e-5, rtol=0)  # sign: + on 2a
    torch.testing.assert_close(comps[1].abs() / comps[1].norm(), b.abs() / b.norm(), atol=1e-5, rtol=0)
    assert torch.count_nonzero(comps[2]) == 0  # rank 2: no third component
    # more channels than positions: the Gram-matrix path, checked against an SVD
    wide = torch.randn(40, 3, 3)
    x = wide.reshape(40, 9).T.double()
    u, s, _ = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    expected = (u[:, :3] * s[:3]).T.reshape(3, 3, 3).float()
    torch.testing.assert_close(principal_components(wide).abs(), expected.abs(), atol=1e-5, rtol=1e-5)
    # subsampled covariance still projects every position
    assert principal_components(torch.randn(4, 30, 30), max_samples=100).shape == (3, 30, 30)


def test_feature_plot_draws_input_image_and_title():
    fmap = torch.randn(1, 8, 7, 7)
    plain = feature_plot([fmap], ["stage4"])
    full = feature_plot([fmap], ["stage4"], image=synthetic_image(64), title="swin")
    assert full.width == plain.width
    assert full.height == plain.height + 26 + (26 + 64 + 12)


def test_feature_plot_sample_selects_batch_item():
    fmap = torch.zeros(2, 1, 2, 2)
    fmap[1] = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    first = np.asarray(feature_plot([fmap], ["s"], sample=0, max_channels=1, cell=20))
    second = np.asarray(feature_plot([fmap], ["s"], sample=1, max_channels=1, cell=20))
    corner = (12 + 26 + 19, 12 + 19)  # bottom-right pixel of the pca cell: the largest value of sample 1
    assert first[corner].tolist() == [0, 0, 0]  # a constant map has no principal component
    assert second[corner].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    "maps, names, kwargs, error, match",
    [
        ([torch.zeros(1, 2, 2, 2)], ["a", "b"], {}, ValueError, "1 feature maps but 2 names"),
        ([], [], {}, ValueError, "no feature maps"),
        ([torch.zeros(2, 2)], ["a"], {}, ValueError, r"must be \(batch, channels, height, width\)"),
        ([np.zeros((1, 2, 2, 2))], ["a"], {}, TypeError, "must be a torch.Tensor"),
        ([torch.zeros(1, 2, 2, 2)], ["a"], {"sample": 1}, ValueError, "sample 1 is out of range"),
        ([torch.zeros(1, 2, 2, 2)], ["a"], {"cell": 0}, ValueError, "cell must be a positive integer"),
    ],
)
def test_feature_plot_errors(maps, names, kwargs, error, match):
    with pytest.raises(error, match=match):
        feature_plot(maps, names, **kwargs)


def test_save_feature_plot_png_and_missing_folder(tmp_path):
    path = tmp_path / "maps.png"
    save_feature_plot([torch.randn(1, 3, 4, 4)], ["stage1"], path, cell=8)
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        reference = feature_plot([torch.zeros(1, 3, 4, 4)], ["stage1"], cell=8)
        assert picture.size == reference.size
    assert [p.name for p in tmp_path.iterdir()] == ["maps.png"]  # no temporary file left behind
    with pytest.raises(OSError, match="does not exist"):
        save_feature_plot([torch.randn(1, 3, 4, 4)], ["stage1"], tmp_path / "nope" / "maps.png")


def test_cli_features_save_plot_and_tensors(tmp_path, capsys):
    plot, tensors = tmp_path / "resnet18.png", tmp_path / "resnet18.safetensors"
    args = ["features", "resnet18", "--size", "64", "--out-indices", "1,3"]
    code = main([*args, "--save-plot", str(plot), "--save", str(tensors)])
    assert code == 0
    out = capsys.readouterr().out
    assert f"saved feature-map picture to {plot}" in out
    saved = load_file(tensors)
    assert list(saved) == ["layer1", "layer3"]
    assert [list(t.shape) for t in saved.values()] == [[1, 64, 16, 16], [1, 256, 4, 4]]
    with Image.open(plot) as picture:
        # input thumbnail block + two stage blocks of pca + 15 channels in 8 columns
        expected = feature_plot(list(saved.values()), list(saved), image=synthetic_image(64))
        assert picture.size == expected.size
        np.testing.assert_array_equal(np.asarray(picture.convert("RGB")), np.asarray(expected))
