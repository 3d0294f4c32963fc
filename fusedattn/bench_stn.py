"""Benchmark providers of the spatial transformer's affine sampler (issue 13, item 4) for
``python -m fusedattn.bench --ops stn``: bilinear sampling of x (N, C, H, W) at the points of a
per-sample affine transform theta (N, 2, 3), output of x's size, align_corners=False:

- ``eager``    ``fusedattn.reference.affine_sample``: ``F.affine_grid`` + ``F.grid_sample``, the
               pair PyTorch users write (the grid (N, H, W, 2) materialised and kept for backward);
- ``compile``  ``torch.compile`` (default: inductor, ``dynamic=False``; fullgraph, no graph break)
               of ``sample_pair``, that pair written as a plain function of (x, theta), the
               strongest a user would write: inductor decomposes both ops, computes the sampling
               points inside its forward kernel and decides itself what to keep for backward;
- ``fused``    ``fusedattn.affine_sample`` (the fused op on the active backend: no grid tensor,
               autograd keeps x and theta only);
- ``clone``    ``x.clone()``, the floor of any forward.

Two parts (the ``part`` column of the results):

- ``sampler``  y = sample(x, theta), the op itself, in the general case of a feature-map STN where
               both x and theta need gradients: theta (N, 2, 3) is a leaf requiring grad, fixed
               per case (``make_theta``: per sample a rotation of 10-20 degrees either way, an
               isotropic scale in [0.8, 1.1] and a translation in [-0.1, 0.1]^2, seeded: off pixel
               lines, near the identity as trained STNs are). Every provider callable names theta
               in its ``grad_inputs`` attribute, so that bwd and fwd+bwd differentiate x AND theta
               (``fusedattn.bench.mode_callables``: ``torch.autograd.grad(y, (x, theta), dy)``);
               differentiating x alone would skip the dtheta reduction in eager (autograd asks
               grid_sample's backward for the input gradient only) but not in torch.compile's
               backward (it computes every gradient its graph has).
- ``module``   y = f(x), the whole ``SpatialTransformer`` (the registry's: the default
               localisation network for C channels, the sampler at x's size): eager
               ``fusedattn.reference.SpatialTransformer``, its torch.compile, and
               ``fusedattn.SpatialTransformer`` with the same state_dict (strict). Weights:
               perturbed as for every op (``fusedattn.bench.perturb_weights``), then the
               localisation's last Linear rescaled to give theta = identity + a per-sample
               deviation of at most 0.2 per entry on the case's x (``near_identity``; the
               perturbed net's theta is far off, sampling mostly outside the image). Gradients are
               taken with respect to x only, as for every op's module part (x's gradient flows
               through the sampler's dx and, through theta, its dtheta and the localisation's
               input gradient; no parameter gradients). The localisation network takes most of
               its time.

In inference (``infer``) the providers are separate instances (their own torch.compile) with a
theta that does not require grad, under ``torch.no_grad()``.

``fusedattn/bench.py`` reads this module through ``registry.get("stn").bench_providers`` (see
``bench.op_bench``): ``PROVIDERS``, ``PARTS``, ``case(part, x, e_lambda, training)``,
``unsupported`` (nothing: every provider runs every mode), ``SHAPES`` / ``QUICK_SHAPES`` /
``LAYOUTS`` / ``ROUND_PERIODS``, ``COMPARE`` and ``saved_bound(shape, dtype)`` (bytes of x + theta,
the issue's target for what the fused sampler saves for backward: no grid), explained in the
table by ``SAVED_BOUND_NOTE``.
Shapes (issue 13): MNIST-like (256, 1, 28, 28), CIFAR-like (128, 3, 32, 32) and a feature map
(8, 64, 56, 56).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PROVIDERS = ("eager", "compile", "fused", "clone")
PARTS = ("sampler", "module")
COMPARE = ("eager", "compile")  # fused / fastest of these (the target: vs compile)
LAYOUTS = "contiguous"  # default --layouts (channels_last only when asked for)
ROUND_PERIODS = 4  # default --reps: 4 periods of the provider orders (4 providers: 16 rounds)

SHAPES = [(256, 1, 28, 28), (128, 3, 32, 32), (8, 64, 56, 56)]  # MNIST, CIFAR, feature map
QUICK_SHAPES = [SHAPES[0], SHAPES[-1]]  # --quick: MNIST-like and the feature map

THETA_SEED = 0
ROTATION_DEG = (10.0, 20.0)  # |angle|, either sign
SCALE = (0.8, 1.1)
SHIFT = 0.1  # |tx|, |ty| at most
MODULE_DEVIATION = 0.2  # the module part: max |theta - identity| per entry on the case's x

SAVED_BOUND_NOTE = ("fused saved / bound: fused's saved bytes over x + theta, N C H W elem + N 6 "
                    "acc (acc: theta's fp32, fp64 for fp64 x), the issue's target (at most 1: no "
                    "grid). The module part also saves the localisation network's activations "
                    "(and its weights, its input x being shared).")


def unsupported(provider: str, mode: str, device) -> str | None:
    """Why provider cannot run mode on device: never (None)."""
    return None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_theta(N: int, dtype=torch.float32, device="cpu", seed: int = THETA_SEED) -> torch.Tensor:
    """(N, 2, 3) affine transforms of realistic STN magnitude, seeded: per sample a rotation by
    a in +-[10, 20] degrees, a scale s in [0.8, 1.1] and a shift (tx, ty) in [-0.1, 0.1]^2,
    theta = [[s cos a, -s sin a, tx], [s sin a, s cos a, ty]] (computed in fp64)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(N, 5, generator=g, dtype=torch.float64)
    lo, hi = ROTATION_DEG
    sign = torch.where(u[:, 0] < 0.5, -1.0, 1.0).to(torch.float64)
    a = sign * torch.deg2rad(lo + (hi - lo) * u[:, 1])
    s = SCALE[0] + (SCALE[1] - SCALE[0]) * u[:, 2]
    tx, ty = (2 * u[:, 3] - 1) * SHIFT, (2 * u[:, 4] - 1) * SHIFT
    theta = torch.stack([s * torch.cos(a), -s * torch.sin(a), tx,
                         s * torch.sin(a), s * torch.cos(a), ty], dim=1).reshape(N, 2, 3)
    return theta.to(device=device, dtype=dtype)


def sample_pair(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """affine_grid + grid_sample as a user writes it (bilinear, zeros, align_corners=False, output
    of x's size): the function the compile provider compiles."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Sampler:
    """Provider callable y = sample(x, theta) with a fixed theta; ``grad_inputs`` (theta, when it
    requires grad) tells ``fusedattn.bench`` to differentiate theta along with x."""

    def __init__(self, sample, theta: torch.Tensor):
        self.sample, self.theta = sample, theta
        self.grad_inputs = (theta,) if theta.requires_grad else ()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.sample(x, self.theta)


def sampler_providers(x: torch.Tensor, training: bool = True):
    """Callables y = f(x) per provider (PROVIDERS) of the sampler part for inputs like x:
    ``make_theta(N)`` in x's dtype (what a localisation network in x's dtype gives), requiring
    grad when training; a fresh torch.compile of ``sample_pair``."""
    import fusedattn
    from fusedattn import bench, reference
    theta = make_theta(x.shape[0], x.dtype, x.device).requires_grad_(training)
    return {"eager": Sampler(reference.affine_sample, theta),
            "compile": Sampler(bench.compiled(sample_pair), theta),
            "fused": Sampler(fusedattn.affine_sample, theta),
            "clone": (lambda t: t.clone())}


def near_identity(module, x: torch.Tensor, deviation: float = MODULE_DEVIATION):
    """Sets the localisation's last Linear so that ``module.theta(x)`` = identity + W h with
    max |W h| = ``deviation`` (its perturbed weight W rescaled, its bias the identity): h, the
    Linear's input on x, computed once."""
    from fusedattn import reference
    last = reference._last_linear(module.localization)
    seen = []
    hook = last.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            module.theta(x.detach())
    finally:
        hook.remove()
    with torch.no_grad():
        dev = (seen[0] @ last.weight.t()).abs().max().item()
        if dev > 0:
            last.weight.mul_(deviation / dev)
        last.bias.copy_(torch.tensor(reference.IDENTITY_THETA, dtype=last.bias.dtype))
    return module


def module_providers(x: torch.Tensor, training: bool = True):
    """Callables y = f(x) per provider of the module part: the registry's reference
    SpatialTransformer for x's shape with perturbed weights and a near-identity theta
    (``near_identity``) in train() or eval(), its torch.compile, the fused module with its
    state_dict (strict), x.clone()."""
    from fusedattn import bench, registry
    entry = registry.get("stn")
    ref = bench.perturb_weights(entry.build(entry.reference_cls(), tuple(x.shape)))
    ref = ref.to(x.device, x.dtype)
    near_identity(ref, x)
    ref.train(training)
    fused = entry.build(entry.fused_cls(), tuple(x.shape)).to(x.device, x.dtype)
    fused.load_state_dict(ref.state_dict(), strict=True)
    fused.train(training)
    return {"eager": ref, "compile": bench.compiled(ref), "fused": fused,
            "clone": (lambda t: t.clone())}


def case(part: str, x: torch.Tensor, e_lambda: float = 0.0, training: bool = True):
    """(input, {provider: f}, dy) of ``part`` for inputs like x, as fusedattn.bench wants them:
    x itself (y has x's shape: dy None, torch.randn_like(x)). e_lambda is SimAM's and unused."""
    if part == "sampler":
        return x, sampler_providers(x, training), None
    if part == "module":
        return x, module_providers(x, training), None
    raise ValueError(f"bench_stn: unknown part {part!r}; expected one of {PARTS}")


def saved_bound(shape, dtype) -> int:
    """Bytes of x + theta for inputs of ``shape`` (N, C, H, W) in ``dtype``: N C H W elem +
    N 6 acc, theta in the accumulation dtype (fp32; fp64 for fp64 x) as the fused op keeps it:
    the issue's target for what the fused sampler saves for backward (no grid)."""
    elem = torch.empty((), dtype=dtype).element_size()
    acc = torch.empty((), dtype=acc_dtype(dtype)).element_size()
    return math.prod(shape) * elem + shape[0] * 6 * acc
