"""The CPU ratios the README quotes, as ranges over several runs of the three CPU benchmarks.

    python bench/cpu_ratios.py [--runs 3] [--threads 1] [--out bench/out]

Runs bench/bench_cpu_step.py, bench/bench_qgalore.py and bench/bench_refresh.py --full in turn,
``--runs`` times (cpu_step, qgalore, refresh, cpu_step, …), each in a fresh process: within a
run every benchmark already alternates its providers round by round
(harness.time_interleaved); across runs the peers' times also move with how their allocations
fault pages in each new process. Writes cpu_ratios.csv: per benchmark, case and ratio, the value
of every run and their min / median / max. A ratio is quoted as its min-max range.

``--threads`` sets each run's intra-op threads (OMP_NUM_THREADS). On a machine shared with other
jobs, more threads than free cores make every parallel region wait at its barrier for a thread
the scheduler parked: a step of many small torch ops (the peers') loses far more than one fused
call, and the ratio measures the neighbours. One thread per process has no barrier and is the
robust reading there; on a quiet machine use the cores it has.
About 5-10 minutes on 2 cores (the SVD refresh of 2048×5504 dominates).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness

BENCH = Path(__file__).resolve().parent
# benchmark -> (script arguments before the output path, option naming the output, suffix)
SCRIPTS = {
    "cpu_step": ("bench_cpu_step.py", [], "--csv", ".csv"),
    "qgalore": ("bench_qgalore.py", [], "--csv", ""),
    "refresh": ("bench_refresh.py", ["--full"], "--csv", ".csv"),
}


def _output(bench: str, stem: Path) -> Path:
    return Path(f"{stem}_cpu_step.csv") if bench == "qgalore" else stem.with_suffix(".csv")


def ratios(bench: str, stem: Path) -> dict[tuple[str, str], float]:
    """(case, ratio name) -> value, from one run's CSV."""
    out: dict[tuple[str, str], float] = {}
    rows = harness.read_csv(_output(bench, stem))[1]
    if bench == "cpu_step":
        for r in rows:
            case = f"{r['m']}x{r['n']} r{r['rank']} {r['dtype']}"
            out[(case, "galore-torch / ours")] = float(r["galore_over_ours"])
            out[(case, "ours / two-GEMM floor")] = float(r["ours_over_floor"])
    elif bench == "qgalore":
        for r in rows:
            case = f"{r['m']}x{r['n']} r{r['rank']} {r['grad_dtype']} grad"
            out[(case, "q-galore-torch* / ours")] = float(r["qgalore_over_ours"])
            out[(case, "ours / two-GEMM floor")] = float(r["ours_over_floor"])
    else:
        for r in rows:
            if r["device"] != "cpu":
                continue
            case = f"{r['shape']} {r['m']}x{r['n']} r{r['rank']}"
            if r.get("svd_ms"):
                out[(case, "svd / dct_select")] = float(r["svd_ms"]) / float(r["dct_fft_ms"])
            out[(case, "dct_select / one GEMM")] = float(r["dct_fft_ms"]) / float(r["gemm_ms"])
    return out


def aggregate(work: Path, runs: int, benches: Sequence[str], out: Path, command: str = ""
              ) -> Path:
    """cpu_ratios.csv from the runs' CSVs in ``work`` (<bench>_<run>...): every run's value,
    min / median / max, and each run's 1-minute load average (other jobs on the machine)."""
    values: dict[tuple[str, str, str], list[float]] = {}
    load: dict[tuple[str, int], str] = {}
    threads: dict[str, set[str]] = {}
    first: dict[str, str] = {}  # the first run's header: the commit, date and machine measured
    for run in range(1, runs + 1):
        for bench in benches:
            stem = work / f"{bench}_{run}"
            header = harness.read_csv(_output(bench, stem))[0]
            first = first or header
            load[(bench, run)] = header.get("loadavg_1m", "")
            threads.setdefault(bench, set()).add(header.get("threads", ""))
            for (case, name), value in ratios(bench, stem).items():
                values.setdefault((bench, case, name), []).append(value)
    rows = []
    for (bench, case, name), vals in values.items():
        rows.append({"bench": bench, "case": case, "ratio": name,
                     **{f"run{i + 1}": round(v, 3) for i, v in enumerate(vals)},
                     "min": round(min(vals), 3), "median": round(statistics.median(vals), 3),
                     "max": round(max(vals), 3), "threads": "/".join(sorted(threads[bench])),
                     "loadavg_1m": " ".join(load[(bench, i + 1)] for i in range(len(vals)))})
    notes = {"command": command, "runs": runs, "q-galore-torch*": "q-galore-torch's step re-run op for op with "
             "its own functions, its bitsandbytes 8-bit Adam (CUDA-only) replaced by fp32 Adam "
             "on the low-rank tensors (bench/bench_qgalore.py)",
             "loadavg_1m": "per run, at the end of each benchmark's run (2 cores)",
             "threads": "/".join(sorted(set().union(*threads.values()))) + " per run"}
    path = harness.write_csv(out / "cpu_ratios.csv", rows, {**first, **notes})
    print(harness.format_table(rows, ["bench", "case", "ratio", "min", "median", "max",
                                      "loadavg_1m"]))
    print(f"wrote {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=harness.OUT_DIR)
    parser.add_argument("--only", nargs="*", choices=list(SCRIPTS), default=list(SCRIPTS))
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads per run (default: torch's)")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    work = Path(tempfile.mkdtemp(prefix="cpu_ratios_"))
    for run in range(1, args.runs + 1):
        for bench in args.only:
            script, extra, option, suffix = SCRIPTS[bench]
            cmd = [sys.executable, str(BENCH / script), *extra, option,
                   f"{work / f'{bench}_{run}'}{suffix}"]
            print(f"# run {run}/{args.runs}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True, env=env)
    aggregate(work, args.runs, args.only, args.out,
              command=" ".join(["python bench/cpu_ratios.py", *(argv or sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
