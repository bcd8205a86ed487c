"""Timing and memory measurement shared by every benchmark: interleaved medians in one process, peak memory, the
machine a run was made on (with its matrix-unit CPU flags), and a plain matmul to compare achieved GFLOP/s against."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# CPU features that decide which bf16 kernels oneDNN can use: AMX tiles (Intel Sapphire Rapids and later), AVX-512
# BF16 dot products (Intel Cooper Lake and later, AMD Zen 4 and later), plain AVX-512 / AVX2 (bf16 converted to fp32)
CPU_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx2")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> dict[str, bool]:
    """Which of :data:`CPU_FLAGS` the CPU reports (``/proc/cpuinfo``; all ``False`` where that file is absent)."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    return {name: name in flags for name in CPU_FLAGS}


def machine_info(device: str) -> dict[str, Any]:
    """The machine, library versions and thread count the numbers were measured with."""
    import timm

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "onednn_bf16": bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers_version(),
        "device": device,
        "load_average": load_average(),
        # glibc's malloc settings and a preloaded allocator change every contender's time (page faults per forward)
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other work on the machine slows every contender and adds noise)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def square_matmul(size: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Callable[[], Any], int]:
    """A ``size``-square matmul in ``dtype`` to time beside a model, and its FLOPs: the GFLOP/s the machine reaches
    on plain matrix products of that precision."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2 * size**3


# measuring -------------------------------------------------------------------------------------------------------
def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    calls: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call of each contender; contenders alternate, with the order rotated every repeat."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize(device)
            start = time.perf_counter()
            calls[name]()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the C++ profiler's own log lines (written straight to file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(call: Callable[[], Any], device: str = "cpu") -> int:
    """Peak bytes allocated by torch during one call, above what was allocated before it.

    CUDA reads the caching allocator's statistics; CPU replays the allocation events of ``torch.profiler``.
    """
    if device == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        _synchronize(device)
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


# precision -------------------------------------------------------------------------------------------------------
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """How a benchmark runs its contenders: ``fp32``; ``bf16`` (``model.to(torch.bfloat16)``, bf16 input); or
    ``bf16`` with ``autocast`` (fp32 model and input, every call under ``torch.autocast(device, torch.bfloat16)``).

    Raises:
        ValueError: an unknown dtype, or ``autocast`` with fp32.
    """

    dtype: str = "fp32"
    autocast: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in PRECISIONS:
            raise ValueError(f"dtype {self.dtype!r} invalid; choose from {list(PRECISIONS)}")
        if self.autocast and self.dtype == "fp32":
            raise ValueError("autocast needs a lower precision to cast to; use dtype 'bf16' with autocast")

    @property
    def label(self) -> str:
        return f"{self.dtype} autocast" if self.autocast else self.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the matrix products (and of the reference matmul)."""
        return PRECISIONS[self.dtype]

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype of the weights and the input."""
        return torch.float32 if self.autocast else PRECISIONS[self.dtype]

    def prepare(self, model: Any) -> Any:
        """The model in eval mode with its weights in :attr:`storage_dtype`."""
        return model.to(self.storage_dtype).eval()

    def call(self, fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        """A no-argument call of ``fn(*args)``, under autocast when this precision asks for it."""
        if not self.autocast:
            return lambda: fn(*args)

        def under_autocast() -> Any:
            with torch.autocast(self.device, dtype=self.compute_dtype):
                return fn(*args)

        return under_autocast


def add_precision_arguments(parser: Any) -> None:
    """``--dtype fp32|bf16`` and ``--autocast`` for a benchmark's argument parser."""
    parser.add_argument("--dtype", default="fp32", choices=list(PRECISIONS), help="weights and input dtype")
    parser.add_argument(
        "--autocast",
        action="store_true",
        help="keep fp32 weights and input and run each call under torch.autocast with --dtype (bf16)",
    )


def precision_from_args(args: Any) -> Precision:
    return Precision(args.dtype, args.autocast)
