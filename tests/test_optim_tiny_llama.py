"""A tiny LLaMA (2 layers, hidden 64) trains on CPU for 50 steps with each optimizer and its loss
falls; the numbers of bench/tiny_llama.py come from the same training function."""

import pytest
import torch

import lowrank_kernels as lk

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


def test_projected_weights_move_and_galore_matches_galore_torch():
    """The projected (attention/MLP) weights really train, and our GaLoreAdamW stays on
    galore-torch's loss curve over 50 steps of a real model."""
    pytest.importorskip("galore_torch")
    ours = tiny_llama.train("GaLoreAdamW", steps=20)
    theirs = tiny_llama.train("galore-torch GaLoreAdamW", steps=20)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-3

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
