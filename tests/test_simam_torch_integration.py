"""SimAM ops under torch.library.opcheck and torch.compile(fullgraph=True)."""
import pytest
import torch
from torch import nn

import fusedattn
from fusedattn import reference
from helpers import assert_close64

OPS = {"cpu": ("simam_forward", "simam_backward"), "cuda": ("simam_forward", "simam_backward"),
       "triton": ("simam_forward_triton", "simam_backward_triton")}


def _samples(device):
    for shape, fmt in [((2, 3, 5, 7), torch.contiguous_format), ((2, 3, 5, 7), torch.channels_last),
                       ((1, 4, 9), torch.contiguous_format), ((1, 2, 3, 4, 2), torch.contiguous_format)]:
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(shape, dtype=dtype, device=device).to(memory_format=fmt)
            yield x.requires_grad_()


def test_opcheck(backend_device):
    backend, device = backend_device
    fwd_name, bwd_name = OPS[backend]
    fwd = getattr(torch.ops.fusedattn, fwd_name)
    bwd = getattr(torch.ops.fusedattn, bwd_name)
    for x in _samples(device):
        torch.library.opcheck(fwd, (x, 1e-4))
        _, mu, inv = fwd(x.detach(), 1e-4)
        torch.library.opcheck(bwd, (torch.randn_like(x), x.detach(), mu, inv))


class SmallNet(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.attn1 = attn()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.attn2 = attn()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.attn1(torch.relu(self.conv1(x)))
        x = self.attn2(torch.relu(self.conv2(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_compile_fullgraph(backend_device, channels_last):
    """A small conv net with SimAM compiles with no graph break (fullgraph=True) and gives the
    eager reference's outputs and grads. Inductor for the C++/CUDA backends; the interpreted
    Triton backend runs under aot_eager (inductor would run its own generated Triton code)."""
    backend, device = backend_device
    torch._dynamo.reset()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref_net = SmallNet(reference.SimAM).to(device, torch.float64).to(memory_format=fmt)
    net = SmallNet(fusedattn.SimAM).to(device, torch.float64).to(memory_format=fmt)
    net.load_state_dict(ref_net.state_dict())
    compiler = "aot_eager" if (backend == "triton" and device == "cpu") else "inductor"
    compiled = torch.compile(net, fullgraph=True, backend=compiler)
    x = torch.randn(2, 3, 12, 13, dtype=torch.float64, device=device).to(memory_format=fmt)
    out = compiled(x)
    out.square().sum().backward()
    ref = ref_net(x)
    ref.square().sum().backward()
    assert_close64(out, ref)
    for (name, p), (_, q) in zip(net.named_parameters(), ref_net.named_parameters()):
        assert_close64(p.grad, q.grad, name)
