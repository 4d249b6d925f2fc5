"""lowrank_kernels.integrations.transformers: targets, optim_args, and a real Trainer run."""

import pytest
import torch

import lowrank_kernels as lk

transformers = pytest.importorskip("transformers")
from bench import tiny_llama
from lowrank_kernels.integrations.transformers import (
    build_optimizer,
    lowrank_param_groups,
    optimizer_cls_and_kwargs,
    parse_optim_args,
    target_linear_names,
)
from lowrank_kernels.optim import GaLoreAdamW, LowRankAdagrad, LowRankAdamW

pytestmark = pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built")

ATTN_MLP = {f"model.layers.{i}.{block}.{proj}" for i in range(2)
            for block, projs in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                 ("mlp", ("gate_proj", "up_proj", "down_proj")))
            for proj in projs}


@pytest.fixture(scope="module")
def model():
    _, vocab = tiny_llama.corpus()
    return tiny_llama.tiny_llama(vocab)


def test_target_modules_names_regex_and_all_linear(model):
    assert set(target_linear_names(model, ["attn", "mlp"])) == ATTN_MLP
    assert set(target_linear_names(model, r".*\.(self_attn|mlp)\..*")) == ATTN_MLP
    assert set(target_linear_names(model, "all-linear")) == ATTN_MLP | {"lm_head"}
    assert target_linear_names(model, ["model.layers.1.mlp.up_proj"]) == [
        "model.layers.1.mlp.up_proj"]
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        target_linear_names(model, ["embed_tokens"])  # an Embedding, not a Linear


def test_param_groups_cover_every_parameter_once(model):
    groups = lowrank_param_groups(model, ["attn", "mlp"], rank=8)
    assert [g.get("rank") for g in groups] == [None, 8]
    assert set(groups[1]["names"]) == {f"{n}.weight" for n in ATTN_MLP}
    held = [id(p) for g in groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in model.parameters())


def test_param_groups_include_int8_weight_codes():
    """Int8Linear codes do not require grad (float_grad carries dL/dW) yet must be stepped."""
    _, vocab = tiny_llama.corpus()
    net = tiny_llama.tiny_llama(vocab)
    replaced = lk.replace_linear_with_int8(net, lambda name: "mlp" in name)
    assert replaced
    groups = lowrank_param_groups(net, ["attn", "mlp"], rank=8)
    assert set(groups[1]["names"]) == {f"{n}.weight" for n in ATTN_MLP}
    assert sum(p.dtype == torch.uint8 for p in groups[1]["params"]) == len(replaced)
    held = [id(p) for g in groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in net.parameters())


def test_optim_args_are_typed_and_checked():
    assert parse_optim_args("rank=64, update_proj_gap=50,scale=0.25,refresh=lazy") == {
        "rank": 64, "update_proj_gap": 50, "scale": 0.25, "refresh": "lazy"}
    with pytest.raises(ValueError, match="optim_args"):
        parse_optim_args("rnak=64")
    assert parse_optim_args("state_dtype=bf16") == {"state_dtype": torch.bfloat16}
    assert parse_optim_args("state_dtype=8bit") == {"state_dtype": "8bit"}
    with pytest.raises(ValueError, match="state_dtype expected one of"):
        parse_optim_args("state_dtype=int8")


def _args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=1, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, **kw)


def _dataset():
    tokens, _ = tiny_llama.corpus()
    return [{"input_ids": ids, "labels": ids} for ids in
            torch.cat(tiny_llama.batches(tokens, 4))]


@pytest.mark.parametrize("route", ["optimizers", "optimizer_cls_and_kwargs"])
def test_trainer_trains_with_our_optimizer(tmp_path, route):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    _, vocab = tiny_llama.corpus()
    model = tiny_llama.tiny_llama(vocab)
    args = _args(tmp_path, optim_target_modules=["attn", "mlp"],
                 optim_args="rank=8,update_proj_gap=2,scale=0.25")
    if route == "optimizers":
        extra = {"optimizers": (build_optimizer(model, args), None)}
    else:
        extra = {"optimizer_cls_and_kwargs": optimizer_cls_and_kwargs(model, args)}
    before = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(), **extra)
    trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") \
        else trainer.optimizer
    assert isinstance(optimizer, GaLoreAdamW)
    weight = model.model.layers[1].mlp.down_proj.weight
    state = optimizer.state[weight]
    assert int(state["step"]) == 4 and int(state["proj_refreshes"]) == 2  # steps 0 and 2
    assert state["exp_avg"].shape == (8, 128)  # 64×128 weight, left side: r×n
    assert (weight - before).abs().max() > 1e-3
    assert optimizer.param_groups[1]["lr"] != 1e-2  # the Trainer's scheduler drove the lr


def test_preset_choice_and_keyword_overrides(model, tmp_path):
    args = _args(tmp_path, optim_target_modules="all-linear", optim_args="rank=4")
    cls, kwargs = optimizer_cls_and_kwargs(model, args, optimizer="lowrank", rank=6,
                                           projection="random")
    assert cls is LowRankAdamW
    assert kwargs["params"][1]["rank"] == 6 and kwargs["params"][1]["projection"] == "random"
    assert kwargs["eps"] == args.adam_epsilon and kwargs["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="optimizer"):
        optimizer_cls_and_kwargs(model, args, optimizer="sgd")


@pytest.mark.parametrize("name", ["adagrad", "lowrank_adagrad"])
def test_adagrad_with_8bit_moments_from_training_arguments(model, tmp_path, name):
    args = _args(tmp_path, optim_target_modules=["attn", "mlp"],
                 optim_args="rank=4,update_proj_gap=2,state_dtype=8bit")
    cls, kwargs = optimizer_cls_and_kwargs(model, args, optimizer=name)
    assert cls is LowRankAdagrad and "betas" not in kwargs and "eps" not in kwargs
    optimizer = build_optimizer(model, args, optimizer=name)
    assert isinstance(optimizer, LowRankAdagrad)
    assert optimizer.param_groups[1]["state_dtype"] == "8bit"
    assert optimizer.param_groups[1]["weight_decay"] == 0.01


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_layerwise_training_with_gradient_checkpointing_equals_ordinary_training(reentrant):
    """transformers' gradient checkpointing (the way a 7B model fits one GPU with layer-wise
    steps): each decoder layer is a checkpointed segment; with use_reentrant=True each one's
    backward is a nested graph task (see lowrank_kernels.optim.layerwise). The embedding and
    head are not checkpointed here; test_optim_layerwise covers models where every weight is."""
    from lowrank_kernels.optim import layerwise

    tokens, vocab = tiny_llama.corpus()
    data = tiny_llama.batches(tokens, 3)

    def make_model():
        model = tiny_llama.tiny_llama(vocab)
        model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model.train()
        return model

    def make_optimizer(model):
        return GaLoreAdamW(lowrank_param_groups(model, rank=8, update_proj_gap=2, scale=0.25),
                           lr=1e-2)

    expected = make_model()
    optimizer = make_optimizer(expected)
    for ids in data:
        expected(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model = make_model()
    trainer = layerwise(model, make_optimizer)
    for ids in data:
        model(input_ids=ids, labels=ids).loss.backward()
    assert (trainer.micro_steps, trainer.optimizer_steps) == (3, 3)
    for (name, a), b in zip(model.named_parameters(), expected.parameters()):
        assert torch.equal(a, b), name
