"""Benchmarks: the timm-versus-native stage benchmark (``timm-backbone bench``), and the timing tools every
benchmark under ``benchmarks/`` shares (interleaved medians in one process, peak memory, machine info)."""

from .report import bench_chart, markdown_report, summary_markdown, write_outputs
from .stages import (
    DTYPES,
    IMPLEMENTATIONS,
    MODELS,
    MODES,
    QUICK_MODELS,
    BenchSettings,
    ModelSpec,
    add_arguments,
    native_config,
    random_timm_state_dict,
    run_benchmark,
    run_from_args,
    settings_from_args,
)
from .timing import machine_info, peak_memory, time_interleaved

__all__ = [
    "DTYPES",
    "IMPLEMENTATIONS",
    "MODELS",
    "MODES",
    "QUICK_MODELS",
    "BenchSettings",
    "ModelSpec",
    "add_arguments",
    "bench_chart",
    "machine_info",
    "markdown_report",
    "native_config",
    "peak_memory",
    "random_timm_state_dict",
    "run_benchmark",
    "run_from_args",
    "settings_from_args",
    "summary_markdown",
    "time_interleaved",
    "write_outputs",
]
