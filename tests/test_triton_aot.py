"""Ahead-of-time compilation of the Triton kernels for sm_89 and sm_90 (DESIGN.md §3, §6).

The interpreter accepts code the real compiler rejects and says nothing about registers, so every
configuration the fused steps' launchers can pick (lowrank_kernels.triton_kernels
.fused_galore_step: candidate_configs for the dense and the generated INT4/DCT bases,
bf16_moment_candidate_configs, int8_candidate_configs; fused_gradnorm_step.candidate_configs
and its two one-configuration launches) is compiled for both targets, both
sides, both offset widths (the 64-bit INDEX_64 variants a launch picks past 2**31 elements or a
DCT size of 32768) and, for launch A, G row-major and transposed (the unit stride the JIT makes a
constant; the AdaGrad and 8-bit moment variants with G row-major); ptxas reports registers, spills
and shared memory. Any spill fails: each of these configurations is one a default launch uses.

The compiler runs in a subprocess because tests/conftest.py sets TRITON_INTERPRET=1 without a GPU,
and under it @triton.jit yields interpreter objects. The default run compiles the most
register-hungry dtype set of each dtype class (see aot.STEP_DTYPES);
LOWRANK_AOT_ALL_DTYPES=1 compiles every dtype set. The Fira/APOLLO step variants (full_rank 1
and 2: as many as all the others together) are compiled for sm_90 only by default, to keep CI
within its time budget; LOWRANK_AOT_FULL_RANK_TARGETS=89,90 compiles them for both targets (run
before a change to the full-rank kernels lands). The factored second moment's launches
(aot.factored_variants, ~30 s per target) are compiled for both (LOWRANK_AOT_FACTORED_TARGETS).
The experimental kernels (triton_kernels/experimental) are not compiled here. The module's
tests may take 30 minutes (pytest-timeout counts the shared compile in the first test's setup:
about 8 minutes on two idle cores, more on a loaded machine).
"""

import itertools
import json
import os
import subprocess
import sys

import pytest

aot = pytest.importorskip("lowrank_kernels.triton_kernels.aot", reason="triton is not installed")

pytestmark = [pytest.mark.skipif(aot.ptxas_path() is None,
                                 reason="Triton's ptxas (triton/backends/nvidia/bin) is missing"),
              pytest.mark.timeout(1800)]  # the shared compile runs in one test's setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_DTYPES = os.environ.get("LOWRANK_AOT_ALL_DTYPES", "0") == "1"
FULL_RANK_TARGETS = os.environ.get("LOWRANK_AOT_FULL_RANK_TARGETS", "90")
FACTORED_TARGETS = os.environ.get("LOWRANK_AOT_FACTORED_TARGETS", "89,90")


def _compile_all(kernels: str = "fused_galore_step", targets: str = "89,90") -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-m", "lowrank_kernels.triton_kernels.aot", "--targets", targets,
            "--kernels", kernels]
    if not ALL_DTYPES:
        args.append("--main-dtypes")
    if kernels == "fused_galore_step":
        args += ["--full-rank-targets", FULL_RANK_TARGETS]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, f"AOT compilation failed:\n{proc.stderr[-5000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    return _compile_all()


@pytest.fixture(scope="module")
def full_rank_reports() -> list[dict]:
    return _compile_all("full_rank")


@pytest.fixture(scope="module")
def factored_reports() -> list[dict]:
    return _compile_all("factored", FACTORED_TARGETS)


def _row(report: dict) -> str:
    v = report["variant"]
    if v["kernel"] in ("gn_gram", "gn_rows"):  # GradNormLoRP launches K and F
        config = f"{v['kernel']:11} blocks={v['block_a']}/{v['block_b']}/{v['block_c']} " \
                 f"warps={v['num_warps']}"
        types = f"{'P=' + v['basis']:24}"
    elif v["kernel"].startswith("int8"):  # INT8 launch B
        blocks = (f"m={v['block_m']} n={v['block_n']}" if v["path"] == "rows" else
                  f"groups={v['block_groups']} g={v['block_g']}")
        config = f"{v['kernel']:11} group={v['group_size']} {blocks} r={v['block_r']} " \
                 f"warps={v['num_warps']} stages={v['num_stages']}"
        types = f"{'P=' + v['proj']:24}"
    else:  # launches A (project) and B (back)
        config = f"{v['kernel']:7} own={v['block_own']} r={v['block_r']} " \
                 f"long={v['block_long']} warps={v['num_warps']} stages={v['num_stages']}"
        types = " ".join(f"{k[0].upper()}={v[k]:4}" for k in ("grad", "weight", "proj", "state")
                         if k in v)
        types = f"{types:24}"
    layout = "G^T" if v.get("grad_layout") == "column" else "   "
    return (f"{report['target']:7} {v['side']:5} {types} {layout} i64={int(v['index_64'])} "
            f"{config:48} regs={report['registers']:3} "
            f"spill={report['spill_store_bytes']}/{report['spill_load_bytes']} "
            f"smem={report['shared_bytes']}")


TARGETS_SIDES_WIDTHS = list(itertools.product(("sm_89", "sm_90a"), ("right", "left"),
                                              aot.INDEX_TYPES))
_TARGET_NAMES = {"89": "sm_89", "90": "sm_90a"}


def _compiled_for(target: str, mode: int) -> bool:
    """Whether the default run compiles full-rank mode ``mode`` for ``target``."""
    return mode == 0 or target in {_TARGET_NAMES[t] for t in FULL_RANK_TARGETS.split(",")}


def test_every_step_config_compiles_for_sm89_and_sm90(reports):
    """Launches A and B of every table entry (dense and generated bases), each target, side and
    offset width, launch A with G row-major and transposed."""
    from lowrank_kernels.triton_kernels import fused_galore_step as fgs

    print("\n" + "\n".join(_row(r) for r in reports))
    fields = ("side", "index_64", "kernel", "full_rank", "block_own", "block_r", "block_long",
              "num_warps", "num_stages")
    compiled = {(r["target"], r["variant"]["basis"] != "dense",
                 r["variant"].get("grad_layout", "row"), *(r["variant"][f] for f in fields))
                for r in reports if r["variant"]["kernel"] in ("project", "back")
                and r["variant"].get("state", "fp32") == "fp32"
                and r["variant"].get("inner", "adam") == "adam"}
    for (target, side, index_64), generated, mode in itertools.product(
            TARGETS_SIDES_WIDTHS, (False, True), (0, 1, 2)):
        if not _compiled_for(target, mode):
            continue
        for kernel, _, c in fgs.candidate_configs(generated, index_64, full_rank=mode != 0):
            # launch B reads G in the full-rank modes: both G layouts there too
            for layout in ("row", "column") if kernel == "project" or mode else ("row",):
                key = (target, generated, layout, side, index_64, kernel, mode, c.block_own,
                       c.block_r, c.block_long, c.num_warps, c.num_stages)
                assert key in compiled, f"not compiled: {key}"


def test_every_bf16_moment_config_compiles_for_sm89_and_sm90(reports):
    """Launch A with bf16 moments (stochastic rounding: one Philox call per state element) has
    its own table; each entry is compiled with bf16 moments, dense and generated, so that the
    spill test below covers it."""
    from lowrank_kernels.triton_kernels import fused_galore_step as fgs

    fields = ("side", "index_64", "full_rank", "block_own", "block_r", "block_long",
              "num_warps", "num_stages")
    compiled = {(r["target"], r["variant"]["basis"] != "dense",
                 *(r["variant"][f] for f in fields)) for r in reports
                if r["variant"]["kernel"] == "project" and r["variant"]["state"] == "bf16"
                and r["variant"]["inner"] == "adam"}
    for (target, side, index_64), generated, mode in itertools.product(
            TARGETS_SIDES_WIDTHS, (False, True), (0, 1, 2)):
        if not _compiled_for(target, mode):
            continue
        for _, _, c in fgs.bf16_moment_candidate_configs(generated, index_64, mode != 0):
            key = (target, generated, side, index_64, mode, c.block_own, c.block_r,
                   c.block_long, c.num_warps, c.num_stages)
            assert key in compiled, f"not compiled with bf16 moments: {key}"


def test_every_8bit_moment_and_adagrad_config_compiles_for_sm89_and_sm90(reports):
    """Launch A with 8-bit moments (moment8_candidate_configs: decode, block absmax, encode in
    the epilogue) under Adam and AdaGrad, and AdaGrad on the other moment formats' tables
    (aot.adagrad_tables: with LOWRANK_AOT_ALL_DTYPES=1), dense and generated bases."""
    from lowrank_kernels.triton_kernels import fused_galore_step as fgs

    fields = ("side", "index_64", "block_own", "block_r", "block_long", "num_warps",
              "num_stages")
    compiled = {(r["target"], r["variant"]["state"], r["variant"]["inner"],
                 r["variant"]["basis"] != "dense", *(r["variant"][f] for f in fields))
                for r in reports if r["variant"]["kernel"] == "project"}
    for (target, side, index_64), generated in itertools.product(TARGETS_SIDES_WIDTHS,
                                                                 (False, True)):
        for inner in ("adam", "adagrad"):
            for _, _, c in fgs.moment8_candidate_configs(generated, index_64):
                key = (target, "8bit", inner, generated, side, index_64, c.block_own,
                       c.block_r, c.block_long, c.num_warps, c.num_stages)
                assert key in compiled, f"not compiled: {key}"
        for what, configs in aot.adagrad_tables(fgs, index_64, ALL_DTYPES):
            state = "8bit" if what.startswith("8bit") else "bf16" if "bf16" in what else "fp32"
            for kernel, _, c in configs:
                if kernel != "project" or generated != what.endswith("generated"):
                    continue
                key = (target, state, "adagrad", generated, side, index_64, c.block_own,
                       c.block_r, c.block_long, c.num_warps, c.num_stages)
                assert key in compiled, f"not compiled: {key}"


def test_every_int8_update_config_compiles_for_sm89_and_sm90(reports):
    """INT8 launch B: the row-aligned and the general kernel (int8_candidate_configs), every
    basis format, both sides and offset widths."""
    from lowrank_kernels.triton_kernels import fused_galore_step as fgs

    fields = ("full_rank", "path", "group_size", "block_groups", "block_r")
    compiled = {(r["target"], r["variant"]["side"], r["variant"]["index_64"],
                 r["variant"]["basis"], *(r["variant"][f] for f in fields))
                for r in reports if r["variant"]["kernel"].startswith("int8")}
    for (target, side, index_64), basis, mode in itertools.product(
            TARGETS_SIDES_WIDTHS, ("dense", "int4", "dct"), (0, 1, 2)):
        if not _compiled_for(target, mode):
            continue
        for c in fgs.int8_candidate_configs(index_64):
            key = (target, side, index_64, basis, mode, c.path, c.group_size, c.block_groups,
                   c.block_r)
            assert key in compiled, f"not compiled: {key}"


def test_every_gradnorm_config_compiles_for_sm89_and_sm90(reports):
    """fused_gradnorm_step: launches A, V and B of every table entry (dense and generated
    bases, both sides where the launch exists; A also with 8-bit moments), K of every basis
    format and F of both sides, each target and offset width."""
    from lowrank_kernels.triton_kernels import fused_gradnorm_step as gns

    fields = ("side", "index_64", "kernel", "block_own", "block_r", "block_long", "num_warps",
              "num_stages")
    compiled = {(r["target"], r["variant"]["basis"], *(r["variant"].get(f) for f in fields))
                for r in reports if r["variant"]["kernel"].startswith("gn_")}
    for (target, side, index_64), generated in itertools.product(TARGETS_SIDES_WIDTHS,
                                                                 (False, True)):
        for basis in ("int4", "dct") if generated else ("dense",):
            for kernel, _, c in gns.candidate_configs(generated):
                if kernel == "gn_vnorm" and side == "right":
                    continue
                key = (target, basis, side, index_64, kernel, c.block_own, c.block_r,
                       c.block_long, c.num_warps, c.num_stages)
                assert key in compiled, f"not compiled: {key}"
            if side == "right":
                key = (target, basis, side, index_64, "gn_gram", None, None, None,
                       gns.GRAM_CONFIG.num_warps, None)
                assert key in compiled, f"not compiled: {key}"
        key = (target, "dense", side, index_64, "gn_rows", None, None, None,
               gns.ROWS_CONFIG.num_warps, None)
        assert key in compiled, f"not compiled: {key}"
    # launch A with 8-bit moments: every table entry, both sides, each basis format
    eight_bit = {(r["target"], r["variant"]["basis"], *(r["variant"].get(f) for f in fields))
                 for r in reports if r["variant"]["kernel"] == "gn_project"
                 and r["variant"]["state"] == "8bit"}
    for (target, side, index_64), generated in itertools.product(TARGETS_SIDES_WIDTHS,
                                                                 (False, True)):
        for basis in ("int4", "dct") if generated else ("dense",):
            for _, _, c in (e for e in gns.candidate_configs(generated) if e[0] == "gn_project"):
                key = (target, basis, side, index_64, "gn_project", c.block_own, c.block_r,
                       c.block_long, c.num_warps, c.num_stages)
                assert key in eight_bit, f"8-bit moments not compiled: {key}"


def test_no_register_spills(reports):
    spilling = [_row(r) for r in reports
                if r["spill_store_bytes"] > 0 or r["spill_load_bytes"] > 0]
    assert not spilling, "register spills in launched configurations:\n" + "\n".join(spilling)


def test_shared_memory_fits_the_target(reports):
    limits = {"sm_89": aot.MAX_SHARED_BYTES[89], "sm_90a": aot.MAX_SHARED_BYTES[90]}
    too_big = [_row(r) for r in reports if r["shared_bytes"] > limits[r["target"]]]
    assert not too_big, "shared memory above the target's limit:\n" + "\n".join(too_big)
    assert all(r["registers"] <= aot.MAX_REGISTERS for r in reports)


def test_full_rank_kernels_compile_without_spills(full_rank_reports):
    """The Fira/APOLLO launches between A and B (full_rank.py: the Gram of every basis format,
    the per-line quadratic, every finalize variant) and random_basis, for both targets: each
    aot_variants() entry compiled, no spills, shared memory within the target's limit."""
    from lowrank_kernels.triton_kernels import full_rank, random_basis

    expected = len(list(full_rank.aot_variants())) + len(list(random_basis.aot_variants()))
    assert len(full_rank_reports) == 2 * expected
    assert {r["variant"]["kernel"] for r in full_rank_reports} == {
        *full_rank.AOT_KERNELS, *random_basis.AOT_KERNELS}
    limits = {"sm_89": aot.MAX_SHARED_BYTES[89], "sm_90a": aot.MAX_SHARED_BYTES[90]}
    for r in full_rank_reports:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
        assert r["shared_bytes"] <= limits[r["target"]], r
        assert r["registers"] <= aot.MAX_REGISTERS, r


def test_factored_moment_kernels_compile_without_spills(factored_reports):
    """A factored V's launches (aot.factored_variants: launch A with FACTORED for every
    candidate_configs() "project" entry of the dense and generated tables, each side, offset
    width and basis format; launch C per (M, N) types, side and width; the finalize), for the
    targets of LOWRANK_AOT_FACTORED_TARGETS (sm_89 and sm_90 by default): all compiled, no
    spills, shared memory within the target's limit. Launch B is the plain step's, compiled
    above."""
    from lowrank_kernels.triton_kernels import fused_galore_step as fgs

    targets = [_TARGET_NAMES[t] for t in FACTORED_TARGETS.split(",")]
    assert len(factored_reports) == len(targets) * len(list(aot.factored_variants(ALL_DTYPES)))
    compiled = {(r["target"], r["variant"]["basis"] != "dense",
                 *(r["variant"][f] for f in ("side", "index_64", "block_own", "block_r",
                                             "block_long", "num_warps", "num_stages")))
                for r in factored_reports if r["variant"]["kernel"] == "project"}
    for (target, side, index_64), generated in itertools.product(
            itertools.product(targets, ("right", "left"), aot.INDEX_TYPES), (False, True)):
        for kernel, _, c in fgs.candidate_configs(generated, index_64):
            key = (target, generated, side, index_64, c.block_own, c.block_r, c.block_long,
                   c.num_warps, c.num_stages)
            assert kernel != "project" or key in compiled, f"not compiled: {key}"
    assert {r["variant"]["kernel"] for r in factored_reports} == {
        "project", "factored_adam", "factored_finalize"}
    limits = {"sm_89": aot.MAX_SHARED_BYTES[89], "sm_90a": aot.MAX_SHARED_BYTES[90]}
    for r in factored_reports:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, _row(r)
        assert r["shared_bytes"] <= limits[r["target"]], _row(r)
        assert r["registers"] <= aot.MAX_REGISTERS, _row(r)
