"""The timm-versus-native stage benchmark: same weights, stage by stage, max abs difference, latency, memory.

For every model the timm backbone, the native backbone and (when installed) transformers' backbone get the same
random weights: a timm checkpoint is drawn once, converted to transformers' layout with the model family's key
mapping, and saved to a temporary folder that the native and the transformers backbones load. For stage ``k`` each
contender is built with ``out_indices=[k]``, so its latency is the cumulative cost of stages ``0..k``. The
contenders run interleaved (the order rotates each repeat) in one process and the medians are reported, with a
square matmul of the run's dtype in the same loop: each contender's GFLOP/s (FLOPs counted on timm's forward of the
same stages) is reported as a share of the matmul's.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..auto import FAMILIES, get_family
from .report import markdown_report, write_outputs
from .timing import machine_info, peak_memory, square_matmul, time_interleaved, transformers_version

IMPLEMENTATIONS = ("timm", "native", "native_opt", "transformers")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("eager", "compile")
MATMUL_SIZE = 1024  # side of the square matmul timed beside every stage: the machine's GFLOP/s in that dtype


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model.

    Args:
        key: Short name (``swin_t``).
        family: ``swin`` or ``resnet``: which native backbone and key mapping.
        timm_name: timm architecture.
        timm_args: Extra ``timm.create_model`` arguments (smaller variants for tests).
        native_args: Native config fields that override the ones derived from ``timm_name``, to match ``timm_args``.
    """

    key: str
    family: str
    timm_name: str
    timm_args: dict[str, Any] = field(default_factory=dict)
    native_args: dict[str, Any] = field(default_factory=dict)


# the benchmarked models, as the families register them (short name -> timm architecture)
MODELS: dict[str, ModelSpec] = {
    key: ModelSpec(key, family.name, timm_name)
    for family in FAMILIES.values()
    for key, timm_name in (family.benchmark_models or {}).items()
}
QUICK_MODELS = ("resnet18", "swin_t")


@dataclass
class BenchSettings:
    """What to run.

    Args:
        models: Keys of :data:`MODELS`, or :class:`ModelSpec` objects.
        batch_sizes: Batch sizes to run.
        dtypes: Keys of :data:`DTYPES`.
        modes: ``eager`` and/or ``compile`` (``torch.compile`` of each contender).
        input_size: Square input side in pixels.
        repeats: Timed calls per contender and stage (the median is reported).
        warmup: Untimed calls per contender before timing (at least 2 under ``compile``).
        device: ``cpu`` or ``cuda`` (``cuda`` is synchronised around every timed call).
        threads: ``torch.set_num_threads`` for the run; ``None`` keeps the current setting.
        stages: Native stage indices to run; ``None`` runs every stage.
        transformers: Include transformers' backbones when the package is installed.
        memory: Measure peak memory (one extra profiled call per contender and stage).
        native_optimized: Also time the native backbones after ``optimize_for_inference()`` as ``native_opt``
            (ResNet: BatchNorm folded into fused convolutions; Swin: pre-packed linear weights).
        seed: Seed of the random weights and input.
    """

    models: list[str | ModelSpec] = field(default_factory=lambda: list(QUICK_MODELS))
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    modes: list[str] = field(default_factory=lambda: ["eager"])
    input_size: int = 224
    repeats: int = 5
    warmup: int = 1
    device: str = "cpu"
    threads: int | None = None
    stages: list[int] | None = None
    transformers: bool = True
    memory: bool = True
    native_optimized: bool = False
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the valid choices for anything unknown."""
        names = [m for m in self.models if not isinstance(m, ModelSpec)]
        checks = (("models", names, MODELS), ("dtypes", self.dtypes, DTYPES), ("modes", self.modes, MODES))
        for name, values, valid in checks:
            unknown = [v for v in values if v not in valid]
            if unknown or (not values and name != "models"):
                raise ValueError(f"{name} {unknown or values} invalid; choose from {list(valid)}")
        if not self.models:
            raise ValueError(f"no models to run; choose from {list(MODELS)}")
        families = {m.family for m in self.models if isinstance(m, ModelSpec)}
        comparable = sorted(f.name for f in FAMILIES.values() if f.timm_as_native is not None)
        if families - set(comparable):
            raise ValueError(f"unknown model families {sorted(families - set(comparable))}; choose from {comparable}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        if self.input_size < 32 or self.input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32 (>= 32), got {self.input_size}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False; use --device cpu")


# machine ---------------------------------------------------------------------------------------------------------
# weights and contenders ------------------------------------------------------------------------------------------
def random_timm_state_dict(timm_name: str, seed: int, **model_args: Any) -> dict[str, torch.Tensor]:
    """timm's random initialisation, with norm statistics and affine parameters perturbed.

    A fresh model has BatchNorm statistics of 0/1 and norm weights of 1/0, which would hide mistakes in how they
    are mapped; every constant floating tensor gets noise (running variances stay positive).
    """
    import timm

    torch.manual_seed(seed)
    state_dict = timm.create_model(timm_name, **model_args).state_dict()
    generator = torch.Generator().manual_seed(seed + 1)
    out = {}
    for key, value in state_dict.items():
        if value.is_floating_point() and value.numel() > 1 and bool((value == value.flatten()[0]).all()):
            noise = torch.randn(value.shape, generator=generator)
            value = (
                torch.rand(value.shape, generator=generator) + 0.5
                if key.endswith("running_var")
                else (value + 0.1 * noise)
            )
        out[key] = value
    return out


def native_config(spec: ModelSpec, **overrides: Any) -> Any:
    """The native config matching the timm architecture of ``spec`` (timm's window semantics for Swin)."""
    family = get_family(spec.family)
    return family.config_class(**{**family.native_fields(spec.timm_name), **spec.native_args, **overrides})


def _max_abs_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None:
        return None
    if a.shape != b.shape:
        raise ValueError(f"stage outputs differ in shape: {list(a.shape)} vs {list(b.shape)}")
    return float((a.float() - b.float()).abs().max())


class _Weights:
    """One random checkpoint of a model in both layouts, and a transformers-layout folder holding it."""

    def __init__(self, spec: ModelSpec, settings: BenchSettings, folder: str) -> None:
        family = get_family(spec.family)
        backbone_class = family.backbone_class
        # the checkpoint is drawn at the model's own resolution; the timm contender runs at the input size
        self.timm = random_timm_state_dict(spec.timm_name, settings.seed, **spec.timm_args)
        self.timm_args = dict(spec.timm_args)
        if family.benchmark_timm_args is not None:
            self.timm_args.update(family.benchmark_timm_args(settings.input_size))
        self.transformers = dict(family.timm_to_transformers(self.timm))
        num_stages = len(native_config(spec).stage_names)
        full = backbone_class(native_config(spec, out_indices=list(range(num_stages))))
        generator = torch.Generator().manual_seed(settings.seed + 2)
        for key, value in full.state_dict_for_save().items():
            if key.startswith("hidden_states_norms."):
                noise = 0.1 * torch.randn(value.shape, generator=generator)
                self.transformers[key] = (1.0 if key.endswith("weight") else 0.0) + noise
        full.load_checkpoint(self.transformers, strict=True, source="benchmark weights")
        full.save_pretrained(folder)
        self.folder = folder
        self.stage_names = list(full.stage_names)


def _build_contenders(
    spec: ModelSpec, weights: _Weights, index: int, dtype: torch.dtype, settings: BenchSettings, with_tf: bool
) -> dict[str, torch.nn.Module]:
    from ..models.timm_backbone import TimmBackbone, TimmBackboneConfig

    family = get_family(spec.family)
    backbone_class = family.backbone_class
    models: dict[str, torch.nn.Module] = {}
    timm_index = family.timm_stage(index)
    if timm_index is not None:
        config = TimmBackboneConfig(spec.timm_name, out_indices=[timm_index], model_args=dict(weights.timm_args))
        models["timm"] = TimmBackbone(config, timm_state_dict=weights.timm)
    config = native_config(spec, out_indices=[index])
    models["native"] = backbone_class.from_pretrained(weights.folder, config=config)
    if with_tf:
        import transformers

        # the concrete class: transformers' AutoBackbone asks the hub whether a local folder is a repo
        tf_class = getattr(transformers, family.transformers_backbone)
        models["transformers"] = tf_class.from_pretrained(weights.folder, out_indices=[index])
    if settings.native_optimized and hasattr(backbone_class, "optimize_for_inference"):
        models["native_opt"] = backbone_class.from_pretrained(weights.folder, config=config)
    models = {name: m.to(device=settings.device, dtype=dtype).eval() for name, m in models.items()}
    if "native_opt" in models:
        models["native_opt"].optimize_for_inference()
    return {name: models[name] for name in IMPLEMENTATIONS if name in models}


# running ---------------------------------------------------------------------------------------------------------
def _stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _transformers_quiet(enabled: bool) -> Iterator[None]:
    """transformers' loading bars and warnings off while the benchmark runs (they would bury the progress)."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as tf_logging

    bars, level = tf_logging.is_progress_bar_enabled(), tf_logging.get_verbosity()
    tf_logging.disable_progress_bar()
    tf_logging.set_verbosity_error()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def run_benchmark(settings: BenchSettings, progress: Callable[[str], None] | None = _stderr_progress) -> dict:
    """Run every (model, dtype, batch, mode) of ``settings`` and return the report (JSON-serialisable).

    Args:
        settings: What to run.
        progress: Called with a line of text after each step (``None``: silent).

    Returns:
        ``{"machine": ..., "settings": ..., "runs": [{"model", "dtype", "batch", "mode", "stages": [...]}, ...]}``,
        each stage with ``max_abs_diff`` (native vs timm and vs transformers), ``latency_ms`` (median),
        ``latency_ms_all``, ``throughput`` (images/s) and ``peak_mib`` per contender.
    """
    settings.validate()
    say = progress or (lambda _message: None)
    previous_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    with_tf = settings.transformers and transformers_version() is not None
    report = {"machine": machine_info(settings.device), "settings": asdict(settings), "runs": []}
    left_out = {"transformers": not with_tf, "native_opt": not settings.native_optimized}
    report["settings"]["contenders"] = [n for n in IMPLEMENTATIONS if not left_out.get(n)]
    combos = [
        (m, d, b, mode)
        for m in settings.models
        for d in settings.dtypes
        for b in settings.batch_sizes
        for mode in settings.modes
    ]
    started = time.perf_counter()
    try:
        with _transformers_quiet(with_tf):
            for step, (model, dtype_name, batch, mode) in enumerate(combos, 1):
                spec = model if isinstance(model, ModelSpec) else MODELS[model]
                tag = f"[{step}/{len(combos)}] {spec.key} {dtype_name} batch {batch} {mode}"
                say(f"{tag}: preparing weights")
                with tempfile.TemporaryDirectory(prefix="stage-bench-") as folder:
                    weights = _Weights(spec, settings, folder)
                    run = _run_one(spec, weights, DTYPES[dtype_name], batch, mode, settings, with_tf, say, tag, started)
                run.update(
                    model=spec.key,
                    timm_name=spec.timm_name,
                    family=spec.family,
                    dtype=dtype_name,
                    batch=batch,
                    mode=mode,
                    input_size=settings.input_size,
                    comparison=get_family(spec.family).comparison_note,
                )
                report["runs"].append(run)
    finally:
        torch.set_num_threads(previous_threads)
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    return report


def _run_one(
    spec: ModelSpec,
    weights: _Weights,
    dtype: torch.dtype,
    batch: int,
    mode: str,
    settings: BenchSettings,
    with_tf: bool,
    say: Callable[[str], None],
    tag: str,
    started: float,
) -> dict:
    generator = torch.Generator().manual_seed(settings.seed + 3)
    pixels = torch.randn(batch, 3, settings.input_size, settings.input_size, generator=generator)
    pixels = pixels.to(device=settings.device, dtype=dtype)
    norm_weights = {k: v for k, v in weights.transformers.items() if k.startswith("hidden_states_norms.")}
    indices = settings.stages if settings.stages is not None else range(len(weights.stage_names))
    warmup = max(settings.warmup, 2) if mode == "compile" else settings.warmup
    bad = [i for i in indices if not 0 <= i < len(weights.stage_names)]
    if bad:
        raise ValueError(f"stages {bad} out of range; {spec.key} has stages 0..{len(weights.stage_names) - 1}")
    family = get_family(spec.family)
    matmul, matmul_flops = square_matmul(MATMUL_SIZE, dtype, settings.device)
    stages = []
    for index in indices:
        name, timm_index = weights.stage_names[index], family.timm_stage(index)
        models = _build_contenders(spec, weights, index, dtype, settings, with_tf)
        runners = {n: (torch.compile(m) if mode == "compile" else m) for n, m in models.items()}
        with torch.inference_mode():
            outputs = {n: runners[n](pixels).feature_maps[0] for n in runners}
            flops = _timm_flops(models.get("timm"), pixels)
            calls = {n: (lambda r=r: r(pixels)) for n, r in runners.items()}
            times = time_interleaved({**calls, "matmul": matmul}, settings.repeats, warmup, settings.device)
            matmul_gflops = matmul_flops / statistics.median(times.pop("matmul")) / 1e9
            memory = {n: peak_memory(c, settings.device) for n, c in calls.items()} if settings.memory else {}
        reference = None
        if "timm" in outputs:
            reference = family.timm_as_native(name, outputs["timm"], norm_weights)
        native = outputs["native"]
        medians = {n: statistics.median(t) for n, t in times.items()}
        stage = {
            "index": index,
            "name": name,
            "timm_stage": models["timm"].stage_names[timm_index] if "timm" in models else None,
            "shape": list(native.shape),
            "max_abs_diff": {
                "timm": _max_abs_diff(native, reference),
                "transformers": _max_abs_diff(native, outputs.get("transformers")),
                "native_opt": _max_abs_diff(native, outputs.get("native_opt")),
            },
            "latency_ms": {n: round(t * 1e3, 3) for n, t in medians.items()},
            "latency_ms_all": {n: [round(v * 1e3, 3) for v in t] for n, t in times.items()},
            "throughput": {n: round(batch / t, 2) for n, t in medians.items()},
            "peak_mib": {n: round(b / 2**20, 2) for n, b in memory.items()},
            "gflops": {n: round(flops / t / 1e9, 2) for n, t in medians.items()} if flops else None,
            "matmul_gflops": round(matmul_gflops, 2),
        }
        stages.append(stage)
        del models, runners, calls, outputs
        lat = "  ".join(f"{n} {v:.2f} ms" for n, v in stage["latency_ms"].items())
        diff = stage["max_abs_diff"]["timm"]
        diff_text = f"  max|native-timm| {diff:.2e}" if diff is not None else ""
        say(f"{tag} {name}: {lat}{diff_text}  ({time.perf_counter() - started:.0f} s)")
    return {"stages": stages}


def _timm_flops(model: torch.nn.Module | None, pixels: torch.Tensor) -> int | None:
    """FLOPs of timm's forward up to the stage (torch's counter sees its plain linears and convolutions; the native
    models' oneDNN kernels are invisible to it), or ``None`` where timm has no such stage."""
    if model is None:
        return None
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(pixels)
    return counter.get_total_flops() or None


# reporting -------------------------------------------------------------------------------------------------------


# command line ----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options, shared by ``timm-backbone bench`` and ``benchmarks/stage_bench.py``."""
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(QUICK_MODELS),
        choices=list(MODELS),
        metavar="MODEL",
        help=f"models to run (default: {' '.join(QUICK_MODELS)}; choices: {' '.join(MODELS)})",
    )
    parser.add_argument("--all-models", action="store_true", help="run every model: " + " ".join(MODELS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes (default 1)")
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES), help="dtypes (default fp32)")
    parser.add_argument("--compile", action="store_true", help="also run each contender under torch.compile")
    parser.add_argument("--size", type=int, default=224, help="input size in pixels (default 224)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per contender (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's setting)")
    parser.add_argument("--stages", type=int, nargs="+", default=None, help="native stage indices (default all)")
    parser.add_argument("--no-transformers", action="store_true", help="leave transformers' backbones out")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--native-optimized",
        action="store_true",
        help="also time the native backbones after optimize_for_inference() as 'native_opt'",
    )
    parser.add_argument("--output", default="stage_bench", help="folder for the JSON, markdown and PNG")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        models=list(MODELS) if args.all_models else list(args.models),
        batch_sizes=list(args.batch),
        dtypes=list(args.dtype),
        modes=["eager", "compile"] if args.compile else ["eager"],
        input_size=args.size,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        threads=args.threads,
        stages=args.stages,
        transformers=not args.no_transformers,
        memory=not args.no_memory,
        native_optimized=args.native_optimized,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run, write the three files, print the markdown table; the command-line entry point."""
    report = run_benchmark(settings_from_args(args))
    paths = write_outputs(report, args.output)
    print(markdown_report(report))
    print(f"wrote {paths['json']}, {paths['md']} and {paths['png']}")
    return 0
