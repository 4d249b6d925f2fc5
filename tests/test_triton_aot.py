"""Ahead-of-time compilation of the Triton kernels for sm_89 and sm_90 (DESIGN.md §3, §6).

The interpreter accepts code the real compiler rejects and says nothing about registers, so every
configuration the launchers can pick (lowrank_kernels.triton_kernels.fused_galore_step
.candidate_configs, and fused_galore_step_2d.candidate_configs for the two-launch variant, each
for the dense and the generated INT4/DCT bases, and fused_galore_step_2d.int8_candidate_configs
for INT8 weights) is compiled for both targets and both sides, and ptxas reports registers,
spills and shared memory. Any spill fails: each of these configurations is one the launcher uses.

The compiler runs in a subprocess because tests/conftest.py sets TRITON_INTERPRET=1 without a GPU,
and under it @triton.jit yields interpreter objects. The default run compiles the most
register-hungry dtype set of each dot path (fp32 states; see aot.FUSED_GALORE_DTYPES);
LOWRANK_AOT_ALL_DTYPES=1 compiles every dtype set.
"""

import itertools
import json
import os
import subprocess
import sys

import pytest

aot = pytest.importorskip("lowrank_kernels.triton_kernels.aot", reason="triton is not installed")

pytestmark = pytest.mark.skipif(aot.ptxas_path() is None,
                                reason="Triton's ptxas (triton/backends/nvidia/bin) is missing")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_DTYPES = os.environ.get("LOWRANK_AOT_ALL_DTYPES", "0") == "1"


def _compile_all() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-m", "lowrank_kernels.triton_kernels.aot", "--targets", "89,90"]
    if not ALL_DTYPES:
        args.append("--main-dtypes")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, f"AOT compilation failed:\n{proc.stderr[-5000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    return _compile_all()


def _row(report: dict) -> str:
    v = report["variant"]
    if v.get("kernel", "").startswith("int8"):  # INT8 launch B (fused_galore_step_2d)
        blocks = (f"m={v['block_m']} n={v['block_n']}" if v["path"] == "rows" else
                  f"groups={v['block_groups']} g={v['block_g']}")
        config = f"{v['kernel']:11} group={v['group_size']} {blocks} r={v['block_r']} " \
                 f"warps={v['num_warps']} stages={v['num_stages']}"
        types = f"{'P=' + v['proj']:20}"
    elif "kernel" in v:  # two-launch kernels (fused_galore_step_2d)
        config = f"{v['kernel']:7} own={v['block_own']} r={v['block_r']} " \
                 f"long={v['block_long']} warps={v['num_warps']} stages={v['num_stages']}"
        types = " ".join(f"{k[0].upper()}={v[k]:4}" for k in ("grad", "weight", "proj", "state")
                         if k in v)
        types = f"{types:20}"
    else:
        config = f"own={v['block_own']} long={v['block_long']} r_pad={v['r_pad']} " \
                 f"warps={v['num_warps']} stages={v['num_stages']}"
        types = f"W={v['weight']:4} P={v['proj']:4} S={v['state']:4}"
    return (f"{report['target']:7} {v['side']:5} {types} {config:48} regs={report['registers']:3} "
            f"spill={report['spill_store_bytes']}/{report['spill_load_bytes']} "
            f"smem={report['shared_bytes']}")


def test_every_candidate_config_compiles_for_sm89_and_sm90(reports):
    from lowrank_kernels.triton_kernels import fused_galore_step as fgs

    print("\n" + "\n".join(_row(r) for r in reports))
    compiled = {(r["target"], r["variant"]["side"], r["variant"]["block_own"],
                 r["variant"]["block_long"], r["variant"]["r_pad"], r["variant"]["num_warps"],
                 r["variant"]["num_stages"]) for r in reports
                if "kernel" not in r["variant"] and r["variant"]["basis"] == "dense"}
    for _, c in fgs.candidate_configs():
        for target in ("sm_89", "sm_90a"):
            for side in ("right", "left"):
                key = (target, side, c.block_own, c.block_long, c.r_pad, c.num_warps,
                       c.num_stages)
                assert key in compiled, f"not compiled: {key}"


def test_every_two_launch_config_compiles_for_sm89_and_sm90(reports):
    from lowrank_kernels.triton_kernels import fused_galore_step_2d as fgs2d

    fields = ("side", "kernel", "block_own", "block_r", "block_long", "num_warps", "num_stages")
    compiled = {(r["target"], r["variant"]["basis"] != "dense",
                 *(r["variant"][f] for f in fields)) for r in reports
                if r["variant"].get("kernel") in ("project", "back")}
    for generated in (False, True):
        for kernel, _, c in fgs2d.candidate_configs(generated):
            for target in ("sm_89", "sm_90a"):
                for side in ("right", "left"):
                    key = (target, generated, side, kernel, c.block_own, c.block_r,
                           c.block_long, c.num_warps, c.num_stages)
                    assert key in compiled, f"not compiled: {key}"


def test_every_bf16_moment_config_compiles_for_sm89_and_sm90(reports):
    """Launch A with bf16 moments (stochastic rounding: one Philox call per state element) has
    its own table; each entry is compiled with bf16 moments, dense and generated, so that the
    spill test below covers it."""
    from lowrank_kernels.triton_kernels import fused_galore_step_2d as fgs2d

    fields = ("side", "block_own", "block_r", "block_long", "num_warps", "num_stages")
    compiled = {(r["target"], r["variant"]["basis"] != "dense",
                 *(r["variant"][f] for f in fields)) for r in reports
                if r["variant"].get("kernel") == "project" and r["variant"]["state"] == "bf16"}
    for generated in (False, True):
        for _, _, c in fgs2d.bf16_moment_candidate_configs(generated):
            for target, side in itertools.product(("sm_89", "sm_90a"), ("right", "left")):
                key = (target, generated, side, c.block_own, c.block_r, c.block_long,
                       c.num_warps, c.num_stages)
                assert key in compiled, f"not compiled with bf16 moments: {key}"


def test_every_generated_basis_config_compiles_for_sm89_and_sm90(reports):
    """The one-pass kernel's INT4 and DCT configurations (fused_galore_step._GENERATED_BLOCKS),
    each compiled for both generated formats."""
    from lowrank_kernels.triton_kernels import fused_galore_step as fgs

    compiled = {(r["target"], r["variant"]["side"], r["variant"]["basis"],
                 r["variant"]["block_own"], r["variant"]["block_long"], r["variant"]["r_pad"],
                 r["variant"]["num_warps"], r["variant"]["num_stages"]) for r in reports
                if "kernel" not in r["variant"]}
    for _, c in fgs.candidate_configs(generated=True):
        for target, side, basis in itertools.product(("sm_89", "sm_90a"), ("right", "left"),
                                                     ("int4", "dct")):
            key = (target, side, basis, c.block_own, c.block_long, c.r_pad, c.num_warps,
                   c.num_stages)
            assert key in compiled, f"not compiled: {key}"


def test_every_int8_update_config_compiles_for_sm89_and_sm90(reports):
    """INT8 launch B: the row-aligned and the general kernel (int8_candidate_configs), every
    basis format, both sides."""
    from lowrank_kernels.triton_kernels import fused_galore_step_2d as fgs2d

    compiled = {(r["target"], r["variant"]["side"], r["variant"]["basis"],
                 r["variant"]["path"], r["variant"]["group_size"]) for r in reports
                if r["variant"].get("kernel", "").startswith("int8")}
    for c in fgs2d.int8_candidate_configs(ALL_DTYPES):
        for target, side, basis in itertools.product(("sm_89", "sm_90a"), ("right", "left"),
                                                     ("dense", "int4", "dct")):
            assert (target, side, basis, c.path, c.group_size) in compiled


def test_no_register_spills(reports):
    spilling = [_row(r) for r in reports
                if r["spill_store_bytes"] > 0 or r["spill_load_bytes"] > 0]
    assert not spilling, "register spills in launched configurations:\n" + "\n".join(spilling)


def test_shared_memory_fits_the_target(reports):
    limits = {"sm_89": aot.MAX_SHARED_BYTES[89], "sm_90a": aot.MAX_SHARED_BYTES[90]}
    too_big = [_row(r) for r in reports if r["shared_bytes"] > limits[r["target"]]]
    assert not too_big, "shared memory above the target's limit:\n" + "\n".join(too_big)
    assert all(r["registers"] <= aot.MAX_REGISTERS for r in reports)
