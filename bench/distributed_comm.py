"""The optimizer's own communication per step under FSDP2: ours, gathering every gradient, DDP.

    python bench/distributed_comm.py [--model llama-7b] [--world 8] [--measure]

Computed from shapes (and labelled so) for a LLaMA model of bench.harness.MODELS on ``--world``
ranks, at the GaLore recipe's rank and refresh gap, bf16 gradients:

  ours, dim 0       LowRankAdamW under fully_shard's default placement: a right-side weight
                    (m ≥ n: q, k, v, o, gate, up) communicates only at refreshes (its gradient
                    gathered on its owner rank, the basis broadcast); a left-side one (down)
                    also reduce-scatters R and all-gathers N, r×n fp32 each, every step
  ours, long side   with ``shard_placement_fn=lowrank_shard_placement(mesh)``: down is sharded
                    on dim 1 (its long side) and steps without communication too
  DCT, ...          DCTAdamW re-selecting every step: an all-reduce of the d scores of a weight
                    sharded along its long side, a gather of a gradient sharded along its short
                    side
  gather every G    the simple approach: ``grad.full_tensor()`` of every projected weight every
                    step (an all-gather of each gradient), then the one-process step
  FSDP2 grad RS     FSDP2's own reduce-scatter of every gradient (the scale the optimizer's
                    bytes are judged against, DESIGN.md §5)
  DDP all-reduce    DDP's all-reduce of every gradient, for scale

Bytes follow lowrank_kernels.distributed.CommCounter: ``size`` is the collective's data
(nccl-tests' convention), ``bus`` what each rank's link carries with a bandwidth-optimal algorithm
(all-reduce 2(w−1)/w·size, all-gather/reduce-scatter/gather (w−1)/w·size, broadcast 1·size).
Refreshes are amortised over the gap (per step = refresh bytes / gap).

``--measure`` runs the test's model (tests/distributed_workers.py) on 2 gloo ranks and prints the
bytes CommCounter measured per step next to this module's prediction for the same shapes (the
test suite asserts they are equal), and the measured bytes of the same model's gradient
all-gathers (gather every G), FSDP2's backward and DDP's backward.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `lowrank_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from lowrank_kernels.distributed.counting import Collective

GRAD_BYTES = 2  # bf16 gradients
FP32 = 4


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def sharded_dim(m: int, n: int, world: int, placement: str) -> int:
    """The dim FSDP2 shards an m×n weight on: 0 ("default"), or 1 when the world divides n for
    a left-side weight under lowrank_shard_placement ("long") or for any weight ("columns")."""
    even = n % world == 0
    return 1 if even and (placement == "columns" or (placement == "long" and m < n)) else 0


def weight_collectives(m: int, n: int, rank: int, world: int, *, placement: str = "default",
                       projection: str = "svd", refresh: bool, grad_bytes: int = GRAD_BYTES
                       ) -> list[tuple[str, int]]:
    """(op, size) of every collective LowRankAdamW issues for one m×n weight at one step
    (lowrank_kernels.distributed.step), in order."""
    right = m >= n
    dim = sharded_dim(m, n, world, placement)
    sums = dim == (1 if right else 0)  # the shard cuts the basis side: R sums over ranks
    out = []
    if refresh and projection == "dct" and not sums:
        out.append(("all_reduce", (n if right else m) * FP32))
    elif refresh and projection in ("svd", "rsvd", "dct"):
        size, other = (m, n) if dim == 0 else (n, m)
        out.append(("gather", world * _ceil_div(size, world) * other * grad_bytes))
        basis = rank * 4 if projection == "dct" else rank * (n if right else m) * FP32
        out.append(("broadcast", basis))
    if sums:
        long_side = m if right else n
        padded = world * _ceil_div(long_side, world) * rank * FP32
        out += [("reduce_scatter", padded), ("all_gather", padded)]
    return out


@dataclasses.dataclass
class Row:
    name: str
    size: float  # bytes per step
    bus: float  # bytes per rank's link per step


def _bus(calls: list[tuple[str, int]], world: int) -> float:
    return sum(Collective(op, size, world).bus_bytes for op, size in calls)


def optimizer_row(name: str, shapes: list[tuple[int, int]], rank: int, world: int, gap: int,
                  **options) -> Row:
    """Per-step bytes of the projected weights ``shapes``: a step without refresh plus the
    refresh step's extra bytes divided by the gap."""
    size = bus = 0.0
    for m, n in shapes:
        plain = weight_collectives(m, n, rank, world, refresh=False, **options)
        fresh = weight_collectives(m, n, rank, world, refresh=True, **options)
        per_step = (gap - 1) / gap
        size += per_step * sum(s for _, s in plain) + sum(s for _, s in fresh) / gap
        bus += per_step * _bus(plain, world) + _bus(fresh, world) / gap
    return Row(name, size, bus)


def gather_everything_row(shapes: list[tuple[int, int]], world: int) -> Row:
    calls = [("all_gather", world * _ceil_div(m, world) * n * GRAD_BYTES) for m, n in shapes]
    return Row("gather every G (full_tensor)", sum(s for _, s in calls), _bus(calls, world))


def model_rows(cfg: harness.ModelShape, world: int) -> list[Row]:
    shapes = [s for _ in range(cfg.layers) for s in cfg.linear_shapes().values()]
    total = cfg.total_params()
    rows = [optimizer_row("ours, dim 0 (GaLore, SVD)", shapes, cfg.rank, world,
                          cfg.update_proj_gap),
            optimizer_row("ours, long side (GaLore, SVD)", shapes, cfg.rank, world,
                          cfg.update_proj_gap, placement="long"),
            optimizer_row("DCT every step, dim 0", shapes, cfg.rank, world, 1, projection="dct"),
            optimizer_row("DCT every step, long side", shapes, cfg.rank, world, 1,
                          projection="dct", placement="long"),
            gather_everything_row(shapes, world)]
    fsdp_rs = [("reduce_scatter", total * GRAD_BYTES)]
    ddp = [("all_reduce", total * GRAD_BYTES)]
    rows.append(Row("FSDP2 grad reduce-scatter", total * GRAD_BYTES, _bus(fsdp_rs, world)))
    rows.append(Row("DDP grad all-reduce", total * GRAD_BYTES, _bus(ddp, world)))
    return rows


def _format(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:8.2f} {unit}"
    return f"{value:8.0f} B "


def print_rows(title: str, rows: list[Row], reference: Row) -> None:
    print(title)
    print(f"  {'':34s} {'size/step':>12s} {'bus/rank/step':>14s}  {'vs ' + reference.name}")
    for row in rows:
        print(f"  {row.name:34s} {_format(row.size):>12s} {_format(row.bus):>14s}  "
              f"{row.bus / reference.bus:8.2%}")


# --------------------------------------------------------------------------------------------
# measured at the test's shapes
# --------------------------------------------------------------------------------------------
def _measure_rank(rank: int, world: int, out: str) -> None:
    import distributed_workers as workers
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lowrank_kernels.distributed import CommCounter

    results = {}
    for config in ("galore", "dct"):
        for placement in ("default", "long"):
            model = workers.fsdp_model(world, placement)
            optimizer = workers.make_optimizer(config, model)
            steps = []
            for step in range(workers.STEPS):
                with CommCounter() as backward:
                    workers.loss_of(model, step, rank, world).backward()
                projected = [p.grad for g in optimizer.param_groups if g.get("rank")
                             for p in g["params"]]
                with CommCounter() as gather_all:
                    for grad in projected:
                        grad.full_tensor()
                with CommCounter() as ours:
                    optimizer.step()
                optimizer.zero_grad()
                steps.append({"ours": (ours.size, ours.bus_bytes),
                              "gather": (gather_all.size, gather_all.bus_bytes),
                              "fsdp_backward": (backward.size, backward.bus_bytes)})
            results[(config, placement)] = steps
    model = DistributedDataParallel(workers.build_model())
    with CommCounter() as ddp:
        workers.loss_of(model, 0, rank, world).backward()
    results["ddp_backward"] = (ddp.size, ddp.bus_bytes)
    dist.barrier()
    if rank == 0:
        torch.save(results, Path(out) / "measured.pt")


def measure(world: int = 2) -> None:
    import tempfile

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import distributed_workers as workers

    with tempfile.TemporaryDirectory() as out:
        workers.launch(_measure_rank, world, out)
        results = torch.load(Path(out) / "measured.pt", weights_only=False)
    shapes = {"a": (41, 16, 4), "b": (25, 41, 4), "c": (27, 25, 4), "e": (20, 26, 4),
              "d": (1, 20, 1)}
    print(f"Measured (CommCounter) at the test's shapes on {world} gloo ranks, fp32 gradients: "
          f"weights {', '.join(f'{m}x{n} r={r}' for m, n, r in shapes.values())}")
    print(f"  {'config, placement':26s} {'step':>4s} {'ours size':>10s} {'predicted':>10s} "
          f"{'ours bus':>10s} {'gather-G bus':>13s} {'FSDP2 bwd bus':>14s}")
    for (config, placement), steps in ((k, v) for k, v in results.items() if k != "ddp_backward"):
        projection = "dct" if config == "dct" else "svd"
        for step, row in enumerate(steps):
            refresh = projection == "dct" or step % 2 == 0  # GAP = 2
            predicted = sum(size for m, n, r in shapes.values()
                            for _, size in weight_collectives(
                                m, n, r, world, placement=placement, projection=projection,
                                refresh=refresh, grad_bytes=4))
            print(f"  {config + ', ' + placement:26s} {step:4d} {row['ours'][0]:10.0f} "
                  f"{predicted:10.0f} {row['ours'][1]:10.0f} {row['gather'][1]:13.0f} "
                  f"{row['fsdp_backward'][1]:14.0f}")
    print(f"  DDP backward (all-reduce of every gradient): size {results['ddp_backward'][0]:.0f}, "
          f"bus {results['ddp_backward'][1]:.0f} bytes per step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-7b")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--measure", action="store_true",
                        help="also measure the test's shapes on 2 gloo ranks")
    args = parser.parse_args(argv)
    cfg = harness.model(args.model)
    rows = model_rows(cfg, args.world)
    print_rows(f"{cfg.name} on {args.world} ranks, r={cfg.rank}, refresh gap "
               f"{cfg.update_proj_gap}, bf16 gradients: COMPUTED FROM SHAPES", rows,
               next(r for r in rows if r.name.startswith("FSDP2")))
    if args.measure:
        print()
        measure()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
