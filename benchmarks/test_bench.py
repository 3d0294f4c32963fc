"""pytest-benchmark definitions of the benchmark cases of every registry op (outside the default
test run):

    .venv/bin/python -m pytest benchmarks/ --benchmark-only --benchmark-columns=median,iqr

Same providers (``bench.op_bench(op)``: eager baseline, torch.compile, fused, clone; aaconv's own
from fusedattn/bench_aaconv.py, for its two parts, module and attention), and modes (fwd, bwd,
fwd+bwd in training, infer in eval under no_grad) as ``python -m fusedattn.bench``, on one small
shape per op so that the run stays quick (``python -m fusedattn.bench`` runs the real shapes,
interleaves the providers and also reports memory; this file is for pytest-benchmark's comparison
and history tools). An op whose fused module does not exist (yet) is skipped, and so is a
(provider, mode) the provider cannot run on this device (``op_bench(op).unsupported``).

``test_models_smoke`` runs the model benchmark (``python -m fusedattn.bench --models``) end to end
on tiny settings (``pytest benchmarks/test_bench.py -k models``; ``--benchmark-only`` skips it);
``test_aaconv_smoke`` runs ``python -m fusedattn.bench --ops aaconv`` on a tiny shape, and
``test_stn_smoke`` ``--ops stn`` (its sampler part differentiates x and theta)."""
import pytest
import torch

from fusedattn import bench, registry

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (2, 64, 16, 16)
CASES = [(op, part, mode, provider) for op in registry.OPS for part in bench.op_bench(op).parts
         for mode in bench.MODES for provider in bench.op_bench(op).providers
         if not (provider == "clone" and mode not in ("fwd", "infer"))]
IDS = ["-".join((op, mode, provider) if part == "module" else (op, part, mode, provider))
       for op, part, mode, provider in CASES]
_cases = {}  # (op, part, training) -> (input, providers, dy), so each torch.compile is built once


def _get(op, part, x, training):
    reason = bench._unavailable(op, DEVICE, None)
    if reason:
        pytest.skip(f"{op}: {reason}")
    if (op, part, training) not in _cases:
        _cases[op, part, training] = bench.op_bench(op).case(part, x, 1e-4, training=training)
    return _cases[op, part, training]


@pytest.mark.parametrize("op,part,mode,provider", CASES, ids=IDS)
def test_bench(benchmark, op, part, mode, provider):
    why = bench.op_bench(op).unsupported(provider, mode, DEVICE)
    if why:
        pytest.skip(f"{op} {provider} {mode} on {DEVICE.type}: {why}")
    torch.manual_seed(0)
    x = torch.randn(SHAPE, device=DEVICE, requires_grad=True)
    if mode == "infer":
        inp, fns, _ = _get(op, part, x, training=False)
        call = bench.infer_callable(fns[provider], inp)
    else:
        inp, fns, dy = _get(op, part, x, training=True)
        g = torch.randn_like(inp) if dy is None else dy
        call = bench.mode_callables(fns[provider], inp, g, with_grad=provider != "clone")[mode]
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


def test_aaconv_smoke(tmp_path, monkeypatch):
    """``python -m fusedattn.bench --ops aaconv`` end to end on a tiny shape (2x96x5x5: the
    registry's module has dk = 160, dv = 16, Nh = 8) and one period of the provider orders: its
    md has a line per part and mode, a column per provider, the ratio column, the CPU's n/a
    cells for flex training (with their footnote), and fused's saved-bytes ratio; the json has
    both parts and the fused attention saves no more than q + k + v + out + lse (+ the tables).
    torch.compile uses its "eager" backend (FUSEDATTN_BENCH_COMPILE_BACKEND, here and in the
    peak-memory child: dynamo's capture, no inductor code generation) and torch one thread (tiny
    ops on two threads of a busy machine wait milliseconds at every parallel region), so that it
    takes seconds, not minutes."""
    pytest.importorskip("matplotlib")
    import json

    from fusedattn import bench_aaconv
    monkeypatch.setenv(bench.COMPILE_BACKEND_ENV, "eager")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child's
    spec = bench.op_bench("aaconv")
    assert spec.providers == bench_aaconv.PROVIDERS and spec.period == 14
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = bench.main(["--ops", "aaconv", "--device", "cpu", "--shapes", "2x96x5x5",
                         "--reps", str(spec.period), "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    for ext in ("md", "json", "csv", "png"):
        assert (tmp_path / f"aaconv_cpu.{ext}").stat().st_size > 0
    md = (tmp_path / "aaconv_cpu.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| part |"))
    for p in bench_aaconv.PROVIDERS:
        assert f"| {p} ms |" in head, p
    assert "| fused / fastest other |" in head and "| fused saved / bound |" in head
    cols = [c.strip() for c in head.strip("|").split("|")]
    for part in bench_aaconv.PARTS:
        for mode in bench.MODES:
            start = f"| {part} | 2x96x5x5 | float32 | contiguous | {mode} |"
            line = next((ln for ln in md.splitlines() if ln.startswith(start)), None)
            assert line is not None, (part, mode)
            cells = dict(zip(cols, (c.strip() for c in line.strip("|").split("|"))))
            flex = cells["flex ms"]
            if mode == "infer":  # flex runs inference on CPU, nothing of training
                assert float(flex) > 0
            else:
                assert flex == "n/a [1]"
            assert float(cells["fused ms"]) > 0
            assert cells["fused / fastest other"].split()[0].replace(".", "").isdigit()
            if mode == "fwd":
                assert float(cells["fused saved / bound"]) > 0
                assert "n/a [1]" in cells[next(c for c in cols if c.startswith("saved MiB"))]
    assert f"[1] flex fwd, bwd, fwd+bwd: {bench_aaconv.FLEX_CPU_BACKWARD}" in md
    res = json.loads((tmp_path / "aaconv_cpu.json").read_text())
    rows = res["rows"]
    assert {r["part"] for r in rows} == set(bench_aaconv.PARTS)
    assert not [r for r in rows if r["provider"] == "flex" and r["mode"] != "infer"]
    assert res["meta"]["rounds"] == 14 and res["meta"]["unsupported"]["flex"]["fwd"]
    assert all(r["peak_added_bytes"] is not None for r in rows if r["mode"] == "fwd")  # the child
    (fused,) = [r for r in rows if (r["part"], r["provider"], r["mode"]) ==
                ("attention", "fused", "fwd")]
    tables = (2 * 5 - 1 + 2 * 5 - 1) * 20 * 4  # rel_h, rel_w: (2H - 1, dkh), (2W - 1, dkh) fp32
    assert fused["saved_bound_bytes"] == bench_aaconv.saved_bound((2, 96, 5, 5), torch.float32)
    assert fused["saved_bytes"] <= fused["saved_bound_bytes"] + tables


def test_stn_smoke(tmp_path, monkeypatch):
    """``python -m fusedattn.bench --ops stn`` end to end on a tiny shape (2x3x8x8) and one period
    of the provider orders: its md has a line per part (sampler, module) and mode, a column per
    provider, the ratio column and fused's saved bytes over x + theta with stn's footnote; the
    fused sampler saves exactly x and theta (no grid), eager also the grid; and the sampler's
    backward differentiates theta along with x (its providers' ``grad_inputs``) for every
    provider. As test_aaconv_smoke: torch.compile's "eager" backend, one thread."""
    pytest.importorskip("matplotlib")
    import json

    from fusedattn import bench_stn
    monkeypatch.setenv(bench.COMPILE_BACKEND_ENV, "eager")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child's
    spec = bench.op_bench("stn")
    assert spec.providers == bench_stn.PROVIDERS and spec.period == 4
    assert spec.saved_bound_note == bench_stn.SAVED_BOUND_NOTE
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    _, fns, _ = spec.case("sampler", x, 0.0, training=True)
    for p in ("eager", "compile", "fused"):
        (theta,) = fns[p].grad_inputs
        calls = bench.mode_callables(fns[p], x, torch.randn_like(x), with_grad=True)
        for m in ("bwd", "fwd+bwd"):
            if isinstance(calls[m], bench.Backward):
                calls[m].prepare(1)
            dx, dtheta = calls[m]()
            assert dx.shape == x.shape and dtheta.shape == theta.shape == (2, 2, 3), (p, m)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = bench.main(["--ops", "stn", "--device", "cpu", "--shapes", "2x3x8x8",
                         "--reps", str(spec.period), "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    for ext in ("md", "json", "csv", "png"):
        assert (tmp_path / f"stn_cpu.{ext}").stat().st_size > 0
    md = (tmp_path / "stn_cpu.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| part |"))
    for p in bench_stn.PROVIDERS:
        assert f"| {p} ms |" in head, p
    assert "| fused / fastest other |" in head and "| fused saved / bound |" in head
    assert bench_stn.SAVED_BOUND_NOTE in md and "q + k + v" not in md
    cols = [c.strip() for c in head.strip("|").split("|")]
    for part in bench_stn.PARTS:
        for mode in bench.MODES:
            start = f"| {part} | 2x3x8x8 | float32 | contiguous | {mode} |"
            line = next((ln for ln in md.splitlines() if ln.startswith(start)), None)
            assert line is not None, (part, mode)
            cells = dict(zip(cols, (c.strip() for c in line.strip("|").split("|"))))
            for p in ("eager", "compile", "fused"):
                assert float(cells[f"{p} ms"]) > 0, (part, mode, p)
            assert cells["fused / fastest other"].split()[0].replace(".", "").isdigit()
            if part == "sampler" and mode == "fwd":
                assert cells["fused saved / bound"] == "1.000"
    res = json.loads((tmp_path / "stn_cpu.json").read_text())
    rows = res["rows"]
    assert {r["part"] for r in rows} == set(bench_stn.PARTS)
    assert all(r["peak_added_bytes"] is not None for r in rows if r["mode"] == "fwd")  # the child
    saved = {r["provider"]: r for r in rows if (r["part"], r["mode"]) == ("sampler", "fwd")}
    bound = bench_stn.saved_bound((2, 3, 8, 8), torch.float32)
    assert bound == (2 * 3 * 8 * 8 + 2 * 6) * 4 == saved["fused"]["saved_bound_bytes"]
    assert saved["fused"]["saved_bytes"] == bound
    assert saved["eager"]["saved_bytes"] == 2 * 3 * 8 * 8 * 4 + 2 * 8 * 8 * 2 * 4  # x + grid
