"""The stage benchmark library on tiny Swin and ResNet variants: report structure, numerical agreement, outputs."""

import json

import pytest
import torch
from PIL import Image

from timm_backbone import benchmark
from timm_backbone.benchmark import (
    BenchSettings,
    ModelSpec,
    bench_chart,
    markdown_report,
    peak_memory,
    run_benchmark,
    time_interleaved,
    write_outputs,
)
from timm_backbone.cli import build_parser

TINY_SWIN = ModelSpec(
    "swin_tiny_test",
    "swin",
    "swin_tiny_patch4_window7_224",
    timm_args=dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=2),
    native_args=dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=2),
)
TINY_RESNET = ModelSpec(
    "resnet_tiny_test", "resnet", "resnet18", timm_args=dict(layers=(1, 1, 1, 1)), native_args=dict(depths=[1, 1, 1, 1])
)
REPEATS, BATCH = 2, 2


@pytest.fixture(scope="module")
def report():
    settings = BenchSettings(
        models=[TINY_SWIN, TINY_RESNET], batch_sizes=[BATCH], input_size=64, repeats=REPEATS, warmup=0, threads=1
    )
    messages = []
    result = run_benchmark(settings, progress=messages.append)
    result["_progress"] = messages
    return result


def test_report_structure(report):
    assert report["settings"]["contenders"] == ["timm", "native", "transformers"]
    assert report["machine"]["torch_threads"] == 1
    assert {"cpu", "torch", "timm", "transformers", "platform"} <= set(report["machine"])
    assert [r["model"] for r in report["runs"]] == ["swin_tiny_test", "resnet_tiny_test"]
    expected_shapes = {
        "swin_tiny_test": [[16, 16, 16], [16, 16, 16], [32, 8, 8], [64, 4, 4], [128, 2, 2]],
        "resnet_tiny_test": [[64, 16, 16], [64, 16, 16], [128, 8, 8], [256, 4, 4], [512, 2, 2]],
    }
    for run in report["runs"]:
        assert (run["dtype"], run["batch"], run["mode"], run["input_size"]) == ("fp32", BATCH, "eager", 64)
        assert [s["name"] for s in run["stages"]] == ["stem", "stage1", "stage2", "stage3", "stage4"]
        assert [s["shape"] for s in run["stages"]] == [[BATCH, *shape] for shape in expected_shapes[run["model"]]]
        for stage in run["stages"]:
            contenders = set(stage["latency_ms"])
            assert contenders == set(stage["throughput"]) == set(stage["peak_mib"]) == set(stage["latency_ms_all"])
            assert all(len(v) == REPEATS for v in stage["latency_ms_all"].values())
            for name, ms in stage["latency_ms"].items():
                assert ms > 0 and stage["peak_mib"][name] > 0
                assert stage["throughput"][name] == pytest.approx(BATCH / (ms / 1e3), rel=1e-2)
            # GFLOP/s from one FLOP count (timm's forward of the same stages) over each contender's time
            assert stage["matmul_gflops"] > 0
            if stage["timm_stage"] is None:
                assert stage["gflops"] is None
            else:
                work = {name: stage["gflops"][name] * stage["latency_ms"][name] for name in stage["latency_ms"]}
                assert set(work) == contenders and min(work.values()) > 0
                assert max(work.values()) == pytest.approx(min(work.values()), rel=2e-2)
    swin_stem, resnet_stem = report["runs"][0]["stages"][0], report["runs"][1]["stages"][0]
    assert set(swin_stem["latency_ms"]) == {"native", "transformers"} and swin_stem["timm_stage"] is None
    assert resnet_stem["timm_stage"] == "act1" and report["runs"][1]["stages"][4]["timm_stage"] == "layer4"
    assert report["runs"][0]["stages"][1]["timm_stage"] == "layers.0"
    # progress: one line per run start and one per stage
    assert len(report["_progress"]) == 2 + 10 and "swin_tiny_test fp32 batch 2 eager stage4" in report["_progress"][5]


@pytest.mark.parametrize("run_index", [0, 1])
def test_stage_outputs_agree(report, run_index):
    run = report["runs"][run_index]
    for stage in run["stages"]:
        diffs = stage["max_abs_diff"]
        if stage["timm_stage"] is None:
            assert diffs["timm"] is None
        else:
            assert diffs["timm"] < 1e-4, (run["model"], stage["name"], diffs)
        assert diffs["transformers"] < 1e-4, (run["model"], stage["name"], diffs)


def test_markdown_chart_and_files(report, tmp_path):
    del report["_progress"]
    text = markdown_report(report)
    assert "| stage | shape | latency ms (timm / native / transformers) |" in text
    assert "| native GFLOP/s (% of matmul) |" in text and text.startswith("Machine: ")
    assert "| 0 stem | 16x16x16 | – / " in text  # timm has no Swin stem output
    assert text.count("| 4 stage4 |") == 2
    summary = [line for line in text.splitlines() if line.startswith("| swin_tiny_test | fp32 | 2 | eager |")]
    cells = [c.strip() for c in summary[0].strip("|").split("|")]
    last = report["runs"][0]["stages"][-1]["latency_ms"]
    assert cells[4] == " / ".join(f"{last[n]:.1f}" for n in ("timm", "native", "transformers"))
    assert cells[5] == f"{last['timm'] / last['native']:.2f}x"
    worst = max(s["max_abs_diff"]["timm"] for s in report["runs"][0]["stages"][1:])
    assert cells[6] == f"{worst:.1e}"
    assert "timm's act1 is max-pooled" in text and "hidden_states_norms" in text
    picture = bench_chart(report)
    assert picture.size == (900, 56 + 2 * 260 + 10)
    paths = write_outputs(report, tmp_path / "out")
    assert json.loads(open(paths["json"]).read()) == json.loads(json.dumps(report))
    assert open(paths["md"]).read() == text
    with Image.open(paths["png"]) as png:
        assert png.format == "PNG" and png.size == picture.size


def test_time_interleaved_rotates_order():
    order = []
    calls = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    times = time_interleaved(calls, repeats=3, warmup=1)
    assert order == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_peak_memory_sees_allocations():
    size = 4 * 2**20

    def allocate():
        a = torch.empty(size, dtype=torch.uint8)
        b = torch.empty(size, dtype=torch.uint8)
        return a, b

    assert 2 * size <= peak_memory(allocate) < 3 * size


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"models": ["resnet34x"]}, r"models \['resnet34x'\] invalid; choose from \['resnet18'"),
        ({"models": []}, "no models to run"),
        ({"dtypes": ["fp8"]}, r"dtypes \['fp8'\] invalid; choose from \['fp32', 'bf16', 'fp16'\]"),
        ({"modes": ["jit"]}, "modes"),
        ({"batch_sizes": [0]}, "batch sizes must be positive"),
        ({"input_size": 100}, "multiple of 32"),
        ({"repeats": 0}, "repeats must be >= 1"),
        ({"device": "tpu"}, "device must be 'cpu' or 'cuda'"),
        ({"models": [ModelSpec("x", "vit", "vit_tiny_patch16_224")]}, r"unknown model families \['vit'\]"),
    ],
)
def test_settings_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        BenchSettings(**overrides).validate()


def test_cli_defaults_are_quick_and_flags_widen():
    parser = build_parser()
    settings = benchmark.settings_from_args(parser.parse_args(["bench"]))
    assert settings.models == ["resnet18", "swin_t"] and settings.batch_sizes == [1] and settings.repeats == 5
    assert settings.modes == ["eager"] and settings.dtypes == ["fp32"] and settings.transformers
    args = parser.parse_args(["bench", "--all-models", "--batch", "1", "8", "--dtype", "fp32", "bf16", "--compile"])
    settings = benchmark.settings_from_args(args)
    assert settings.models == ["resnet18", "resnet50", "resnet101", "swin_t", "swin_s", "swin_b"]
    assert (
        settings.batch_sizes == [1, 8]
        and settings.dtypes == ["fp32", "bf16"]
        and settings.modes == ["eager", "compile"]
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--models", "vgg16"])


def test_native_optimized_contender():
    settings = BenchSettings(
        models=[TINY_RESNET, TINY_SWIN], input_size=64, repeats=1, warmup=0, threads=1, stages=[4],
        transformers=False, memory=False, native_optimized=True,
    )  # fmt: skip
    report = run_benchmark(settings, progress=None)
    assert report["settings"]["contenders"] == ["timm", "native", "native_opt"]
    resnet, swin = (run["stages"][0] for run in report["runs"])
    assert list(resnet["latency_ms"]) == ["timm", "native", "native_opt"]
    assert resnet["max_abs_diff"]["native_opt"] < 1e-4 and resnet["max_abs_diff"]["timm"] < 1e-4
    assert list(swin["latency_ms"]) == ["timm", "native", "native_opt"] and swin["max_abs_diff"]["native_opt"] < 1e-4
    assert resnet["peak_mib"] == {}
    text = markdown_report(report)
    assert "latency ms (timm / native / native_opt)" in text and "| 4 stage4 | 128x2x2 |" in text


def test_machine_info_records_matrix_unit_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert benchmark.cpu_flags(str(cpuinfo)) == {
        "amx_bf16": False, "amx_tile": True, "amx_int8": False, "avx512_bf16": True, "avx512f": True, "avx2": True,
    }  # fmt: skip
    assert not any(benchmark.cpu_flags(str(tmp_path / "absent")).values())
    info = benchmark.machine_info("cpu")
    assert set(info["cpu_flags"]) == set(benchmark.CPU_FLAGS) and isinstance(info["onednn_bf16"], bool)


def test_machine_info_records_the_allocator_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "17179869184")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("MALLOCX", "not an allocator setting")
    env = benchmark.machine_info("cpu")["allocator_env"]
    assert env.get("MALLOC_TRIM_THRESHOLD_") == "17179869184" and "LD_PRELOAD" not in env and "MALLOCX" not in env


def test_precision_runs_calls_under_autocast_and_rejects_fp32_autocast():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    assert benchmark.Precision("bf16", autocast=True).call(layer, x)().dtype == torch.bfloat16
    half = benchmark.Precision("bf16")
    assert benchmark.Precision().call(layer, x)().dtype == torch.float32
    assert half.call(half.prepare(layer), x.to(half.storage_dtype))().dtype == torch.bfloat16
    assert layer.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="autocast needs a lower precision"):
        benchmark.Precision("fp32", autocast=True)
    with pytest.raises(ValueError, match=r"dtype 'fp8' invalid; choose from \['fp32', 'bf16'\]"):
        benchmark.Precision("fp8")
