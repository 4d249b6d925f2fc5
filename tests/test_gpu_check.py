"""bench/gpu_check.py on CPU: its plan fits the budget and names real things, its rule decides
from one run's rows, and a stage that overruns is stopped with the rows gathered so far written.
(`bash scripts/gpu_check.sh --dry-run`, run by CI, also collects every GPU test it names.)"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest

from bench import gpu_check, harness


def test_plan_fits_the_budget_and_every_benchmark_and_rule_names_real_things():
    assert sum(s.estimate_s for s in gpu_check.PLAN) <= gpu_check.BUDGET_S - gpu_check.RESERVE_S
    assert gpu_check.check_benches(gpu_check.PLAN) == []
    assert gpu_check.check_rules(gpu_check.PLAN) == []
    step = next(s for s in gpu_check.PLAN if s.name == "step-fp32-moments")
    assert set(gpu_check.SHAPES_7B) <= set(step.args) and set(gpu_check.RANKS) <= set(step.args)
    assert {"default", "galore-torch"} <= set(gpu_check.providers_of(step))


def test_the_checks_catch_a_misnamed_provider_file_or_stage():
    step = next(s for s in gpu_check.PLAN if s.name == "step-fp32-moments")
    typo = dataclasses.replace(step, args=(*step.args[:-1], "cpoy"))
    assert "rejects" in gpu_check.check_benches([typo])[0]
    gone = dataclasses.replace(step, args=("bench/no_such_bench.py",))
    assert "does not exist" in gpu_check.check_benches([gone])[0]
    no_default = dataclasses.replace(step, args=tuple(a for a in step.args if a != "default"))
    assert any("does not measure 'default'" in p for p in gpu_check.check_rules(
        [no_default if s.name == step.name else s for s in gpu_check.PLAN]))
    missing_test = gpu_check.Stage("t", "pytest", 1, 1, args=("tests/test_no_such_file.py",))
    assert gpu_check.check_tests([missing_test], sys.executable) == [
        "test file tests/test_no_such_file.py does not exist"]


def _rows(times: dict[tuple[str, str], dict[str, float]], tests_status: str = "ok"):
    rows = [{"stage": "tests-default-path", "kind": "pytest", "status": tests_status}]
    for (shape, rank), providers in times.items():
        for provider, ms in providers.items():
            rows.append({"stage": "step-fp32-moments", "kind": "bench-row", "shape": shape,
                         "rank": rank, "provider": provider, "ms": str(ms)})
    return rows


RULE = gpu_check.Rule("square, r <= 256", "step-fp32-moments", "default", "triton-onepass",
                      ranks=("128", "256"), shapes=("4096x4096",), tests=("tests-default-path",))


def test_a_candidate_flips_only_when_faster_by_the_margin_at_every_cell_with_tests_passing():
    cells = [("4096x4096", "128"), ("4096x4096", "256")]
    fast = {c: {"default": 1.0, "triton-onepass": 0.9} for c in cells}
    other_shape = {("4096x11008", "128"): {"default": 1.0, "triton-onepass": 2.0}}
    (verdict,) = gpu_check.decide(_rows({**fast, **other_shape}), [RULE])
    assert verdict["verdict"].startswith("FLIP") and verdict["cells"] == 2
    assert verdict["min_speedup"] == pytest.approx(1 / 0.9, abs=1e-3)

    one_short = {**fast, cells[1]: {"default": 1.0, "triton-onepass": 0.96}}  # 1.04x
    assert gpu_check.decide(_rows(one_short), [RULE])[0]["verdict"].startswith("keep")
    assert "tests" in gpu_check.decide(_rows(fast, "failed"), [RULE])[0]["verdict"]
    unmeasured = {**fast, cells[1]: {"default": 1.0}}
    assert "not measured" in gpu_check.decide(_rows(unmeasured), [RULE])[0]["verdict"]


def test_the_default_against_galore_torch_is_summarised_per_rank_range():
    rows = _rows({("4096x11008", "128"): {"default": 0.2, "galore-torch": 0.3},
                  ("4096x11008", "1024"): {"default": 0.6, "galore-torch": 0.5}})
    summary = {r["ranks"]: r for r in gpu_check.versus_galore(rows)}
    assert summary["128/256"]["default_speedup_min"] == 1.5
    assert summary["512/1024"]["default_speedup_max"] == pytest.approx(0.833, abs=1e-3)


def test_a_stage_past_its_timeout_is_stopped_and_what_it_wrote_is_kept(tmp_path):
    script = tmp_path / "slow_bench.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        out = sys.argv[sys.argv.index("--out") + 1]
        with open(out, "w") as f:  # what a benchmark has written when its stage is stopped
            f.write("# commit: x\\nshape,rank,provider,ms\\n8x8,2,default,1.0\\n")
        print("wrote the first row", flush=True)
        time.sleep(60)
    """))
    plan = [gpu_check.Stage("slow", "bench", 1, 5, args=(str(script),)),
            gpu_check.Stage("after", "bench", 1, 5, args=(str(script),))]
    # the first stage starts with 17 s left; after its 5 s timeout 12 s < MIN_START_S remain
    runner = gpu_check.Runner(plan, budget_s=gpu_check.RESERVE_S + gpu_check.MIN_START_S + 2,
                              out_dir=tmp_path, commit="abc1234")
    runner.open_files("test-device")
    runner.run()
    header, rows = harness.read_csv(tmp_path / "gpu_test-device_abc1234.csv")
    assert header["commit"] == "abc1234" and header["run_status"].startswith("complete")
    status = {r["stage"]: r["status"] for r in rows if r["kind"] == "bench"}
    assert status == {"slow": "timeout", "after": "skipped"}  # the deadline had passed
    assert [r["provider"] for r in rows if r["kind"] == "bench-row"] == ["default"]
    log = (tmp_path / "gpu_test-device_abc1234.log").read_text()
    assert "wrote the first row" in log and "slow: timeout" in log and "deadline" in log


def test_the_pytest_plugin_records_each_outcome_as_it_happens(tmp_path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest
        def test_pass(): pass
        def test_fail(): assert False
        @pytest.mark.skip(reason="x")
        def test_skip(): pass
        @pytest.fixture
        def broken(): raise RuntimeError
        def test_error(broken): pass
    """))
    results = tmp_path / "out.jsonl"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                    "bench.gpu_check", f"--gpu-check-results={results}", "test_sample.py"],
                   cwd=tmp_path, check=False, capture_output=True,
                   env={"PYTHONPATH": str(gpu_check.ROOT), "PATH": "/usr/bin:/bin"})
    outcomes = {r["nodeid"].split("::")[1]: r["outcome"]
                for r in gpu_check.read_results(results)}
    assert outcomes == {"test_pass": "passed", "test_fail": "failed", "test_skip": "skipped",
                        "test_error": "error"}


def test_a_pytest_stage_counts_outcomes_per_target(tmp_path):
    target = "tests/test_bench_harness.py::test_timing_statistics"
    plan = [gpu_check.Stage("tests", "pytest", 1, 120, args=(target,))]
    runner = gpu_check.Runner(plan, budget_s=300, out_dir=tmp_path, commit="c")
    runner.open_files("dev")
    assert runner.run() == 0
    _, rows = harness.read_csv(tmp_path / "gpu_dev_c.csv")
    (per_target,) = [r for r in rows if r["kind"] == "pytest-target"]
    assert (per_target["target"], per_target["passed"], per_target["failed"]) == (target, "1", "0")
    assert [r["status"] for r in rows if r["kind"] == "pytest"] == ["ok"]
