"""The GPU check: one command for a borrowed GPU, inside 8 minutes, that still writes what it has.

    bash scripts/gpu_check.sh [--dry-run] [--commit SHA] [--only STAGE,...] [--skip STAGE,...]
    python bench/gpu_check.py --decide bench/results/gpu_<device>_<commit>.csv

On a machine with one NVIDIA GPU it runs the stages of ``PLAN`` in order: build the extension for
this GPU's architecture only (or reuse one built here earlier for the same sources), every GPU
test, and the benchmarks that decide defaults (the fused step with the default provider against
galore-torch at the LLaMA-7B shapes, bf16 moments, the INT4/INT8 and DCT formats, dct_select
against the SVD refresh, and the never-run variants last, in their own process). It writes
``bench/results/gpu_<device>_<commit>.csv`` (every stage's rows, the machine, commit and
versions in the header) and ``.log`` beside it, rewritten after every stage, so a hard stop keeps
what was measured. A progress line opens and closes each stage.

Time: every stage has a timeout, and the whole run a deadline (``--budget-s``, default 480 s):
a stage gets at most what is left before it, a stage that cannot start in time is recorded as
skipped, and SIGTERM / SIGINT write the files before exiting. While nvcc builds, a background
process compiles the Triton kernels the benchmarks will launch (their cache is on disk), so the
timed stages do not wait for Triton's compiler; it is stopped before the first benchmark.

``--dry-run`` (CPU; CI runs it) prints the plan with each stage's estimate and timeout, fails
when the estimates exceed the budget, and checks that every test file and test id named here is
collected by pytest, every benchmark script exists and accepts its arguments, and every provider
a rule compares is measured by its stage. ``--decide CSV`` applies ``RULES`` to a run's CSV: the
written-down rule by which a measurement changes a default (README, "GPU").

The two tables below (``TEST_STAGES``, ``BENCH_STAGES``) and ``RULES`` are what to edit when
tests, providers or dispatch move; the dry run says whether the edit still names real things.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480  # the 8 minutes, start to finish
RESERVE_S = 10  # kept back at the deadline to stop the running stage and write the files
MIN_START_S = 15  # a stage is not started with less than this left
SHAPES_7B = ("4096x11008", "11008x4096", "4096x4096")  # LLaMA-7B MLP (both sides) and attention
RANKS = ("128", "256", "512", "1024")
STEP = ("bench/bench_gpu_step.py", "--shapes", *SHAPES_7B, "--rank", *RANKS)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the plan: ``kind`` is env, peers, build, pytest or bench. ``args``: pytest
    targets (files or test ids), or a bench script and its arguments. ``needs``: 'cuda_ext'
    (the extension's CUDA kernels), 'galore_torch' (the peer package). ``note``: what it checks
    or decides, printed in the plan."""

    name: str
    kind: str
    estimate_s: int
    timeout_s: int
    args: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    note: str = ""


SETUP_STAGES = (
    Stage("env", "env", 5, 30, note="device, versions, nvcc; stops here without a GPU"),
    Stage("peers", "peers", 5, 60,
          note="galore-torch from .whl/ (pip --no-index --no-deps --target) if not installed"),
    Stage("build", "build", 110, 170,
          note="setup.py build_ext --inplace for this GPU's arch only, MAX_JOBS = cores, with "
               "the experimental CUDA path (LOWRANK_EXPERIMENTAL_CUDA=1) for the late stages; "
               "skipped when a build of the same sources for this arch and torch is there; "
               "meanwhile Triton compiles the benchmarks' kernels in the background"),
)
# Each pytest stage is its own process: a CUDA fault in one cannot fail the others' tests.
# Per-test timeout through pytest-timeout, workers through pytest-xdist (both on the GPU image;
# used only when importable).
TEST_STAGES = (
    Stage("tests-default-path", "pytest", 125, 155, needs=(), note="Triton (the GPU default), "
          "quantization and DCT ops, Int8Linear, bf16 moments, op checks, the step's modes "
          "(AdaGrad, 8-bit moments, side override, factored V) and GradNormLoRP's op", args=(
              "tests/test_fused_galore_step_triton.py", "tests/test_bf16_moments.py",
              "tests/test_dct.py", "tests/test_quant.py", "tests/test_int8_linear.py",
              "tests/test_ops.py", "tests/test_layouts.py", "tests/test_fused_step_modes.py",
              "tests/test_fused_gradnorm_step.py", "tests/test_factored_moment_triton.py")),
    Stage("tests-cuda-cpp", "pytest", 45, 70, needs=("cuda_ext",),
          note="the CUDA C++ kernels (set_cuda_backend('cuda_cxx')) and the experimental 16-bit "
               "path (conftest cuda_paths), the experimental one-pass Triton kernel", args=(
              "tests/test_fused_galore_step_cuda.py", "tests/test_fused_qgalore_step_cuda.py",
              "tests/test_quant_cuda.py", "tests/test_experimental.py")),
)
PER_TEST_TIMEOUT_S = 90
BENCH_STAGES = (
    Stage("step-fp32-moments", "bench", 60, 90, needs=("galore_torch",),
          note="bf16 W, fp32 M/V: the default provider and each alternative vs galore-torch",
          args=(*STEP, "--providers", "default", "galore-torch", "cuda", "copy")),
    Stage("step-bf16-moments", "bench", 25, 45, needs=("galore_torch",),
          note="bf16 W, bf16 M/V (stochastic rounding) vs galore-torch's bf16 moments",
          args=(*STEP, "--state-dtype", "bf16", "--providers", "default", "galore-torch",
                "cuda")),
    Stage("step-formats", "bench", 25, 45,
          note="packed INT4 basis + INT8 weights (Triton, CUDA C++), DCT indices (Triton)",
          args=(*STEP, "--providers", "default", "triton-q", "cuda-q", "triton-dct")),
    Stage("refresh-dct-vs-svd", "bench", 30, 50, needs=("galore_torch",),
          note="dct_select (Triton, CUDA) vs galore-torch's SVD refresh vs one GEMM",
          args=("bench/bench_refresh.py", "--gpu-only", "--full")),
)
# After the default path's benchmarks and only then: code that has never run on a GPU, in its
# own processes (a fault there cannot cost the measurements above).
LATE_STAGES = (
    TEST_STAGES[1],
    Stage("step-experimental", "bench", 15, 30, needs=("cuda_ext",),
          note="the experimental kernels (the CUDA 16-bit path never ran on a GPU; the one-pass "
               "Triton kernel lost at the 7B shapes) vs the default, same run",
          args=(*STEP, "--providers", "default", "triton-onepass", "cuda-fast16")),
)
PLAN: tuple[Stage, ...] = (*SETUP_STAGES, TEST_STAGES[0], *BENCH_STAGES, *LATE_STAGES)
# Triton providers whose kernels the background warm-up compiles during the build
TRITON_PROVIDERS = {"default", "triton", "triton-onepass", "triton-q", "triton-dct"}


@dataclasses.dataclass(frozen=True)
class Rule:
    """A default changes by this rule only: in ONE run, ``candidate`` is at least ``FLIP_MARGIN``
    times faster than ``current`` (ratio of median ms) at EVERY (shape, rank) cell of the regime
    (stage ``stage``, ranks ``ranks``; all shapes it measured), and every test stage in
    ``tests`` ran with no failure and no error. Otherwise the default stays."""

    regime: str
    stage: str
    current: str
    candidate: str
    ranks: tuple[str, ...] = RANKS
    tests: tuple[str, ...] = ()
    shapes: tuple[str, ...] = ()  # empty: every shape the stage measured
    key: str = "provider"  # the column naming the implementation
    value: str = "ms"  # long rows: the time column; wide rows (refresh): "" and key = column


FLIP_MARGIN = 1.05
RULES = (
    # the experimental one-pass kernel exists up to r = 512; it once won only on square weights
    # at r <= 256 (before the two-launch tuning), within that run's IQR
    Rule("dense step, square 4096x4096, r <= 256", "step-experimental", "default",
         "triton-onepass", ranks=("128", "256"), shapes=("4096x4096",),
         tests=("tests-default-path", "tests-cuda-cpp")),
    Rule("dense step, MLP 4096x11008 / 11008x4096, r <= 512", "step-experimental", "default",
         "triton-onepass", ranks=("128", "256", "512"), shapes=("4096x11008", "11008x4096"),
         tests=("tests-default-path", "tests-cuda-cpp")),
    Rule("dense step, fp32 moments", "step-fp32-moments", "default", "cuda",
         tests=("tests-cuda-cpp",)),
    Rule("dense step, bf16 moments", "step-bf16-moments", "default", "cuda",
         tests=("tests-cuda-cpp",)),
    Rule("INT4 basis + INT8 weights", "step-formats", "triton-q", "cuda-q",
         tests=("tests-cuda-cpp",)),
    Rule("dense step, CUDA C++ 16-bit path", "step-experimental", "default", "cuda-fast16",
         tests=("tests-cuda-cpp",)),
    Rule("dct_select on GPUs", "refresh-dct-vs-svd", "triton_dct_ms", "cuda_dct_ms",
         ranks=(), tests=("tests-default-path",), key="", value=""),
)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def log_line(message: str, log) -> None:
    print(message, flush=True)
    if log is not None:
        log.write(message + "\n")
        log.flush()


class Runner:
    """Runs the plan against a deadline, collecting CSV rows and writing them after each stage."""

    def __init__(self, plan: Sequence[Stage], *, budget_s: float, out_dir: Path, commit: str,
                 python: str = sys.executable, machine: dict | None = None):
        self.plan, self.budget_s, self.python = list(plan), budget_s, python
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.commit = commit
        self.out_dir = out_dir
        self.machine = dict(machine or {})
        self.rows: list[dict[str, object]] = []
        self.status: dict[str, str] = {}
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "LOWRANK_COMMIT": commit,
                    "TQDM_DISABLE": "1",  # progress bars would fill the log with \r lines
                    # tests/test_experimental.py runs only where a stage names it (the late one)
                    "LOWRANK_TEST_EXPERIMENTAL": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                os.environ.get("PYTHONPATH")]))}
        self.facts: dict[str, object] = {"cuda_ext": False, "galore_torch": False}
        self.proc: subprocess.Popen | None = None
        self.warm: subprocess.Popen | None = None
        self.csv_path = self.log_path = None
        self.log = None

    # -- files --------------------------------------------------------------------------------
    def open_files(self, device_label: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"gpu_{device_label}_{self.commit}"
        self.csv_path, self.log_path = self.out_dir / f"{stem}.csv", self.out_dir / f"{stem}.log"
        self.log = self.log_path.open("w")

    def say(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        log_line(f"[gpu_check {elapsed:4.0f}/{self.budget_s:.0f} s] {message}", self.log)

    def write(self, run_status: str) -> None:
        if self.csv_path is None:
            return
        from bench import harness

        header = {**self.machine, "commit": self.commit, "run_status": run_status,
                  "budget_s": self.budget_s,
                  "elapsed_s": round(time.monotonic() - self.started, 1),
                  "stages": "; ".join(f"{k}={v}" for k, v in self.status.items())}
        rows = self.rows or [{"stage": "none", "status": run_status}]
        tmp = self.csv_path.with_suffix(".csv.tmp")
        harness.write_csv(tmp, rows, header)
        tmp.replace(self.csv_path)

    # -- subprocesses -------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.deadline - RESERVE_S - time.monotonic()

    def run_process(self, cmd: Sequence[str], timeout_s: float, env: dict | None = None
                    ) -> tuple[int | None, float]:
        """Runs ``cmd`` in its own process group, its output copied line by line to the console
        and the log; returns (exit status or None when stopped at its timeout, seconds)."""
        t0 = time.monotonic()
        self.proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env or self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", start_new_session=True)
        reader = threading.Thread(target=self._copy_output, args=(self.proc,), daemon=True)
        reader.start()
        try:
            status: int | None = self.proc.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            stop_group(self.proc)
            status = None
        reader.join(timeout=5)
        self.proc = None
        return status, time.monotonic() - t0

    def _copy_output(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            log_line("    " + line.rstrip("\n"), self.log)

    # -- stages -------------------------------------------------------------------------------
    def run(self, only: set[str] | None = None, skip: set[str] = frozenset()) -> int:
        failed = False
        for stage in self.plan:
            # env (the output files) and peers always run: they take seconds
            if stage.kind not in ("env", "peers") and (
                    (only and stage.name not in only) or stage.name in skip):
                self.status[stage.name] = "not selected"
                continue
            if ("cuda_ext" in stage.needs and self.status.get("build") == "not selected"
                    and "probed" not in self.facts):
                self.facts["cuda_ext"] = self.extension_state() == "cuda"  # a build from before
                self.facts["probed"] = True
            missing = [need for need in stage.needs if not self.facts.get(need)]
            if missing and stage.kind == "pytest":
                self.record(stage, "skipped", 0.0, f"needs {', '.join(missing)}")
                continue
            if missing and stage.kind == "bench" and "cuda_ext" in missing:
                self.record(stage, "skipped", 0.0, "needs the extension's CUDA kernels")
                continue
            left = self.remaining()
            if left < MIN_START_S:
                self.record(stage, "skipped", 0.0, f"deadline: {left:.0f} s left")
                continue
            timeout = min(stage.timeout_s, left)
            self.say(f"{stage.name}: start (estimate {stage.estimate_s} s, timeout "
                     f"{timeout:.0f} s) — {stage.note}")
            if stage.kind == "bench":
                self.stop_warm_up()
            try:
                status, _ = getattr(self, f"stage_{stage.kind}")(stage, timeout)
            except Exception as exc:  # noqa: BLE001  (recorded; the next stage still runs)
                status, _ = self.record(stage, "error", 0.0, f"{type(exc).__name__}: {exc}")
            failed |= status not in ("ok", "skipped")
            if stage.kind == "env" and status != "ok":
                self.write("stopped: no usable GPU")
                return 2
        self.stop_warm_up()
        self.decide_and_record()
        run_status = "complete" if not failed else "complete with failures"
        self.write(run_status)
        self.say(f"done: {run_status}; wrote {self.csv_path} and {self.log_path}")
        return 1 if failed else 0

    def record(self, stage: Stage, status: str, seconds: float, detail: str = "",
               **extra: object) -> tuple[str, str]:
        self.status[stage.name] = status
        self.rows.append({"stage": stage.name, "kind": stage.kind, "status": status,
                          "seconds": round(seconds, 1), "detail": detail, **extra})
        self.say(f"{stage.name}: {status} in {seconds:.0f} s" + (f" — {detail}" if detail
                                                                  else ""))
        self.write("running")
        return status, detail

    def stage_env(self, stage: Stage, timeout: float):
        import torch

        from bench import harness

        if not torch.cuda.is_available():
            return self.record(stage, "error", 0.0, "no CUDA device: nothing to check")
        self.machine.update(harness.machine_info("cuda"))
        self.machine["commit"] = self.commit
        major, minor = torch.cuda.get_device_capability()
        self.facts["arch"] = f"{major}.{minor}"
        self.open_files(harness.device_label("cuda"))
        nvcc = subprocess.run(["bash", "-c", "nvcc --version | tail -n 2"], capture_output=True,
                              text=True, check=False, timeout=timeout)
        self.machine["nvcc"] = " ".join(nvcc.stdout.split()) or "not found"
        self.say(f"env: {self.machine.get('gpu')} (sm_{major}{minor}), torch "
                 f"{torch.__version__}, Triton {self.machine.get('triton', 'missing')}, nvcc "
                 f"{self.machine['nvcc']}")
        return self.record(stage, "ok", 0.0, f"sm_{major}{minor}")

    def stage_peers(self, stage: Stage, timeout: float):
        t0 = time.monotonic()
        if importlib.util.find_spec("galore_torch") is not None:
            self.facts["galore_torch"] = True
            return self.record(stage, "ok", 0.0, "galore-torch installed")
        wheels = sorted(glob.glob(str(ROOT / ".whl" / "galore_torch-*.whl")))
        if not wheels:
            return self.record(stage, "skipped", 0.0, "galore-torch is not installed and no "
                               ".whl/galore_torch-*.whl was carried: the peer comparisons are "
                               f"skipped (README 'GPU': {PIP_DOWNLOAD})")
        site = self.work / "site"
        status, seconds = self.run_process(
            [self.python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
             "--disable-pip-version-check", "-q", "--target", str(site), wheels[-1]], timeout)
        if status != 0:
            return self.record(stage, "failed", time.monotonic() - t0,
                               f"pip could not install {Path(wheels[-1]).name}")
        self.env["PYTHONPATH"] = os.pathsep.join([self.env["PYTHONPATH"], str(site)])
        self.facts["galore_torch"] = True
        return self.record(stage, "ok", seconds, f"installed {Path(wheels[-1]).name}")

    def stage_build(self, stage: Stage, timeout: float):
        arch = str(self.facts["arch"])
        stamp = build_stamp(arch)
        self.start_warm_up()  # runs beside the build, or beside the first tests when none is due
        if self.extension_state() == "cuda" and stamp_matches(stamp):
            self.facts["cuda_ext"] = True
            return self.record(stage, "ok", 0.0, "reused: a build of these sources for sm_"
                               f"{arch.replace('.', '')} and this torch is in place")
        env = {**self.env, "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 8),
               "LOWRANK_EXPERIMENTAL_CUDA": "1"}
        env.pop("LOWRANK_SKIP_CUDA_BUILD", None)
        # as scripts/setup_env.sh: nvcc may sit outside the toolkit root
        if not env.get("CUDA_HOME") and Path("/usr/local/cuda/include/cuda_runtime.h").exists():
            env["CUDA_HOME"] = "/usr/local/cuda"
        status, seconds = self.run_process([self.python, "setup.py", "build_ext", "--inplace"],
                                           timeout, env)
        state = self.extension_state()
        self.facts["cuda_ext"] = state == "cuda"
        if status == 0 and state == "cuda":
            STAMP.write_text(json.dumps(stamp))
            return self.record(stage, "ok", seconds, f"built for sm_{arch.replace('.', '')}")
        why = "timed out" if status is None else f"exit {status}"
        return self.record(stage, "failed", seconds, f"build {why}; extension: {state} (CUDA "
                           "C++ stages skipped, Triton stages run)")

    def extension_state(self) -> str:
        """'cuda' (loads, with CUDA kernels), 'cpu' (loads without them) or 'missing'."""
        probe = ("import torch, lowrank_kernels as lk; print('cuda' if lk.EXTENSION_AVAILABLE and "
                 "torch._C._dispatch_has_kernel_for_dispatch_key('lowrank::fused_galore_step', "
                 "'CUDA') else 'cpu' if lk.EXTENSION_AVAILABLE else 'missing')")
        out = subprocess.run([self.python, "-c", probe], cwd=ROOT, env=self.env, check=False,
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "missing"

    def start_warm_up(self) -> None:
        """Compiles the Triton kernels of every bench stage in the background (no timing)."""
        cases = []
        for stage in self.plan:
            if stage.kind == "bench" and stage.args[0].endswith("bench_gpu_step.py"):
                script, args = stage.args[0], list(stage.args[1:])
                providers = providers_of(stage)
                keep = [p for p in providers if p in TRITON_PROVIDERS]
                if keep:
                    i = args.index("--providers")
                    args = args[:i + 1] + keep + args[i + 1 + len(providers):]
                    cases.append([self.python, script, *args, "--compile-only"])
        if not cases or self.warm is not None:
            return
        script = "; ".join(" ".join(c) for c in cases)  # one failing stage stops no other
        self.say(f"warm-up: compiling the benchmarks' Triton kernels in the background "
                 f"({len(cases)} stage(s))")
        self.warm = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def stop_warm_up(self) -> None:
        if self.warm is not None:
            done = self.warm.poll() is not None
            stop_group(self.warm)
            self.say(f"warm-up: {'finished' if done else 'stopped before the benchmarks'}")
            self.warm = None

    def stage_pytest(self, stage: Stage, timeout: float):
        results = self.work / f"{stage.name}.jsonl"
        cmd = [self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
               "bench.gpu_check", f"--gpu-check-results={results}", "-rfE"]
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd.append(f"--timeout={PER_TEST_TIMEOUT_S}")
        if importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
        status, seconds = self.run_process([*cmd, *stage.args], timeout)
        reports = read_results(results)
        for target in stage.args:
            mine = [r for r in reports if r["nodeid"].startswith(target)]
            counts = {k: sum(r["outcome"] == k for r in mine)
                      for k in ("passed", "failed", "skipped", "error")}
            self.rows.append({"stage": stage.name, "kind": "pytest-target", "target": target,
                              **counts, "seconds": round(sum(r["duration"] for r in mine), 1),
                              "failed_ids": " ".join(r["nodeid"] for r in mine
                                                     if r["outcome"] in ("failed", "error"))})
        totals = {k: sum(r["outcome"] == k for r in reports)
                  for k in ("passed", "failed", "skipped", "error")}
        summary = ", ".join(f"{v} {k}" for k, v in totals.items())
        if status is None:
            return self.record(stage, "timeout", seconds, f"stopped at its timeout after "
                               f"{summary}", **totals)
        ok = status in (0, 5) and not totals["failed"] and not totals["error"]
        return self.record(stage, "ok" if ok else "failed", seconds,
                           f"{summary}" + ("" if ok else f" (pytest exit {status})"), **totals)

    def stage_bench(self, stage: Stage, timeout: float):
        out = self.work / f"{stage.name}.csv"
        status, seconds = self.run_process([self.python, *stage.args, *bench_out_args(stage, out)],
                                           timeout)
        added = 0
        if out.exists():
            from bench import harness

            _, rows = harness.read_csv(out)
            for row in rows:
                self.rows.append({"stage": stage.name, "kind": "bench-row", **row})
            added = len(rows)
        if status is None:
            return self.record(stage, "timeout", seconds, f"stopped at its timeout ({added} "
                               "rows kept)")
        return self.record(stage, "ok" if status == 0 else "failed", seconds,
                           f"{added} rows" + ("" if status == 0 else f"; exit {status}"))

    def decide_and_record(self) -> None:
        for d in decide(self.rows):
            self.rows.append({"stage": "decision", "kind": "rule", **d})
            self.say(f"rule: {d['regime']}: {d['candidate']} vs {d['current']}: {d['verdict']}")
        for v in versus_galore(self.rows):
            self.rows.append({"kind": "versus-galore-torch", **v})
            self.say(f"default vs galore-torch, {v['stage']} r {v['ranks']}: "
                     f"{v['default_speedup_min']}-{v['default_speedup_max']}x faster "
                     "(below 1: slower)")

    def interrupt(self, signum, _frame) -> None:
        if self.proc is not None:
            stop_group(self.proc)
        self.stop_warm_up()
        self.say(f"stopped by signal {signum}")
        self.write(f"stopped by signal {signum}")
        raise SystemExit(128 + signum)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after 5 s."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def providers_of(stage: Stage) -> list[str]:
    args = list(stage.args)
    if "--providers" not in args:
        return []
    tail = args[args.index("--providers") + 1:]
    return [a for a in tail[:next((i for i, a in enumerate(tail) if a.startswith("--")),
                                  len(tail))]]


def bench_out_args(stage: Stage, out: Path) -> list[str]:
    return ["--csv", str(out)] if stage.args[0].endswith("bench_refresh.py") else ["--out",
                                                                                   str(out)]


# ----------------------------------------------------------------------------------------------
# a build of these sources for this arch and torch, recognised on the next run
# ----------------------------------------------------------------------------------------------
STAMP = ROOT / "lowrank_kernels" / "_C.gpu_check.json"


def source_hash() -> str:
    digest = hashlib.sha1()
    for path in [ROOT / "setup.py", *sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file())]:
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def build_stamp(arch: str) -> dict[str, str]:
    import torch

    return {"sources": source_hash(), "arch": arch, "torch": torch.__version__}


def stamp_matches(stamp: dict[str, str]) -> bool:
    try:
        return json.loads(STAMP.read_text()) == stamp
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# pytest plugin (-p bench.gpu_check): one JSON line per test as it finishes, so a stage stopped
# at its timeout still says which tests passed
# ----------------------------------------------------------------------------------------------
def pytest_addoption(parser) -> None:
    parser.addoption("--gpu-check-results", default=None, help="JSON-lines file of outcomes")


_CONFIG: dict[str, object] = {}


def pytest_configure(config) -> None:
    _CONFIG["config"] = config


def pytest_runtest_logreport(report) -> None:
    config = _CONFIG.get("config")
    if config is None or hasattr(config, "workerinput"):  # xdist workers: the controller writes
        return
    path = config.getoption("--gpu-check-results")
    if not path:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = report.outcome if report.when == "call" else (
            "skipped" if report.outcome == "skipped" else "error")
    elif report.when == "teardown" and report.outcome == "failed":
        outcome = "error"
    else:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "outcome": outcome,
                            "duration": round(report.duration, 3)}) + "\n")


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# the rule
# ----------------------------------------------------------------------------------------------
def _cells(rows: Sequence[dict], rule: Rule) -> dict[tuple[str, str], dict[str, float]]:
    """(shape, rank) -> {implementation: ms} of the rule's stage and ranks."""
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        if row.get("stage") != rule.stage or row.get("kind") != "bench-row":
            continue
        rank = str(row.get("rank", ""))
        if (rule.ranks and rank not in rule.ranks) or (rule.shapes
                                                       and str(row.get("shape")) not in rule.shapes):
            continue
        cell = cells.setdefault((str(row.get("shape")), rank), {})
        if rule.key:  # long rows: one per provider
            if row.get(rule.value) not in (None, ""):
                cell[str(row[rule.key])] = float(row[rule.value])
        else:  # wide rows: one column per implementation
            for name in (rule.current, rule.candidate):
                if row.get(name) not in (None, ""):
                    cell[name] = float(row[name])
    return cells


def decide(rows: Sequence[dict], rules: Sequence[Rule] = RULES) -> list[dict[str, object]]:
    """Each rule's verdict on one run's rows (RULES' docstring: the rule)."""
    stage_status = {str(r["stage"]): str(r["status"]) for r in rows
                    if r.get("kind") in ("pytest", "bench", "build", "env", "peers")}
    out = []
    for rule in rules:
        cells = _cells(rows, rule)
        pairs = {cell: times for cell, times in cells.items()
                 if rule.current in times and rule.candidate in times}
        speedups = [times[rule.current] / times[rule.candidate] for times in pairs.values()]
        missing = sorted(f"{s} r{r}" for (s, r), t in cells.items() if (s, r) not in pairs)
        tests_ok = all(stage_status.get(t) == "ok" for t in rule.tests)
        if not speedups or missing:
            verdict = "keep: not measured at every cell" + (
                f" (missing {', '.join(missing)})" if missing else "")
        elif not tests_ok:
            verdict = "keep: its tests did not all pass in this run (" + ", ".join(
                f"{t}={stage_status.get(t, 'not run')}" for t in rule.tests) + ")"
        elif min(speedups) >= FLIP_MARGIN:
            verdict = f"FLIP: {rule.candidate} >= {FLIP_MARGIN}x faster at every cell"
        else:
            verdict = f"keep: {rule.candidate} not >= {FLIP_MARGIN}x faster at every cell"
        out.append({"regime": rule.regime, "current": rule.current,
                    "candidate": rule.candidate, "cells": len(pairs),
                    "min_speedup": round(min(speedups), 3) if speedups else "",
                    "max_speedup": round(max(speedups), 3) if speedups else "",
                    "tests_ok": tests_ok, "verdict": verdict})
    return out


def versus_galore(rows: Sequence[dict]) -> list[dict[str, object]]:
    """The default provider against galore-torch per stage and rank range (for the README)."""
    out = []
    for stage in ("step-fp32-moments", "step-bf16-moments"):
        for ranks in (("128", "256"), ("512", "1024")):
            rule = Rule("", stage, "galore-torch", "default", ranks=ranks)
            ratios = [t["galore-torch"] / t["default"] for t in _cells(rows, rule).values()
                      if "galore-torch" in t and "default" in t]
            if ratios:
                out.append({"stage": stage, "ranks": "/".join(ranks), "cells": len(ratios),
                            "default_speedup_min": round(min(ratios), 3),
                            "default_speedup_max": round(max(ratios), 3)})
    return out


# ----------------------------------------------------------------------------------------------
# the dry run
# ----------------------------------------------------------------------------------------------
def dry_run(plan: Sequence[Stage], budget_s: float, python: str = sys.executable) -> int:
    """Prints the plan and checks it; returns the number of problems found."""
    problems: list[str] = []
    total = sum(s.estimate_s for s in plan)
    print(f"GPU check plan (budget {budget_s:.0f} s, {RESERVE_S} s reserve; estimates: README "
          "'GPU'; a run logs each stage's real time):")
    print(f"  {'stage':<20} {'kind':<7} {'est s':>6} {'timeout':>8}  what")
    for stage in plan:
        print(f"  {stage.name:<20} {stage.kind:<7} {stage.estimate_s:>6} {stage.timeout_s:>8}  "
              f"{stage.note}")
        for arg in (stage.args if stage.kind == "pytest" else stage.args[:1]):
            print(f"  {'':<20} {'':<7} {'':>6} {'':>8}    {arg}")
    print(f"  {'total':<20} {'':<7} {total:>6}  of {budget_s - RESERVE_S:.0f} s "
          f"({budget_s - RESERVE_S - total:.0f} s to spare)")
    if total > budget_s - RESERVE_S:
        problems.append(f"estimates sum to {total} s, over the {budget_s:.0f} s budget less "
                        f"{RESERVE_S} s reserve")
    names = [s.name for s in plan]
    if len(set(names)) != len(names):
        problems.append(f"stage names repeat: {names}")
    problems += check_tests(plan, python)
    problems += check_benches(plan)
    problems += check_rules(plan)
    for p in problems:
        print(f"PROBLEM: {p}")
    print("dry run: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return len(problems)


def check_tests(plan: Sequence[Stage], python: str) -> list[str]:
    targets = [t for s in plan if s.kind == "pytest" for t in s.args]
    problems = [f"test file {t.split('::')[0]} does not exist" for t in targets
                if not (ROOT / t.split("::")[0]).is_file()]
    if problems or not targets:
        return problems
    collected = subprocess.run([python, "-m", "pytest", "--collect-only", "-q",
                                "-p", "no:cacheprovider", *targets], cwd=ROOT, check=False,
                               capture_output=True, text=True, timeout=600,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    ids = [line.strip() for line in collected.stdout.splitlines() if "::" in line]
    if collected.returncode not in (0, 5):
        return [f"pytest could not collect the GPU tests (exit {collected.returncode}):\n"
                + collected.stdout[-2000:] + collected.stderr[-2000:]]
    for target in targets:
        found = sum(1 for i in ids if i == target or i.startswith((target + "::",
                                                                   target + "[")))
        print(f"  collected {found:>4} test(s) from {target}")
        if not found:
            problems.append(f"no test collected for {target}")
    return problems


def check_benches(plan: Sequence[Stage]) -> list[str]:
    problems = []
    for stage in plan:
        if stage.kind != "bench":
            continue
        script = ROOT / stage.args[0]
        if not script.is_file():
            problems.append(f"{stage.name}: {stage.args[0]} does not exist")
            continue
        module = importlib.import_module(f"bench.{script.stem}")
        if not hasattr(module, "parser"):
            problems.append(f"{stage.name}: {stage.args[0]} has no parser() to check against")
            continue
        try:
            module.parser().parse_args([*stage.args[1:], *bench_out_args(stage, Path("x.csv"))])
        except SystemExit:
            problems.append(f"{stage.name}: {stage.args[0]} rejects {' '.join(stage.args[1:])}")
    return problems


def check_rules(plan: Sequence[Stage]) -> list[str]:
    stages = {s.name: s for s in plan}
    problems = []
    for rule in RULES:
        stage = stages.get(rule.stage)
        if stage is None:
            problems.append(f"rule {rule.regime!r}: no stage {rule.stage!r}")
            continue
        if rule.key == "provider":
            for name in (rule.current, rule.candidate):
                if name not in providers_of(stage):
                    problems.append(f"rule {rule.regime!r}: {rule.stage} does not measure "
                                    f"{name!r}")
            for value in (*rule.ranks, *rule.shapes):
                if value not in stage.args:
                    problems.append(f"rule {rule.regime!r}: {rule.stage} does not run {value}")
        for test in rule.tests:
            if test not in stages:
                problems.append(f"rule {rule.regime!r}: no test stage {test!r}")
    return problems


# ----------------------------------------------------------------------------------------------
def commit_id(explicit: str | None) -> str:
    """--commit, else $LOWRANK_COMMIT, else git's short hash, else 'unknown' (a copy of the
    tree without .git: pass --commit there)."""
    if explicit:
        return explicit
    from bench import harness

    return harness._git_commit()


PIP_DOWNLOAD = ("pip download --no-deps --only-binary=:all: galore-torch==1.0 -d .whl")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="print and check the plan (CPU)")
    p.add_argument("--decide", type=Path, metavar="CSV", help="apply the rules to a run's CSV")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="deadline of the whole run")
    p.add_argument("--commit", default=None, help="commit id for the file name and header")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--only", default="", help="comma-separated stage names to run")
    p.add_argument("--skip", default="", help="comma-separated stage names to leave out")
    args = p.parse_args(argv)
    known = {s.name for s in PLAN}
    for name in filter(None, (args.only + "," + args.skip).split(",")):
        if name not in known:
            p.error(f"--only/--skip: unknown stage {name!r}; stages: {', '.join(sorted(known))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return 1 if dry_run(PLAN, args.budget_s) else 0
    if args.decide:
        from bench import harness

        _, rows = harness.read_csv(args.decide)
        print(harness.format_table(decide(rows)))
        print()
        print(harness.format_table(versus_galore(rows)))
        return 0
    commit = commit_id(args.commit)
    os.environ["LOWRANK_COMMIT"] = commit
    runner = Runner(PLAN, budget_s=args.budget_s, out_dir=args.out_dir, commit=commit)
    signal.signal(signal.SIGTERM, runner.interrupt)
    signal.signal(signal.SIGINT, runner.interrupt)
    return runner.run(only=set(filter(None, args.only.split(","))) or None,
                      skip=set(filter(None, args.skip.split(","))))


if __name__ == "__main__":
    raise SystemExit(main())
