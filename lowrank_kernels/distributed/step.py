"""One LowRankAdamW step of an FSDP2 weight, its state placed as placement.py says.

Notation: m×n weight, rank r, w ranks on the sharding mesh dimension; rank k holds the k-th chunk
(possibly empty) of the weight's rows (Shard(0), FSDP2's default) or columns (Shard(1), e.g. with
``lowrank_shard_placement``). The basis spans the short side: Q r×n on the right (m ≥ n), P m×r
on the left (m < n); the moments span the long side (m×r right, r×n left).

Sharded along the long side (right weight on rows, left weight on columns): R = G Qᵀ (or Pᵀ G) is
computed row by row (column by column), so each rank projects, runs Adam on its slice of M, V and
back-projects its own rows (columns) with the replicated basis. **No communication between
refreshes.** This is one ``ops.fused_galore_step(..., right=side)`` call on the local tensors:
the whole weight's side is passed, since a shard's own shape may not show it (the usual case for
the right side: a 4096×4096 weight on 8 ranks is 512×4096 per rank, which the side rule would
project from the left). Every format, inner rule (AdaGrad) and moment format (8-bit) of the op
runs there as in one process.

Sharded along the short side (FSDP2's default dim 0 for a left weight; a right weight on
columns): R = Σ_k P_kᵀ G_k (or Σ_k G_k Q_kᵀ) sums over ranks. Each rank computes its partial
product, a reduce-scatter along the long side leaves rank k the sum on its chunk, Adam runs there
on its chunk of M, V (the moments are sharded, not replicated), and an all-gather of N lets every
rank apply W_k ← W_k − α·scale·back(N) with its rows (columns) of the basis. Per step: one
reduce-scatter and one all-gather of r×(long side) fp32, the bytes of one all-reduce, with the
moments and the Adam arithmetic divided by w. The fused op cannot run this step: it projects
inside, and the sum over ranks must happen between the projection and Adam; the step is composed
of reference pieces (plain torch), AdaGrad and 8-bit moments (their block scales sharded with the
moments' long side) included. ``lowrank_shard_placement`` avoids it.

Refreshes. Every rank holds the refresh counters, so every rank knows when a weight refreshes.
- SVD, randomized SVD, and DCT when the weight is sharded along its short side need the whole
  gradient: it is gathered on one owner rank per weight (round-robin by the weight's position in
  the optimizer), which runs the one-process projector on it (same function, same generator
  seed) and broadcasts the fp32 basis (or the r indices); every rank stores it as one process
  would, keeping its chunk of a sharded basis. ``step()`` runs all the refreshes due at a step
  together first (:func:`refresh_due_`), in waves of one weight per owner, so the w owners
  compute their SVDs at the same time; layer-wise stepping refreshes weight by weight.
- DCT when the weight is sharded along its long side: the scores are sums along the long side
  of |G Cᵀ| (right) or |C G| (left) (squares for ℓ2), so each rank scores its chunk and one
  all-reduce of n (or m) floats gives every rank the same top-r.
- Random projections read only the shape and the seeded generator: every rank draws the same
  basis, no communication.
- The lazy policy's overlap ‖P_oldᵀ P_new‖²_F/r needs one all-reduce of r×r for a sharded dense
  basis; replicated bases are measured locally, identically on every rank.

bf16 and 8-bit moments are stored with stochastic rounding keyed by the shard-local element index,
with the shard's first index along the long side mixed into the seed: unbiased as in one process,
but not the same random draws (so not bit-identical to a one-process run; fp32 moments are).
"""

from __future__ import annotations

import dataclasses

import torch

from lowrank_kernels import ops, reference
from lowrank_kernels.distributed.collectives import (
    all_gather_along,
    all_reduce_sum_,
    broadcast_,
    reduce_scatter_along,
    start_gather,
)
from lowrank_kernels.distributed.placement import (
    ShardLayout,
    check_sharded_param,
    chunk_range,
    is_sharded,
    layout_of,
    local_view,
    place_projection_,
)
from lowrank_kernels.projection import state as proj_state
from lowrank_kernels.projection.base import check_rank, columns_of
from lowrank_kernels.projection.dct import NORMS

_SEED_MIX = 0x9E3779B1  # odd: shards starting at different rows get different rounding streams


@dataclasses.dataclass
class _Weight:
    """One sharded weight of the optimizer at the step in progress."""

    group: dict  # its parameter group
    state: dict
    param: torch.Tensor  # this rank's chunk
    grad: torch.Tensor  # this rank's chunk, contiguous
    layout: ShardLayout
    spec: proj_state.ProjectionSpec
    name: str
    owner: int  # the group rank that computes its gathered refreshes
    step_before: int
    new: torch.Tensor | None = None  # the projection a refresh computed
    error: BaseException | None = None

    @property
    def gathers(self) -> bool:
        """Whether its refresh needs the whole gradient on the owner."""
        local_scores = self.spec.projector.kind == "indices" and not self.layout.sums
        return self.spec.projector.needs_gradient and not local_scores


def _weight(optimizer, p: torch.Tensor) -> _Weight:
    """Looks ``p`` up in ``optimizer``, checks its gradient, allocates its state."""
    group, index, position = optimizer._locate(p)
    name = optimizer._name(group, index, p)
    check_sharded_param(p, name)  # again: accelerate swaps sharded parameters in after __init__
    grad = p.grad
    if not is_sharded(grad) or tuple(grad.placements) != tuple(p.placements):
        raise ValueError(f"gradient of {name}: expected a DTensor placed as its parameter "
                         f"{tuple(p.placements)}, got {type(grad).__name__}")
    spec = optimizer._spec(group)
    layout = layout_of(p)
    state = optimizer.state[p]
    if not state:
        optimizer._init_projected_state(state, p, spec, group, position)
    return _Weight(group, state, p.to_local(), grad.to_local().contiguous(), layout, spec, name,
                   position % layout.world, int(state["step"]))


@torch.compiler.disable
def step_sharded(optimizer, p: torch.Tensor) -> None:
    """The projected step of DTensor parameter ``p`` of ``optimizer`` (a LowRankAdamW)."""
    w = _weight(optimizer, p)
    if proj_state.refresh_due(w.state, w.step_before, w.spec):
        refresh_([w])
    w.state["step"] += 1
    hyper = optimizer._step_hyper(w.group, w.state, p, w.step_before + 1)
    _local_step(local_view(w.state), w.param, w.grad, w.layout, w.spec, hyper, optimizer.backend)


@torch.compiler.disable
def refresh_due_(optimizer, params: list[torch.Tensor]) -> None:
    """Runs together the refreshes due at this step among the DTensor ``params`` (projected,
    with gradients), before ``step()`` steps them one by one: the owners of gathered refreshes
    then compute in parallel instead of one weight after another (see :func:`refresh_`)."""
    due = []
    for p in params:
        w = _weight(optimizer, p)
        if proj_state.refresh_due(w.state, w.step_before, w.spec):
            due.append(w)
    if due:
        refresh_(due)


def refresh_(weights: list[_Weight]) -> None:
    """Recomputes the projections of ``weights`` (the module docstring says who computes what)
    and stores them in their states as DTensors. Collectives of different weights are in
    flight together; gathered refreshes run in waves of at most one weight per owner rank, so
    each rank holds at most one whole gradient at a time while the owners compute in parallel.
    Every rank calls this with the same weights in the same order."""
    for w in weights:
        check_rank(w.spec.rank, w.layout.m, w.layout.n, w.name)
    _local_projections([w for w in weights if not w.gathers])
    for wave in _waves([w for w in weights if w.gathers]):
        _gathered_projections(wave)
    for w in weights:
        if w.error is not None:
            raise w.error
    for w in weights:
        view = local_view(w.state)
        overlap = _overlap(view, w.new, w.layout, w.spec)
        proj_state.install_(view, w.new, w.param, w.spec, w.step_before, overlap)
        place_projection_(w.state, view, w.layout)


def _local_projections(weights: list[_Weight]) -> None:
    """Projections every rank computes itself: random bases (the shape and the seeded
    generator suffice) and DCT indices from partial scores (one all-reduce of d floats)."""
    pending = []
    for w in weights:
        m, n = w.layout.m, w.layout.n
        if not w.spec.projector.needs_gradient:
            # compute() reads only the shape and device: a stride-0 m×n view of a zero
            w.new = proj_state.compute_projection(local_view(w.state),
                                                  w.grad.new_zeros(()).expand(m, n), w.spec,
                                                  w.name)
            continue
        norm = NORMS[w.spec.projector.norm]
        # this rank's chunk of the long side: partial sums (0 for an empty chunk)
        scores = reference.dct_scores(w.grad, norm, right=w.layout.right)
        if norm == 2:
            scores = scores.square()
        pending.append((w, scores, norm, all_reduce_sum_(scores, w.layout, async_op=True)))
    for w, scores, norm, work in pending:
        if work is not None:
            work.wait()
        w.new = reference.top_r_indices(scores.sqrt() if norm == 2 else scores, w.spec.rank)


def _waves(weights: list[_Weight]) -> list[list[_Weight]]:
    """``weights`` in order, split so that no owner rank (of one group) appears twice in a
    wave."""
    waves: list[tuple[set, list[_Weight]]] = []
    for w in weights:
        key = (id(w.layout.group), w.owner)
        wave = next((wave for wave in waves if key not in wave[0]), None)
        if wave is None:
            wave = (set(), [])
            waves.append(wave)
        wave[0].add(key)
        wave[1].append(w)
    return [members for _, members in waves]


def _gathered_projections(wave: list[_Weight]) -> None:
    """Gathers each weight's gradient on its owner, which runs the one-process projector on it,
    then broadcasts the result. A failure on an owner is broadcast as NaN (or -1 indices) so
    that no rank waits forever; the owner keeps the exception, the others a RuntimeError."""
    gathers = [start_gather(w.grad, w.layout.dim, (w.layout.m, w.layout.n)[w.layout.dim],
                            w.layout, w.owner) for w in wave]
    for w, gather in zip(wave, gathers):
        whole = gather.wait()
        w.new = w.spec.projector.empty(w.layout.m, w.layout.n, w.spec.rank, w.grad.device)
        if whole is None:
            continue
        try:
            w.new.copy_(proj_state.compute_projection(local_view(w.state), whole, w.spec,
                                                      w.name))
        except Exception as exc:  # noqa: BLE001  (any failure: the others wait in the broadcast)
            w.error = exc
            w.new.fill_(-1 if w.spec.projector.kind == "indices" else float("nan"))
    works = [broadcast_(w.new, w.layout, w.owner, async_op=True) for w in wave]
    for w, work in zip(wave, works):
        if work is not None:
            work.wait()
        indices = w.spec.projector.kind == "indices"
        if w.error is None and bool((w.new < 0).any() if indices else ~w.new.isfinite().all()):
            w.error = RuntimeError(f"refresh of {w.name} failed on rank {w.owner} of its "
                                   "sharding group, which computes its projection (that rank "
                                   "raised the cause)")


def _overlap(view: dict, new: torch.Tensor, layout: ShardLayout,
             spec: proj_state.ProjectionSpec) -> float | None:
    if not proj_state.overlap_due(view, spec):
        return None
    if layout.basis_dim(view["proj"]) is None:
        # a replicated basis: every rank measures the same overlap locally
        return proj_state.measure_overlap(view, new, layout.m, layout.n, spec)
    start, stop = layout.own
    m, n = layout.m, layout.n
    old_columns = columns_of(view["proj"].float(), m, n)  # this rank's d_k×r rows of P_old
    new_columns = columns_of(new.narrow(layout.dim, start, stop - start), m, n)
    gram = all_reduce_sum_(old_columns.T @ new_columns, layout)  # P_oldᵀ P_new sums over ranks
    return float(gram.square().sum()) / spec.rank


def _local_step(view: dict, param: torch.Tensor, grad: torch.Tensor, layout: ShardLayout,
                spec: proj_state.ProjectionSpec, hyper: dict, backend: str | None) -> None:
    m, n = layout.m, layout.n
    exp_avg, exp_avg_sq = view.get("exp_avg"), view["exp_avg_sq"]
    scales = proj_state.moment_scales(view)
    if not layout.sums:
        if param.numel() == 0:
            return
        hyper = dict(hyper, seed=_shard_seed(hyper["seed"], layout.own[0]))
        ops.fused_galore_step(param, grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                              **proj_state.step_args(view, spec), **hyper, **scales,
                              right=layout.right, backend=backend)
        return
    start, stop = layout.own
    basis = view["proj"]
    if layout.basis_dim(basis) is None:  # INT4 or DCT: replicated; this rank's chunk of it
        basis = proj_state.dense_basis(view, m, n, spec).narrow(layout.dim, start, stop - start)
    partial = reference.project(grad, basis, right=layout.right)
    low_rank = reduce_scatter_along(partial, layout.moment_dim, layout)
    block = {"block_size": reference.MOMENT_BLOCK_SIZE, "right": layout.right}
    exp_avg32, exp_avg_sq32 = reference.load_moments(exp_avg, exp_avg_sq,
                                                     scales.get("exp_avg_scales"),
                                                     scales.get("exp_avg_sq_scales"), **block)
    adagrad = hyper.get("inner") == "adagrad"
    if adagrad:
        normalized = reference.adagrad_normalized(low_rank, exp_avg_sq32, hyper["eps"])
    else:
        normalized = reference.adam_normalized(low_rank, exp_avg32, exp_avg_sq32,
                                               hyper["beta1"], hyper["beta2"], hyper["eps"])
    long_side = partial.shape[layout.moment_dim]
    seed = _shard_seed(hyper["seed"], chunk_range(long_side, layout.world, layout.rank)[0])
    reference.store_moments_(exp_avg, exp_avg_sq, exp_avg32, exp_avg_sq32,
                             reference.rounding_philox_seed(seed, hyper["step"]), **scales,
                             **block)
    normalized = all_gather_along(normalized, layout.moment_dim, long_side, layout)
    if param.numel():
        reference.galore_update_(param, normalized, basis, lr=hyper["lr"], beta1=hyper["beta1"],
                                 beta2=hyper["beta2"], weight_decay=hyper["weight_decay"],
                                 scale=hyper["scale"], step=hyper["step"], right=layout.right,
                                 inner=hyper.get("inner", "adam"))


def _shard_seed(seed: int, first: int) -> int:
    """The stochastic-rounding seed of a shard whose first index along the long side is
    ``first`` (0: the one-process seed)."""
    return (seed + first * _SEED_MIX) % (2**31)
