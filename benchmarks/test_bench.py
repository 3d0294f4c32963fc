"""pytest-benchmark definitions of the benchmark cases of every registry op (outside the default
test run):

    .venv/bin/python -m pytest benchmarks/ --benchmark-only --benchmark-columns=median,iqr

Same providers (eager baseline, torch.compile, fused, clone) and modes (fwd, bwd, fwd+bwd in
training, infer in eval under no_grad) as ``python -m fusedattn.bench``, on one small shape per op
so that the run stays quick (``python -m fusedattn.bench`` runs the real shapes, interleaves the
providers and also reports memory; this file is for pytest-benchmark's comparison and history
tools). An op whose fused module does not exist (yet) is skipped."""
import pytest
import torch

from fusedattn import bench, registry

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (2, 64, 16, 16)
CASES = [(op, mode, provider) for op in registry.OPS for mode in bench.MODES
         for provider in bench.PROVIDERS if not (provider == "clone" and mode not in ("fwd", "infer"))]
_providers = {}  # (op, training) -> providers, so each torch.compile is built once per op and mode


def _get(op, x, training):
    reason = bench._unavailable(op, DEVICE, None)
    if reason:
        pytest.skip(f"{op}: {reason}")
    if (op, training) not in _providers:
        _providers[op, training] = bench.providers(op, 1e-4, x, training=training)
    return _providers[op, training]


@pytest.mark.parametrize("op,mode,provider", CASES, ids=["-".join(c) for c in CASES])
def test_bench(benchmark, op, mode, provider):
    torch.manual_seed(0)
    x = torch.randn(SHAPE, device=DEVICE, requires_grad=True)
    g = torch.randn_like(x)
    if mode == "infer":
        call = bench.infer_callable(_get(op, x, training=False)[provider], x)
    else:
        f = _get(op, x, training=True)[provider]
        call = bench.mode_callables(f, x, g, with_grad=provider != "clone")[mode]
    bench.time_call(call, DEVICE, 1)  # warm-up / compile
    if isinstance(call, bench.Backward):
        benchmark.pedantic(call, setup=lambda: call.prepare(1), rounds=10)
    else:
        benchmark.pedantic(lambda: (call(), bench._sync(DEVICE)), rounds=10, warmup_rounds=1)
