"""A tiny LLaMA (2 layers, hidden 64) trains on CPU for 50 steps with each optimizer and its loss
falls; the numbers of bench/tiny_llama.py come from the same training function."""

import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels.optim import GaLoreAdamW

pytest.importorskip("transformers")
from bench import tiny_llama

pytestmark = [pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="extension not built"),
              pytest.mark.usefixtures("one_thread")]



@pytest.mark.parametrize("name", list(tiny_llama.OPTIMIZERS))
def test_tiny_llama_loss_falls(name):
    if name.startswith("galore-torch"):
        pytest.importorskip("galore_torch")
    losses = tiny_llama.train(name, steps=50)
    start, end = tiny_llama.start_end(losses)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert end < start - 0.5, f"{name}: loss {start:.3f} -> {end:.3f}"


def test_8bit_moments_end_within_1_percent_of_fp32_moments():
    """Issue 16's quality bar on a real model: GaLoreAdamW with 8-bit moments ends (mean loss
    of the last 5 of 50 steps) within 1 % of the same run with fp32 moments."""
    fp32 = tiny_llama.start_end(tiny_llama.train("GaLoreAdamW"))[1]
    eight = tiny_llama.start_end(tiny_llama.train("GaLoreAdamW 8-bit moments"))[1]
    assert abs(eight - fp32) / fp32 < 0.01, (eight, fp32)
    assert eight != fp32


def test_projected_weights_move_and_galore_matches_galore_torch(monkeypatch):
    """The projected (attention/MLP) weights really train, and our GaLoreAdamW stays on
    galore-torch's loss curve over 20 steps of a real model (SVD refreshes at steps 1 and 11).

    The reference backend computes in galore-torch's order: the same losses bit for bit. The C++
    kernel's GEMMs round otherwise (fp32 rounding apart per step): the same losses to an ulp up
    to the second refresh; that refresh takes the SVD of a gradient those roundings moved, and
    where singular values around the rank are close the kept subspace moves more than the
    gradient did, so from there the curves are only close (measured: 2.4e-7 before, 2.1e-3
    after, at one thread)."""
    pytest.importorskip("galore_torch")
    monkeypatch.setitem(tiny_llama.OPTIMIZERS, "GaLoreAdamW reference", lambda m: GaLoreAdamW(
        tiny_llama.lowrank_param_groups(m, tiny_llama.TARGETS, **tiny_llama.GALORE), lr=1e-2,
        backend="reference"))
    theirs = tiny_llama.train("galore-torch GaLoreAdamW", steps=20)
    assert tiny_llama.train("GaLoreAdamW reference", steps=20) == theirs
    ours = tiny_llama.train("GaLoreAdamW", steps=20)
    gap = tiny_llama.GALORE["update_proj_gap"]
    assert max(abs(a - b) for a, b in zip(ours[:gap + 1], theirs[:gap + 1])) < 1e-6
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-2

    tokens, vocab = tiny_llama.corpus()
    model = tiny_llama.tiny_llama(vocab)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    optimizer = tiny_llama.OPTIMIZERS["GaLoreAdamW"](model)
    for ids in tiny_llama.batches(tokens, 3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    weight = model.model.layers[0].mlp.down_proj.weight
    assert "proj" in optimizer.state[weight]
    assert (weight - before).abs().max() > 1e-3
