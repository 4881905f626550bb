"""What every benchmark report records, and how it is written: the machine, timings, tables, files.

* the machine description (cores, CPU model, memory, torch/e3nn versions, date, load average) written into every
  report, the thread count, this process's memory;
* timing statistics, timed calls, log-log fits and power-law extrapolation;
* Markdown formatting (numbers, tables, the header every report starts with) and the JSON/Markdown/PNG writers.

Model building, the reference hyper-parameters, the mace-torch peer and worker subprocesses are in
``bench_common.py``. Units: times in seconds unless a key says otherwise (``*_ms``, ``*_us``), memory in MB
(2**20 bytes).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from potentials.io import atomic_write_text  # noqa: E402

SCHEMA_VERSION = 1


# --------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def mem_available_mb() -> float:
    """MemAvailable from /proc/meminfo (MB); a large number where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("inf")


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def machine_info(threads: int) -> dict[str, Any]:
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cores_available": available_cores(),
        "cpu_count": os.cpu_count(),
        "torch_threads": int(threads),
        "memory_total_mb": None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_average_start": load_average(),
    }
    try:
        import e3nn

        info["e3nn"] = e3nn.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        with open("/proc/meminfo") as fh:
            info["memory_total_mb"] = round(int(fh.readline().split()[1]) / 1024.0)
    except (OSError, ValueError, IndexError):
        pass
    return info


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(int(threads))


def rss_mb() -> float:
    """Resident set size of this process now (MB)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------- timing
def timing_stats(times: Sequence[float]) -> dict[str, float]:
    """Median, mean, min, max and count of a list of durations (s)."""
    xs = sorted(float(t) for t in times)
    n = len(xs)
    if n == 0:
        return {"n": 0}
    mid = n // 2
    median = xs[mid] if n % 2 else 0.5 * (xs[mid - 1] + xs[mid])
    return {"n": n, "median_s": median, "mean_s": sum(xs) / n, "min_s": xs[0], "max_s": xs[-1]}


def time_calls(fn: Callable[[], Any], warmup: int, repeat: int) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeat`` times; the durations (s) of the timed calls."""
    for _ in range(int(warmup)):
        fn()
    times = []
    for _ in range(int(repeat)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def fit_loglog(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float] | None:
    """Least-squares ``y = a · x^k`` on log-log axes: {exponent k, prefactor a, points}; None below 2 points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    k = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return {"exponent": k, "prefactor": math.exp(my - k * mx), "points": n}


def extrapolate(xs: Sequence[float], ys: Sequence[float], x_new: float) -> float | None:
    """Power-law extrapolation from the last two points, at least linear: ``y_last · (x_new/x_last)^max(k, 1)``
    (None with fewer than two points)."""
    if len(xs) < 2:
        return None
    fit = fit_loglog(xs[-2:], ys[-2:])
    if fit is None:
        return None
    return float(ys[-1]) * (float(x_new) / float(xs[-1])) ** max(fit["exponent"], 1.0)


def is_pos_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# ------------------------------------------------------------------------------------------------ output
def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x == 0:
            return "0"
        mag = abs(x)
        if mag >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{max(0, digits - 1 - int(math.floor(math.log10(mag))))}f}" if mag >= 1e-3 else f"{x:.2e}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in row) + " |")
    return "\n".join(lines)


def command_line() -> str:
    """The exact command that produced a report (relative script path, as run from the repo root)."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return " ".join(shlex.quote(a) for a in ["python", str(script), *sys.argv[1:]])


def machine_markdown(machine: dict[str, Any], peer: dict[str, Any] | None) -> str:
    lines = [
        f"- date (UTC): {machine['date']}",
        f"- machine: {machine['cpu_model']}, {machine['cores_available']} cores available "
        f"(torch threads {machine['torch_threads']}), {fmt(machine.get('memory_total_mb'))} MB RAM; "
        f"load average at start {machine.get('load_average_start')} / end {machine.get('load_average_end')} "
        "(shared machine: other jobs may run alongside)",
        f"- this project: torch {machine['torch']}, e3nn {machine.get('e3nn', '?')}, Python {machine['python']}",
    ]
    if peer and "error" not in peer:
        lines.append(f"- peer: mace-torch {peer.get('mace_torch')}, e3nn {peer.get('e3nn')}, torch {peer.get('torch')} (peer-venv)")
    elif peer:
        lines.append(f"- peer: unavailable ({peer.get('error')})")
    return "\n".join(lines)


def hp_markdown(desc: dict[str, Any]) -> str:
    vals = desc["values"]
    parts = [f"{k}={json.dumps(v)}" for k, v in vals.items()]
    peer = [f"{k}={json.dumps(v)}" for k, v in desc["mace_torch_names"].items()]
    out = [
        f"- hyper-parameters (both sides): {', '.join(parts)}"
        + (f", batch_size={desc['batch_size']}" if "batch_size" in desc else ""),
        f"- mace-torch names: {', '.join(peer)}; {desc['mace_torch_fixed']}",
        f"- reference configuration of issue 8: {'yes' if desc['is_reference'] else 'NO (overridden with --hp)'}",
    ]
    return "\n".join(out)


def write_report(payload: dict[str, Any], json_path: str | os.PathLike | None, markdown: str,
                 also: Sequence[str | os.PathLike] = ()) -> dict[str, str]:
    """Print ``markdown``; write ``payload`` as JSON to ``json_path`` and ``markdown`` beside it (same stem, ``.md``),
    each atomically, and print what was written (plus the files in ``also``, e.g. the plot).

    Returns the paths written. Without ``json_path`` only prints the Markdown.
    """
    print(markdown)
    if not json_path:
        return {}
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    md_path = path.with_suffix(".md")
    for target, text in ((path, json.dumps(payload, indent=1, default=_json_default)), (md_path, markdown)):
        atomic_write_text(target, text + "\n")
    print(f"wrote {path}, {md_path}" + "".join(f" and {a}" for a in also))
    return {"json": str(path), "markdown": str(md_path)}


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def base_payload(benchmark: str, threads: int, hp_desc: dict[str, Any], peer_info: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": benchmark,
        "command": command_line(),
        "machine": machine_info(threads),
        "peer": peer_info,
        "hyperparameters": hp_desc,
        "rows": [],
    }



def report_header(title: str, payload: dict[str, Any]) -> list[str]:
    """First lines of every benchmark report: title, exact command, machine and library versions, hyper-parameters."""
    return [f"# {title}", "", f"Command: `{payload['command']}`", "",
            machine_markdown(payload["machine"], payload["peer"]), hp_markdown(payload["hyperparameters"])]


def write_report_with_plot(payload: dict[str, Any], json_path, plot: Callable[[dict, Path], None], to_markdown) -> None:
    """Plot beside ``json_path`` (``.png``; a failing plot is recorded, never fatal), then write the JSON and Markdown
    reports (:func:`write_report`); ``to_markdown(payload, png_name_or_None)``."""
    png = None
    if json_path:
        png = Path(json_path).with_suffix(".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        try:
            plot(payload, png)
            payload["plot"] = png.name
        except Exception as exc:  # a plot failure must not lose the numbers
            payload["plot_error"] = f"{type(exc).__name__}: {exc}"
            png = None
    write_report(payload, json_path, to_markdown(payload, png.name if png else None), also=[png] if png else [])


def new_figure(ncols: int, figsize: tuple[float, float]):
    """A row of ``ncols`` matplotlib axes on the headless Agg backend → (fig, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=figsize)


def save_figure(fig, axes, png: Path, title: str, fontsize: int = 9) -> None:
    """Grid + legend on every axis, a title, tight layout; write ``png`` (110 dpi) and close the figure."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
