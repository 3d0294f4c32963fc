"""pytest-benchmark definitions of the SimAM benchmark cases (outside the default test run):

    .venv/bin/python -m pytest benchmarks/ --benchmark-only --benchmark-columns=median,iqr

Same shapes, providers and modes as ``python -m fusedattn.bench`` (which interleaves providers
and also reports memory; this file is for pytest-benchmark's comparison and history tools)."""
import pytest
import torch

from fusedattn import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [(name, mode, provider) for name in bench.SHAPES for mode in bench.MODES
         for provider in bench.PROVIDERS if not (provider == "clone" and mode != "fwd")]


@pytest.mark.parametrize("name,mode,provider", CASES, ids=["-".join(c) for c in CASES])
def test_simam(benchmark, name, mode, provider):
    x = torch.randn(bench.SHAPES[name], device=DEVICE, requires_grad=True)
    g = torch.randn_like(x)
    f = bench.providers("simam", 1e-4, x)[provider]
    call = bench.mode_callables(f, x, g, with_grad=provider != "clone")[mode]
    bench.time_call(call, DEVICE, 1)  # warm-up / compile
    if isinstance(call, bench.Backward):
        benchmark.pedantic(call, setup=lambda: call.prepare(1), rounds=10)
    else:
        benchmark.pedantic(lambda: (call(), bench._sync(DEVICE)), rounds=10, warmup_rounds=1)
