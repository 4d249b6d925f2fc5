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
                   num_warps: int, num_stages: int, aligned: bool = True):
    """``triton.compile`` of ``fn`` for sm_<capability>.

    ``aligned`` adds the hints the JIT derives for 16-byte aligned pointers and sizes/strides
    divisible by 16 (the common LLM case, and the variant with the widest vector accesses).
    """
    full_signature = {name: ("constexpr" if name in constexprs else signature[name])
                      for name in fn.arg_names}
    attrs = {}
    if aligned:
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if full_signature[name].startswith("*") or full_signature[name] == "i32"}
    source = ASTSource(fn=fn, signature=full_signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def compile_and_measure(name: str, fn, signature, constexprs, capability, num_warps, num_stages,
                        variant: dict) -> CompileReport:
    compiled = compile_kernel(fn, signature, constexprs, capability, num_warps, num_stages)
    usage = ptxas_resource_usage(compiled.asm["ptx"], capability)
    return CompileReport(kernel=name, target=_arch_name(capability), variant=variant,
                         shared_bytes=compiled.metadata.shared, **usage)


# --------------------------------------------------------------------------------------------
# fused_galore_step
# --------------------------------------------------------------------------------------------
# (param/grad, proj, state) dtypes compiled per configuration: every dot path of the kernel.
FUSED_GALORE_DTYPES = {
    "tc": [(torch.bfloat16, torch.bfloat16, torch.float32),
           (torch.float16, torch.float16, torch.bfloat16)],
    "fp32": [(torch.float32, torch.float32, torch.float32),
             (torch.bfloat16, torch.float32, torch.float32)],
}


def fused_galore_step_variants(configs, all_dtypes: bool = True):
    """(variant description, signature, constexprs, num_warps, num_stages) for each
    (dot kind, KernelConfig) in ``configs``, both sides, each dot path's dtypes (only the first,
    most register-hungry set per dot kind, and 32-bit offsets only, unless ``all_dtypes``)."""
    for kind, config in configs:
        dtype_sets = FUSED_GALORE_DTYPES[kind] if all_dtypes else FUSED_GALORE_DTYPES[kind][:1]
        # 64-bit offsets (weights of 2**31+ elements) only in the exhaustive run
        index_types = (False, True) if all_dtypes else (False,)
        for (weight, proj, state), index_64 in itertools.product(dtype_sets, index_types):
            for right in (True, False):
                w, p, s = _TRITON_TYPES[weight], _TRITON_TYPES[proj], _TRITON_TYPES[state]
                signature = dict(W_ptr=f"*{w}", G_ptr=f"*{w}", Proj_ptr=f"*{p}",
                                 ExpAvg_ptr=f"*{s}", ExpAvgSq_ptr=f"*{s}")
                signature.update({k: "i32" for k in ("stride_wm", "stride_gm", "stride_projm",
                                                     "stride_statem", "M", "N", "R")})
                signature.update({k: "fp32" for k in ("beta1", "beta2", "one_minus_beta1",
                                                      "one_minus_beta2", "eps", "decay",
                                                      "update_scale")})
                constexprs = dict(RIGHT=right, BLOCK_OWN=config.block_own,
                                  BLOCK_LONG=config.block_long, R_PAD=config.r_pad,
                                  INDEX_64=index_64, INTERPRETED=False)
                variant = dict(side="right" if right else "left", weight=w, proj=p, state=s,
                               index_64=index_64,
                               **dataclasses.asdict(config))
                yield variant, signature, constexprs, config.num_warps, config.num_stages


def fused_galore_step_2d_variants(configs, all_dtypes: bool = True):
    """As ``fused_galore_step_variants`` for the two-launch kernels: ``configs`` are
    fused_galore_step_2d.candidate_configs() entries (kernel, dtype class, TileConfig)."""
    for kernel, kind, config in configs:
        dtype_sets = TWOLAUNCH_DTYPES[(kernel, kind)]
        dtype_sets = dtype_sets if all_dtypes else dtype_sets[:1]
        index_types = (False, True) if all_dtypes else (False,)
        for dtypes, index_64 in itertools.product(dtype_sets, index_types):
            for right in (True, False):
                if kernel == "project":
                    g, p, s, w = (_TRITON_TYPES[t] for t in dtypes)
                    signature = {"G_ptr": f"*{g}", "Proj_ptr": f"*{p}", "ExpAvg_ptr": f"*{s}",
                                 "ExpAvgSq_ptr": f"*{s}", "Normalized_ptr": f"*{w}"}
                    ints = ("stride_gm", "stride_projm", "stride_statem", "stride_normm")
                    floats = ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps")
                    types = {"grad": g, "proj": p, "state": s, "weight": w}
                else:
                    w, p = (_TRITON_TYPES[t] for t in dtypes)
                    signature = {"W_ptr": f"*{w}", "Proj_ptr": f"*{p}",
                                 "Normalized_ptr": f"*{w}"}  # N in W's type (workspace_dtype)
                    ints = ("stride_wm", "stride_projm", "stride_normm")
                    floats = ("decay", "update_scale")
                    types = {"weight": w, "proj": p}
                signature.update({k: "i32" for k in (*ints, "M", "N", "R")})
                signature.update({k: "fp32" for k in floats})
                constexprs = {"RIGHT": right, "BLOCK_OWN": config.block_own,
                              "BLOCK_R": config.block_r, "BLOCK_LONG": config.block_long,
                              "INDEX_64": index_64, "INTERPRETED": False}
                variant = {"kernel": kernel, "side": "right" if right else "left", **types,
                           "index_64": index_64, **dataclasses.asdict(config)}
                yield variant, signature, constexprs, config.num_warps, config.num_stages


# dtype sets per (two-launch kernel, dtype class), the most register-hungry first:
# project: (grad, proj, state, weight = N's workspace type); back: (weight, proj)
TWOLAUNCH_DTYPES = {
    ("project", "tc"): [(torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16),
                        (torch.float16, torch.float16, torch.bfloat16, torch.float16)],
    ("project", "fp32"): [(torch.float32, torch.float32, torch.float32, torch.float32),
                          (torch.bfloat16, torch.float32, torch.float32, torch.bfloat16)],
    ("back", "16bit"): [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
    ("back", "fp32"): [(torch.float32, torch.float32)],
}


def _kernel_of(variant: dict):
    from lowrank_kernels.triton_kernels import fused_galore_step as fgs
    from lowrank_kernels.triton_kernels import fused_galore_step_2d as fgs2d

    return {"project": fgs2d._project_adam_kernel,
            "back": fgs2d._back_project_kernel}.get(variant.get("kernel"),
                                                    fgs._fused_galore_step_kernel)


def _compile_fused_galore_step_variant(job) -> CompileReport:
    capability, (variant, signature, constexprs, warps, stages) = job
    kernel = _kernel_of(variant)
    return compile_and_measure(kernel.__name__, kernel, signature, constexprs, capability, warps,
                               stages, variant)


def fused_galore_step_reports(configs, capabilities=TARGETS, all_dtypes: bool = True,
                              jobs: int = 1, configs_2d=()):
    """Compiles every variant (one-pass ``configs`` and two-launch ``configs_2d``) for every
    target, ``jobs`` compilations at a time."""
    variants = [*fused_galore_step_variants(configs, all_dtypes),
                *fused_galore_step_2d_variants(configs_2d, all_dtypes)]
    work = [(capability, v) for capability in capabilities for v in variants]
    if jobs <= 1:
        yield from map(_compile_fused_galore_step_variant, work)
        return
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        yield from pool.map(_compile_fused_galore_step_variant, work)


# --------------------------------------------------------------------------------------------
# dct_select
# --------------------------------------------------------------------------------------------
def _compile_dct_select_variant(job) -> CompileReport:
    from lowrank_kernels.triton_kernels import dct_select

    capability, (variant, signature, constexprs, warps, stages) = job
    return compile_and_measure("_dct_kernel", dct_select._dct_kernel, signature, constexprs,
                               capability, warps, stages, variant)


def dct_select_reports(capabilities=TARGETS, main_only: bool = False, jobs: int = 1):
    """Compiles every launch of the Triton dct_select (dct_select.aot_variants) per target."""
    from lowrank_kernels.triton_kernels import dct_select

    work = [(capability, v) for capability in capabilities
            for v in dct_select.aot_variants(main_only)]
    if jobs <= 1:
        yield from map(_compile_dct_select_variant, work)
        return
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        yield from pool.map(_compile_dct_select_variant, work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="89,90", help="compute capabilities, e.g. 89,90")
    parser.add_argument("--main-dtypes", action="store_true",
                        help="one dtype set per dot kind (the most register-hungry one) and "
                             "32-bit offsets only")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compilations (default: one per CPU)")
    parser.add_argument("--kernels", default="fused_galore_step",
                        choices=("fused_galore_step", "dct_select"),
                        help="which kernel family to compile")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot: unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    if ptxas_path() is None:
        print("aot: Triton's ptxas was not found", file=sys.stderr)
        return 3
    capabilities = [int(c) for c in args.targets.split(",")]
    if args.kernels == "dct_select":
        for report in dct_select_reports(capabilities, args.main_dtypes, args.jobs):
            print(json.dumps(dataclasses.asdict(report)), flush=True)
        return 0
    from lowrank_kernels.triton_kernels import fused_galore_step as fgs
    from lowrank_kernels.triton_kernels import fused_galore_step_2d as fgs2d

    configs = fgs.candidate_configs()
    for report in fused_galore_step_reports(configs, capabilities, not args.main_dtypes,
                                            args.jobs, fgs2d.candidate_configs()):
        print(json.dumps(dataclasses.asdict(report)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
