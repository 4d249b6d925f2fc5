"""LowRankAdamW and its presets under FSDP2 and DDP, on 2 CPU processes (gloo) started here.

Every scenario runs in ONE launch of 2 forked ranks (tests/distributed_workers.py, whose
docstring lists the model: uneven shards, an empty shard, both projection sides, the fused-op and
the reference paths of the sharded step, FSDP2's default dim-0 placement and
``lowrank_shard_placement``); the tests compare what rank 0 saved with one-process runs made here:

- FSDP2 lands where one process lands on the same global batch (refreshes included), and on the
  very gradients the sharded run consumed ("replay": the optimizer alone, tighter);
- states are DTensors placed as lowrank_kernels.distributed.placement says;
- the optimizer's own collectives per step, per weight, with their bytes: none for weights
  sharded along their long side between refreshes (checked against torch's CommDebugMode);
- DDP lands there too, every rank's parameters and states bit for bit equal;
- layer-wise stepping with gradient accumulation and clipping under FSDP2, DDP and DDP with
  no_sync() equals ordinary one-process training;
- a DCP checkpoint saved on 2 ranks, loaded on 2 (bit for bit) and on 1, continues the run;
- INT8 weight codes, unsupported placements and the factored V / dense Adafactor (whose means
  span the whole weight; DDP runs them) are refused under FSDP2 naming the parameter.
"""

from __future__ import annotations

import warnings

import distributed_workers as workers
import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

WORLD = 2
PLACEMENTS = ("default", "long", "columns")
FSDP_RUNS = tuple((c, p) for c in workers.CONFIGS + ("galore_bf16",) for p in PLACEMENTS
                  if p != "columns" or c in ("galore", "dct", "qgalore", "lazy_svd")) + (
    ("galore", "hsdp"), ("galore", "hsdp_replicated")) + tuple(
    (c, p) for c in ("adagrad", "galore_8bit") for p in PLACEMENTS[:2])
ROUNDED = ("galore_bf16", "galore_8bit")  # stochastically rounded moments: shard-local streams
DDP_RUNS = ("galore", "dct", "qgalore", "random", "factored")
LAYERWISE_RUNS = ("galore", "dct", "qgalore")
DCP_RUNS = (("galore", "default"), ("dct", "long"), ("qgalore", "default"), ("lazy_svd", "long"))
# Relative to each tensor's largest entry. One process and two differ in the gradient's rounding
# (FSDP2 averages two half-batch gradients); a few steps of Adam on it stay within E2E. Fed the
# same gradients, the sharded step differs only by how its GEMMs are split: REPLAY.
E2E, REPLAY = 1e-4, 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    workers.launch(workers.everything, WORLD, str(out), FSDP_RUNS, DDP_RUNS, LAYERWISE_RUNS,
                   DCP_RUNS)
    return {name: torch.load(out / f"{name}.pt", weights_only=False)
            for name in ("fsdp", "ddp", "layerwise", "dcp", "refusals", "int8_ddp", "swapped")}


def assert_trajectories_close(actual: list[dict], expected: list[dict], tolerance: float):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        for name in e:
            error = float((a[name].float() - e[name].float()).abs().max())
            scale = float(e[name].float().abs().max())
            assert error <= tolerance * scale, (
                f"step {step}, {name}: max error {error:.3g} > {tolerance} × {scale:.3g}")


@pytest.mark.parametrize(("config", "placement"),
                         [r for r in FSDP_RUNS if r[0] not in ("rsvd", *ROUNDED)])
def test_fsdp_lands_where_one_process_lands(results, config, placement):
    """rsvd is left out: its basis vectors' signs follow the gradient's rounding here (the
    subspace does not), and GaLore keeps the moments across a refresh, so a flipped sign
    changes the run; the replay test below checks rsvd on the same gradients."""
    single, _, _ = workers.train_single(config)
    assert_trajectories_close(results["fsdp"][(config, placement)]["trajectory"], single, E2E)


@pytest.mark.parametrize(("config", "placement"),
                         [r for r in FSDP_RUNS if r[0] not in ROUNDED])
def test_fsdp_step_equals_one_process_step_on_the_same_gradients(results, config, placement):
    run = results["fsdp"][(config, placement)]
    single, optimizer, model = workers.train_single(config, grads=run["grads"])
    assert_trajectories_close(run["trajectory"], single, REPLAY)
    expected = workers.state_snapshot(model, optimizer)
    for name, state in run["state"].items():
        for key, value in state.items():
            reference = expected[name][key]
            if value.is_floating_point():  # moments, bases, scales, the measured overlap
                torch.testing.assert_close(value, reference, rtol=0, equal_nan=True,
                                           atol=REPLAY * float(reference.abs().nan_to_num().max()),
                                           msg=f"{name}.{key}")
            else:  # counters, DCT indices, packed INT4 codes: identical
                assert torch.equal(value, reference), (name, key)


@pytest.mark.parametrize("config", ROUNDED)
@pytest.mark.parametrize("placement", PLACEMENTS[:2])
def test_fsdp_rounded_moments_within_twice_one_process_error(results, placement, config):
    """bf16 and 8-bit moments round stochastically with shard-local streams, so not the same
    draws as one process: judged as DESIGN.md §6 judges low precision, error against the fp32
    run ≤ 2× the one-process run's (plus one bf16 ulp of the largest entry for tiny errors).
    8-bit: every shard-local step is the fused op (the side override on c.weight's wide row
    shards and e.weight's tall column shards), the split step (b.weight, e.weight under the
    default placement) the reference's 8-bit load and store; the scales are placed as
    placement.py says."""
    fp32, _, _ = workers.train_single("galore")
    rounded, _, _ = workers.train_single(config)
    sharded = results["fsdp"][(config, placement)]["trajectory"]
    for step in range(workers.STEPS):
        for name, exact in fp32[step].items():
            one = float((rounded[step][name].float() - exact).abs().max())
            two = float((sharded[step][name].float() - exact).abs().max())
            assert two <= 2 * one + exact.abs().max() * 2**-8, (step, name, two, one)
    if config == "galore_8bit":
        placed = results["fsdp"][(config, placement)]["placements"]
        for name in ("a.weight", "b.weight", "c.weight", "e.weight"):
            moments = placed[name]["exp_avg"]
            assert placed[name]["exp_avg_sq_scales"] == placed[name]["exp_avg_scales"] == (
                "S(0)" if moments.startswith("S") else moments), (placement, name)


def test_hsdp_states_are_placed_on_the_sharding_mesh_dimension(results):
    placed = results["fsdp"][("galore", "hsdp")]["placements"]
    assert placed["a.weight"]["param"] == "R,S(0)" and placed["a.weight"]["exp_avg"] == "R,S(0)"
    assert placed["b.weight"]["exp_avg"] == "R,S(1)" and placed["b.weight"]["proj"] == "R,S(0)"
    assert placed["a.weight"]["proj"] == "R,R"
    comm = results["fsdp"][("galore", "hsdp_replicated")]["comm"]
    assert all(calls == [] for step in comm for calls in step.values())  # shard groups of 1


def test_state_is_placed_with_its_weight(results):
    expected = {  # weight: (its placement, exp_avg, dense basis) under each placement
        "default": {"a.weight": ("S(0)", "S(0)", "R"), "b.weight": ("S(0)", "S(1)", "S(0)"),
                    "c.weight": ("S(0)", "S(0)", "R"), "e.weight": ("S(0)", "S(1)", "S(0)"),
                    "d.weight": ("S(0)", "S(1)", "S(0)")},
        "long": {"a.weight": ("S(0)", "S(0)", "R"), "b.weight": ("S(0)", "S(1)", "S(0)"),
                 "c.weight": ("S(0)", "S(0)", "R"), "e.weight": ("S(1)", "S(1)", "R"),
                 "d.weight": ("S(1)", "S(1)", "R")},
        "columns": {"a.weight": ("S(1)", "S(0)", "S(1)"), "b.weight": ("S(0)", "S(1)", "S(0)"),
                    "c.weight": ("S(0)", "S(0)", "R"), "e.weight": ("S(1)", "S(1)", "R"),
                    "d.weight": ("S(1)", "S(1)", "R")},
    }
    for placement, weights in expected.items():
        galore = results["fsdp"][("galore", placement)]["placements"]
        qgalore = results["fsdp"][("qgalore", placement)]["placements"]
        dct = results["fsdp"][("dct", placement)]["placements"]
        for name, (param, moments, basis) in weights.items():
            assert galore[name]["param"] == param, (placement, name)
            assert galore[name]["exp_avg"] == galore[name]["exp_avg_sq"] == moments
            assert galore[name]["proj"] == basis, (placement, name)
            for key in ("proj", "proj_scales", "proj_zeros"):  # packed INT4: replicated
                assert qgalore[name][key] == "R", (placement, name, key)
            assert dct[name]["proj"] == "R"
            for key in ("step", "proj_last_refresh", "proj_gap", "proj_refreshes", "proj_seed"):
                assert galore[name][key] == "tensor"
        assert galore["a.bias"]["exp_avg"] == "S(0)"


SHAPES = {"a.weight": (41, 16, 4), "b.weight": (25, 41, 4), "c.weight": (27, 25, 4),
          "e.weight": (20, 26, 4), "d.weight": (1, 20, 1)}  # (m, n, r) of tests/distributed_workers


@pytest.mark.parametrize("projection", ["svd", "dct"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_optimizer_communication_per_weight_and_step(results, placement, projection):
    """Every collective of every weight's step, with its bytes, equals what
    bench/distributed_comm.py computes from shapes (and prints for LLaMA-7B). GaLore (SVD,
    refreshes at steps 0 and 2): a weight sharded along its long side communicates only at
    refreshes (gradient gathered on its owner, basis broadcast); one sharded along its short side
    adds a reduce-scatter and an all-gather of r×(long side) fp32 every step. DCT re-selects every
    step: an all-reduce of the d scores when sharded along the long side, else the gather."""
    from bench.distributed_comm import weight_collectives

    comm = results["fsdp"][("galore" if projection == "svd" else "dct", placement)]["comm"]
    silent = 0
    for step, calls in enumerate(comm):
        refresh = projection == "dct" or step % workers.GAP == 0
        for name, (m, n, r) in SHAPES.items():
            assert calls[name] == weight_collectives(
                m, n, r, WORLD, placement=placement, projection=projection, refresh=refresh,
                grad_bytes=4), (step, name)
            silent += calls[name] == []
        assert all(calls[n] == [] for n in calls if n.endswith("bias"))
    if projection == "svd":  # weights sharded along their long side, between refreshes
        assert silent == {"default": 4, "long": 8, "columns": 6}[placement]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_step_refreshes_every_weight_at_once_with_the_same_collectives(results, placement):
    """step() runs the refreshes due together (owners in parallel, refresh_due_): at the first
    step (every weight refreshes) it issues the collectives that stepping weight by weight
    issues (galore and qgalore share shapes and gap; INT4 bases are broadcast in fp32 too)."""
    one_by_one = results["fsdp"][("galore", placement)]["comm"][0]
    together = results["fsdp"][("qgalore", placement)]["comm"][0]["all"]
    assert sorted(together) == sorted(c for calls in one_by_one.values() for c in calls)


def test_comm_counter_agrees_with_torch_comm_debug_mode(results):
    for run in results["fsdp"].values():
        for calls, debug_count in zip(run["comm"], run["debug_counts"]):
            assert sum(len(c) for c in calls.values()) == debug_count


def test_ddp_lands_where_one_process_lands_with_identical_ranks(results):
    for config in DDP_RUNS:
        run = results["ddp"][config]
        assert run["ranks_identical"], config  # refreshes (SVD, DCT, seeds) deterministic
        single, _, _ = workers.train_single(config)
        assert_trajectories_close(run["trajectory"], single, E2E)


@pytest.mark.parametrize("config", LAYERWISE_RUNS)
def test_layerwise_with_accumulation_under_fsdp_and_ddp_equals_ordinary_training(results,
                                                                                 config):
    single = workers.train_accumulating_single(config)
    for wrapper in ("fsdp", "ddp", "ddp_no_sync"):
        run = results["layerwise"][(config, wrapper)]
        assert run["steps"] == workers.STEPS
        assert_trajectories_close(run["trajectory"], single, E2E)


def test_layerwise_comparison_would_see_a_missing_clip():
    """The layer-wise comparison can fail: without the clipping, ordinary training goes
    elsewhere (the clip threshold is below the gradients' norms)."""
    clipped = workers.train_accumulating_single("galore")
    unclipped_max, workers.MAX_GRAD_NORM = workers.MAX_GRAD_NORM, 1e9
    try:
        unclipped = workers.train_accumulating_single("galore")
    finally:
        workers.MAX_GRAD_NORM = unclipped_max
    with pytest.raises(AssertionError):
        assert_trajectories_close(unclipped, clipped, E2E)


@pytest.mark.parametrize(("config", "placement"), DCP_RUNS)
def test_dcp_checkpoint_from_2_ranks_resumes_on_2_bit_for_bit(results, config, placement):
    run = results["dcp"][(config, placement)]
    for name, value in run["uninterrupted"].items():
        assert torch.equal(run["resumed"][name], value), name


@pytest.mark.parametrize(("config", "placement"), DCP_RUNS)
def test_dcp_checkpoint_from_2_ranks_resumes_in_one_process(results, config, placement):
    run = results["dcp"][(config, placement)]
    model = workers.build_model()
    optimizer = workers.make_optimizer(config, model)
    with warnings.catch_warnings():  # "no process group: loading in a single process"
        warnings.simplefilter("ignore", UserWarning)
        workers.resume(model, optimizer, run["checkpoint"], init=True)
    assert all(not isinstance(v, torch.distributed.tensor.DTensor)
               for s in optimizer.state.values() for v in s.values())
    workers.train_steps(model, optimizer, range(workers.SAVED_AT, workers.STEPS))
    assert_trajectories_close([workers.snapshot(model)], [run["uninterrupted"]], E2E)
    # and not because nothing was loaded: a fresh run from step SAVED_AT lands elsewhere
    fresh = workers.build_model()
    fresh_optimizer = workers.make_optimizer(config, fresh)
    workers.train_steps(fresh, fresh_optimizer, range(workers.SAVED_AT, workers.STEPS))
    with pytest.raises(AssertionError):
        assert_trajectories_close([workers.snapshot(fresh)], [run["uninterrupted"]], E2E)


def test_int8_codes_and_unsupported_placements_are_refused_naming_the_parameter(results):
    messages = results["refusals"]
    assert "'layer.int8'" in messages["int8"] and "INT8 weight codes cannot be sharded" in (
        messages["int8"])
    assert "'layer.partial'" in messages["partial"] and "Partial" in messages["partial"]
    assert "'layer.factored'" in messages["factored"] and (
        "second_moment='factored' does not step sharded (FSDP2) weights" in messages["factored"])
    assert "'layer.adafactor'" in messages["adafactor"] and (
        "dense_adamw='adafactor' does not step sharded (FSDP2) weights" in messages["adafactor"])


def test_a_failed_owner_refresh_raises_on_every_rank_instead_of_hanging(results):
    owner, other = results["refusals"]["nan_refresh"]
    assert owner.startswith("ValueError") and "'a.weight'" in owner and "NaN" in owner
    assert other.startswith("RuntimeError") and "'a.weight'" in other and "rank 0" in other


def test_int8_weights_under_ddp_need_their_float_grad_averaged(results):
    """DDP averages .grad, not the float_grad of INT8 codes: average_int8_grads makes every
    rank step from the averaged gradient (ordinary and layer-wise stepping), without it the
    ranks drift apart. The INT8 codes are stochastically rounded, so the one-process run is
    matched to a few codes' steps (s = range/255 of a group)."""
    runs = results["int8_ddp"]
    assert runs["averaged"]["ranks_identical"] and runs["layerwise"]["ranks_identical"]
    assert not runs["not_averaged"]["ranks_identical"]
    single = workers.train_int8_single()
    assert_trajectories_close(runs["averaged"]["trajectory"], single, 2e-2)
    assert_trajectories_close(runs["layerwise"]["trajectory"], single, 2e-2)


def test_parameters_swapped_for_sharded_ones_after_construction_as_accelerate_does(results):
    """transformers' Trainer with FSDP2 builds the optimizer first; accelerate then shards the
    model and replaces the optimizer's parameters by the DTensor ones. The optimizer, which
    creates its state at the first step, trains on as if built on the sharded model."""
    run = results["swapped"]
    assert run["sharded"]
    single, _, _ = workers.train_single("galore")
    assert_trajectories_close(run["trajectory"], single, E2E)
