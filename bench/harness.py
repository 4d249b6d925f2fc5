"""Shared pieces of every benchmark in bench/: model shapes, timing, machine info, CSV, ratios.

Nothing here imports lowrank_kernels or a peer package, so the traffic model, the memory
accounting and the unit tests run on any machine. GPU-only helpers (triton.testing.do_bench,
nvidia-ml-py) are imported lazily, inside the functions that need them.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

# Committed results (rewritten only on purpose: `bash scripts/bench.sh --refresh`) and the
# git-ignored folder every benchmark writes to by default, so that a user's run leaves the
# checkout clean.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
OUT_DIR = Path(__file__).resolve().parent / "out"

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPE_NAMES.items()}[dtype]


# --------------------------------------------------------------------------------------------
# model-shape table
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A LLaMA configuration of the GaLore paper (configs/llama_*.json of its repository).

    ``rank`` is the GaLore recipe's rank for that size (docs/DESIGN.md §8: 128 for 60M, 256 for
    130M and 350M, 512 for 1B, 1024 for 7B); ``update_proj_gap`` 200 (500 for 7B).
    """

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    rank: int
    update_proj_gap: int = 200
    vocab: int = 32000

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """nn.Linear weight shapes (out_features, in_features) of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def distinct_linear_shapes(self) -> list[tuple[int, int]]:
        """The distinct (out, in) shapes, in first-seen order: (h, h), (i, h), (h, i)."""
        return list(dict.fromkeys(self.linear_shapes().values()))

    def linear_params(self) -> int:
        """Elements of all projected (attention and MLP) weights of the whole model."""
        return self.layers * sum(m * n for m, n in self.linear_shapes().values())

    def other_params(self) -> int:
        """Embedding, lm_head (untied, as in the GaLore configs) and RMSNorm weights."""
        return 2 * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden

    def total_params(self) -> int:
        return self.linear_params() + self.other_params()


MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("llama-60m", hidden=512, intermediate=1376, layers=8, heads=8, rank=128),
        ModelShape("llama-130m", hidden=768, intermediate=2048, layers=12, heads=12, rank=256),
        ModelShape("llama-350m", hidden=1024, intermediate=2736, layers=24, heads=16, rank=256),
        ModelShape("llama-1b", hidden=2048, intermediate=5461, layers=24, heads=32, rank=512),
        ModelShape("llama-7b", hidden=4096, intermediate=11008, layers=32, heads=32, rank=1024,
                   update_proj_gap=500),
    )
}

RANKS = (128, 256, 512, 1024)


def model(name: str) -> ModelShape:
    """Looks a model up by name ("llama-7b"; "7b" also works)."""
    key = name.lower() if name.lower().startswith("llama-") else f"llama-{name.lower()}"
    if key not in MODELS:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {name!r}")
    return MODELS[key]


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: median and interquartile range over ``repeats`` timed calls."""

    median_s: float
    q1_s: float
    q3_s: float
    repeats: int

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> Timing:
        if not samples:
            raise ValueError("samples: expected at least one timing")
        if len(samples) == 1:
            return cls(samples[0], samples[0], samples[0], 1)
        q1, med, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(med, q1, q3, len(samples))

    def __str__(self) -> str:
        return f"{self.median_s * 1e3:.3f} ms (IQR {self.iqr_s * 1e3:.3f}, n={self.repeats})"


def time_cpu(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 7,
             min_time_s: float = 0.0) -> Timing:
    """Times ``fn`` with time.perf_counter after ``warmup`` untimed calls.

    With ``min_time_s`` > 0, calls are repeated until both ``repeats`` samples exist and that much
    time has passed, so very short calls still give a stable median.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - started < min_time_s:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing.from_samples(samples)


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, rounds: int = 5,
                     warmup: int = 1, max_rounds: Mapping[str, int] | None = None,
                     cold: Sequence[str] = ()) -> dict[str, Timing]:
    """Times several providers of the same work on CPU, one call of each per round.

    Every round calls each provider once (ours, peer, floor, ours, peer, floor, …), starting one
    provider later than the round before so that none always runs right after the same other;
    each provider's Timing is over its rounds (median, quartiles). A neighbour's job that slows
    the machine for a while then slows every provider alike, and the ratios of medians stay
    put where back-to-back blocks of repeats would charge the whole slowdown to one provider.

    ``max_rounds`` caps a slow provider's rounds (an SVD of seconds: 1); providers in ``cold``
    get no warm-up call (too slow to repeat). All CPU benchmarks in bench/ time through this.
    """
    if not fns:
        raise ValueError("fns: expected at least one provider to time")
    if rounds < 1:
        raise ValueError(f"rounds: expected at least 1, got {rounds}")
    caps = {name: min(rounds, (max_rounds or {}).get(name, rounds)) for name in fns}
    for name, cap in caps.items():
        if cap < 1:
            raise ValueError(f"max_rounds: expected at least 1 round for {name!r}, got {cap}")
    for name, fn in fns.items():
        if name not in cold:
            for _ in range(warmup):
                fn()
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        start = round_ % len(names)
        for name in names[start:] + names[:start]:
            if len(samples[name]) < caps[name]:
                t0 = time.perf_counter()
                fns[name]()
                samples[name].append(time.perf_counter() - t0)
    return {name: Timing.from_samples(s) for name, s in samples.items()}


_GPU_WARM: set[int] = set()


def warm_gpu(seconds: float = 1.0) -> None:
    """Runs bf16 matmuls for ``seconds`` so that the GPU's clocks have ramped up before the first
    provider is timed (an idle H100 starts at a few hundred MHz and the first do_bench of a cold
    GPU read up to 1.5x slow). Once per current device and process."""
    index = torch.cuda.current_device()
    if index in _GPU_WARM:
        return
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
    _GPU_WARM.add(index)


def time_cuda(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """Times ``fn`` on the current CUDA device with triton.testing.do_bench.

    do_bench flushes L2 between calls, so the time includes the DRAM traffic a step really has
    (a weight that stayed in L2 from the previous call would flatter the kernel). The first call
    in a process warms the GPU's clocks first (``warm_gpu``).
    """
    from triton.testing import do_bench

    warm_gpu()

    q1, med, q3 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
    runs = max(1, int(rep_ms / max(med, 1e-3)))  # about what do_bench repeated (not returned)
    return Timing(med * 1e-3, q1 * 1e-3, q3 * 1e-3, runs)


def time_fn(fn: Callable[[], object], device: torch.device | str, **kwargs) -> Timing:
    return time_cuda(fn, **kwargs) if torch.device(device).type == "cuda" else time_cpu(fn,
                                                                                        **kwargs)


# --------------------------------------------------------------------------------------------
# the peer every step benchmark compares with
# --------------------------------------------------------------------------------------------
def import_galore_torch():
    """galore_torch, with GaLoreProjector beside its optimizers. Its package __init__ also imports
    its 8-bit optimizer, which needs bitsandbytes; where that is not installed (the GPU image has
    none), an empty stand-in takes its place for that import only, so GaLoreAdamW (which never
    touches bitsandbytes) loads; the stand-in raises if the 8-bit optimizer is ever built."""
    try:
        import galore_torch
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("bitsandbytes"):
            raise

        class Optimizer2State:  # what galore_torch.adamw8bit subclasses
            def __init__(self, *args, **kwargs):
                raise ImportError("galore-torch's 8-bit optimizer needs bitsandbytes")

        names = ("bitsandbytes", "bitsandbytes.optim", "bitsandbytes.optim.optimizer")
        stand_ins = {name: types.ModuleType(name) for name in names}
        stand_ins[names[-1]].Optimizer2State = Optimizer2State
        sys.modules.update(stand_ins)
        try:
            import galore_torch
        finally:  # nothing else may mistake the stand-in for bitsandbytes
            for name in names:
                sys.modules.pop(name, None)
    from galore_torch.galore_projector import GaLoreProjector

    galore_torch.GaLoreProjector = GaLoreProjector
    return galore_torch


def random_basis(m: int, n: int, rank: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """An orthonormal basis in fused_galore_step's layout: r×n (m >= n) or m×r (m < n)."""
    q, _ = torch.linalg.qr(torch.randn(min(m, n), rank, device=device, dtype=torch.float32))
    return (q.T if m >= n else q).contiguous().to(dtype)


def galore_torch_fixed_bases(param_groups: list[dict], *, lr: float, weight_decay: float,
                             eps: float, beta1: float = 0.9, beta2: float = 0.999,
                             bases: dict[int, torch.Tensor] | None = None):
    """galore-torch's GaLoreAdamW over ``param_groups``, one step in for every projected
    parameter: its projector holds a fixed basis (``bases[id(p)]``, else a random orthonormal one
    in the weight's dtype, as its SVD would leave it) and never refreshes, so ``.step`` times its
    steady-state step without the SVD. Groups with a ``rank`` must carry ``scale``."""
    galore_torch = import_galore_torch()
    groups = [{**g, "update_proj_gap": 10**9} if "rank" in g else dict(g) for g in param_groups]
    opt = galore_torch.GaLoreAdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps,
                                   weight_decay=weight_decay, no_deprecation_warning=True)
    for group in opt.param_groups:
        if "rank" not in group:
            continue
        for p in group["params"]:
            projector = galore_torch.GaLoreProjector(group["rank"], update_proj_gap=10**9,
                                                     scale=group["scale"])
            basis = (bases or {}).get(id(p))
            projector.ortho_matrix = (basis.clone() if basis is not None else random_basis(
                *p.shape, group["rank"], p.dtype, p.device))
            opt.state[p]["projector"] = projector
            opt.state[p]["step"] = 1  # refresh when step % gap == 0: step 1 does not refresh
    return opt


def galore_torch_optimizer(param: torch.Tensor, grad: torch.Tensor, basis: torch.Tensor,
                           rank: int, *, scale: float, **hyper):
    """galore_torch_fixed_bases for one weight: a copy of ``param`` with gradient ``grad`` and
    projector basis ``basis``."""
    p = torch.nn.Parameter(param.clone())
    p.grad = grad.clone()
    return galore_torch_fixed_bases([{"params": [p], "rank": rank, "scale": scale,
                                      "proj_type": "std"}], bases={id(p): basis}, **hyper)


# --------------------------------------------------------------------------------------------
# machine information
# --------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    """$LOWRANK_COMMIT (a copy of the tree without .git, e.g. on a borrowed GPU machine), else
    git's short hash of HEAD, else 'unknown'."""
    if os.environ.get("LOWRANK_COMMIT"):
        return os.environ["LOWRANK_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False,
                             capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_peak_bandwidth(device: int | torch.device = 0) -> float | None:
    """Theoretical DRAM bandwidth (bytes/s) from the memory clock and bus width (DDR: ×2)."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8.0


def _nvml_info(index: int) -> dict[str, object]:
    """Clocks, power and temperature through nvidia-ml-py; empty when it is not installed."""
    try:
        import pynvml
    except ImportError:
        return {"nvml": "nvidia-ml-py not installed"}
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        clock = pynvml.nvmlDeviceGetClockInfo
        max_clock = pynvml.nvmlDeviceGetMaxClockInfo
        info = {
            "sm_clock_mhz": clock(handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": max_clock(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": clock(handle, pynvml.NVML_CLOCK_MEM),
            "mem_clock_max_mhz": max_clock(handle, pynvml.NVML_CLOCK_MEM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
            "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            "driver": pynvml.nvmlSystemGetDriverVersion(),
        }
        pynvml.nvmlShutdown()
        return info
    except pynvml.NVMLError as exc:  # e.g. inside a container without the management library
        return {"nvml": f"error: {exc}"}


def machine_info(device: torch.device | str = "cpu") -> dict[str, object]:
    """What ran the benchmark: GPU name, memory, clocks, power (CUDA) or CPU model and threads."""
    device = torch.device(device)
    info: dict[str, object] = {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "cpus_visible": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "",
        # other jobs on the machine inflate CPU timings: record how busy it was
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "",
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        peak = gpu_peak_bandwidth(index)
        info.update({
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "sm_count": props.multi_processor_count,
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            "peak_dram_gbps": round(peak / 1e9, 1) if peak else "",
            "cuda": torch.version.cuda,
        })
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
        info.update(_nvml_info(index))
    return info


def device_label(device: torch.device | str) -> str:
    """A file-name-safe device name: "nvidia-h100-80gb-hbm3" or "cpu-amd-epyc"."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {_cpu_model()}"
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


# --------------------------------------------------------------------------------------------
# CSV with the machine in a header
# --------------------------------------------------------------------------------------------
def write_csv(path: Path | str, rows: Sequence[dict[str, object]],
              machine: dict[str, object] | None = None) -> Path:
    """Writes ``rows`` as CSV; ``machine`` (default: this CPU's ``machine_info``, so every result
    file says which commit, date and machine made it) goes first as ``# key: value`` lines.

    Read it back with ``read_csv`` (or pandas ``read_csv(path, comment="#")``).
    """
    if not rows:
        raise ValueError("rows: expected at least one row to write")
    if machine is None:
        machine = machine_info("cpu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        for key, value in machine.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def save_rows(csv_path: Path | str | None, rows: list[dict[str, object]]
              ) -> list[dict[str, object]]:
    """A benchmark's ending: ``rows`` written to ``csv_path`` with this CPU's header (and the
    path printed) when a path is given; returns ``rows``."""
    if csv_path:
        write_csv(csv_path, rows, machine_info("cpu"))
        print(f"# wrote {csv_path}")
    return rows


def read_csv(path: Path | str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The (machine header, rows) that ``write_csv`` wrote; values come back as strings."""
    machine: dict[str, str] = {}
    body: list[str] = []
    for line in Path(path).read_text().splitlines(keepends=True):
        if line.startswith("# ") and not body:
            key, _, value = line[2:].rstrip("\n").partition(": ")
            machine[key] = value
        else:
            body.append(line)
    return machine, list(csv.DictReader(body))


def results_path(stem: str, device: torch.device | str | None = None, suffix: str = ".csv",
                 root: Path = OUT_DIR) -> Path:
    """<root>/<stem>[_<device label>].csv, root bench/out/ unless given (bench/results/ to
    refresh the committed files)."""
    label = f"_{device_label(device)}" if device is not None else ""
    return Path(root) / f"{stem}{label}{suffix}"


# --------------------------------------------------------------------------------------------
# ratios and tables
# --------------------------------------------------------------------------------------------
def add_ratios(rows: list[dict[str, object]], *, key: str, baseline: str, value: str = "ms",
               group_by: Sequence[str] = ("shape",), column: str | None = None
               ) -> list[dict[str, object]]:
    """Adds ``column`` = row[value] / baseline row's [value] within each group, in place.

    The baseline is the row of the same group whose ``key`` equals ``baseline``, measured in the
    same run; a group without one gets an empty ratio rather than a made-up number.
    """
    column = column or f"vs_{baseline}"
    base: dict[tuple, float] = {}
    for row in rows:
        if row.get(key) == baseline and row.get(value) not in (None, ""):
            base[tuple(row.get(g) for g in group_by)] = float(row[value])
    for row in rows:
        ref = base.get(tuple(row.get(g) for g in group_by))
        has_value = row.get(value) not in (None, "")
        row[column] = round(float(row[value]) / ref, 3) if ref and has_value else ""
    return rows


def format_table(rows: Sequence[dict[str, object]], columns: Sequence[str] | None = None,
                 *, markdown: bool = False) -> str:
    """Rows as an aligned plain-text (or GitHub markdown) table."""
    if not rows:
        return "(no rows)"
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    table = [[cell(r.get(c)) for c in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row) + " |" for row in table]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join(lines)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------
def progress(iterable: Iterable, *, desc: str = "", total: int | None = None,
             disable: bool = False):
    """A tqdm progress bar (on stderr); the bare iterable when tqdm is missing or disabled."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True,
                leave=False, mininterval=0.5)
