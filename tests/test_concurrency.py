"""Long-running services: one model shared by several threads, and memory over many input sizes.

Native Swin keeps per-geometry caches (attention masks, window indices) and native ResNet an inference plan; both are
exercised from several threads at once with more geometries than the caches hold, so evictions race with lookups.
"""

from __future__ import annotations

import gc
import random
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tiny_backbones import build
from torch import nn

from timm_backbone import layers

SELECTIONS = {"timm-list": (1, 2, 3, 4), "timm-getter": (1, 3, 5), "swin": (1, 2, 3, 4), "resnet": (1, 2, 3, 4)}
# (batch, height, width): multiples of 16 (timm ViT's patch) from 32 up, square and not; more than Swin's cache holds
GEOMETRIES = [(1 + i % 2, 32 + 16 * (i % 5), 32 + 16 * (i // 5)) for i in range(10)]


def _model(name: str) -> nn.Module:
    if name.endswith("-optimized"):  # ResNet's fused inference path and its plan; Swin's packed linear weights
        family = name.removesuffix("-optimized")
        return build(family, out_indices=SELECTIONS[family]).optimize_for_inference()
    return build(name, out_indices=SELECTIONS[name])


def _clear_caches(model: nn.Module) -> None:
    for module in model.modules():
        cache = getattr(module, "_mask_cache", None)
        if cache is not None:
            cache.clear()
    if hasattr(model, "_plan"):
        model._plan = None
    for module in model.modules():
        layers._PACKED_WEIGHTS.pop(module, None)


@pytest.mark.parametrize("name", [*SELECTIONS, "resnet-optimized", "swin-optimized"])
def test_concurrent_forwards_match_serial(name):
    model = _model(name)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(b, 3, h, w, generator=generator) for b, h, w in GEOMETRIES]
    with torch.no_grad():
        serial = [model(x).feature_maps for x in inputs]
    _clear_caches(model)  # the threads fill the caches themselves, racing each other
    jobs = list(range(len(inputs))) * 2
    random.Random(0).shuffle(jobs)

    def run(i: int) -> tuple[int, tuple[torch.Tensor, ...]]:
        with torch.no_grad():
            return i, model(inputs[i]).feature_maps

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, jobs))
    assert len(results) == len(jobs)
    for i, maps in results:
        for got, expected in zip(maps, serial[i], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_concurrent_forwards_with_hidden_states_and_selections():
    """Different call options from different threads do not leak into each other's outputs."""
    model = _model("swin")
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        plain = model(x)
        hidden = model(x, output_hidden_states=True)
        attentions = model(x, output_attentions=True)
    calls = [{}, {"output_hidden_states": True}, {"output_attentions": True}] * 6

    def run(kwargs):
        with torch.no_grad():
            return kwargs, model(x, **kwargs)

    with ThreadPoolExecutor(max_workers=3) as pool:
        for kwargs, out in pool.map(run, calls):
            expected = hidden if kwargs.get("output_hidden_states") else plain
            expected = attentions if kwargs.get("output_attentions") else expected
            torch.testing.assert_close(out.feature_maps, expected.feature_maps)
            assert (out.hidden_states is None) == (expected.hidden_states is None)
            assert (out.attentions is None) == (expected.attentions is None)


def _live_tensor_bytes() -> int:
    """Bytes of every tensor storage reachable from Python (parameters, buffers, caches, outputs not yet freed)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some torch module objects warns about deprecations
        for obj in gc.get_objects():
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            try:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except NotImplementedError:  # opaque tensors (oneDNN packed weights) have no storage to share
                storages[("opaque", id(obj))] = obj.numel() * obj.element_size()
            except RuntimeError:  # fake tensors left by export/compile in this process hold no memory
                continue
    return sum(storages.values())


@pytest.mark.parametrize(
    "name",
    [
        "swin",
        "resnet-optimized",
        pytest.param("timm-list", marks=pytest.mark.slow),  # timm keeps no per-size state
        pytest.param("timm-getter", marks=pytest.mark.slow),
        pytest.param("resnet", marks=pytest.mark.slow),
    ],
)
def test_memory_stays_bounded_over_many_input_sizes(name):
    model = _model(name)
    # steps of 28 pixels give Swin (patch 4, window 7) a new window grid each time; ViT needs multiples of 16
    sides = [32, 48, 64, 80, 96] if name == "timm-getter" else [32, 60, 88, 116, 144]
    first = [(1, h, w) for h in sides for w in sides if h < w]  # 10 geometries: more than Swin's caches hold
    second = [(1, w, h) for _, h, w in first]  # 10 others with the same sizes, transposed
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        baseline = _live_tensor_bytes()
        for b, h, w in first:
            model(torch.randn(b, 3, h, w))
        after_first = _live_tensor_bytes()
        for b, h, w in second:
            model(torch.randn(b, 3, h, w))
        after_second = _live_tensor_bytes()
    # caches may fill up during the first sweep, but a bounded cache holds no more after the second
    growth_first, growth_second = after_first - baseline, after_second - baseline
    assert growth_second <= 1.5 * growth_first + 64 * 1024, (baseline, after_first, after_second)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin", "resnet-optimized", "timm-list"])
def test_memory_plateaus_over_many_rounds_of_new_sizes(name):
    """56 geometries in 4 rounds: more than any cache holds, so bounded caches stop growing after the first rounds
    (an unbounded mask cache keeps adding about a quarter each round)."""
    model = _model(name)
    sides = [32 + 28 * k for k in range(8)]
    geometries = [(h, w) for h in sides for w in sides if h != w]
    random.Random(0).shuffle(geometries)
    growth = []
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        baseline = _live_tensor_bytes()
        for r in range(4):
            for h, w in geometries[r::4]:
                model(torch.randn(1, 3, h, w))
            growth.append(_live_tensor_bytes() - baseline)
    assert growth[-1] <= 1.05 * max(growth[:-1]) + 16 * 1024, growth


def test_maskformer_size_cache_under_threads():
    """MaskFormer's decoder caches the position embedding of the last size; threads asking for different sizes
    must each get their own (a short switch interval makes the interleavings that used to raise KeyError common)."""
    from test_export import _maskformer

    model = _maskformer()
    decoder = next(m for m in model.modules() if hasattr(m, "_pos_cache"))
    expected = {h: decoder.position_embedding(h, h + 1, torch.device("cpu"), torch.float32) for h in range(1, 6)}
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(1000):
                h = rng.randrange(1, 6)
                got = decoder.position_embedding(h, h + 1, torch.device("cpu"), torch.float32)
                assert got.shape == expected[h].shape
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(work, range(4)))
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    x = [torch.randn(1, 3, s, s) for s in (64, 96)] * 2
    with torch.no_grad():
        serial = [model(t).masks_queries_logits for t in x]
        with ThreadPoolExecutor(max_workers=3) as pool:
            threaded = list(pool.map(lambda t: model(t).masks_queries_logits, x))
    for got, want in zip(threaded, serial):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # intra-op threads may split sums differently
