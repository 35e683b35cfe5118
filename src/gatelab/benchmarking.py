"""Benchmark harness shared by the scripts in benchmarks/: side-by-side timing (interleaved repeats,
medians), peak memory, machine description, and table + JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch


def machine() -> dict:
    """What the figures were measured on."""
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_side_by_side(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 7,
    warmup: int = 2,
    device: str = "cpu",
    clock: str = "wall",
) -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds so that machine noise
    hits every contender alike.

    clock: "wall" (perf_counter), or "cpu" (process_time: CPU seconds of all this process's threads,
    which other processes competing for the cores inflate far less than wall time; CPU only).
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if clock == "cpu" and device != "cpu":
        raise ValueError("clock='cpu' measures host CPU time and only makes sense with device='cpu'")
    now = time.perf_counter if clock == "wall" else time.process_time
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = now()
            fn()
            _sync(device)
            samples[name].append(now() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_memory_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes of tensors alive during one call beyond those alive before it.

    CUDA: the caching allocator's max_memory_allocated. CPU: replays, in time order, the allocations that
    torch.profiler (profile_memory=True) charges to each op itself and the frees it records as "[memory]"
    events, and takes the maximum of the running sum.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    for event in prof.events():
        change = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if change:
            deltas.append((event.time_range.start, change))
    running = peak = 0
    for _, change in sorted(deltas):
        running += change
        peak = max(peak, running)
    return peak


def write_results(name: str, rows: list[dict], meta: dict | None = None, out_dir: str | None = None) -> Path:
    """Write {"machine": ..., "meta": ..., "rows": [...]} to benchmarks/results/<name>.json (or out_dir)."""
    out = Path(out_dir or os.environ.get("GATELAB_BENCH_DIR", "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    payload = {"machine": machine(), "meta": meta or {}, "rows": rows}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column not in ("mixer", "op", "name") else "left")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped into a log: keep whole column names
    console.print(table)
