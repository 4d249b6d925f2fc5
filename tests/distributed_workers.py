"""Multi-process workers of tests/test_distributed.py (CPU, gloo), importable by spawned ranks.

One tiny model covers every case the sharded step distinguishes, on 2 ranks, under FSDP2's
default placement (dim 0), under ``lowrank_shard_placement`` ("long": left-side weights with
an even n on dim 1), and "columns" (every weight with an even n on dim 1: a.weight is then a
right-side weight whose shard cuts its basis side, 16 columns 8 / 8, R reduce-scattered by rows);
HSDP meshes (Replicate, Shard) of 1×2 ("hsdp", the shards as above on mesh dim 1) and 2×1
("hsdp_replicated": every rank holds whole weights, one rank per shard group):

=========  =====  =====  ===========================================  =========================
weight     shape  side   dim 0 (default)                              "long" placement
=========  =====  =====  ===========================================  =========================
a.weight   41×16  right  rows 21 / 20, uneven; shards tall (m_k ≥ n):  (same)
                         the fused op
b.weight   25×41  left   rows 13 / 12; moments' columns 21 / 20:      (same: 41 is odd)
                         reduce-scatter + all-gather, uneven both
c.weight   27×25  right  rows 14 / 13, wide (m_k < n): the fused op   (same)
                         with right=True
e.weight   20×26  left   rows 10 / 10: reduce-scatter + all-gather    columns 13 / 13, shards
                                                                      tall: fused op, right=False
d.weight   1×20   left   rows 1 / 0: rank 1 holds an EMPTY shard      columns 10 / 10: fused op
biases     1-D    dense  AdamW on DTensor shards
=========  =====  =====  ===========================================  =========================

The global batch is the same for every run; rank k of w takes rows k::w, and FSDP2/DDP average
the gradients, so a sharded run and a one-process run see the same gradient up to rounding.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BATCH = 8
STEPS = 4
GAP = 2  # refreshes at steps 0 and 2 (DCT: every step)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 41)
        self.b = torch.nn.Linear(41, 25)
        self.c = torch.nn.Linear(25, 27)
        self.e = torch.nn.Linear(26, 20)
        self.d = torch.nn.Linear(20, 1, bias=False)

    def forward(self, x):
        h = torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x))))))
        return self.d(torch.tanh(self.e(h[:, :26])))


LAYERS = ("a", "b", "c", "e", "d")


def build_model(dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def dtype_of(config: str) -> torch.dtype:
    return torch.bfloat16 if config.endswith("_bf16") else torch.float32


def data(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of the global batch of ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 16, generator=g)
    y = torch.randn(BATCH, 1, generator=g)
    return x[rank::world], y[rank::world]


def param_groups(model: torch.nn.Module, **keys) -> list[dict]:
    named = dict(model.named_parameters())
    wide = ["a.weight", "b.weight", "c.weight", "e.weight"]
    dense = [n for n in named if n.endswith("bias")]
    return [{"params": [named[n] for n in wide], "names": wide, "rank": 4, **keys},
            {"params": [named["d.weight"]], "names": ["d.weight"], "rank": 1, **keys},
            {"params": [named[n] for n in dense], "names": dense}]


def make_optimizer(config: str, model: torch.nn.Module):
    from lowrank_kernels.optim import (
        DCTAdamW,
        GaLoreAdamW,
        LowRankAdagrad,
        LowRankAdamW,
        QGaLoreAdamW,
    )

    if config == "galore":
        return GaLoreAdamW(param_groups(model, update_proj_gap=GAP, scale=0.25), lr=0.02,
                           weight_decay=0.1)
    if config == "galore_bf16":  # bf16 weights and bf16 moments (stochastic rounding)
        return GaLoreAdamW(param_groups(model, update_proj_gap=GAP, scale=0.25), lr=0.02,
                           weight_decay=0.1, state_dtype=torch.bfloat16)
    if config == "dct":
        return DCTAdamW(param_groups(model, scale=0.25), lr=0.02, weight_decay=0.1)
    if config == "qgalore":
        return QGaLoreAdamW(param_groups(model, update_proj_gap=GAP, proj_group_size=16),
                            lr=0.02)
    if config == "lazy_svd":  # a dense left basis under the lazy policy: sharded overlap
        return LowRankAdamW(param_groups(model, update_proj_gap=1), lr=0.02, refresh="lazy",
                            refresh_threshold=0.5)
    if config == "random":
        return LowRankAdamW(param_groups(model, update_proj_gap=GAP), lr=0.02,
                            projection="random", seed=3)
    if config == "adagrad":  # no exp_avg; the split path's AdaGrad and the fused op's
        return LowRankAdagrad(param_groups(model, update_proj_gap=GAP, scale=0.25), lr=0.05,
                              weight_decay=0.1)
    if config == "galore_8bit":  # 8-bit moments (stochastic rounding), scales sharded
        return GaLoreAdamW(param_groups(model, update_proj_gap=GAP, scale=0.25), lr=0.02,
                           weight_decay=0.1, state_dtype="8bit")
    if config == "rsvd":
        return LowRankAdamW(param_groups(model, update_proj_gap=GAP), lr=0.02,
                            projection="rsvd", dense_adamw="galore")
    if config == "factored":  # 8-bit M, factored V; Adafactor for the rest (DDP only)
        return LowRankAdamW(param_groups(model, update_proj_gap=GAP, scale=0.25,
                                         second_moment="factored"), lr=0.02, weight_decay=0.1,
                            state_dtype="8bit", dense_adamw="adafactor")
    raise ValueError(config)


CONFIGS = ("galore", "dct", "qgalore", "lazy_svd", "random", "rsvd")


def loss_of(model, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    x, y = data(step, rank, world)
    out = model(x.to(next(p for p in model.parameters() if p.is_floating_point()).dtype))
    return torch.nn.functional.mse_loss(out.float(), y)


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p) for n, p in model.named_parameters()}


def state_snapshot(model: torch.nn.Module, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for n, p in model.named_parameters():
        out[n] = {k: full(v) for k, v in optimizer.state[p].items()}
    return out


def train_single(config: str, steps: int = STEPS, grads: list[dict] | None = None
                 ) -> tuple[list[dict], object, Net]:
    """The one-process run: parameters after every step. With ``grads`` (whole gradients per
    step, recorded in a sharded run) it replays them instead of running backward."""
    model = build_model(dtype_of(config))
    optimizer = make_optimizer(config, model)
    trajectory = []
    for step in range(steps):
        if grads is None:
            loss_of(model, step).backward()
        else:
            for n, p in model.named_parameters():
                p.grad = grads[step][n].clone()
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append(snapshot(model))
    return trajectory, optimizer, model


def columns(param: torch.nn.Parameter):
    """Every 2-D weight whose columns split evenly on dim 1, right-side ones included (their
    shard then cuts the basis side: R = G Qᵀ sums over ranks)."""
    from torch.distributed.tensor import Shard

    return Shard(1) if param.dim() == 2 and param.shape[1] % dist.get_world_size() == 0 else None


def fsdp_model(world: int, placement: str = "default", dtype: torch.dtype = torch.float32
               ) -> Net:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lowrank_kernels.distributed import lowrank_shard_placement

    if placement.startswith("hsdp"):  # HSDP: (Replicate(), Shard(0)) on a 2-D mesh
        shape = (world, 1) if placement == "hsdp_replicated" else (1, world)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    fn = {"long": lowrank_shard_placement(mesh), "columns": columns}.get(placement)
    model = build_model(dtype)
    for name in LAYERS:
        fully_shard(getattr(model, name), mesh=mesh, shard_placement_fn=fn)
    fully_shard(model, mesh=mesh, shard_placement_fn=fn)
    return model


def placements(model: torch.nn.Module, optimizer) -> dict[str, dict[str, str]]:
    """{param: {state key: "Shard(dim=0)" / "Replicate()" / "tensor"}} and the param's own."""
    from torch.distributed.tensor import DTensor

    def describe(t):
        return ",".join(map(str, t.placements)) if isinstance(t, DTensor) else "tensor"

    return {n: {"param": describe(p), **{k: describe(v) for k, v in optimizer.state[p].items()}}
            for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------
# launching
# --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        dist.destroy_process_group()


def launch(fn, world: int, *args) -> None:
    """Runs ``fn(rank, world, *args)`` on ``world`` spawned gloo ranks (raises if one fails)."""
    # fork: the ranks inherit the imported torch and lowrank_kernels (importing them again in
    # each spawned rank costs seconds on a loaded 2-core CI machine)
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method="fork")


# --------------------------------------------------------------------------------------------
# scenarios (rank 0 saves what the test compares into ``out``)
# --------------------------------------------------------------------------------------------
PER_WEIGHT = ("galore", "dct")  # stepped weight by weight, each step_parameter counted alone


def fsdp_runs(rank: int, world: int, out: str, runs: tuple[tuple[str, str], ...]) -> None:
    """For each (config, placement): parameters after every step, the whole gradients each step
    consumed, the optimizer's collectives per step (per weight for PER_WEIGHT configs, whose
    steps go through step_parameter; the others through step()), final states, placements."""
    from torch.distributed.tensor.debug import CommDebugMode

    from lowrank_kernels.distributed import CommCounter

    results = {}
    for config, placement in runs:
        model = fsdp_model(world, placement, dtype_of(config))
        optimizer = make_optimizer(config, model)
        trajectory, grads, comm, debug_counts = [], [], [], []
        for step in range(STEPS):
            loss_of(model, step, rank, world).backward()
            grads.append({n: full(p.grad) for n, p in model.named_parameters()})
            calls = {}
            with CommDebugMode() as debug:
                if config in PER_WEIGHT:
                    for n, p in model.named_parameters():
                        with CommCounter() as counter:
                            optimizer.step_parameter(p)
                        calls[n] = [(c.op, c.size) for c in counter.calls]
                else:
                    with CommCounter() as counter:
                        optimizer.step()
                    calls["all"] = [(c.op, c.size) for c in counter.calls]
            optimizer.zero_grad()
            trajectory.append(snapshot(model))
            comm.append(calls)
            debug_counts.append(debug.get_total_counts())
        results[(config, placement)] = {
            "trajectory": trajectory, "grads": grads, "comm": comm, "debug_counts": debug_counts,
            "state": state_snapshot(model, optimizer), "placements": placements(model, optimizer)}
    if rank == 0:
        torch.save(results, Path(out) / "fsdp.pt")


def ranks_identical(tensors: list[torch.Tensor], world: int) -> bool:
    """Whether every rank holds the same bits in ``tensors`` (NaN equal to itself)."""
    flat = torch.cat([t.detach().flatten().double() for t in tensors]).view(torch.int64)
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    return all(torch.equal(every[0], e) for e in every)


def ddp_runs(rank: int, world: int, out: str, configs: tuple[str, ...]) -> None:
    """DDP: the trajectory, and every rank's parameters and states bit for bit (rank 0 stores
    whether all ranks agree)."""
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    for config in configs:
        model = DistributedDataParallel(build_model())
        optimizer = make_optimizer(config, model.module)
        trajectory = []
        for step in range(STEPS):
            loss_of(model, step, rank, world).backward()
            optimizer.step()
            optimizer.zero_grad()
            trajectory.append(snapshot(model.module))
        tensors = [t for s in state_snapshot(model.module, optimizer).values()
                   for t in s.values()] + list(model.parameters())
        results[config] = {"trajectory": trajectory,
                           "ranks_identical": ranks_identical(tensors, world)}
    if rank == 0:
        torch.save(results, Path(out) / "ddp.pt")


ACCUMULATION = 2
MAX_GRAD_NORM = 0.05  # small enough to clip


def train_accumulating_single(config: str, steps: int = STEPS) -> list[dict]:
    """One process, ordinary training: ACCUMULATION micro-batches per step (the loss scaled by
    1/ACCUMULATION), each parameter's gradient clipped by its own norm, then step()."""
    model = build_model()
    optimizer = make_optimizer(config, model)
    trajectory = []
    for step in range(steps):
        for micro in range(ACCUMULATION):
            (loss_of(model, ACCUMULATION * step + micro) / ACCUMULATION).backward()
        for p in model.parameters():
            torch.nn.utils.clip_grad_norm_([p], MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append(snapshot(model))
    return trajectory


def layerwise_runs(rank: int, world: int, out: str, configs: tuple[str, ...]) -> None:
    """layerwise(...) with accumulation and clipping under FSDP2, DDP and DDP with no_sync()."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel

    from lowrank_kernels.optim import layerwise

    results = {}
    for config in configs:
        for wrapper in ("fsdp", "ddp", "ddp_no_sync"):
            model = (fsdp_model(world) if wrapper == "fsdp"
                     else DistributedDataParallel(build_model()))
            inner = model if wrapper == "fsdp" else model.module
            trainer = layerwise(model, lambda m, inner=inner, config=config:
                                make_optimizer(config, inner),
                                accumulation_steps=ACCUMULATION, max_grad_norm=MAX_GRAD_NORM)
            trajectory = []
            for step in range(STEPS):
                for micro in range(ACCUMULATION):
                    last = micro == ACCUMULATION - 1
                    sync = (model.no_sync() if wrapper == "ddp_no_sync" and not last
                            else contextlib.nullcontext())
                    with sync:
                        loss = loss_of(model, ACCUMULATION * step + micro, rank, world)
                        (loss / ACCUMULATION).backward()
                trajectory.append(snapshot(inner))
            results[(config, wrapper)] = {"trajectory": trajectory,
                                          "steps": trainer.optimizer_steps}
            trainer.remove()
    if rank == 0:
        torch.save(results, Path(out) / "layerwise.pt")


SAVED_AT = 2  # the checkpoint is taken after steps 0 and 1


def dcp_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model,
                                                                                    optimizer)}


def resume(model, optimizer, checkpoint: str, *, init: bool) -> None:
    """Loads ``checkpoint`` into ``model``/``optimizer`` (fresh): with ``init``, the state is
    allocated by init_optimizer_state first; without, DCP's zero-gradient step creates it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from lowrank_kernels.distributed import init_optimizer_state

    if init:
        init_optimizer_state(optimizer)
    sd = dcp_state(model, optimizer)
    dcp.load(sd, checkpoint_id=checkpoint)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, optimizer, sd["optim"])


def train_steps(model, optimizer, steps, rank: int = 0, world: int = 1) -> None:
    for step in steps:
        loss_of(model, step, rank, world).backward()
        optimizer.step()
        optimizer.zero_grad()


def dcp_runs(rank: int, world: int, out: str, runs: tuple[tuple[str, str], ...]) -> None:
    """Per (config, placement): train SAVED_AT steps, save with DCP, train to STEPS (the
    uninterrupted run); then a fresh model and optimizer on the same ranks load the checkpoint
    and train to STEPS (the resumed run). The checkpoints stay in ``out`` for a 1-process load."""
    import torch.distributed.checkpoint as dcp

    results = {}
    for i, (config, placement) in enumerate(runs):
        checkpoint = str(Path(out) / f"checkpoint_{config}_{placement}")
        model = fsdp_model(world, placement)
        optimizer = make_optimizer(config, model)
        train_steps(model, optimizer, range(SAVED_AT), rank, world)
        dcp.save(dcp_state(model, optimizer), checkpoint_id=checkpoint)
        train_steps(model, optimizer, range(SAVED_AT, STEPS), rank, world)
        uninterrupted = snapshot(model)
        model = fsdp_model(world, placement)
        optimizer = make_optimizer(config, model)
        resume(model, optimizer, checkpoint, init=i % 2 == 0)
        train_steps(model, optimizer, range(SAVED_AT, STEPS), rank, world)
        results[(config, placement)] = {"uninterrupted": uninterrupted, "resumed": snapshot(model),
                                        "checkpoint": checkpoint}
    if rank == 0:
        torch.save(results, Path(out) / "dcp.pt")


def refusals(rank: int, world: int, out: str) -> None:
    """The errors raised for DTensor parameters the sharded step cannot serve."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, distribute_tensor

    from lowrank_kernels import ops
    from lowrank_kernels.optim import LowRankAdamW, QGaLoreAdamW

    mesh = init_device_mesh("cpu", (world,))
    codes, _, _ = ops.quantize_int8(torch.randn(8, 6))
    cases = {"int8": torch.nn.Parameter(distribute_tensor(codes, mesh), requires_grad=False),
             "partial": torch.nn.Parameter(DTensor.from_local(torch.randn(8, 6), mesh,
                                                              [Partial()]))}
    messages = {}
    for case, p in cases.items():
        try:
            QGaLoreAdamW([{"params": [p], "rank": 2, "names": [f"layer.{case}"]}])
            messages[case] = None
        except ValueError as exc:
            messages[case] = str(exc)
    # the factored V and dense Adafactor sum over the whole weight: refused for sharded ones
    sharded = torch.nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh))
    for case, make in (
            ("factored", lambda: LowRankAdamW([{"params": [sharded], "rank": 2,
                                                "names": ["layer.factored"],
                                                "second_moment": "factored"}])),
            ("adafactor", lambda: LowRankAdamW([{"params": [sharded],
                                                 "names": ["layer.adafactor"]}],
                                               dense_adamw="adafactor"))):
        try:
            make()
            messages[case] = None
        except ValueError as exc:
            messages[case] = str(exc)
    # a NaN in rank 1's rows of a.weight's gradient: its owner (rank 0) cannot compute the SVD
    model = fsdp_model(world)
    optimizer = make_optimizer("galore", model)
    loss_of(model, 0, rank, world).backward()
    if rank == 1:
        model.a.weight.grad.to_local()[0, 0] = float("nan")
    try:
        optimizer.step()
        raised = None
    except (ValueError, RuntimeError) as exc:
        raised = f"{type(exc).__name__}: {exc}"
    every = [None] * world
    dist.all_gather_object(every, raised)
    messages["nan_refresh"] = every
    if rank == 0:
        torch.save(messages, Path(out) / "refusals.pt")


def everything(rank: int, world: int, out: str, fsdp: tuple, ddp: tuple, layerwise: tuple,
               dcp: tuple) -> None:
    """Every scenario in one launch (starting the ranks is the slow part)."""
    fsdp_runs(rank, world, out, fsdp)
    ddp_runs(rank, world, out, ddp)
    layerwise_runs(rank, world, out, layerwise)
    dcp_runs(rank, world, out, dcp)
    refusals(rank, world, out)
    int8_ddp_runs(rank, world, out)
    swapped_runs(rank, world, out)


INT8_LAYERS = ("a", "c")
INT8_GROUP = 16


def int8_model(dtype: torch.dtype = torch.float32) -> Net:
    """The model with a and c as Int8Linear (Q-GaLore's INT8 weights)."""
    from lowrank_kernels.autograd import replace_linear_with_int8

    model = build_model(dtype)
    replace_linear_with_int8(model, lambda name: name in INT8_LAYERS, group_size=INT8_GROUP)
    return model


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters, INT8 codes dequantized."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if p.is_floating_point()}
    for name in INT8_LAYERS:
        out[f"{name}.weight"] = getattr(model, name).dequantized_weight()
    return out


def train_int8_single(steps: int = STEPS) -> list[dict]:
    model = int8_model()
    optimizer = make_optimizer("qgalore", model)
    trajectory = []
    for step in range(steps):
        loss_of(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append(weights(model))
    return trajectory


def int8_ddp_runs(rank: int, world: int, out: str) -> None:
    """QGaLoreAdamW with INT8 weights under DDP: with average_int8_grads (ordinary and
    layer-wise stepping) and without it (DDP does not see float_grad)."""
    from torch.nn.parallel import DistributedDataParallel

    from lowrank_kernels.distributed import average_int8_grads
    from lowrank_kernels.optim import layerwise

    results = {}
    for variant in ("averaged", "layerwise", "not_averaged"):
        model = DistributedDataParallel(int8_model())
        if variant != "not_averaged":
            average_int8_grads(model.module)
        if variant == "layerwise":
            trainer = layerwise(model, lambda m: make_optimizer("qgalore", m.module))
        else:
            optimizer = make_optimizer("qgalore", model.module)
        trajectory = []
        for step in range(STEPS):
            loss_of(model, step, rank, world).backward()
            if variant != "layerwise":
                optimizer.step()
                optimizer.zero_grad()
            trajectory.append(weights(model.module))
        if variant == "layerwise":
            trainer.remove()
        results[variant] = {"trajectory": trajectory, "ranks_identical": ranks_identical(
            list(model.module.state_dict().values()), world)}
    if rank == 0:
        torch.save(results, Path(out) / "int8_ddp.pt")


def swapped_runs(rank: int, world: int, out: str) -> None:
    """The optimizer built on the plain model, then the model sharded and the optimizer's
    parameters replaced by the sharded ones: what accelerate's FSDP2 preparation does (and so
    transformers' Trainer with fsdp_version 2), see accelerate's _prepare_fsdp2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    optimizer = make_optimizer("galore", model)
    names = {id(p): n for n, p in model.named_parameters()}
    mesh = init_device_mesh("cpu", (world,))
    for name in LAYERS:
        fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    trajectory = []
    for step in range(STEPS):
        loss_of(model, step, rank, world).backward()
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append(snapshot(model))
    if rank == 0:
        torch.save({"trajectory": trajectory,
                    "sharded": all(type(p).__name__ == "DTensor" for p in sharded.values())},
                   Path(out) / "swapped.pt")
