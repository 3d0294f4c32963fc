"""pytest-benchmark definitions of the benchmark cases of every registry op (outside the default
test run):

    .venv/bin/python -m pytest benchmarks/ --benchmark-only --benchmark-columns=median,iqr

Same providers (eager baseline, torch.compile, fused, clone) and modes (fwd, bwd, fwd+bwd in
training, infer in eval under no_grad) as ``python -m fusedattn.bench``, on one small shape per op
so that the run stays quick (``python -m fusedattn.bench`` runs the real shapes, interleaves the
providers and also reports memory; this file is for pytest-benchmark's comparison and history
tools). An op whose fused module does not exist (yet) is skipped.

``test_models_smoke`` runs the model benchmark (``python -m fusedattn.bench --models``) end to end
on tiny settings (``pytest benchmarks/test_bench.py -k models``; ``--benchmark-only`` skips it)."""
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


def test_models_smoke(tmp_path):
    """``python -m fusedattn.bench --models`` end to end on tiny settings (ResNet-18 with SimAM and
    HAM vs plain ResNet-18, batch 1, 64x64, 1 round): it writes models_cpu.{md,json,png} with the
    share table's columns, and its output check found eager and fused logits equal."""
    pytest.importorskip("torchvision")
    pytest.importorskip("matplotlib")
    import json

    from fusedattn import bench_models
    rc = bench.main(["--models", "tv_resnet18_simam_ham,tv_resnet18", "--device", "cpu",
                     "--batch", "1", "--size", "64", "--rounds", "1", "--warmup", "0",
                     "--out", str(tmp_path)])
    assert rc == 0
    for ext in ("md", "json", "png"):
        assert (tmp_path / f"models_cpu.{ext}").stat().st_size > 0
    md = (tmp_path / "models_cpu.md").read_text()
    for col in ("plain ms", "eager ms", "fused ms", "eager share ms", "fused share ms",
                "time ratio", "eager MiB", "fused MiB", "eager share MiB", "fused share MiB",
                "memory ratio", "eager peak MiB", "fused peak MiB"):
        assert f"| {col} |" in md, col
    assert "| tv_resnet18_simam_ham (tv_resnet18) | train |" in md
    assert "| tv_resnet18 | infer |" in md
    res = json.loads((tmp_path / "models_cpu.json").read_text())
    assert [(s["model"], s["mode"]) for s in res["shares"]] == [
        ("tv_resnet18_simam_ham", m) for m in bench_models.MODES]
    assert {(r["model"], r["role"]) for r in res["rows"]} == {
        ("tv_resnet18", "plain"), ("tv_resnet18_simam_ham", "eager"),
        ("tv_resnet18_simam_ham", "fused")}
    assert all(r["median_ms"] > 0 and r["peak_bytes"] > 0 for r in res["rows"])
    (group,) = res["groups"]
    assert group["convert"]["swapped"] == 16 and group["check"]["logits_max_diff"] < 1e-4
