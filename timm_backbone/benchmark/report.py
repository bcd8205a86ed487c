"""The stage benchmark's outputs: markdown tables, the bar chart, and the files they are written to."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from ..hub import atomic_write
from ..visualize import _font


def _cell(values: dict[str, Any], names: Sequence[str], fmt: str) -> str:
    return " / ".join(format(values[n], fmt) if values.get(n) is not None else "–" for n in names)


def summary_markdown(runs: Sequence[dict], contenders: Sequence[str]) -> str:
    """One line per run: each contender's latency at the deepest stage run, and the worst stage difference."""
    order = " / ".join(contenders)
    lines = [
        f"| model | dtype | batch | mode | last-stage latency ms ({order}) | native speed-up vs timm | "
        f"worst max abs diff native vs timm | vs transformers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        last = run["stages"][-1]["latency_ms"]
        ratio = f"{last['timm'] / last['native']:.2f}x" if "timm" in last else "–"
        worst = []
        for other in ("timm", "transformers"):
            values = [s["max_abs_diff"][other] for s in run["stages"] if s["max_abs_diff"][other] is not None]
            worst.append(f"{max(values):.1e}" if values else "–")
        lines.append(
            f"| {run['model']} | {run['dtype']} | {run['batch']} | {run['mode']} | {_cell(last, contenders, '.1f')} | "
            f"{ratio} | {worst[0]} | {worst[1]} |"
        )
    return "\n".join(lines)


def _gflops_cell(stage: dict) -> str:
    gflops = (stage.get("gflops") or {}).get("native")
    if gflops is None:
        return "–"
    return f"{gflops:.1f} ({gflops / stage['matmul_gflops']:.0%})"


def markdown_report(report: dict) -> str:
    """The report as markdown: the machine line, a summary, then one table per run."""
    m = report["machine"]
    contenders = report["settings"]["contenders"]
    lines = [
        f"Machine: {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads, {m['device']}; "
        f"{', '.join(f for f, on in m.get('cpu_flags', {}).items() if on) or 'no AVX-512/AMX flags'}); "
        f"torch {m['torch']}, timm {m['timm']}, transformers {m['transformers'] or 'not installed'}; "
        f"median of {report['settings']['repeats']} interleaved repeats.",
        "",
    ]
    order = " / ".join(contenders)
    lines += [summary_markdown(report["runs"], contenders), ""]
    for run in report["runs"]:
        lines.append(
            f"**{run['model']}** ({run['timm_name']}), {run['dtype']}, batch {run['batch']}, "
            f"{run['input_size']}x{run['input_size']}, {run['mode']}"
        )
        lines.append("")
        lines.append(
            f"| stage | shape | latency ms ({order}) | native speed-up vs timm | images/s ({order}) | "
            f"peak MiB ({order}) | max abs diff native vs timm | vs transformers | native GFLOP/s (% of matmul) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for s in run["stages"]:
            lat = s["latency_ms"]
            ratio = f"{lat['timm'] / lat['native']:.2f}x" if "timm" in lat else "–"
            diffs = [s["max_abs_diff"][n] for n in ("timm", "transformers")]
            diff_cells = [f"{d:.1e}" if d is not None else "–" for d in diffs]
            shape = "x".join(str(v) for v in s["shape"][1:])
            lines.append(
                f"| {s['index']} {s['name']} | {shape} | {_cell(lat, contenders, '.2f')} | {ratio} | "
                f"{_cell(s['throughput'], contenders, '.1f')} | {_cell(s['peak_mib'], contenders, '.1f')} | "
                f"{diff_cells[0]} | {diff_cells[1]} | {_gflops_cell(s)} |"
            )
        lines.append("")
    notes = {run["family"]: run["comparison"] for run in report["runs"]}
    lines.extend(f"- {family}: {text}." for family, text in sorted(notes.items()))
    return "\n".join(lines).rstrip() + "\n"


def write_outputs(report: dict, output_dir: str | os.PathLike, stem: str = "stage_bench") -> dict[str, str]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``output_dir``; return the paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {ext: os.path.join(output_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")}
    with atomic_write(paths["json"], "w") as f:
        json.dump(report, f, indent=1)
    with atomic_write(paths["md"], "w") as f:
        f.write(markdown_report(report))
    with atomic_write(paths["png"]) as f:
        bench_chart(report).save(f, format="PNG")
    return paths


_BENCH_COLORS = {
    "timm": (66, 133, 244),
    "native": (219, 68, 55),
    "native_opt": (142, 36, 170),
    "transformers": (244, 180, 0),
}


def bench_chart(report: dict, width: int = 900, panel_height: int = 260) -> Any:
    """The stage benchmark's bar chart: cumulative latency per stage, one panel per run, one bar per contender.

    Args:
        report: What :func:`timm_backbone.benchmark.run_benchmark` returns.
        width: Picture width in pixels.
        panel_height: Height of each run's panel.

    Returns:
        A ``PIL.Image.Image`` (RGB).
    """
    from PIL import Image, ImageDraw

    runs = report["runs"]
    contenders = report["settings"]["contenders"]
    title_font, font, small = _font(16), _font(12), _font(10)
    top = 56
    height = top + max(len(runs), 1) * panel_height + 10
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    m = report["machine"]
    draw.text(
        (12, 8), "cumulative latency up to each stage (ms, median; lower is better)", fill=(20, 20, 20), font=title_font
    )
    draw.text(
        (12, 30),
        f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, timm {m['timm']}",
        fill=(110, 110, 110),
        font=small,
    )
    x = width - 12
    for name in reversed(contenders):
        label_w = draw.textlength(name, font=font)
        x -= label_w + 22
        draw.rectangle((x, 12, x + 14, 26), fill=_BENCH_COLORS[name])
        draw.text((x + 18, 12), name, fill=(20, 20, 20), font=font)
    left, right = 64, width - 16
    for p, run in enumerate(runs):
        y0 = top + p * panel_height
        plot_top, plot_bottom = y0 + 24, y0 + panel_height - 36
        draw.text(
            (left, y0 + 2),
            f"{run['model']}  {run['dtype']}  batch {run['batch']}  {run['mode']}",
            fill=(20, 20, 20),
            font=font,
        )
        peak = max((v for s in run["stages"] for v in s["latency_ms"].values()), default=1.0) or 1.0
        for frac in (0.0, 0.5, 1.0):
            y = plot_bottom - frac * (plot_bottom - plot_top)
            draw.line((left, y, right, y), fill=(225, 225, 225))
            draw.text((8, y - 6), f"{peak * frac:.1f}", fill=(110, 110, 110), font=small)
        group_w = (right - left) / max(len(run["stages"]), 1)
        bar_w = group_w * 0.8 / len(contenders)
        for g, stage in enumerate(run["stages"]):
            gx = left + g * group_w + group_w * 0.1
            for c, name in enumerate(contenders):
                value = stage["latency_ms"].get(name)
                bx = gx + c * bar_w
                if value is None:
                    draw.text((bx + 2, plot_bottom - 14), "n/a", fill=(150, 150, 150), font=small)
                    continue
                by = plot_bottom - value / peak * (plot_bottom - plot_top)
                draw.rectangle((bx, by, bx + bar_w - 2, plot_bottom), fill=_BENCH_COLORS[name])
                draw.text((bx, by - 12), f"{value:.1f}", fill=(60, 60, 60), font=small)
            label = f"{stage['index']} {stage['name']}"
            label_w = draw.textlength(label, font=font)
            draw.text(
                (left + g * group_w + (group_w - label_w) / 2, plot_bottom + 6), label, fill=(20, 20, 20), font=font
            )
    return canvas
