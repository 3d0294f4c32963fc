"""Shared helpers of the test suite: backend/device pairs and the tolerance rule."""
import os

import torch
from torch import nn

GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# GPU pairs are always listed: without a GPU they skip, saying so.
BACKEND_DEVICES = [("cpu", "cpu")] + ([("triton", "cpu")] if INTERPRET else []) + [
    ("triton", "cuda"), ("cuda", "cuda")]

LOW_PRECISION = (torch.float16, torch.bfloat16, torch.float32)

# Absolute slack added to 2x the eager error, for dtypes where the eager error can be ~0.
ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 2e-6, torch.float64: 1e-12}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_tolerance(fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, what=""):
    """flash-attention's rule: against the fp64 result, the fused error is at most twice the
    error of eager PyTorch at the same precision (plus a small absolute slack)."""
    ef, ee = max_err(fused, exact), max_err(eager, exact)
    bound = 2 * ee + ATOL[fused.dtype]
    assert ef <= bound, f"{what}: fused error {ef:.3g} > 2 x eager error {ee:.3g} + atol"


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, what=""):
    """fp64 comparison: agreement to fp64 round-off relative to the values' size."""
    scale = max(1.0, expected.abs().max().item())
    err = max_err(actual, expected)
    assert err <= 1e-12 * scale, f"{what}: fp64 error {err:.3g} (scale {scale:.3g})"


class Block(nn.Module):
    """A ResNet basic block with an attention module after the last BN, before the identity add
    (HAM's Fig. 4; where timm puts SE, ECA and CBAM)."""

    def __init__(self, attn, c=16):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.attn = attn(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.attn(self.bn2(self.conv2(out))))


def check_compiled_block(ref: nn.Module, fused: nn.Module, device, compiler: str):
    """torch.compile(fullgraph=True) of ``fused`` (a Block holding a fused module, loaded with
    ``ref``'s state) against eager ``ref`` in fp64, training and eval: outputs, every parameter
    grad and the BatchNorm running statistics of the attention module."""
    fused.load_state_dict(ref.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend=compiler)
    for train in (True, False):
        ref.train(train), fused.train(train)
        ref.zero_grad(), fused.zero_grad()
        x = torch.randn(2, 16, 8, 8, dtype=torch.float64, device=device)
        out, want = compiled(x), ref(x)
        out.square().sum().backward()
        want.square().sum().backward()
        assert_close64(out, want)
        for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
            assert_close64(p.grad, q.grad, name)
        for (name, b), c in zip(fused.attn.named_buffers(), ref.attn.buffers()):
            if "running" in name:
                assert_close64(b, c, name)
