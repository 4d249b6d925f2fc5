"""reference.py (and the CPU kernel) against galore-torch (docs/DESIGN.md §8): the spec agrees
with the peer it claims drop-in parity with."""

import pytest
import torch
from cases import assert_fp32_close, orthonormal_basis

import lowrank_kernels as lk
from lowrank_kernels import reference

galore_torch = pytest.importorskip("galore_torch")
from galore_torch.galore_projector import GaLoreProjector

BACKENDS = ["reference"] + (["cpu"] if lk.EXTENSION_AVAILABLE else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n", [(64, 40), (40, 64)], ids=["right", "left"])
def test_matches_galore_torch_ten_steps(m, n, backend, monkeypatch):
    rank, scale, lr, wd = 8, 0.25, 1e-2, 0.1
    gen = torch.Generator().manual_seed(0)
    basis = orthonormal_basis(m, n, rank, generator=gen)
    w0 = torch.randn(m, n, generator=gen)
    peer_param = torch.nn.Parameter(w0.clone())
    peer = galore_torch.GaLoreAdamW(
        [{"params": [peer_param], "rank": rank, "update_proj_gap": 1000, "scale": scale,
          "proj_type": "std"}], lr=lr, weight_decay=wd, betas=(0.9, 0.999), eps=1e-6,
        no_deprecation_warning=True)
    # galore-torch computes its basis by SVD at step 0 only (gap 1000): hand it ours instead.
    refreshes = []
    monkeypatch.setattr(GaLoreProjector, "get_orthogonal_matrix",
                        lambda self, *a, **k: refreshes.append(1) or basis.clone())
    ours = w0.clone()
    shape = (m, rank) if m >= n else (rank, n)
    exp_avg, exp_avg_sq = torch.zeros(shape), torch.zeros(shape)
    for step in range(1, 11):
        grad = torch.randn(m, n, generator=gen)
        peer_param.grad = grad.clone()
        peer.step()
        lk.ops.fused_galore_step(ours, grad, basis, exp_avg, exp_avg_sq, lr=lr, beta1=0.9,
                                 beta2=0.999, eps=1e-6, weight_decay=wd, scale=scale, step=step,
                                 backend=backend)
        assert_fp32_close(ours, peer_param.detach())
    assert len(refreshes) == 1
    state = peer.state[peer_param]
    assert_fp32_close(exp_avg, state["exp_avg"])
    assert_fp32_close(exp_avg_sq, state["exp_avg_sq"])


@pytest.mark.parametrize("m,n", [(30, 20), (20, 30)], ids=["right", "left"])
def test_reference_projection_matches_galore_projector(m, n):
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(m, n, generator=gen)
    projector = GaLoreProjector(5, update_proj_gap=10**9, scale=0.5, proj_type="std")
    low_rank = projector.project(grad, 0)  # runs galore-torch's own SVD once
    basis = projector.ortho_matrix
    assert_fp32_close(reference.project(grad, basis), low_rank)
    assert_fp32_close(reference.project_back(low_rank, basis, m, n, 0.5),
                      projector.project_back(low_rank))
