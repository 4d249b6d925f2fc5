"""APOLLO's generated Gaussian basis (reference.random_basis, DESIGN.md §4.7): N(0, 1/r) values
from Philox keyed by (seed, refresh count), Box-Muller with IEEE-exact polynomial log/cos/sin.
Checked: against the float64 transform of the same words, mean and variance, a KS test against
the normal CDF, independence across seeds, refresh counts and neighbouring elements, and the
layout (four elements of a row per Philox call, the left side's dense basis the transpose)."""

import math

import pytest
import torch

from lowrank_kernels import reference

pytestmark = pytest.mark.usefixtures("one_thread")

D, RANK = 1000, 128  # 1.28e5 samples per basis


@pytest.fixture(scope="module")
def basis():
    return reference.random_basis(D, RANK, seed=3, refresh=0)


def test_log_and_angle_helpers_are_accurate():
    k = torch.cat([torch.arange(1, 5000), torch.randint(1, 2**24, (20000,)),
                   torch.tensor([2**23, 2**24 - 1, 2**24])])
    log_u = reference.log_of_units(k, -24).double()
    exact = torch.log(k.double()) - 24 * math.log(2)
    # absolute error ≤ 2 ulps of the result (ln u ∈ [−16.6, 0])
    assert ((log_u - exact).abs() <= 2 * 2.0**-23 * exact.abs().clamp(min=2.0**-23)).all()
    assert reference.log_of_units(torch.tensor([2**24]), -24).item() == 0.0
    t = torch.cat([torch.randint(0, 2**24, (20000,)), torch.tensor([0, 2**21, 2**22, 3 * 2**22,
                                                                     2**24 - 1])])
    cos_t, sin_t = reference.cos_sin_turn(t)
    theta = 2 * math.pi * t.double() / 2**24
    assert (cos_t.double() - torch.cos(theta)).abs().max() < 2e-7
    assert (sin_t.double() - torch.sin(theta)).abs().max() < 2e-7


def test_values_equal_the_float64_transform_of_the_same_words(basis):
    """The fp32 pipeline is within 2e-6 of Box-Muller in float64 on the same Philox words
    (measured: 5.7e-7): the CDF of the values is then within φ(0)·2e-6 < 1e-6 of the exact
    transform's."""
    groups = -(-D // 4)
    k = torch.arange(RANK).view(-1, 1)
    i = torch.arange(D).view(1, -1)
    w0, w1, w2, w3 = reference.philox_uint32x4(reference.rounding_philox_seed(3, 0),
                                               k * groups + (i >> 2) + reference.BASIS_STREAM)
    lane = (i & 3).expand(RANK, D)
    first = lane < 2
    u = ((torch.where(first, w0, w2) >> 8) + 1).double() * 2.0**-24
    theta = 2 * math.pi * (torch.where(first, w1, w3) >> 8).double() * 2.0**-24
    radius = torch.sqrt(-2 * torch.log(u))
    exact = radius * torch.where(lane % 2 == 0, torch.cos(theta), torch.sin(theta))
    exact /= math.sqrt(RANK)
    assert (basis.double() - exact).abs().max() * math.sqrt(RANK) < 2e-6


def test_mean_variance_and_ks_against_the_normal_cdf(basis):
    z = basis.double().flatten() * math.sqrt(RANK)
    n = z.numel()
    assert abs(z.mean()) < 4 / math.sqrt(n)
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs(basis.double().var() * RANK - 1) < 4 * math.sqrt(2 / n)
    sorted_z = torch.sort(z).values
    cdf = 0.5 * torch.erfc(-sorted_z / math.sqrt(2))
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(ranks / n - cdf, cdf - (ranks - 1) / n).max().item()
    assert ks < 1.63 / math.sqrt(n)  # Kolmogorov's 1 % critical value
    # the tails are there: |z| > 4 has probability 6.3e-5, about 8 of these samples
    assert 1 <= int((z.abs() > 4).sum()) <= 30


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_independence_across_seeds_refreshes_and_elements(basis):
    bound = 4 / math.sqrt(basis.numel())
    others = [reference.random_basis(D, RANK, seed=4, refresh=0),
              reference.random_basis(D, RANK, seed=3, refresh=1),
              reference.random_basis(D, RANK, seed=3 + 2**31, refresh=0)]
    for other in others:
        assert abs(correlation(basis, other)) < bound
        assert abs(correlation(basis**2, other**2)) < bound  # not only uncorrelated signs
    quarter = basis.view(RANK, D // 4, 4)
    for a, b in [(0, 1), (0, 2), (1, 3), (2, 3)]:  # lanes of one Philox call
        assert abs(correlation(quarter[..., a], quarter[..., b])) < 2 * bound
        assert abs(correlation(quarter[..., a]**2, quarter[..., b]**2)) < 2 * bound
    assert abs(correlation(basis[:, 1:], basis[:, :-1])) < bound  # neighbours in a row
    assert abs(correlation(basis[1:], basis[:-1])) < bound  # neighbouring rows


def test_reproducible_and_laid_out_as_documented():
    a = reference.random_basis(10, 3, seed=7, refresh=2)
    assert torch.equal(a, reference.random_basis(10, 3, seed=7, refresh=2))
    assert not torch.equal(a, reference.random_basis(10, 3, seed=7, refresh=3))
    # element (k, i): Philox call k·⌈d/4⌉ + ⌊i/4⌋, lane i mod 4, divided by √r
    k, i = 2, 9
    words = reference.philox_uint32x4(reference.rounding_philox_seed(7, 2),
                                      torch.tensor([k * 3 + i // 4 + reference.BASIS_STREAM]))
    _, sin_t = reference.gaussian_pair(words[0], words[1])  # lane 1: the sin of pair 0
    assert a[k, i] == (sin_t / torch.sqrt(torch.tensor(3.0)))[0]
    # dense parity path: Q = basis(n, r) on the right, P = basis(m, r)ᵀ on the left
    assert torch.equal(reference.random_projection(7, 2, 12, 10, 3), a)
    assert torch.equal(reference.random_projection(7, 2, 10, 12, 3), a.T)
