"""The pure-Python parts of bench/: model-shape table, DRAM-traffic model, timing stats, CSV.

The traffic model of the peers is checked against what their step really executes: every aten
kernel of one galore-torch / q-galore-torch step is recorded (bench.traffic.measure_torch) and
its bytes must equal the hand-written list kernel by kernel.
"""

from __future__ import annotations

import math
import warnings
from unittest import mock

import pytest
import torch

from bench import harness, traffic


# --------------------------------------------------------------------------------------------
# model table
# --------------------------------------------------------------------------------------------
def test_llama_7b_parameter_count_is_the_published_one():
    # LLaMA-7B has 6,738,415,616 parameters (untied embeddings, vocab 32000).
    assert harness.model("llama-7b").total_params() == 6_738_415_616
    assert harness.model("7b") is harness.MODELS["llama-7b"]
    with pytest.raises(ValueError, match="model"):
        harness.model("llama-13b")


@pytest.mark.parametrize("name", ["llama-60m", "llama-1b"])
def test_shape_table_matches_transformers_llama(name):
    transformers = pytest.importorskip("transformers")
    cfg = harness.model(name)
    config = transformers.LlamaConfig(
        hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, vocab_size=cfg.vocab,
        tie_word_embeddings=False)
    with torch.device("meta"):
        net = transformers.LlamaForCausalLM(config)
    linear = {name.split(".")[-1]: tuple(mod.weight.shape)
              for name, mod in net.model.layers[0].named_modules()
              if isinstance(mod, torch.nn.Linear)}
    assert linear == cfg.linear_shapes()
    assert sum(p.numel() for p in net.parameters()) == cfg.total_params()


# --------------------------------------------------------------------------------------------
# traffic model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n", [(4096, 11008), (11008, 4096)])
def test_floor_bytes(m, n):
    r = 256
    t = traffic.floor(m, n, r, torch.bfloat16, torch.float32)
    # G read (2 B), W read + written (2 B each), M and V fp32 read + written, P bf16 read
    expected = 2 * m * n + 4 * m * n + 4 * 4 * r * max(m, n) + 2 * r * min(m, n)
    assert t.total == expected


def test_one_pass_fused_within_ten_percent_of_floor_for_every_model_shape_it_runs():
    for cfg in harness.MODELS.values():
        for m, n in cfg.distinct_linear_shapes():
            r = min(cfg.rank, m, n)
            if r > traffic.ONE_PASS_MAX_RANK:  # llama-7b's r = 1024: no such kernel, no row
                with pytest.raises(ValueError, match="one-pass kernel runs up to"):
                    traffic.fused(m, n, r)
                assert "fused-triton-onepass" not in {
                    t.impl for t, _ in traffic.implementations(m, n, r)}
                continue
            ratio = (traffic.fused(m, n, r).total / traffic.floor(m, n, r).total)
            assert 1.0 <= ratio <= 1.1, (cfg.name, m, n, ratio)


def test_model_totals_only_for_implementations_that_run_at_every_shape():
    rows = traffic.model_rows(["llama-7b", "llama-1b"])
    totals = {(r["model"], r["impl"]) for r in rows if str(r["shape"]).startswith("all")}
    assert ("llama-1b", "fused-triton-onepass") in totals  # r = 512
    assert ("llama-7b", "fused-triton-onepass") not in totals  # r = 1024
    assert ("llama-7b", "fused-triton-2launch") in totals


def test_storing_n_costs_ten_percent_of_the_floor_at_a_quarter_of_the_short_side():
    """floor+N on a d×d bf16 weight, fp32 states, r = d/4: N (bf16) written and read adds
    4·r·d bytes to 6·d² + 16·r·d + 2·r·d, i.e. 1/(10 + 1/2) of it; the two-launch steps add a
    second basis read on top."""
    d, r = 4096, 1024
    floor = traffic.floor(d, d, r).total
    stored = traffic.floor_plus_n(d, d, r).total
    assert stored - floor == 4 * r * d
    assert stored / floor == pytest.approx(1 + 1 / 10.5)
    for model in (traffic.fused_triton_2launch, traffic.fused_cuda_fast16):
        assert model(d, d, r).total == stored + 2 * r * d
    # the CUDA C++ kernel: N in fp32 (8·r·d), the bf16 basis copied to fp32 (12·r·d)
    assert traffic.fused_cuda(d, d, r).total == floor + 8 * r * d + 12 * r * d


def test_two_launch_steps_add_the_workspace_and_a_second_basis_read():
    # triton_kernels/fused_galore_step.py's (and the experimental CUDA 16-bit path's) own count
    # at 4096x11008 (left: L = r*n, basis m*r), r=256, bf16, fp32 states: floor 318 MB, N in
    # bf16 written and read once, the basis read by both launches; in fp32 the CUDA C++ kernel's
    m, n, r = 4096, 11008, 256
    floor = traffic.floor(m, n, r).total
    assert round(floor / 1e6) == 318
    for model in (traffic.fused_cuda_fast16, traffic.fused_triton_2launch):
        assert model(m, n, r).total - floor == 2 * 2 * r * n + 2 * m * r
        assert model(m, n, r).kernels == 2
    for model in (traffic.fused_cuda, traffic.fused_triton_2launch):
        assert model(m, n, r, torch.float32).total == (
            traffic.floor(m, n, r, torch.float32).total + 8 * r * n + 4 * m * r)


def test_cuda_step_copies_a_basis_that_does_not_match_the_data():
    m, n, r = 4096, 11008, 256
    for weight, proj in ((torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
                         (torch.bfloat16, torch.bfloat16)):
        step = traffic.fused_cuda(m, n, r, weight, proj_dtype=proj)
        # fp32 N, a bf16 basis read once, its fp32 copy written once and read by both launches
        assert step.total == (traffic.floor(m, n, r, weight, proj_dtype=proj).total
                              + 8 * r * n + 12 * m * r)
        assert step.kernels == 3


@pytest.mark.parametrize("name,rank", [("llama-7b", 128), ("llama-7b", 256), ("llama-7b", 512),
                                       ("llama-1b", 128), ("llama-1b", 256)])
def test_two_launch_steps_within_ten_percent_of_floor(name, rank):
    """Their extra bytes, ~6·r·d on a d×d bf16 weight against a floor of ~6·d² + 18·r·d, stay
    within 10% while r <= d/7: every shape of the large models at these ranks (the small models'
    recipe ranks, r = d/4 at llama-60m, are above it)."""
    for m, n in harness.model(name).distinct_linear_shapes():
        for model in (traffic.fused_cuda_fast16, traffic.fused_triton_2launch):
            ratio = model(m, n, rank).total / traffic.floor(m, n, rank).total
            assert 1.0 <= ratio <= 1.1, (model.__name__, name, m, n, rank, ratio)


def test_fused_charges_tile_rereads_when_the_basis_exceeds_l2():
    fits = traffic.fused(4096, 11008, 256, l2_bytes=50 * 2**20)
    spills = traffic.fused(4096, 11008, 256, l2_bytes=1 * 2**20, block_lines=64)
    assert spills.total > fits.total + 100 * 4096 * 256 * 2


def test_galore_torch_ratio_tends_to_the_count_of_full_size_passes():
    # With r << min(m, n) only the m×n passes matter: galore-torch reads G, writes back(N),
    # reads+writes it for ×scale, reads 2 and writes 1 for p.add_, reads+writes for decay
    # = 9 m×n passes against the floor's 3 (7 without decay).
    m = n = 8192
    floor = traffic.floor(m, n, 1, torch.bfloat16, torch.bfloat16).total
    assert traffic.galore_torch(m, n, 1).total / floor == pytest.approx(3.0, rel=1e-3)
    no_decay = traffic.galore_torch(m, n, 1, weight_decay=False).total
    assert no_decay / floor == pytest.approx(7 / 3, rel=1e-3)


def test_rank_above_min_dim_is_rejected():
    with pytest.raises(ValueError, match="rank"):
        traffic.floor(64, 32, 33)


@pytest.mark.parametrize("m,n", [(96, 160), (160, 96)])
def test_galore_torch_model_equals_its_executed_kernels(m, n):
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(m, n, dtype=torch.bfloat16))
    group = {"params": [p], "rank": 8, "update_proj_gap": 1000, "scale": 0.25,
             "proj_type": "std"}
    with warnings.catch_warnings():  # its deprecation notice, irrelevant here
        warnings.simplefilter("ignore", FutureWarning)
        opt = galore_torch.GaLoreAdamW([group], lr=1e-3, weight_decay=0.1)
    p.grad = torch.randn_like(p)
    opt.step()  # SVD and state allocation happen here, outside the measured step
    measured = traffic.measure_torch(opt.step)
    modelled = traffic.galore_torch(m, n, 8, torch.bfloat16)
    assert [(a.read, a.write) for a in measured.accesses] == [
        (a.read, a.write) for a in modelled.accesses]


@pytest.mark.parametrize("m,n", [(128, 256), (256, 128)])
def test_q_galore_torch_model_equals_its_executed_kernels(m, n):
    q_galore_torch = pytest.importorskip("q_galore_torch")
    optimizer_cls = q_galore_torch.QGaLoreAdamW8bit
    torch.manual_seed(0)
    codes, scales, zeros = optimizer_cls._quantize(
        None, torch.randn(m, n, dtype=torch.bfloat16) * 0.02, q_group_size=256)
    p = torch.nn.Parameter(codes, requires_grad=False)  # a QGaLoreLinear weight: INT8 codes
    p.group_size, p.scales, p.zeros, p.stochastic_round = 256, scales, zeros, True
    group = {"params": [p], "rank": 8, "update_proj_gap": 1000, "scale": 0.25,
             "proj_type": "std", "quant": True, "quant_group_size": 256, "quant_n_bit": 4,
             "cos_threshold": 0.4, "gamma_proj": 2, "queue_size": 5}
    # min_8bit_size: this low-rank state (2048 elements) would otherwise stay fp32
    opt = optimizer_cls([group], lr=1e-3, weight_decay=0.1, min_8bit_size=256)

    # q-galore-torch 1.0 calls bitsandbytes' pre-0.45 update API (KeyError
    # 'percentile_clipping' with the installed one), so its 8-bit Adam kernel is left out of
    # the measurement and checked against bitsandbytes' state layout instead.
    def adam_stand_in(self, group, p, *args, **kwargs):
        self.state[p]["step"] += 1

    with mock.patch("torch.cuda.synchronize"), \
            mock.patch.object(optimizer_cls, "update_step", adam_stand_in):
        p.float_grad = torch.randn(m, n, dtype=torch.bfloat16)
        opt.step()  # SVD, quantised basis and 8-bit state allocation
        p.float_grad = torch.randn(m, n, dtype=torch.bfloat16)
        measured = traffic.measure_torch(opt.step)
    state = opt.state[p]
    low_rank = 8 * max(m, n)
    assert state["state1"].dtype == torch.uint8 and state["state1"].numel() == low_rank
    assert state["absmax1"].numel() * 4 == -(-low_rank // 256) * 4

    modelled = traffic.q_galore_torch(m, n, 8, torch.bfloat16)
    adam = [a for a in modelled.accesses if a.op.startswith("bitsandbytes")]
    assert len(adam) == 1
    assert measured.total == modelled.total - adam[0].total
    measured_full = [a for a in measured.accesses if a.write >= m * n]
    modelled_full = [a for a in modelled.accesses if a.write >= m * n]
    assert [(a.read, a.write) for a in measured_full] == [
        (a.read, a.write) for a in modelled_full]


def test_predicted_times_scale_with_bandwidth():
    rows = traffic.rows_for_shape(4096, 11008, 256)
    floor = next(r for r in rows if r["impl"] == "floor")
    mb = traffic.floor(4096, 11008, 256).total / 1e6
    for device, (bandwidth, _) in traffic.DEVICES.items():
        assert floor[f"pred_ms@{device}"] == pytest.approx(mb * 1e6 / bandwidth * 1e3, rel=1e-3)
    assert {r["impl"] for r in rows} >= {"floor", "fused-triton-onepass", "fused-triton-2launch",
                                         "fused-cuda", "galore-torch", "q-galore-torch"}
    # every modelled implementation says whether its code has run on a GPU
    assert {r["ran_on_gpu"] for r in rows if r["impl"] == "fused-cuda"} == {
        traffic.RAN_ON_GPU["fused-cuda"]}
    assert all(r["ran_on_gpu"] for r in rows)


# --------------------------------------------------------------------------------------------
# timing, ratios, CSV
# --------------------------------------------------------------------------------------------
def test_timing_statistics():
    t = harness.Timing.from_samples([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_s, t.q1_s, t.q3_s, t.iqr_s, t.repeats) == (3.0, 2.0, 4.0, 2.0, 5)
    with pytest.raises(ValueError):
        harness.Timing.from_samples([])


def test_time_cpu_counts_warmup_and_repeats():
    calls = []
    t = harness.time_cpu(lambda: calls.append(1), warmup=3, repeats=5)
    assert len(calls) == 8 and t.repeats == 5 and t.median_s >= 0.0


def test_time_interleaved_alternates_providers_and_rotates_the_start():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("ours", "peer", "floor")}
    timings = harness.time_interleaved(fns, rounds=4, warmup=1)
    warm, timed = calls[:3], calls[3:]
    assert warm == ["ours", "peer", "floor"]
    assert timed == ["ours", "peer", "floor", "peer", "floor", "ours",
                     "floor", "ours", "peer", "ours", "peer", "floor"]
    assert {name: t.repeats for name, t in timings.items()} == {"ours": 4, "peer": 4, "floor": 4}


def test_time_interleaved_caps_slow_providers_and_skips_their_warmup():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("svd", "dct")}
    timings = harness.time_interleaved(fns, rounds=3, warmup=2, max_rounds={"svd": 1},
                                       cold=("svd",))
    assert calls.count("svd") == 1 and calls.count("dct") == 2 + 3
    assert timings["svd"].repeats == 1 and timings["dct"].repeats == 3
    with pytest.raises(ValueError, match="rounds"):
        harness.time_interleaved(fns, rounds=0)
    with pytest.raises(ValueError, match="max_rounds"):
        harness.time_interleaved(fns, rounds=2, max_rounds={"svd": 0})
    with pytest.raises(ValueError, match="fns"):
        harness.time_interleaved({})


def test_a_slow_spell_moves_every_interleaved_provider_alike(monkeypatch):
    """A neighbour's job slows the machine 3x for four consecutive calls. Interleaved, each
    provider gets two slow samples of five and the ratio of medians stays 2.0; timed in blocks
    (five of one, then five of the other) the same spell would land on "ours" alone."""
    clock = {"now": 0.0, "calls": 0}

    def work(units):
        def fn():
            slow = 2 <= clock["calls"] < 6
            clock["now"] += units * (3.0 if slow else 1.0)
            clock["calls"] += 1
        return fn

    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock["now"])
    t = harness.time_interleaved({"ours": work(1.0), "peer": work(2.0)}, rounds=5, warmup=0)
    assert t["peer"].median_s / t["ours"].median_s == 2.0


def test_ratios_use_the_baseline_of_the_same_group():
    rows = [{"shape": "a", "impl": "base", "ms": 2.0}, {"shape": "a", "impl": "x", "ms": 1.0},
            {"shape": "b", "impl": "x", "ms": 4.0}]
    harness.add_ratios(rows, key="impl", baseline="base")
    assert [r["vs_base"] for r in rows] == [1.0, 0.5, ""]


def test_benchmarks_write_to_an_ignored_folder_unless_refreshing():
    """A user's run must not dirty the checkout: bench/out/ is git-ignored, and the main job
    writes bench/results/ only with --refresh."""
    import shutil
    import subprocess

    from bench import run_all

    assert harness.results_path("x", root=harness.OUT_DIR).parent == harness.OUT_DIR
    assert harness.results_path("x").parent == harness.OUT_DIR
    assert run_all.output_dir(run_all.parse_args([])) == harness.OUT_DIR
    assert run_all.output_dir(run_all.parse_args(["--refresh"])) == harness.RESULTS_DIR
    root = harness.OUT_DIR.parent.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench/out/report.md"], cwd=root,
                             check=False)
    assert ignored.returncode == 0


def test_galore_torch_loads_without_bitsandbytes_and_its_8bit_optimizer_says_why(monkeypatch):
    """The GPU image has no bitsandbytes, which galore-torch's __init__ imports for its 8-bit
    optimizer; GaLoreAdamW (what the benchmarks time) must still load, and nothing may be left
    looking like bitsandbytes."""
    import importlib.abc
    import sys

    pytest.importorskip("galore_torch")

    class NoBitsandbytes(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "bitsandbytes":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    def ours(name):
        return name.split(".")[0] in ("galore_torch", "bitsandbytes")

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    for name in saved:
        del sys.modules[name]
    monkeypatch.setattr(sys, "meta_path", [NoBitsandbytes(), *sys.meta_path])
    try:
        _check_galore_torch_without_bitsandbytes()
    finally:  # later tests get the modules they had, not the ones imported without bitsandbytes
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)


def _check_galore_torch_without_bitsandbytes():
    import sys

    galore_torch = harness.import_galore_torch()
    assert "bitsandbytes" not in sys.modules
    p = torch.zeros(8, 4)
    opt = harness.galore_torch_optimizer(p, torch.ones(8, 4), torch.eye(4)[:2].contiguous(), 2,
                                         lr=0.1, weight_decay=0.0, eps=1e-6, scale=1.0)
    opt.step()
    assert opt.param_groups[0]["params"][0].abs().sum() > 0  # it stepped
    with pytest.raises(ImportError, match="bitsandbytes"):
        galore_torch.GaLoreAdamW8bit([torch.nn.Parameter(torch.zeros(2))])


def test_csv_round_trip_keeps_machine_header(tmp_path):
    machine = harness.machine_info("cpu")
    assert machine["threads"] == torch.get_num_threads() and machine["cpu"]
    rows = [{"impl": "floor", "ms": 1.5}, {"impl": "galore-torch", "ms": 3.0, "note": "x"}]
    path = harness.write_csv(tmp_path / "r.csv", rows, machine)
    header, back = harness.read_csv(path)
    assert header["cpu"] == str(machine["cpu"])
    assert [float(r["ms"]) for r in back] == [1.5, 3.0] and back[1]["note"] == "x"
    assert math.isclose(float(header["threads"]), torch.get_num_threads())


# --------------------------------------------------------------------------------------------
# memory accounting (meta tensors) and the step benchmark's CPU paths
# --------------------------------------------------------------------------------------------
def test_memory_accounting_of_adamw_and_galore_torch_on_meta():
    pytest.importorskip("galore_torch")
    from bench import memory

    cfg = harness.model("llama-60m")
    accounts = {a.optimizer: a for a in memory.accounting(
        "llama-60m", torch.bfloat16, ["adamw", "galore-torch"], verbose=False)}
    adamw, galore = accounts["torch AdamW"], accounts["galore-torch GaLoreAdamW"]
    weights = 2 * cfg.total_params()
    assert adamw.weights == weights and adamw.grads_all == weights
    assert adamw.optimizer_state == 2 * weights and adamw.projection == 0
    # GaLore: basis r×min(m, n) and M, V of r×max(m, n) per projected weight, all bf16;
    # embeddings, lm_head and norms keep full AdamW states.
    r = cfg.rank
    shapes = list(cfg.linear_shapes().values())
    assert galore.projection == 2 * cfg.layers * sum(r * min(s) for s in shapes)
    low_rank_states = 2 * 2 * cfg.layers * sum(r * max(s) for s in shapes)
    assert galore.optimizer_state == low_rank_states + 2 * 2 * cfg.other_params()


def test_step_benchmark_runs_its_providers_on_cpu(tmp_path):
    pytest.importorskip("galore_torch")
    from bench import bench_gpu_step

    out = tmp_path / "step.csv"
    status = bench_gpu_step.main(["--device", "cpu", "--shapes", "48x80", "--rank", "8", "60",
                                  "--dtype", "fp32", "--providers", "reference",
                                  "galore-torch", "cuda", "--out", str(out)])
    assert status == 0
    _, rows = harness.read_csv(out)
    assert {(r["provider"], r["rank"]) for r in rows} == {  # cuda: skipped with a message
        (p, r) for p in ("reference", "galore-torch") for r in ("8", "48")}  # 60 capped at 48
    by_provider = {r["provider"]: r for r in rows if r["rank"] == "8"}
    assert float(by_provider["galore-torch"]["vs_galore-torch"]) == 1.0
    assert float(by_provider["reference"]["ms"]) > 0


def test_step_overhead_benchmark_times_ours_against_galore_torch(tmp_path):
    pytest.importorskip("galore_torch")
    from bench import bench_step_overhead

    out = tmp_path / "overhead.csv"
    assert bench_step_overhead.main(["--rounds", "2", "--steps", "1", "--csv", str(out)]) == 0
    _, rows = harness.read_csv(out)
    assert [(r["optimizer"], r["weights"]) for r in rows] == [
        (label, harness.dtype_name(dtype)) for label, dtype, _ in bench_step_overhead.PROVIDERS]
    for row in rows:
        assert float(row["step_ms_median"]) > 0
        assert float(row["vs_galore_torch"]) == pytest.approx(
            float(row["step_ms_median"]) / float(next(
                r["step_ms_median"] for r in rows
                if r["optimizer"] == "galore-torch" and r["weights"] == row["weights"])), rel=1e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_step_benchmark_without_gpu_prints_the_traffic_model(capsys):
    from bench import bench_gpu_step

    assert bench_gpu_step.main([]) == 0
    printed = capsys.readouterr().out
    assert "galore-torch" in printed and "No CUDA device" in printed


def test_memory_accounting_of_q_galore_torch_layout():
    q_galore_torch = pytest.importorskip("q_galore_torch")
    from bench import memory

    cfg = harness.model("llama-60m")
    (acc,) = memory.accounting("llama-60m", torch.bfloat16, ["q-galore-torch"], verbose=False)
    shapes = list(cfg.linear_shapes().values())
    # INT8 codes + bf16 scale and zero per group of 256, for every projected weight
    int8 = cfg.layers * sum(m * n + 2 * 2 * (m * n // 256) for m, n in shapes)
    assert acc.weights == int8 + 2 * cfg.other_params()
    # INT4 basis stored one code per byte + bf16 scale and zero per 256 codes
    r = cfg.rank
    assert acc.projection == cfg.layers * sum(
        r * min(s) + 2 * 2 * (r * min(s) // 256) for s in shapes)
    # 8-bit M, V (1 byte each) + fp32 absmax per 256 of the low-rank tensors
    low_rank = cfg.layers * sum(2 * r * max(s) + 2 * 4 * -(-r * max(s) // 256) for s in shapes)
    # the other parameters: the same 8-bit layout, fp32 M, V below 4096 elements (the norms),
    # and bitsandbytes' two 256-entry fp32 quantisation maps, shared
    _, rest = memory.split_params(memory.build_model(cfg, torch.bfloat16))
    others = sum(2 * p.numel() + 2 * 4 * -(-p.numel() // 256) if p.numel() >= 4096
                 else 2 * 4 * p.numel() for p in rest)
    # q-galore-torch 1.0 passes percentile_clipping=100 positionally; bitsandbytes >= 0.45 reads
    # it as max_unorm, which allocates a 1-element fp32 unorm_vec per parameter
    probe = q_galore_torch.QGaLoreAdamW8bit([torch.nn.Parameter(torch.zeros(1))])
    unorm = 4 * (cfg.layers * len(shapes) + len(rest)) if probe.args.max_unorm > 0 else 0
    assert acc.optimizer_state == low_rank + others + 2 * 256 * 4 + unorm


def test_fused_q_galore_step_is_the_q_floor_plus_the_fp32_workspace():
    """fused-triton-q (INT8 W, packed INT4 P, fp32 states) against floor-q, at 4096x11008, r=256:
    the floor counts G, 1-byte codes and fp32 group scales/zeros of W read+written, M and V,
    the packed basis once; the step adds the fp32 N round trip and launch B's second basis read."""
    m, n, r = 4096, 11008, 256
    floor = traffic.floor_q(m, n, r, torch.bfloat16, torch.float32)
    groups_w, groups_p = -(-m * n // 256), -(-r * m // 256)
    basis = r * m // 2 + 8 * groups_p
    assert floor.total == 2 * m * n + 2 * (m * n + 8 * groups_w) + 16 * r * n + basis
    fused = traffic.fused_triton_q(m, n, r, torch.bfloat16, torch.float32)
    assert fused.total - floor.total == 8 * r * n + basis
    assert fused.kernels == 2


def test_cpu_ratio_ranges_span_the_runs(tmp_path):
    from bench import cpu_ratios

    for run, (ours, load) in enumerate([(10.0, "1.0"), (20.0, "5.5"), (12.5, "2.0")], start=1):
        machine = {"loadavg_1m": load}
        harness.write_csv(tmp_path / f"cpu_step_{run}.csv", [{
            "m": 64, "n": 32, "rank": 8, "dtype": "float32", "galore_over_ours": 25.0 / ours,
            "ours_over_floor": ours / 10.0}], machine)
        harness.write_csv(tmp_path / f"qgalore_{run}_cpu_step.csv", [{
            "m": 64, "n": 32, "rank": 8, "grad_dtype": "float32", "qgalore_over_ours": 3.0,
            "ours_over_floor": 1.3}], machine)
        harness.write_csv(tmp_path / f"refresh_{run}.csv", [{
            "device": "cpu", "shape": "s", "m": 64, "n": 32, "rank": 8, "svd_ms": 100.0,
            "dct_fft_ms": ours / 10.0, "gemm_ms": 2.0}], machine)
    path = cpu_ratios.aggregate(tmp_path, 3, list(cpu_ratios.SCRIPTS), tmp_path / "out")
    header, rows = harness.read_csv(path)
    assert "8-bit Adam" in header["q-galore-torch*"]
    by = {(r["bench"], r["ratio"]): r for r in rows}
    galore = by[("cpu_step", "galore-torch / ours")]
    assert (galore["min"], galore["median"], galore["max"]) == ("1.25", "2.0", "2.5")
    assert galore["loadavg_1m"] == "1.0 5.5 2.0"
    assert by[("refresh", "svd / dct_select")]["max"] == "100.0"


@pytest.mark.parametrize("peer", ["fira", "apollo"])
@pytest.mark.parametrize("m,n", [(128, 256), (256, 128)])
def test_fira_and_apollo_torch_models_equal_their_executed_kernels(peer, m, n):
    """bench.traffic.fira_torch / apollo_torch against the aten kernels the peers' steps run
    (scalar kernels of the limiter, 0 bytes, left out)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(m, n, dtype=torch.bfloat16))
    group = {"params": [p], "rank": 8, "update_proj_gap": 1000, "proj_type": "std"}
    if peer == "fira":
        fira = pytest.importorskip("fira")
        opt = fira.FiraAdamW([{**group, "alpha": 0.25}], lr=1e-3, weight_decay=0.1,
                             no_deprecation_warning=True)
        modelled = traffic.fira_torch(m, n, 8, torch.bfloat16)
    else:
        apollo_torch = pytest.importorskip("apollo_torch")
        opt = apollo_torch.APOLLOAdamW([{**group, "proj": "random", "scale_type": "channel",
                                         "scale": 0.25}], lr=1e-3, weight_decay=0.1)
        modelled = traffic.apollo_torch(m, n, 8, torch.bfloat16)
    p.grad = torch.randn_like(p)
    opt.step()
    opt.step()  # the limiter's state exists: the measured step limits
    measured = traffic.measure_torch(opt.step)
    assert [(a.read, a.write) for a in measured.accesses if a.read or a.write] == [
        (a.read, a.write) for a in modelled.accesses]


def test_full_rank_cpu_benchmark_times_ours_against_fira_and_apollo_torch():
    pytest.importorskip("fira")
    pytest.importorskip("apollo_torch")
    from bench import bench_cpu_full_rank

    row = bench_cpu_full_rank.bench_case(96, 40, 8, warmup=1, rounds=2)
    for key in ("floor", "ours_fira", "fira", "ours_apollo", "ours_apollo_gen", "apollo"):
        assert row[f"{key}_ms"] > 0
    for ratio, num, den in (("fira_over_ours", "fira", "ours_fira"),
                            ("apollo_over_ours", "apollo", "ours_apollo")):
        # the row's times are rounded to 0.001 ms (these tiny shapes take ~0.03 ms), its ratios
        # come from the unrounded times: allow each time's rounding error
        a, b = row[f"{num}_ms"], row[f"{den}_ms"]
        slack = (a / b) * (0.0005 / a + 0.0005 / b) + 0.0005
        assert abs(row[ratio] - a / b) <= slack, (ratio, row)
