"""The optimizer API catches mistakes and defaults to galore-torch's memory: unknown group keys,
moment dtypes per weight dtype and preset, checkpoints of the defaults, bf16 parity with
galore-torch, the package's public names."""

import importlib
import inspect
import re
import warnings

import pytest
import torch
from cases import (
    assert_lowp_close,
    assert_resumes_bit_for_bit,
    mlp_batches,
    mlp_param_groups,
    save_load,
    small_mlp,
    train_steps,
)

import lowrank_kernels as lk
from lowrank_kernels import _dispatch, ops
from lowrank_kernels.optim import (
    GROUP_KEYS_WITHOUT_DEFAULT,
    DCTAdamW,
    GaLoreAdamW,
    LowRankAdamW,
    QGaLoreAdamW,
    moment_dtype,
)

pytestmark = [pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]

PRESETS = [LowRankAdamW, GaLoreAdamW, QGaLoreAdamW, DCTAdamW]


# ---------------------------------------------------------------------------------------------
# unknown keys
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: c.__name__)
def test_a_typo_in_a_group_key_raises_naming_the_key_the_group_and_the_accepted_keys(preset):
    groups = mlp_param_groups(small_mlp(), rank=4)
    groups[1]["rnak"] = groups[1].pop("rank")
    with pytest.raises(ValueError, match=r"parameter group 1 \('0.weight', '2.weight', "
                                         r"'4.weight'\): unknown key 'rnak' \(did you mean "
                                         r"'rank'\?\); accepted keys: .*\brank\b.*"
                                         r"\bupdate_proj_gap\b"):
        preset(groups)


def test_unknown_keys_raise_in_groups_without_rank_and_in_add_param_group():
    model = small_mlp()
    with pytest.raises(ValueError, match=r"parameter group 0: unknown key 'weight_decy' "
                                         r"\(did you mean 'weight_decay'\?\)"):
        LowRankAdamW([{"params": list(model.parameters()), "weight_decy": 0.1}])
    optimizer = LowRankAdamW([{"params": [model[0].weight], "rank": 4}])
    with pytest.raises(ValueError, match=r"parameter group 1: unknown key 'scael'"):
        optimizer.add_param_group({"params": [model[2].weight], "rank": 4, "scael": 0.25})
    assert len(optimizer.param_groups) == 1  # nothing was added


@pytest.mark.parametrize("key,value,hint", [
    ("quant", True, "use proj_bits=4"),
    ("quant_group_size", 256, "use proj_group_size"),
    ("cos_threshold", 0.4, "refresh_threshold"),
    ("gamma_proj", 2, "refresh_growth"),
    ("alpha", 0.25, "use scale"),
    ("proj", "random", "use projection"),
    ("amsgrad", False, "AMSGrad is not implemented"),
])
def test_peer_keys_raise_with_the_name_to_use(key, value, hint):
    groups = mlp_param_groups(small_mlp(), rank=4, **{key: value})
    with pytest.raises(ValueError, match=f"unknown key '{key}' \\(.*{hint}"):
        QGaLoreAdamW(groups)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: c.__name__)
def test_a_typo_in_a_constructor_argument_raises(preset):
    with pytest.raises(TypeError, match="rnak"):
        preset(mlp_param_groups(small_mlp(), rank=4), rnak=4)


def test_galore_torch_groups_named_parameters_and_scheduler_keys_are_accepted():
    """galore-torch's group keys, torch's (name, tensor) pairs, and the keys LR schedulers write
    into the groups: an optimizer rebuilt from a scheduled optimizer's groups is accepted."""
    model = small_mlp()
    named = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [(n, p) for n, p in model.named_parameters() if not n.endswith("weight")]
    optimizer = GaLoreAdamW([{"params": rest},
                             {"params": named, "rank": 4, "update_proj_gap": 2, "scale": 0.25,
                              "proj_type": "std"}], lr=1e-2, weight_decay=0.1, correct_bias=True)
    assert optimizer.param_groups[1]["param_names"] == ["0.weight", "2.weight", "4.weight"]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.02, total_steps=10)
    train_steps(model, optimizer, mlp_batches(2))
    scheduler.step()
    assert {"initial_lr", "max_lr", "min_lr", "max_momentum",
            "base_momentum"} <= set(optimizer.param_groups[1])
    rebuilt = GaLoreAdamW(optimizer.param_groups)
    train_steps(model, rebuilt, mlp_batches(1))


def test_every_documented_group_key_is_accepted_and_every_accepted_key_is_documented():
    """The class docstring's table lists every key a group may carry, besides torch's and its
    schedulers' (the docstring names those in prose)."""
    doc = inspect.getdoc(LowRankAdamW)
    lines = doc.split("**Group keys**")[1].splitlines()
    rules = [i for i, line in enumerate(lines) if re.fullmatch(r"=+ +=+", line)]
    rows = [line for line in lines[rules[0] + 1:rules[1]] if line and not line.startswith(" ")]
    documented = {key.strip() for row in rows for key in row.split("  ")[0].split(",") if key}
    defaults = set(LowRankAdamW(mlp_param_groups(small_mlp(), rank=4)).defaults)
    accepted = defaults | set(GROUP_KEYS_WITHOUT_DEFAULT)
    torch_keys = {"params", "param_names", "initial_lr", "max_lr", "min_lr", "max_momentum",
                  "base_momentum", "swa_lr"}
    assert documented == accepted - torch_keys


def test_lr_scheduler_drives_the_projected_step():
    """LambdaLR halves lr each step: the same run as an optimizer whose lr is set by hand."""
    batches = mlp_batches(4)
    runs = []
    for scheduled in (True, False):
        model = small_mlp()
        optimizer = GaLoreAdamW(mlp_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
        scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
                     if scheduled else None)
        for step, batch in enumerate(batches):
            if not scheduled:
                for group in optimizer.param_groups:
                    group["lr"] = 1e-2 * 0.5**step
            train_steps(model, optimizer, [batch])
            if scheduler is not None:
                scheduler.step()
        runs.append(model)
    for a, b in zip(*(m.parameters() for m in runs)):
        assert torch.equal(a, b)


def test_checkpoints_are_not_checked_for_unknown_keys():
    """A checkpoint written before keys were checked may carry any key: it still loads (its
    groups are the saved ones, as torch loads them)."""
    model = small_mlp()
    optimizer = GaLoreAdamW(mlp_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
    train_steps(model, optimizer, mlp_batches(2))
    saved = save_load(optimizer.state_dict())
    saved["param_groups"][1]["quant"] = True  # e.g. copied from a q-galore-torch recipe
    fresh = GaLoreAdamW(mlp_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
    fresh.load_state_dict(saved)
    train_steps(model, fresh, mlp_batches(1))
    assert int(fresh.state[model[0].weight]["step"]) == 3


# ---------------------------------------------------------------------------------------------
# moment dtypes
# ---------------------------------------------------------------------------------------------
def _weight(dtype: torch.dtype, m: int = 40, n: int = 24) -> torch.nn.Parameter:
    w = 0.02 * torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    if dtype != torch.uint8:
        return torch.nn.Parameter(w.to(dtype))
    codes, scales, zeros = ops.quantize_int8(w)
    p = torch.nn.Parameter(codes, requires_grad=False)
    p.scales, p.zeros = scales, zeros
    return p


AUTO_MOMENTS = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16,
                torch.float16: torch.bfloat16, torch.uint8: torch.bfloat16}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("weight_dtype", list(AUTO_MOMENTS), ids=str)
def test_default_moments_follow_the_weight_and_fp32_is_one_argument_away(preset, weight_dtype):
    for kwargs, expected in (({}, AUTO_MOMENTS[weight_dtype]),
                             ({"state_dtype": torch.float32}, torch.float32),
                             ({"state_dtype": torch.bfloat16}, torch.bfloat16)):
        p = _weight(weight_dtype)
        optimizer = preset([{"params": [p], "rank": 4}], **kwargs)
        state = optimizer.init_state(p)
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == expected
        assert moment_dtype(optimizer.param_groups[0]["state_dtype"], p) == expected


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.uint8], ids=str)
def test_a_step_with_default_moments_stores_them_in_bf16(weight_dtype):
    p = _weight(weight_dtype)
    optimizer = QGaLoreAdamW([{"params": [p], "rank": 4}], lr=1e-2)
    grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
    if weight_dtype == torch.uint8:
        p.float_grad = grad
    else:
        p.grad = grad.to(weight_dtype)
    optimizer.step()
    assert optimizer.state[p]["exp_avg"].dtype == torch.bfloat16
    assert optimizer.state[p]["exp_avg_sq"].abs().max() > 0


def test_unprojected_parameters_keep_moments_in_their_own_dtype():
    model = small_mlp(dtype=torch.bfloat16)
    optimizer = GaLoreAdamW(mlp_param_groups(model, rank=4), lr=1e-2)
    train_steps(model, optimizer, mlp_batches(1, dtype=torch.bfloat16))
    assert optimizer.state[model[0].bias]["exp_avg"].dtype == torch.bfloat16  # as galore-torch


@pytest.mark.parametrize("preset", [GaLoreAdamW, QGaLoreAdamW], ids=lambda c: c.__name__)
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_default_moments_resume_bit_for_bit_from_a_weights_only_checkpoint(preset,
                                                                            weight_dtype):
    def make(model):
        return preset(mlp_param_groups(model, rank=5, update_proj_gap=3, scale=0.25),
                      lr=1e-2, weight_decay=0.05)

    model, optimizer = assert_resumes_bit_for_bit(make, mlp_batches(8, dtype=weight_dtype),
                                                  weight_dtype)
    assert optimizer.state_dict()["param_groups"][1]["state_dtype"] == "auto"
    assert optimizer.state[model[0].weight]["exp_avg"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# bf16 weights against galore-torch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n", [(40, 24), (24, 40)], ids=["right", "left"])
def test_bf16_weights_track_galore_torch_within_the_bf16_rule(m, n):
    """bf16 weights, 12 steps, refreshes at 0 and 6, the same gradients: our GaLoreAdamW with its
    default (bf16, stochastically rounded) moments is at most 2× as far from galore-torch's fp32
    run as galore-torch's own bf16 run (bf16 matmuls, nearest-rounded bf16 moments) is."""
    galore_torch = pytest.importorskip("galore_torch")
    gen = torch.Generator().manual_seed(5)
    w0 = (0.02 * torch.randn(m, n, generator=gen)).bfloat16()
    grads = [torch.randn(m, n, generator=gen).bfloat16() for _ in range(12)]

    def run(cls, dtype):
        p = torch.nn.Parameter(w0.to(dtype, copy=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            optimizer = cls([{"params": [p], "rank": 6, "update_proj_gap": 6, "scale": 0.25,
                              "proj_type": "std"}], lr=1e-2, weight_decay=0.1)
        for g in grads:
            p.grad = g.to(dtype)
            optimizer.step()
        return p.detach(), optimizer

    exact, _ = run(galore_torch.GaLoreAdamW, torch.float32)
    plain, _ = run(galore_torch.GaLoreAdamW, torch.bfloat16)
    ours, optimizer = run(GaLoreAdamW, torch.bfloat16)
    assert optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"].dtype == (
        torch.bfloat16)
    assert_lowp_close(ours, exact, plain, before=w0)


# ---------------------------------------------------------------------------------------------
# the package's public names
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["lowrank_kernels", "lowrank_kernels.optim"])
def test_all_lists_every_public_name_of_the_package(module):
    mod = importlib.import_module(module)
    # classes and functions of the package (submodules are listed where they are public API)
    public = {name for name, value in vars(mod).items()
              if not name.startswith("_") and not inspect.ismodule(value)
              and getattr(value, "__module__", "").startswith("lowrank_kernels")}
    assert public <= set(mod.__all__), public - set(mod.__all__)
    for name in mod.__all__:
        assert hasattr(mod, name), name


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_backend_switch_reaches_every_projected_step(backend, monkeypatch):
    """``backend=`` goes to lowrank_kernels.ops (resolved once per group and step): the same
    trajectory as the default (the dispatcher's C++) kernel, and the chosen backend ran."""
    if backend == "triton":
        pytest.importorskip("triton")
    ran = []
    real = _dispatch.kernel
    monkeypatch.setattr(_dispatch, "kernel",
                        lambda op, chosen, device: ran.append(chosen) or real(op, chosen, device))
    batches = mlp_batches(3)
    models = []
    for choice in (None, backend):
        model = small_mlp()
        train_steps(model, GaLoreAdamW(mlp_param_groups(model, rank=4, update_proj_gap=2),
                                       lr=1e-2, weight_decay=0.1, backend=choice), batches)
        models.append(model)
    # the default run calls torch.ops.lowrank directly (no lookup); the forced one, its backend
    assert ran and set(ran) == {backend}
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
