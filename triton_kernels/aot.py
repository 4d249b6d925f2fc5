"""Ahead-of-time compilation of the Triton kernels for GPUs this machine may not have.

The interpreter (TRITON_INTERPRET=1) accepts code the real compiler rejects and says nothing about
registers or shared memory, so every configuration a launcher can pick is also compiled for
sm_89 (Ada) and sm_90 (Hopper) with ``triton.compile(..., target=GPUTarget("cuda", cc, 32))``,
and the PTX is assembled again by the ptxas that Triton ships with ``-v`` to read registers and
spills. No GPU or driver is needed.

Run as a module (``python -m lowrank_kernels.triton_kernels.aot``) it prints one JSON line per
compiled variant. It must run without TRITON_INTERPRET=1 (under the interpreter ``@triton.jit``
returns an interpreter object that cannot be compiled), which is why the tests call it in a
subprocess.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Hardware limits of the targets (CUDA programming guide, compute capabilities table).
MAX_SHARED_BYTES = {89: 101376, 90: 232448}  # per block, opt-in
MAX_REGISTERS = 255
TARGETS = (89, 90)

_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass
class CompileReport:
    kernel: str
    target: str
    variant: dict
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


def ptxas_path() -> str | None:
    """The ptxas that Triton itself uses (shipped in the wheel), if it is there."""
    try:
        from triton import knobs
        path = knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001 - any failure means "no usable ptxas"
        return None
    return path if path and os.path.exists(path) else None


def _arch_name(capability: int) -> str:
    # Triton compiles Hopper for the architecture-specific sm_90a (wgmma, TMA)
    return f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"


def ptxas_resource_usage(ptx: str, capability: int) -> dict[str, int]:
    """Registers, spills and stack of the single kernel in ``ptx``, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        result = subprocess.run(
            [ptxas_path(), "-v", "--regAllocOptLevel=2", f"--gpu-name={_arch_name(capability)}",
             src, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr

    def number(pattern: str) -> int:
        match = re.search(pattern, log)
        if match is None:
            raise RuntimeError(f"ptxas -v output lacks {pattern!r}:\n{log}")
        return int(match.group(1))

    return dict(registers=number(r"Used (\d+) registers"),
                spill_store_bytes=number(r"(\d+) bytes spill stores"),
                spill_load_bytes=number(r"(\d+) bytes spill loads"),
                stack_bytes=number(r"(\d+) bytes stack frame"))


def compile_kernel(fn, signature: dict[str, str], constexprs: dict[str, object], capability: int,
                   num_warps: int, num_stages: int, aligned: bool = True,
                   options: dict | None = None):
    """``triton.compile`` of ``fn`` for sm_<capability>.

    ``aligned`` adds the hints the JIT derives for 16-byte aligned pointers and sizes/strides
    divisible by 16 (the common LLM case, and the variant with the widest vector accesses).
    ``options``: further compile options the launcher passes (e.g. enable_fp_fusion).
    """
    full_signature = {name: ("constexpr" if name in constexprs else signature[name])
                      for name in fn.arg_names}
    attrs = {}
    if aligned:
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if full_signature[name].startswith("*") or full_signature[name] == "i32"}
    source = ASTSource(fn=fn, signature=full_signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages,
                                       **(options or {})))


def compile_and_measure(name: str, fn, signature, constexprs, capability, num_warps, num_stages,
                        variant: dict, options: dict | None = None) -> CompileReport:
    compiled = compile_kernel(fn, signature, constexprs, capability, num_warps, num_stages,
                              options=options)
    usage = ptxas_resource_usage(compiled.asm["ptx"], capability)
    return CompileReport(kernel=name, target=_arch_name(capability), variant=variant,
                         shared_bytes=compiled.metadata.shared, **usage)


_FLOAT_SCALARS = {"beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps", "decay",
                  "update_scale", "step_size"}


def _signature(fn, pointers: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    """Types of ``fn``'s runtime arguments as the JIT infers them for a typical launch:
    ``pointers`` as given, the Adam scalars fp32, the Philox seed i64, every other int i32."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name in pointers:
            signature[name] = pointers[name]
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name == "philox_seed" else "i32"
    return signature


def _basis_pointers(basis: str, dense_type: str) -> dict[str, str]:
    """Pointer types of the basis arguments: dense values, packed INT4 codes (+ fp32 scales and
    zeros) or int32 DCT frequencies; the launchers pass proj itself for unused scales/zeros."""
    proj = {"dense": f"*{dense_type}", "int4": "*u8", "dct": "*i32"}[basis]
    group = "*fp32" if basis == "int4" else proj
    return {"Proj_ptr": proj, "ProjScales_ptr": group, "ProjZeros_ptr": group}


def _basis_constexprs(basis: str) -> dict[str, object]:
    from lowrank_kernels.triton_kernels._common import BASIS_NAMES

    kind = {name: k for k, name in BASIS_NAMES.items()}[basis]
    return {"BASIS": kind, "PROJ_GROUP": 256 if basis == "int4" else 1}


# --------------------------------------------------------------------------------------------
# fused_galore_step (triton_kernels/fused_galore_step.py: launch A "project", launch B "back",
# INT8 launch B "int8_rows" / "int8_groups")
# --------------------------------------------------------------------------------------------
# Generated bases (INT4 codes, DCT frequencies): the dot kind follows G's type alone.
GENERATED_BASES = ("int4", "dct")
# Offset widths: 32-bit, and the 64-bit variant a launch picks past 2**31 (tensor spans, r·d, or
# a DCT size ≥ 32768). Both are compiled in every run: each is a kernel a launch can pick.
INDEX_TYPES = (False, True)


def _dtype_sets(table, kind, all_dtypes):
    return table[kind] if all_dtypes else table[kind][:1]


def unit_strides(kernel: str, right: bool, basis: str, grad_layout: str = "row",
                 reads_grad: bool = True) -> dict[str, int]:
    """The stride arguments a launch on dense operands passes as 1, which the JIT turns into
    compile-time constants (so must the AOT compile): the basis' stride along its size-d axis
    (right, Q r×n) or along the rank (left, P m×r), for dense and packed INT4 bases; and G's
    column stride (``grad_layout`` "row") or its row stride ("column": a transposed gradient,
    G = Xᵀ of a row-major X) in every kernel that takes G (launch A; launch B and the INT8
    kernels since the full-rank modes, which pass G whatever the mode). ``reads_grad=False``:
    a launch without G (GradNormLoRP's V, B and K)."""
    unit = {}
    if basis != "dct":
        unit["stride_pl" if right else "stride_pr"] = 1
    if reads_grad:
        unit["stride_gn" if grad_layout == "row" else "stride_gm"] = 1
    return unit


def step_variants(all_dtypes: bool = True, grad_layouts=("row", "column")):
    """(variant description, signature, constexprs, num_warps, num_stages, options) of launches
    A and B: for each offset width (INDEX_TYPES), every fused_galore_step.candidate_configs()
    entry (kernel, dtype class, TileConfig) for the dense and the generated (INT4, DCT) bases,
    every bf16_moment_candidate_configs() entry compiled with bf16 moments and every
    moment8_candidate_configs() entry with 8-bit moments, and launch A under AdaGrad
    (adagrad_tables); each for the full-rank modes it serves (FULL_RANK 0: GaLore from the plain
    tables; 1: Fira and 2: APOLLO from the full-rank tables, candidate_configs(...,
    full_rank=True), with fp32/bf16 Adam moments only: the checks refuse them with AdaGrad or
    8-bit moments). Both sides, launch A for each G layout in ``grad_layouts`` (unit_strides;
    the fp32/bf16 Adam tables), launch B too in the full-rank modes (which read G there); each
    dtype class's most register-hungry dtype set, or every set with ``all_dtypes``."""
    from lowrank_kernels.triton_kernels import fused_galore_step as fgs

    for index_64, modes in itertools.product(INDEX_TYPES, ((0,), (1, 2))):
        full_rank = modes != (0,)
        tables = [("dense", fgs.candidate_configs(False, index_64, full_rank)),
                  ("generated", fgs.candidate_configs(True, index_64, full_rank)),
                  ("bf16-moments", fgs.bf16_moment_candidate_configs(False, index_64, full_rank)),
                  ("bf16-moments-generated",
                   fgs.bf16_moment_candidate_configs(True, index_64, full_rank))]
        if not full_rank:
            tables += [("8bit-moments", fgs.moment8_candidate_configs(False, index_64)),
                       ("8bit-moments-generated", fgs.moment8_candidate_configs(True, index_64))]
        jobs = [(*c, what, mode, False) for what, configs in tables for c in configs
                for mode in modes]
        if not full_rank:
            jobs += [(*c, what, 0, True) for what, configs in adagrad_tables(fgs, index_64,
                                                                              all_dtypes)
                     for c in configs if c[0] == "project"]
        for kernel, kind, config, what, mode, adagrad in jobs:
            table, generated = _STEP_TABLES[what]
            bases = GENERATED_BASES if generated else ("dense",)
            sets = [(basis, dtypes) for basis in bases
                    for dtypes in _dtype_sets(table, (kernel, kind), all_dtypes)]
            # The moment epilogue does not touch G: the G layouts are compiled with the Adam
            # fp32/bf16 tables (launch A, and launch B in the full-rank modes, which read G
            # there); AdaGrad and 8-bit moments (more variants) with G row-major.
            layouts = (grad_layouts if (kernel == "project" or mode) and not adagrad
                       and what in _G_LAYOUT_TABLES else ("row",))
            for (basis, dtypes), right, layout in itertools.product(sets, (True, False),
                                                                    layouts):
                yield _step_variant(fgs, kernel, config, basis, dtypes, index_64, right,
                                    layout, adagrad, mode)


def adagrad_tables(fgs, index_64: bool, all_dtypes: bool = True):
    """(job kind, launch A configurations) compiled with ADAGRAD (AdaGrad: no M): the 8-bit
    moment tables always (their AdaGrad variants spilled more than Adam's before the tables were
    fixed), the fp32 and bf16 ones with ``all_dtypes`` (all spill-free when measured: AdaGrad
    holds one moment fewer than the Adam variants the default run compiles)."""
    tables = [("8bit-moments", fgs.moment8_candidate_configs(False, index_64)),
              ("8bit-moments-generated", fgs.moment8_candidate_configs(True, index_64))]
    if all_dtypes:
        tables += [("dense", fgs.candidate_configs(False, index_64)),
                   ("generated", fgs.candidate_configs(True, index_64)),
                   ("bf16-moments", fgs.bf16_moment_candidate_configs(False, index_64)),
                   ("bf16-moments-generated", fgs.bf16_moment_candidate_configs(True, index_64))]
    return tables


def _moment_pointers(state: str, adagrad: bool = False) -> dict[str, str]:
    """Launch A's moment pointers for a state type ("8bit": int8 M, uint8 √V codes and fp32
    block scales; otherwise M and V of that type, the unused scale pointers at V). AdaGrad: M's
    pointer is V's (never read)."""
    m_type, v_type = ("i8", "u8") if state == "8bit" else (state, state)
    scales = "fp32" if state == "8bit" else v_type
    return {"ExpAvg_ptr": f"*{v_type if adagrad else m_type}", "ExpAvgSq_ptr": f"*{v_type}",
            "ExpAvgScales_ptr": f"*{scales}", "ExpAvgSqScales_ptr": f"*{scales}"}


def _step_variant(fgs, kernel, config, basis, dtypes, index_64, right, layout, adagrad=False,
                  full_rank=0, factored=False):
    extra = {}
    f32 = "*fp32"
    if kernel == "project":
        fn = fgs._project_adam_kernel
        g, p, s, w = (_TRITON_TYPES.get(t, t) if t is not None else basis for t in dtypes)
        # the full-rank modes keep N in fp32, a factored V stores R there (moments unused: fp32)
        w = "fp32" if full_rank or factored else w
        s = "factored" if factored else s
        pointers = {"G_ptr": f"*{g}", **_moment_pointers("fp32" if factored else s, adagrad),
                    "Normalized_ptr": f"*{w}",
                    "LowRank_ptr": f32 if full_rank or factored else f"*{w}",
                    "LineSums_ptr": f32 if full_rank or factored else f"*{w}"}
        types = {"grad": g, "proj": p, "state": s, "weight": w, "grad_layout": layout,
                 "inner": "adagrad" if adagrad else "adam"}
        extra = {"ADAGRAD": adagrad, "MOMENT_BLOCK": MOMENT_BLOCK, "FACTORED": int(factored)}
    else:
        fn = fgs._back_project_kernel
        w, p = (_TRITON_TYPES[t] if t is not None else basis for t in dtypes)
        n = "*fp32" if full_rank else f"*{w}"  # N in W's type, fp32 in the full-rank modes
        pointers = {"W_ptr": f"*{w}", "Normalized_ptr": n, "G_ptr": f"*{w}",
                    **dict.fromkeys(("LowRank_ptr", "LineCoef_ptr", "GradCoef_ptr"), n)}
        types = {"weight": w, "proj": p, "grad_layout": layout}
    pointers.update(_basis_pointers(basis, p))
    constexprs = {"RIGHT": right, "BLOCK_OWN": config.block_own, "BLOCK_R": config.block_r,
                  "BLOCK_LONG": config.block_long, "INDEX_64": index_64, "INTERPRETED": False,
                  "FULL_RANK": full_rank, **_basis_constexprs(basis),
                  **unit_strides(kernel, right, basis, layout), **extra}
    variant = {"kernel": kernel, "side": "right" if right else "left", **types, "basis": basis,
               "index_64": index_64, "full_rank": full_rank, **dataclasses.asdict(config)}
    # 8-bit moments are launched with enable_fp_fusion=False (bits equal to the CPU kernel's)
    options = {"enable_fp_fusion": False} if types.get("state") == "8bit" else {}
    return (variant, _signature(fn, pointers, constexprs), constexprs, config.num_warps,
            config.num_stages, {**options, **fgs.full_rank_options(full_rank)})


def int8_update_variants(all_dtypes: bool = True):
    """Launch B of INT8 weights (fused_galore_step.int8_candidate_configs() of each offset
    width), both sides, every basis format (a dense basis in bf16 and, with ``all_dtypes``,
    fp32), compiled with the launcher's enable_fp_fusion=False."""
    from lowrank_kernels.triton_kernels import fused_galore_step as fgs

    bases = [("dense", "bf16"), ("int4", "int4"), ("dct", "dct")]
    if all_dtypes:
        bases.append(("dense", "fp32"))
    modes = (0, 1, 2)  # GaLore, Fira, APOLLO
    for index_64, config in ((i, c) for i in INDEX_TYPES for c in fgs.int8_candidate_configs(i)):
        rows = config.path == "rows"
        fn = fgs._int8_update_rows_kernel if rows else fgs._int8_update_groups_kernel
        for (basis, p), right, mode in itertools.product(bases, (True, False), modes):
            pointers = {"Codes_ptr": "*u8", "Scales_ptr": "*fp32", "Zeros_ptr": "*fp32",
                        "Normalized_ptr": "*fp32", "G_ptr": "*bf16", "LowRank_ptr": "*fp32",
                        "LineCoef_ptr": "*fp32", "GradCoef_ptr": "*fp32",
                        **_basis_pointers(basis, p)}
            blocks = ({"BLOCK_M": config.block_m, "BLOCK_N": config.block_n} if rows else
                      {"BLOCK_GROUPS": config.block_groups, "BLOCK_G": config.block_g})
            constexprs = {"RIGHT": right, **blocks, "BLOCK_R": config.block_r,
                          "GROUP": config.group_size, "INDEX_64": index_64,
                          "INTERPRETED": False, "FULL_RANK": mode, **_basis_constexprs(basis),
                          **unit_strides(f"int8_{config.path}", right, basis)}
            variant = {"kernel": f"int8_{config.path}", "side": "right" if right else "left",
                       "weight": "u8", "proj": p, "basis": basis, "index_64": index_64,
                       "full_rank": mode, **dataclasses.asdict(config)}
            yield (variant, _signature(fn, pointers, constexprs), constexprs,
                   config.num_warps, config.num_stages,
                   {"enable_fp_fusion": False, **fgs.full_rank_options(mode)})


# dtype sets per (kernel, dtype class), the most register-hungry first:
# project: (grad, proj, state, weight = N's workspace type); back: (weight, proj)
STEP_DTYPES = {
    ("project", "tc"): [(torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16),
                        (torch.float16, torch.float16, torch.float32, torch.float16)],
    ("project", "fp32"): [(torch.float32, torch.float32, torch.float32, torch.float32),
                          (torch.bfloat16, torch.float32, torch.float32, torch.bfloat16)],
    ("back", "16bit"): [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
    ("back", "fp32"): [(torch.float32, torch.float32)],
}
# The same for generated bases (proj None: the basis format's own pointer types). Launch A's
# workspace is fp32 for INT8 weights too, which the fp32 rows cover.
STEP_GENERATED_DTYPES = {
    ("project", "tc"): [(torch.bfloat16, None, torch.float32, torch.bfloat16),
                        (torch.bfloat16, None, torch.float32, torch.float32)],
    ("project", "fp32"): [(torch.float32, None, torch.float32, torch.float32)],
    ("back", "16bit"): [(torch.bfloat16, None)],
    ("back", "fp32"): [(torch.float32, None)],
}

# Launch A with bf16 moments (fused_galore_step.bf16_moment_candidate_configs): its own table,
# compiled with these (grad, proj, state, workspace) sets, dense and generated.
BF16_MOMENT_DTYPES = {  # the fp32 workspace: INT8 weights
    ("project", "tc"): [(torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
                        (torch.float16, torch.float16, torch.bfloat16, torch.float16),
                        (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32)],
    ("project", "fp32"): [(torch.float32, torch.float32, torch.bfloat16, torch.float32),
                          (torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16)],
}
BF16_MOMENT_GENERATED_DTYPES = {
    ("project", "tc"): [(torch.bfloat16, None, torch.bfloat16, torch.bfloat16),
                        (torch.bfloat16, None, torch.bfloat16, torch.float32),
                        (torch.float16, None, torch.bfloat16, torch.float16)],
    ("project", "fp32"): [(torch.float32, None, torch.bfloat16, torch.float32)],
}
# Launch A with 8-bit moments ("8bit": int8 M and uint8 √V codes with fp32 block scales of
# MOMENT_BLOCK ranks, the default block; other block sizes compile on first use unchecked):
# (grad, proj, state, workspace) sets as for bf16 moments.
MOMENT_BLOCK = 32
MOMENT8_DTYPES = {key: [(g, p, "8bit", w) for g, p, _, w in sets]
                  for key, sets in BF16_MOMENT_DTYPES.items()}
MOMENT8_GENERATED_DTYPES = {key: [(g, p, "8bit", w) for g, p, _, w in sets]
                            for key, sets in BF16_MOMENT_GENERATED_DTYPES.items()}
_STEP_TABLES = {  # job kind -> (dtype table, generated basis)
    "dense": (STEP_DTYPES, False),
    "generated": (STEP_GENERATED_DTYPES, True),
    "bf16-moments": (BF16_MOMENT_DTYPES, False),
    "bf16-moments-generated": (BF16_MOMENT_GENERATED_DTYPES, True),
    "8bit-moments": (MOMENT8_DTYPES, False),
    "8bit-moments-generated": (MOMENT8_GENERATED_DTYPES, True),
}
_G_LAYOUT_TABLES = ("dense", "generated", "bf16-moments", "bf16-moments-generated")

# --------------------------------------------------------------------------------------------
# the factored second moment in fused_galore_step: launch A with FACTORED ("project"), the
# finalize ("factored_finalize") and launch C ("factored_adam"); launch B is the plain step's
# --------------------------------------------------------------------------------------------
# Launch C's (M, N workspace) types: M in each format, N fp32 (fp32 and INT8 weights) or 16-bit
# (N in W's type; fp16 weights keep bf16 M under state_dtype="auto").
FACTORED_ADAM_TYPES = [("fp32", "fp32"), ("bf16", "fp32"), ("8bit", "fp32"), ("fp32", "bf16"),
                       ("bf16", "bf16"), ("8bit", "bf16"), ("bf16", "fp16")]
FACTORED_ADAM_ALL_TYPES = FACTORED_ADAM_TYPES + [("fp32", "fp16"), ("8bit", "fp16")]


def factored_variants(all_dtypes: bool = True):
    """(variant, signature, constexprs, num_warps, num_stages, options) of the launches a step
    with a factored V adds: launch A with FACTORED for every candidate_configs() "project" entry
    (the fp32-moment tables it picks; dense and generated bases, the dtype sets of STEP_DTYPES,
    both sides and offset widths, G row-major: the epilogue does not touch G, whose transposed
    layout the plain variants compile), launch C for each (M, N) type pair, side and offset
    width, and the finalize. Launch B is the plain step's (N in W's type): compiled there."""
    from lowrank_kernels.triton_kernels import fused_galore_step as fgs

    for index_64, generated in itertools.product(INDEX_TYPES, (False, True)):
        table = STEP_GENERATED_DTYPES if generated else STEP_DTYPES
        bases = GENERATED_BASES if generated else ("dense",)
        for kernel, kind, config in fgs.candidate_configs(generated, index_64):
            if kernel != "project":
                continue
            for basis, dtypes, right in itertools.product(
                    bases, _dtype_sets(table, (kernel, kind), all_dtypes), (True, False)):
                yield _step_variant(fgs, kernel, config, basis, dtypes, index_64, right, "row",
                                    factored=True)
    config = fgs.FACTORED_ADAM_CONFIG
    fn = fgs._factored_adam_kernel
    for index_64, right, (state, n) in itertools.product(
            INDEX_TYPES, (True, False),
            FACTORED_ADAM_ALL_TYPES if all_dtypes else FACTORED_ADAM_TYPES):
        m_type = "i8" if state == "8bit" else state
        pointers = {"LowRank_ptr": "*fp32", "Normalized_ptr": f"*{n}", "ExpAvg_ptr": f"*{m_type}",
                    "ExpAvgScales_ptr": "*fp32" if state == "8bit" else f"*{m_type}",
                    "Factors_ptr": "*fp32", "Mean_ptr": "*fp32"}
        constexprs = {"RIGHT": right, "BLOCK_OWN": config.block_own, "BLOCK_R": config.block_r,
                      "MOMENT_BLOCK": MOMENT_BLOCK, "INDEX_64": index_64, "INTERPRETED": False}
        variant = {"kernel": "factored_adam", "side": "right" if right else "left",
                   "state": state, "weight": n, "index_64": index_64,
                   **dataclasses.asdict(config)}
        yield (variant, _signature(fn, pointers, constexprs), constexprs, config.num_warps,
               config.num_stages, {"enable_fp_fusion": False})
    fn = fgs._factored_finalize_kernel
    constexprs = {"BLOCK": fgs.FACTORED_FINALIZE_BLOCK}
    pointers = dict.fromkeys(("Factors_ptr", "Partials_ptr", "Mean_ptr"), "*fp32")
    block = fgs.FACTORED_FINALIZE_BLOCK  # lines (and ranks) per program
    config = fgs.TileConfig(block_own=block, block_r=block, block_long=0,
                            num_warps=fgs.FACTORED_FINALIZE_WARPS, num_stages=1)
    yield ({"kernel": "factored_finalize", "side": "both", "index_64": False,
            **dataclasses.asdict(config)},
           _signature(fn, pointers, constexprs), constexprs, fgs.FACTORED_FINALIZE_WARPS, 1,
           {"enable_fp_fusion": False})


def factored_reports(capabilities=TARGETS, all_dtypes: bool = True, jobs: int = 1):
    """Compiles factored_variants() for every target, ``jobs`` at a time."""
    work = [(capability, v) for capability in capabilities
            for v in factored_variants(all_dtypes)]
    yield from _run(_compile_step_variant, work, jobs)


# --------------------------------------------------------------------------------------------
# fused_gradnorm_step (triton_kernels/fused_gradnorm_step.py): launches K "gn_gram", A
# "gn_project", V "gn_vnorm" (left side), F "gn_rows", B "gn_update"
# --------------------------------------------------------------------------------------------
# (grad, weight, proj, state) of launch A and (weight, proj) of launches V and B (N is an fp32
# workspace) per dtype class, the most register-hungry first (bf16 moments: a Philox call per
# state element); the default run compiles that first set of each class.
GRADNORM_PROJECT_DTYPES = {
    "tc": [(torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
           (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32),
           (torch.float16, torch.float16, torch.float16, torch.float32)],
    "fp32": [(torch.float32, torch.float32, torch.float32, torch.bfloat16),
             (torch.float32, torch.float32, torch.float32, torch.float32),
             (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)],
}
GRADNORM_PROJECT_GENERATED_DTYPES = {
    "tc": [(torch.bfloat16, torch.bfloat16, None, torch.bfloat16),
           (torch.bfloat16, torch.bfloat16, None, torch.float32)],
    "fp32": [(torch.float32, torch.float32, None, torch.bfloat16),
             (torch.float32, torch.float32, None, torch.float32)],
}
# 8-bit moments (int8 M, uint8 √V codes and fp32 block scales; enable_fp_fusion=False), compiled
# beside the fp32/bf16 sets of each class: their epilogue holds the scales and codes too.
GRADNORM_PROJECT_8BIT_DTYPES = {
    "tc": [(torch.bfloat16, torch.bfloat16, torch.bfloat16, "8bit"),
           (torch.float16, torch.float16, torch.float16, "8bit")],
    "fp32": [(torch.float32, torch.float32, torch.float32, "8bit"),
             (torch.bfloat16, torch.bfloat16, torch.float32, "8bit")],
}
GRADNORM_PROJECT_8BIT_GENERATED_DTYPES = {
    "tc": [(torch.bfloat16, torch.bfloat16, None, "8bit")],
    "fp32": [(torch.float32, torch.float32, None, "8bit")],
}
GRADNORM_BACK_DTYPES = {"16bit": [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
                        "fp32": [(torch.float32, torch.float32)]}
GRADNORM_BACK_GENERATED_DTYPES = {"16bit": [(torch.bfloat16, None)], "fp32": [(torch.float32, None)]}


def _gradnorm_dtype_sets(kernel: str, kind: str, generated: bool, all_dtypes: bool):
    if kernel == "gn_project":
        table = GRADNORM_PROJECT_GENERATED_DTYPES if generated else GRADNORM_PROJECT_DTYPES
        eight_bit = (GRADNORM_PROJECT_8BIT_GENERATED_DTYPES if generated
                     else GRADNORM_PROJECT_8BIT_DTYPES)
        return _dtype_sets(table, kind, all_dtypes) + _dtype_sets(eight_bit, kind, all_dtypes)
    else:
        table = GRADNORM_BACK_GENERATED_DTYPES if generated else GRADNORM_BACK_DTYPES
    return _dtype_sets(table, kind, all_dtypes)


def gradnorm_variants(all_dtypes: bool = True):
    """(variant, signature, constexprs, num_warps, num_stages, options) of every launch of
    fused_gradnorm_step: launches A, V and B for each fused_gradnorm_step.candidate_configs()
    entry (dense and generated bases, both sides where the launch exists), K for each basis
    format and F for each side, each offset width. G row-major (the transposed layout's unit
    stride is GaLore's launch A's concern, compiled there)."""
    from lowrank_kernels.triton_kernels import fused_gradnorm_step as gns

    for index_64, generated in itertools.product(INDEX_TYPES, (False, True)):
        bases = GENERATED_BASES if generated else ("dense",)
        for kernel, kind, config in gns.candidate_configs(generated):
            sides = (False,) if kernel == "gn_vnorm" else (True, False)
            for basis, dtypes, right in itertools.product(
                    bases, _gradnorm_dtype_sets(kernel, kind, generated, all_dtypes), sides):
                yield _gradnorm_tile_variant(gns, kernel, config, basis, dtypes, index_64, right)
        for basis in bases:  # launch K (right side only): its basis formats
            yield _gradnorm_small_variant(gns, "gn_gram", basis, index_64, True)
    for index_64, right in itertools.product(INDEX_TYPES, (True, False)):
        yield _gradnorm_small_variant(gns, "gn_rows", "dense", index_64, right)


def _gradnorm_tile_variant(gns, kernel, config, basis, dtypes, index_64, right):
    types = [_TRITON_TYPES.get(t, t) if t is not None else basis for t in dtypes]
    extra, options = {}, {}
    if kernel == "gn_project":
        g, w, p, s = types
        fn = gns._gradnorm_project_kernel
        pointers = {"G_ptr": f"*{g}", "W_ptr": f"*{w}", **_moment_pointers(s),
                    "Normalized_ptr": "*fp32", "ProjW_ptr": "*fp32", "RowSums_ptr": "*fp32"}
        described = {"grad": g, "weight": w, "proj": p, "state": s}
        unit = unit_strides("project", right, basis)
        extra = {"MOMENT_BLOCK": MOMENT_BLOCK}
        # 8-bit moments are launched with enable_fp_fusion=False (the CPU kernel's codes)
        options = {"enable_fp_fusion": False} if s == "8bit" else {}
    else:
        w, p = types
        fn = gns._gradnorm_vnorm_kernel if kernel == "gn_vnorm" else gns._gradnorm_update_kernel
        pointers = {"W_ptr": f"*{w}", "Normalized_ptr": "*fp32", "Coeffs_ptr": "*fp32",
                    "RowScale_ptr": "*fp32", "RowNorm_ptr": "*fp32", "VnormParts_ptr": "*fp32"}
        described = {"weight": w, "proj": p}
        unit = unit_strides("back", right, basis, reads_grad=False)
    pointers.update(_basis_pointers(basis, p))
    constexprs = {"BLOCK_OWN": config.block_own, "BLOCK_R": config.block_r,
                  "BLOCK_LONG": config.block_long, "INDEX_64": index_64, "INTERPRETED": False,
                  **_basis_constexprs(basis), **unit, **extra}
    if kernel != "gn_vnorm":
        constexprs["RIGHT"] = right
    pointers = {k: v for k, v in pointers.items() if k in fn.arg_names}
    variant = {"kernel": kernel, "side": "right" if right else "left", **described,
               "basis": basis, "index_64": index_64, **dataclasses.asdict(config)}
    return (variant, _signature(fn, pointers, constexprs), constexprs, config.num_warps,
            config.num_stages, options)


def _gradnorm_small_variant(gns, kernel, basis, index_64, right):
    if kernel == "gn_gram":
        fn, config = gns._gram_kernel, gns.GRAM_CONFIG
        pointers = {"Gram_ptr": "*fp32", **_basis_pointers(basis, "bf16")}
        constexprs = {"BLOCK_R": config.block_a, "BLOCK_LONG": config.block_b,
                      "INDEX_64": index_64, "INTERPRETED": False, **_basis_constexprs(basis),
                      **unit_strides("back", right, basis, reads_grad=False)}
    else:
        fn, config = gns._gradnorm_rows_kernel, gns.ROWS_CONFIG
        pointers = {name: "*fp32" for name in fn.arg_names if name.endswith("_ptr")}
        constexprs = {"RIGHT": right, "BLOCK_M": config.block_a, "BLOCK_R": config.block_b,
                      "BLOCK_PARTS": config.block_c, "INDEX_64": index_64}
    variant = {"kernel": kernel, "side": "right" if right else "left", "basis": basis,
               "index_64": index_64, **dataclasses.asdict(config)}
    return (variant, _signature(fn, pointers, constexprs), constexprs, config.num_warps, 1, {})


_KERNELS = {  # variant kernel -> (module, function)
    "project": ("fused_galore_step", "_project_adam_kernel"),
    "back": ("fused_galore_step", "_back_project_kernel"),
    "int8_rows": ("fused_galore_step", "_int8_update_rows_kernel"),
    "int8_groups": ("fused_galore_step", "_int8_update_groups_kernel"),
    "factored_adam": ("fused_galore_step", "_factored_adam_kernel"),
    "factored_finalize": ("fused_galore_step", "_factored_finalize_kernel"),
    "gn_gram": ("fused_gradnorm_step", "_gram_kernel"),
    "gn_project": ("fused_gradnorm_step", "_gradnorm_project_kernel"),
    "gn_vnorm": ("fused_gradnorm_step", "_gradnorm_vnorm_kernel"),
    "gn_rows": ("fused_gradnorm_step", "_gradnorm_rows_kernel"),
    "gn_update": ("fused_gradnorm_step", "_gradnorm_update_kernel"),
}


def _compile_step_variant(job) -> CompileReport:
    import importlib

    capability, (variant, signature, constexprs, warps, stages, options) = job
    module, name = _KERNELS[variant["kernel"]]
    kernel = getattr(importlib.import_module(f"lowrank_kernels.triton_kernels.{module}"), name)
    return compile_and_measure(kernel.__name__, kernel, signature, constexprs, capability, warps,
                               stages, variant, options)


def _run(compile_one, work, jobs: int):
    if jobs <= 1:
        yield from map(compile_one, work)
        return
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        yield from pool.map(compile_one, work)


def fused_galore_step_reports(capabilities=TARGETS, all_dtypes: bool = True, jobs: int = 1,
                              grad_layouts=("row", "column"), full_rank_capabilities=None):
    """Compiles every configuration the fused steps' launchers can pick (step_variants,
    int8_update_variants and gradnorm_variants) for every target, ``jobs`` at a time; the
    Fira/APOLLO variants (full_rank 1, 2) only for ``full_rank_capabilities`` (default: every
    target) -- they are half of all variants, and CI's time budget takes them for one target."""
    variants = [*step_variants(all_dtypes, grad_layouts),
                *int8_update_variants(all_dtypes), *gradnorm_variants(all_dtypes)]
    full_rank_targets = capabilities if full_rank_capabilities is None else full_rank_capabilities
    work = [(capability, v) for capability in capabilities for v in variants
            if not v[0].get("full_rank") or capability in full_rank_targets]
    yield from _run(_compile_step_variant, work, jobs)


# --------------------------------------------------------------------------------------------
# dct_select
# --------------------------------------------------------------------------------------------
def _compile_dct_select_variant(job) -> CompileReport:
    from lowrank_kernels.triton_kernels import dct_select

    capability, (variant, signature, constexprs, warps, stages) = job
    name = "_dct_basis_kernel" if variant["kernel"] == "dct_basis" else "_dct_kernel"
    return compile_and_measure(name, getattr(dct_select, name), signature, constexprs,
                               capability, warps, stages, variant)


def dct_select_reports(capabilities=TARGETS, main_only: bool = False, jobs: int = 1):
    """Compiles every launch of the Triton dct_select (dct_select.aot_variants) per target."""
    from lowrank_kernels.triton_kernels import dct_select

    work = [(capability, v) for capability in capabilities
            for v in dct_select.aot_variants(main_only)]
    yield from _run(_compile_dct_select_variant, work, jobs)


# --------------------------------------------------------------------------------------------
# Fira/APOLLO kernels between the fused step's launches (full_rank.py) and random_basis
# --------------------------------------------------------------------------------------------
_FULL_RANK_MODULES = ("full_rank", "random_basis")


def _compile_module_variant(job) -> CompileReport:
    import importlib

    capability, module_name, (variant, signature, constexprs, warps, stages, options) = job
    module = importlib.import_module(f"lowrank_kernels.triton_kernels.{module_name}")
    name = module.AOT_KERNELS[variant["kernel"]]
    return compile_and_measure(name, getattr(module, name), signature, constexprs, capability,
                               warps, stages, variant, options)


def full_rank_reports(capabilities=TARGETS, jobs: int = 1):
    """Compiles every launch of full_rank.py (Gram, quadratic, finalize) and random_basis.py
    (their aot_variants) per target."""
    import importlib

    work = [(capability, name, v) for capability in capabilities for name in _FULL_RANK_MODULES
            for v in importlib.import_module(
                f"lowrank_kernels.triton_kernels.{name}").aot_variants()]
    yield from _run(_compile_module_variant, work, jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="89,90", help="compute capabilities, e.g. 89,90")
    parser.add_argument("--main-dtypes", action="store_true",
                        help="one dtype set per dtype class (the most register-hungry one); "
                             "every configuration, side, offset width and G layout still")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compilations (default: one per CPU)")
    parser.add_argument("--full-rank-targets", default=None,
                        help="targets of the Fira/APOLLO step variants (default: --targets)")
    parser.add_argument("--kernels", default="fused_galore_step",
                        choices=("fused_galore_step", "dct_select", "full_rank", "factored"),
                        help="which kernel family to compile")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot: unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    if ptxas_path() is None:
        print("aot: Triton's ptxas was not found", file=sys.stderr)
        return 3
    capabilities = [int(c) for c in args.targets.split(",")]
    if args.kernels == "full_rank":
        for report in full_rank_reports(capabilities, args.jobs):
            print(json.dumps(dataclasses.asdict(report)), flush=True)
        return 0
    if args.kernels == "factored":
        for report in factored_reports(capabilities, not args.main_dtypes, args.jobs):
            print(json.dumps(dataclasses.asdict(report)), flush=True)
        return 0
    if args.kernels == "dct_select":
        for report in dct_select_reports(capabilities, args.main_dtypes, args.jobs):
            print(json.dumps(dataclasses.asdict(report)), flush=True)
        return 0
    full_rank_targets = (capabilities if args.full_rank_targets is None else
                         [int(c) for c in args.full_rank_targets.split(",")])
    for report in fused_galore_step_reports(capabilities, not args.main_dtypes, args.jobs,
                                            full_rank_capabilities=full_rank_targets):
        print(json.dumps(dataclasses.asdict(report)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
