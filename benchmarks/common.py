"""Helpers shared by the benchmarks: measured subprocesses, tables, JSON results, machine facts.

Nothing here knows about merging; ``bench_merge.py`` (and later benchmarks)
build on it. Only the standard library, ``psutil`` and (optionally) ``rich``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Runs the command given as argv[1:] and reports the largest single-process
# peak RSS among its descendants (RUSAGE_CHILDREN.ru_maxrss, in KiB on Linux)
# to the file named by $BENCH_MAXRSS_FILE. A fresh wrapper per measurement,
# because ru_maxrss of RUSAGE_CHILDREN never resets within one process.
_WRAPPER = """
import json, os, resource, subprocess, sys
rc = subprocess.call(sys.argv[1:])
u = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(os.environ["BENCH_MAXRSS_FILE"], "w") as f:
    json.dump({"maxrss_kib": u.ru_maxrss, "user_s": u.ru_utime, "sys_s": u.ru_stime}, f)
sys.exit(rc)
"""


@dataclass
class Measured:
    """One measured subprocess run."""

    cmd: list[str]
    returncode: int
    wall_s: float
    #: Peak of the summed RSS of the whole process tree, sampled every ``poll_s``.
    peak_rss_tree: int
    #: Largest single-process peak RSS (kernel high-water mark, catches spikes between samples).
    peak_rss_maxrss: int
    #: CPU seconds (user, system) of the command and its children: less sensitive to a busy machine than wall.
    user_s: float = 0.0
    sys_s: float = 0.0
    #: 1-minute load average when the command started and ended (other work on the machine).
    load_before: float = 0.0
    load_after: float = 0.0
    #: Share of the wall time in which some runnable thread waited for a CPU (Linux PSI
    #: /proc/pressure/cpu "some"): the command's own surplus threads count too, so compare it
    #: with a run on a quiet machine; near 1 means other work competed.
    cpu_pressure: float | None = None
    stdout: str = ""
    stderr: str = ""
    samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_rss(self) -> int:
        """Bytes: the larger of the sampled tree sum and the kernel high-water mark."""
        return max(self.peak_rss_tree, self.peak_rss_maxrss)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak_rss"] = self.peak_rss
        d["stdout"] = self.stdout[-2000:]
        d["stderr"] = self.stderr[-4000:]
        return d


def cpu_pressure_total() -> float | None:
    """Seconds of CPU stall ("some") since boot from Linux PSI, or None where unavailable."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                return int(line.rsplit("total=", 1)[1]) / 1e6
    except (OSError, ValueError, IndexError):
        pass
    return None


class _TreeSampler:
    """Summed RSS of a process and its descendants; the tree is re-listed only every ``refresh_s``.

    Listing descendants scans all of /proc, so doing it at every 20 ms sample
    would itself load a small machine.
    """

    def __init__(self, root: psutil.Process, refresh_s: float = 0.25):
        self.root = root
        self.refresh_s = refresh_s
        self.procs: list[psutil.Process] = [root]
        self.listed = 0.0

    def rss(self) -> int:
        now = time.monotonic()
        if now - self.listed >= self.refresh_s:
            with contextlib.suppress(psutil.Error):
                self.procs = [self.root, *self.root.children(recursive=True)]
            self.listed = now
        total = 0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total


def run_measured(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    poll_s: float = 0.02,
    timeout_s: float | None = None,
) -> Measured:
    """Run ``cmd``; measure wall time and peak RSS (psutil tree polling + ru_maxrss).

    The wall time includes the tiny ``python -c`` wrapper that collects
    ru_maxrss (about 20 ms). stdout and stderr are captured.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".maxrss", delete=False) as tmp:
        maxrss_file = tmp.name
    full_env = dict(os.environ if env is None else env)
    full_env["BENCH_MAXRSS_FILE"] = maxrss_file
    out_f = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed below, after the child exits)
    err_f = tempfile.TemporaryFile("w+")  # noqa: SIM115
    peak = 0
    samples = 0
    load_before = os.getloadavg()[0]
    stall_before = cpu_pressure_total()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *cmd], stdout=out_f, stderr=err_f, env=full_env, cwd=cwd)
    ps = psutil.Process(proc.pid)
    tree = _TreeSampler(ps)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, samples
        while not stop.is_set():
            peak = max(peak, tree.rss())
            samples += 1
            stop.wait(poll_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        returncode = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for child in ps.children(recursive=True):
            child.kill()
        proc.kill()
        returncode = proc.wait()
    wall = time.perf_counter() - started
    stall_after = cpu_pressure_total()
    stop.set()
    sampler.join()
    try:
        usage = json.loads(Path(maxrss_file).read_text())
    except (OSError, ValueError):
        usage = {}
    finally:
        Path(maxrss_file).unlink(missing_ok=True)
    out_f.seek(0)
    err_f.seek(0)
    stdout, stderr = out_f.read(), err_f.read()
    out_f.close()
    err_f.close()
    return Measured(
        cmd=list(cmd),
        returncode=returncode,
        wall_s=wall,
        peak_rss_tree=peak,
        peak_rss_maxrss=int(usage.get("maxrss_kib", 0)) * 1024,
        user_s=float(usage.get("user_s", 0.0)),
        sys_s=float(usage.get("sys_s", 0.0)),
        load_before=load_before,
        load_after=os.getloadavg()[0],
        cpu_pressure=None if stall_before is None or stall_after is None else (stall_after - stall_before) / wall,
        stdout=stdout,
        stderr=stderr,
        samples=samples,
    )


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    """Print a table with rich when it is installed, as aligned plain text otherwise."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        print("  ".join("-" * w for w in widths))
        for r in cells:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        return
    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 2 else "right")
    for r in cells:
        table.add_row(*r)
    Console(width=max(100, min(200, sum(len(h) for h in headers) * 3))).print(table)


def write_json(name: str, data: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``data`` to ``results_dir/name`` (pretty, sorted keys); returns the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / name
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(path: str | Path = ".") -> dict[str, Any]:
    """Cores, RAM, disk, CPU model and library versions for the results file."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        usage = psutil.disk_usage(str(path))
        info["disk_free_bytes"] = usage.free
    except OSError:
        pass
    for mod in ("torch", "safetensors", "transformers", "convergent"):
        try:
            info[f"{mod}_version"] = __import__(mod).__version__
        except Exception:  # not installed or no __version__
            info[f"{mod}_version"] = None
    return info


def mb(nbytes: float) -> float:
    """Bytes to MB (10^6), one decimal."""
    return round(nbytes / 1e6, 1)
