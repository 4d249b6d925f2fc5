"""bench/memory.py: the meta-device accounting of our presets equals the state a real training
step allocates, tensor bytes for tensor bytes, and follows the rank."""

import dataclasses
import math

import pytest
import torch

import lowrank_kernels as lk
from bench import harness, memory
from lowrank_kernels.autograd import register_float_grad_hook

pytestmark = [pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]

# every shape projected on both sides, INT8 group boundaries inside rows, vocab above hidden
TINY = harness.ModelShape("llama-tiny-test", hidden=64, intermediate=96, layers=2, heads=2,
                          rank=8, vocab=300)
OURS = list(memory.OUR_CONFIGS)


def _real_account(key: str, cfg: harness.ModelShape) -> memory.Account:
    """The same configuration trained for real on CPU: a LlamaForCausalLM forward and backward
    (through the layer-wise hooks for layer-wise rows), then step(); state summed as on meta."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    net = memory._model_for(key, cfg, torch.bfloat16, device="cpu")
    opt, params, trainer = memory.build_optimizer(key, net, cfg)
    tokens = torch.randint(0, cfg.vocab, (2, 9))
    logits = net(tokens[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab),
                                      tokens[:, 1:].reshape(-1)).backward()
    if trainer is None:
        opt.step()
    else:  # the hooks stepped every weight during backward and freed its gradient
        assert all(p.grad is None and getattr(p, "float_grad", None) is None for p in params)
        memory.set_gradients(params, activation_dtype=torch.bfloat16)  # only for their bytes
    assert all(len(opt.state[p]) > 0 for p in params)
    return memory.account_state("", params, opt.state, layerwise=trainer is not None)


@pytest.mark.parametrize("key", OURS)
def test_meta_accounting_equals_a_real_training_step(key):
    (meta,) = memory.accounting(TINY.name, torch.bfloat16, [key], verbose=False,
                                model_cfg=TINY)
    real = _real_account(key, TINY)
    for field in ("weights", "grads_all", "grads_layer", "optimizer_state", "projection"):
        assert getattr(meta, field) == getattr(real, field), field
    assert meta.total == real.total and meta.layerwise == memory.OUR_CONFIGS[key].layerwise
    # APOLLOAdamW's random basis is generated from its seed in each step: no projection bytes
    seeded = memory.OUR_CONFIGS[key].preset == "APOLLOAdamW"
    assert (meta.projection == 0 if seeded else meta.projection > 0)
    assert meta.optimizer_state > 0


def test_int8_preset_weights_are_codes_plus_fp32_group_parameters():
    (acc,) = memory.accounting(TINY.name, torch.bfloat16, ["ours-QGaLoreAdamW"],
                               verbose=False, model_cfg=TINY)
    codes = TINY.layers * sum(m * n + 2 * 4 * math.ceil(m * n / 256)
                              for m, n in TINY.linear_shapes().values())
    assert acc.weights == codes + 2 * TINY.other_params()  # the rest stays bf16
    assert acc.grads_all == 2 * TINY.total_params()  # float_grad in bf16, like .grad


@pytest.mark.parametrize("key", ["ours-GaLoreAdamW", "ours-QGaLoreAdamW", "ours-DCTAdamW"])
def test_projection_bytes_follow_the_rank(key):
    def account(rank):
        cfg = dataclasses.replace(TINY, rank=rank)
        (acc,) = memory.accounting(cfg.name, torch.bfloat16, [key], verbose=False,
                                   model_cfg=cfg)
        return acc

    small, large = account(8), account(16)
    shapes = list(TINY.linear_shapes().values())
    per_rank = {  # bytes of one rank's worth of projection state, over every projected weight
        "ours-GaLoreAdamW": 2 * TINY.layers * sum(min(s) for s in shapes),  # bf16 basis
        "ours-DCTAdamW": 4 * TINY.layers * len(shapes),  # one int32 index
    }
    if key in per_rank:
        assert small.projection == 8 * per_rank[key]
        assert large.projection == 16 * per_rank[key]
    else:  # packed INT4: r·d/2 bytes + fp32 scale and zero per 256 codes (r·d = 512 or 1024)
        assert small.projection == TINY.layers * sum(8 * min(s) // 2 + 2 * 4 * 2 for s in shapes)
        assert large.projection == TINY.layers * sum(16 * min(s) // 2 + 2 * 4 * 4
                                                     for s in shapes)
    # default moments of bf16 weights (bf16): 2 × r × max(m, n) × 2 bytes each
    moments = 2 * 2 * 8 * TINY.layers * sum(max(s) for s in shapes)
    assert large.optimizer_state - small.optimizer_state == moments
    assert large.weights == small.weights and large.grads_all == small.grads_all


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_default_galore_adamw_holds_galore_torchs_optimizer_bytes(dtype):
    """The drop-in never holds more optimizer memory than galore-torch: its default moments
    take the weight's dtype (bf16 ones stochastically rounded), fp32 moments are opt-in."""
    pytest.importorskip("galore_torch")
    theirs, ours, ours_fp32 = memory.accounting(
        TINY.name, dtype, ["galore-torch", "ours-GaLoreAdamW", "ours-GaLoreAdamW-fp32"],
        verbose=False, model_cfg=TINY)
    assert ours.optimizer_state == theirs.optimizer_state
    assert ours.projection == theirs.projection
    if dtype == torch.bfloat16:
        projected_moments = 2 * 2 * TINY.rank * TINY.layers * sum(
            max(s) for s in TINY.linear_shapes().values())
        assert ours_fp32.optimizer_state - ours.optimizer_state == projected_moments


@pytest.mark.parametrize("key", ["ours-GaLoreAdamW", "ours-QGaLoreAdamW"])
def test_layerwise_rows_hold_only_the_largest_gradient(key):
    plain, layerwise = memory.accounting(TINY.name, torch.bfloat16, [key, f"{key}-layerwise"],
                                         verbose=False, model_cfg=TINY)
    assert layerwise.layerwise and not plain.layerwise
    # embedding / lm_head, bf16 (the INT8 layers' float_grad are bf16 too, and smaller)
    assert layerwise.grads_held == 2 * TINY.vocab * TINY.hidden
    assert plain.grads_held == 2 * TINY.total_params()
    assert plain.total - layerwise.total == plain.grads_held - layerwise.grads_held
    assert plain.weights == layerwise.weights  # INT8 codes in both Q-GaLore rows


@pytest.mark.parametrize("key", ["ours-GaLoreAdamW", "ours-GaLoreAdamW-layerwise",
                                 "ours-QGaLoreAdamW", "ours-QGaLoreAdamW-layerwise"])
def test_gradients_held_during_backward_are_the_accounted_ones(key):
    """Observed, not assumed: at every gradient's arrival, the bytes of all gradients alive
    (.grad and INT8 codes' float_grad; hooks registered before the layer-wise trainer's, so they
    see the new gradient before it is stepped and freed) peak at the accounted grads_held."""
    pytest.importorskip("transformers")
    (meta,) = memory.accounting(TINY.name, torch.bfloat16, [key], verbose=False,
                                model_cfg=TINY)
    torch.manual_seed(0)
    net = memory._model_for(key, TINY, torch.bfloat16, device="cpu")
    params = list(net.parameters())
    alive = []

    def observe(_):
        grads = (p.grad if p.grad is not None else getattr(p, "float_grad", None) for p in params)
        alive.append(sum(memory._nbytes(g) for g in grads if g is not None))

    for p in params:
        if p.dtype == torch.uint8:
            register_float_grad_hook(p, observe)
        else:
            p.register_post_accumulate_grad_hook(observe)
    memory.build_optimizer(key, net, TINY)
    tokens = torch.randint(0, TINY.vocab, (2, 9))
    logits = net(tokens[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.float().reshape(-1, TINY.vocab),
                                      tokens[:, 1:].reshape(-1)).backward()
    assert len(alive) == len(params)
    assert max(alive) == meta.grads_held


# --------------------------------------------------------------------------------------------
# the full step budget: activations and the largest temporary
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seq,batch", [(16, 1), (12, 3)])
def test_activation_formula_is_what_autograd_saves(seq, batch):
    """memory.Activations' per-layer and head terms equal the bytes of the tensors autograd
    saves in LlamaForCausalLM's forward and loss (meta device, FlashAttention's saves), each
    storage counted once: one layer = saved(2 layers) − saved(1 layer); the rest = the head
    (less the logits the loop holds, which autograd does not save), RoPE's cos/sin, the int64
    tokens and the loss's fp32 total weight."""
    pytest.importorskip("transformers")
    acts = memory.activation_bytes(TINY, seq, batch)
    one = memory.saved_tensor_bytes(TINY, 1, seq, batch)
    two = memory.saved_tensor_bytes(TINY, 2, seq, batch)
    tokens = seq * batch
    assert two - one == acts.layer
    rope = 2 * 2 * seq * (TINY.hidden // TINY.heads)  # one cos/sin per position
    logits_held = 2 * tokens * TINY.vocab
    # the token batch (inputs are a view of it); the targets tokens[:, 1:] are one too for a
    # single sequence, a reshaped copy for several
    token_ids = 8 * batch * (seq + 1) + (8 * tokens if batch > 1 else 0)
    assert one == acts.layer + acts.head - logits_held + rope + token_ids + 4
    assert acts.checkpoints == TINY.layers * 2 * tokens * TINY.hidden + rope
    assert acts.total == acts.checkpoints + max(acts.layer, acts.head)


def test_step_budget_rows_add_up():
    """Every row of the step budget: weights + grads held + states + projection + activations +
    the largest temporary = total; the temporary is the largest of its phases (a layer-wise DCT
    row has no SVD: its largest is the dense AdamW of one parameter)."""
    keys = ["ours-GaLoreAdamW", "ours-DCTAdamW-layerwise", "ours-GradNormLoRPAdamW"]
    rows = memory.step_budget(TINY.name, torch.bfloat16, keys, svd_per_element=20.0,
                              seq=16, batch=1, model_cfg=TINY)
    assert [r["optimizer"] for r in rows[:3]] == [memory.OUR_CONFIGS[k].label for k in keys]
    for row in rows:
        parts = sum(row[k] for k in ("weights_GiB", "grads_held_GiB", "optimizer_GiB",
                                     "projection_GiB", "activations_GiB",
                                     "largest_temporary_GiB"))
        assert abs(parts - row["total_GiB"]) < 5e-3
    dct = memory.largest_temporary("ours-DCTAdamW-layerwise", TINY, torch.bfloat16, 20.0)
    assert dct.nbytes == 2 * TINY.vocab * TINY.hidden  # one bf16 embedding, torch's foreach √V
    svd = memory.largest_temporary("ours-GaLoreAdamW", TINY, torch.bfloat16, 1e3)
    assert svd.what.startswith("SVD refresh") and svd.nbytes == 1e3 * 96 * 64


def test_the_10gib_row_counts_the_randomized_refresh_and_the_adafactor_chunks():
    """The <= 10 GiB configuration refreshes by randomized SVD (its own bytes per element) and
    steps the embeddings and lm_head by Adafactor in row chunks: four fp32 chunks at most."""
    key = "ours-QGaLoreAdamW-layerwise-10gib"
    rsvd = memory.largest_temporary(key, TINY, torch.bfloat16, 20.0, 1e3)
    assert rsvd.what.startswith("randomized SVD refresh") and rsvd.nbytes == 1e3 * 96 * 64
    dense = memory.largest_temporary(key, TINY, torch.bfloat16, 20.0, 1.0)
    assert dense.what.startswith("dense Adafactor")
    assert dense.nbytes == 4 * 4 * TINY.vocab * TINY.hidden  # below one chunk: the whole matrix
    (acc,) = memory.accounting(TINY.name, torch.bfloat16, [key], verbose=False, model_cfg=TINY)
    assert "factored fp32 V" in acc.note and "Adafactor" in acc.note
