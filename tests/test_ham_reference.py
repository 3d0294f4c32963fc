"""The eager HAM (fusedattn.reference.HAM): the spec's choices, checked one by one."""
import pytest
import torch

import fusedattn
from fusedattn.reference import HAM, ham_important_channels, ham_kernel_size

@pytest.mark.parametrize("channels,k", [(4, 1), (16, 3), (32, 3), (64, 3), (128, 5), (256, 5),
                                        (512, 5), (1024, 5), (2048, 7)])
def test_kernel_size(channels, k):
    assert ham_kernel_size(channels) == k
    assert HAM(channels).conv1d.kernel_size == (k,)

@pytest.mark.parametrize("channels,rate,important", [(16, 0.6, 10), (2, 0.6, 2), (3, 0.6, 2),
                                                     (64, 0.6, 38), (5, 0.0, 0), (5, 1.0, 5),
                                                     (7, 1.0, 7), (10, 0.5, 6)])
def test_important_channels(channels, rate, important):
    assert ham_important_channels(channels, rate) == important

def test_state_dict_names_and_shapes():
    sd = HAM(64).state_dict()
    assert set(sd) == {"alpha", "beta", "conv1d.weight", "spatial_conv.weight", "bn.weight",
                       "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert sd["alpha"].shape == () and float(sd["alpha"]) == 0.5 and float(sd["beta"]) == 0.5
    assert sd["conv1d.weight"].shape == (1, 1, 3)
    assert sd["spatial_conv.weight"].shape == (1, 2, 7, 7)

def _written_out(m: HAM, x: torch.Tensor) -> torch.Tensor:
    """Eqs. (1)-(10) written out per sample with explicit channel lists (an independent
    statement of the spec, against the vectorised reference)."""
    N, C = x.shape[:2]
    out = torch.zeros_like(x)
    for n in range(N):
        xn = x[n]
        avg = xn.mean((1, 2))
        mx = xn.flatten(1).max(1).values
        add = 0.5 * (avg + mx) + m.alpha * avg + m.beta * mx
        a = torch.sigmoid(torch.nn.functional.conv1d(add[None, None], m.conv1d.weight,
                                                     padding=m.conv1d.padding))[0, 0]
        ranked = sorted(range(C), key=lambda c: (-float(a[c].detach()), c))
        groups = [ranked[:m.important], ranked[m.important:]]
        f = a[:, None, None] * xn
        for g in groups:
            if not g:
                continue
            fg = torch.zeros_like(f)
            fg[g] = f[g]
            avg_g = fg[g].sum(0) / len(g)
            max_g = fg.max(0).values
            z = torch.nn.functional.conv2d(torch.stack([avg_g, max_g])[None],
                                           m.spatial_conv.weight, padding=m.spatial_conv.padding)
            s = torch.sigmoid(torch.relu(m.bn(z)))[0, 0]
            out[n, g] = s * f[g]
    return out

@pytest.mark.parametrize("channels", [2, 4, 16, 19])
def test_matches_the_written_out_equations_in_eval(channels):
    torch.manual_seed(1)
    m = HAM(channels).double().eval()
    with torch.no_grad():
        m.alpha.fill_(0.3), m.beta.fill_(0.7)
        m.bn.running_mean.fill_(0.1), m.bn.running_var.fill_(2.0)
        m.bn.weight.fill_(1.5), m.bn.bias.fill_(0.2)
    x = torch.randn(3, channels, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(m(x), _written_out(m, x), rtol=1e-12, atol=1e-12)

def test_empty_group_when_two_channels():
    m = HAM(2).double().eval()
    assert m.important == 2
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    y = m(x)
    assert torch.isfinite(y).all()

def test_ties_go_to_the_lower_channel_index():
    m = HAM(4, separation_rate=0.5)  # C_im = 2
    a = torch.tensor([[0.5, 0.7, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]])
    assert m.important_mask(a).tolist() == [[True, True, False, False], [True, True, False, False]]

def test_batchnorm_running_statistics_move_twice_per_forward():
    m = HAM(16).double().train()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    m(x)
    assert int(m.bn.num_batches_tracked) == 2
    m2 = HAM(2).double().train()  # one empty group: one BN call
    m2(torch.randn(2, 2, 5, 5, dtype=torch.float64))
    assert int(m2.bn.num_batches_tracked) == 1

def test_max_gradient_goes_to_the_first_index():
    m = HAM(4).double().eval()
    x = torch.zeros(1, 4, 3, 3, dtype=torch.float64)
    x[0, :, 0, 0] = 2.0
    x[0, :, 1, 1] = 2.0  # every channel's pixel max is tied between pixels 0 and 4
    x.requires_grad_()
    a = m.channel_attention(x)
    (g,) = torch.autograd.grad(a.sum(), x)
    assert (g[0, :, 1, 1] != g[0, :, 0, 0]).all()  # the max's gradient reached pixel 0 only

def test_gradcheck_eval():
    m = HAM(6).double().eval()
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))

@pytest.mark.parametrize("x,exc,match", [
    (torch.ones(2, 8, 4), ValueError, r"\(N, C, H, W\)"),
    (torch.ones(2, 8, 4, 4, dtype=torch.int32), TypeError, "floating-point"),
    (torch.ones(2, 7, 4, 4), ValueError, "expected 8 channels"),
])
@pytest.mark.parametrize("cls", [HAM, fusedattn.HAM], ids=["reference", "fused"])
def test_bad_input(x, exc, match, cls):
    with pytest.raises(exc, match=match):
        cls(8)(x)

@pytest.mark.parametrize("kwargs,match", [({"separation_rate": 1.5}, "separation_rate"),
                                          ({"separation_rate": -0.1}, "separation_rate"),
                                          ({"channels": 0}, "channels"),
                                          ({"spatial_kernel_size": 4}, "spatial_kernel_size")])
def test_bad_arguments(kwargs, match):
    args = {"channels": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        HAM(**args)
