"""Trains a tiny LLaMA on CPU with each optimizer and prints its loss (start → end).

    python bench/tiny_llama.py [--steps 50]

Model: transformers LlamaConfig, hidden 64, 2 layers, 4 heads, MLP 128, random init (seed 0).
Data: character-level "The Zen of Python" (packaged with Python as ``this``), batches of 4
sequences of 32 characters drawn with a fixed generator, the same for every optimizer. GaLore-style
optimizers project the attention and MLP Linear weights (rank 16, gap 10, scale 0.25, lr 1e-2, the
galore recipe's lr and scale); embeddings, norms and the head take AdamW at the same lr. AdamW
itself runs at lr 3e-3. "start" is the mean loss of the first 5 steps, "end" of the last 5.
tests/test_optim_tiny_llama.py runs the same training and checks that each loss falls.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import io
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lowrank_kernels.integrations.transformers import lowrank_param_groups
from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW, LowRankAdamW, QGaLoreAdamW

SEQ, BATCH = 32, 4
GALORE = dict(rank=16, update_proj_gap=10, scale=0.25)
TARGETS = r".*\.(self_attn|mlp)\..*"


def corpus() -> tuple[torch.Tensor, int]:
    """(character ids, vocabulary size) of the Zen of Python."""
    # the module keeps the text rot13-encoded in `s`; its import prints the Zen, silenced here
    with contextlib.redirect_stdout(io.StringIO()):
        zen = importlib.import_module("this")
    text = codecs.decode(zen.s, "rot13")
    vocab = sorted(set(text))
    return torch.tensor([vocab.index(c) for c in text]), len(vocab)


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=SEQ, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def batches(tokens: torch.Tensor, steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(tokens) - SEQ, (steps, BATCH), generator=gen)
    return [torch.stack([tokens[s:s + SEQ] for s in row]) for row in starts]


def galore_torch_adamw(model):
    import galore_torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        groups = lowrank_param_groups(model, TARGETS, proj_type="std", **GALORE)
        for group in groups:
            group.pop("names", None)
        return galore_torch.GaLoreAdamW(groups, lr=1e-2)


# name -> factory(model) -> optimizer
OPTIMIZERS = {
    "AdamW (torch)": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, eps=1e-6),
    "galore-torch GaLoreAdamW": galore_torch_adamw,
    "GaLoreAdamW": lambda m: GaLoreAdamW(lowrank_param_groups(m, TARGETS, **GALORE), lr=1e-2),
    "LowRankAdamW rsvd+lazy": lambda m: LowRankAdamW(
        lowrank_param_groups(m, TARGETS, projection="rsvd", refresh="lazy", **GALORE), lr=1e-2),
    "LowRankAdamW random": lambda m: LowRankAdamW(
        lowrank_param_groups(m, TARGETS, projection="random", **GALORE), lr=1e-2),
    "GaLoreAdamW 8-bit moments": lambda m: GaLoreAdamW(
        lowrank_param_groups(m, TARGETS, state_dtype="8bit", **GALORE), lr=1e-2),
    "QGaLoreAdamW": lambda m: QGaLoreAdamW(lowrank_param_groups(m, TARGETS, **GALORE), lr=1e-2),
    "DCTAdamW": lambda m: DCTAdamW(lowrank_param_groups(
        m, TARGETS, rank=16, scale=0.25, update_proj_gap=1), lr=1e-2),
}


def train(name: str, steps: int = 50) -> list[float]:
    tokens, vocab = corpus()
    model = tiny_llama(vocab)
    optimizer = OPTIMIZERS[name](model)
    losses = []
    for ids in batches(tokens, steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def start_end(losses: list[float], window: int = 5) -> tuple[float, float]:
    window = min(window, len(losses))
    return sum(losses[:window]) / window, sum(losses[-window:]) / window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (tiny shapes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        corpus()  # `import this` prints the Zen: keep it out of the table
    print(f"| optimizer | loss start → end ({args.steps} steps) |")
    print("|---|---|")
    for name in OPTIMIZERS:
        start, end = start_end(train(name, args.steps))
        print(f"| {name} | {start:.3f} → {end:.3f} |")


if __name__ == "__main__":
    main()
