"""Kernel-level properties: launch configurations and 64-bit indexing."""
import pytest
import torch


def test_triton_launcher_keeps_fitting_planes_on_chip():
    """The spec's traffic table: a plane that fits on chip is read once (ONCHIP variant)."""
    from fusedattn.triton_kernels import simam as k
    for M in (1, 49, 784, 3136, 6400, 8192):
        assert k.config(256, M, channels_last=False, elem_bytes=4).onchip, M
        assert k.config(256, M, channels_last=False, elem_bytes=2).onchip, M
    assert not k.config(2, 130 * 131, channels_last=False, elem_bytes=4).onchip
    assert k.config(256, 196, channels_last=True, elem_bytes=4).onchip
    for cl, eb, cfg in k.specializations():
        assert cfg.num_warps <= k.MAX_WARPS
        assert cfg.block_p * cfg.block_m <= cfg.num_warps * 32 * k.per_thread(cl, eb)


def _period_expectations(period: torch.Tensor, reps: int, g: float):
    """fp64 (y, dx) of one period of a plane that tiles ``period`` ``reps`` times, from the
    spec's formulas (with plane sums = reps x period sums)."""
    p = period.double()
    M = p.shape[1] * reps
    mu = p.mean(1, keepdim=True)
    d = p - mu
    inv = 1 / (4 * ((d**2).sum(1, keepdim=True) * reps / (M - 1) + 1e-4))
    s = torch.sigmoid(d**2 * inv + 0.5)
    a = g * p * s * (1 - s)
    S1 = (a * d).sum(1, keepdim=True) * reps
    S2 = (a * d * d).sum(1, keepdim=True) * reps
    dx = g * s + 2 * inv * (a * d - S1 / M) - 8 * inv**2 * d * S2 / (M - 1)
    return p * s, dx


def _assert_tiles(big: torch.Tensor, period_values: torch.Tensor, K: int, reps: int):
    view = big.view(2, reps, K)
    for start in range(0, reps, 1 << 24):  # compare in slices to bound the memory used
        chunk = view[:, start:start + (1 << 24)]
        torch.testing.assert_close(chunk, period_values[:, None, :].expand_as(chunk),
                                   rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_cpu_more_than_2_31_elements():
    """(2, 1, L) fp16 with 2L > 2^31: the second plane starts past element 2^31. Each plane
    tiles a period of 7 values, so its outputs and grads are known in closed form."""
    K, reps = 7, 153_391_690
    L = K * reps
    assert 2 * L > 2**31
    period = torch.tensor([[-1.5, 0.25, 2.0, -0.75, 1.0, 0.5, -2.0],
                           [3.0, -1.0, 0.125, 4.0, -2.5, 1.5, 0.0]], dtype=torch.float16)
    y_exp, dx_exp = _period_expectations(period, reps, g=0.5)
    x = period.repeat(1, reps).view(2, 1, L)
    y, mu, inv = torch.ops.fusedattn.simam_forward(x, 1e-4)
    _assert_tiles(y, y_exp.half(), K, reps)
    del y
    g = torch.full_like(x, 0.5)
    dx = torch.ops.fusedattn.simam_backward(g, x, mu, inv)
    _assert_tiles(dx, dx_exp.half(), K, reps)
