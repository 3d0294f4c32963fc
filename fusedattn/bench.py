"""Benchmark — the main job: fused vs eager vs torch.compile(eager) vs x.clone() (the floor).

    python -m fusedattn.bench                  # every op of fusedattn.registry on this machine's device
    python -m fusedattn.bench --ops se,cbam    # some of them
    python -m fusedattn.bench --quick          # fewer rounds, two shapes, contiguous only
    python -m fusedattn.bench --device cuda --dtypes fp16,bf16,fp32
    python -m fusedattn.bench --models         # whole models, eager vs convert(): bench_models.py

Ops and providers come from ``fusedattn.registry.OPS``: eager is the module a user holds
(``Op.baseline_module``: timm's SEModule / EcaModule / CbamModule where there is one, else our
reference; for SimAM the function ``reference.simam``), compile is ``torch.compile(eager,
dynamic=False)``, fused is the op's ``fusedattn`` module with the eager module's state_dict loaded
(strict), clone is ``x.clone()``. Every float parameter and buffer of the eager module is first
perturbed by a seeded uniform(-0.25, 0.25) (BatchNorm: random running statistics), so that the
weights are not the trivial init and fused and eager compute the same thing.

An op whose registry entry names a ``bench_providers`` module has its own providers, parts,
default shapes / layouts / rounds and unsupported cells (``op_bench``): aaconv
(fusedattn/bench_aaconv.py) times 7 providers (eager, compile, sdpa_bias, sdpa_folded, flex, fused,
clone) on two parts, "module" (y = f(x), the whole AugmentedConv2d) and "attention" (only the
attention core, on the qkv convolution's output), on the spec's ResNet-50 and CIFAR grids,
contiguous, 14 rounds (one period of the provider orders for 7 providers); its table has a column
per provider, "fused / fastest other", and fused's saved bytes over q + k + v + out + lse. A
(provider, mode) that cannot run on the device (flex training on CPU) is not run and reads "n/a"
with a footnote. Every row has a ``part`` column ("module" for the other ops).

Modes: ``fwd`` (training forward: modules in train(), x requires grad), ``bwd`` (backward only,
of forwards run untimed before), ``fwd+bwd``, and ``infer`` (inference forward: separate module
instances in eval(), their own torch.compile, under torch.no_grad(), x not requiring grad).

Timing: providers are timed interleaved, one sample (an average over enough back-to-back calls
to last ~2 ms) of every provider and mode per round; the table reports medians (CSV/JSON also
p20 and p80). The order of the providers changes from round to round: round r uses row r mod k
(or mod 2k for an odd number k of providers) of a Williams Latin square, which starts at
provider r mod k, so over each k rounds every provider is timed in every position once and right
after every other provider once. A fixed order would make one provider always pay for the cache
state and page faults left by the same predecessor's large allocations. The default --reps (16)
is a multiple of that period for the 4 providers (aaconv: 14, the period for its 7).

Memory: bytes autograd saves for backward in the training forward (unique storages, via
saved_tensors_hooks) and the peak memory one training forward+backward adds (GPU: the caching
allocator's peak; CPU: the peak resident set, measured in a child process whose large
allocations are mmapped so that freed memory leaves it); both on the fwd row. On a GPU, GB/s
counts the minimum traffic of the op (forward and infer: read x, write y; backward: read x and
dy, write dx) and is compared with the device's peak bandwidth.
Results go to benchmarks/results/<op>_<device>[_<backend>].{csv,json,md,png}; progress to stderr.
$FUSEDATTN_BENCH_COMPILE_BACKEND names another torch.compile backend (the smoke tests: "eager").
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fusedattn import registry

SHAPES = {
    "rn50-s1": (8, 256, 56, 56),
    "rn50-s2": (8, 512, 28, 28),
    "rn50-s3": (8, 1024, 14, 14),
    "rn50-s4": (8, 2048, 7, 7),
    "cifar": (128, 64, 32, 32),
    "yolo-neck": (8, 128, 80, 80),
    "small-56": (8, 64, 56, 56),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "fp64": torch.float64}
PROVIDERS = ("eager", "compile", "fused", "clone")
MODES = ("fwd", "bwd", "fwd+bwd", "infer")
TRAIN_MODES = ("fwd", "bwd", "fwd+bwd")  # modules in train(), x requires grad
TRAFFIC = {"fwd": 2, "bwd": 3, "fwd+bwd": 5, "infer": 2}  # minimum full-size tensor passes
WEIGHT_SEED = 0
WEIGHT_NOISE = 0.25
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
COMPILE_BACKEND_ENV = "FUSEDATTN_BENCH_COMPILE_BACKEND"  # compile's backend (default inductor)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- device facts

def peak_bandwidth(device: torch.device) -> float | None:
    """Peak DRAM bandwidth of a CUDA device in bytes/s (memory clock x bus width x 2)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8
    return None


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------- measuring

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, inner: int) -> float:
    """Seconds per call, averaged over ``inner`` back-to-back calls."""
    if isinstance(fn, Backward):
        fn.prepare(inner)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / inner


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def peak_added_bytes(fn, device) -> int | None:
    """Memory one call of ``fn`` adds at its peak over what was allocated before it."""
    fn()
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set
    except OSError:
        return None
    base = _rss("VmRSS:")
    fn()
    return _rss("VmHWM:") - base


def saved_bytes(f, x) -> int:
    """Bytes of the unique storages autograd saves for backward in y = f(x)."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(x)
    return sum(seen.values())


def peaks_in_child(op, shape, dtype, channels_last, e_lambda, backend=None,
                   parts=("module",)) -> dict:
    """CPU peak memory of one training forward+backward per part and provider ({part:
    {provider: bytes or None}}; None: the provider cannot train here), measured in a child
    process whose large allocations are all mmapped (glibc's MALLOC_MMAP_THRESHOLD_ fixed), so
    that freed tensors leave the resident set. Timings stay in this process: mmapping every
    tensor adds page faults that would distort them."""
    spec = json.dumps({"op": op, "shape": shape, "dtype": str(dtype).split(".")[-1],
                       "channels_last": channels_last, "e_lambda": e_lambda, "backend": backend,
                       "parts": list(parts)})
    env = {**os.environ, _MMAP_ENV: "65536"}
    r = subprocess.run([sys.executable, "-m", "fusedattn.bench", "--peak-child", spec],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        log(f"    peak-memory child failed: {r.stderr.strip().splitlines()[-1:]}")
        return {}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _peak_target(spec, p, calls, device):
    """The training call whose peak is measured: fwd+bwd, else (clone; a provider that cannot
    run a backward here) fwd; None if it cannot train here at all."""
    for m in ("fwd+bwd", "fwd"):
        if m in calls and not spec.unsupported(p, m, device):
            return calls[m]
    return None


def _peak_child(spec_json: str) -> int:
    c = json.loads(spec_json)
    x = torch.randn(c["shape"], dtype=getattr(torch, c["dtype"]))
    if c["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    spec = op_bench(c["op"])
    out = {}
    with _backend_ctx(c.get("backend")):
        for part in c.get("parts", ["module"]):
            inp, fns, dy = spec.case(part, x, c["e_lambda"], training=True)
            g = torch.randn_like(inp) if dy is None else dy
            out[part] = {}
            for p in spec.providers:
                calls = mode_callables(fns[p], inp, g, with_grad=(p != "clone"))
                call = _peak_target(spec, p, calls, x.device)
                out[part][p] = None if call is None else peak_added_bytes(call, x.device)
    print(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------- the providers

def compiled(fn):
    """The compile provider: ``torch.compile(fn, dynamic=False)``, with the backend named by
    $FUSEDATTN_BENCH_COMPILE_BACKEND if set (default inductor; the smoke tests set "eager":
    dynamo's graph capture without code generation, seconds instead of minutes)."""
    backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
    return torch.compile(fn, dynamic=False, backend=backend)


def perturb_weights(module: torch.nn.Module, seed: int = WEIGHT_SEED) -> torch.nn.Module:
    """Adds a seeded uniform(-WEIGHT_NOISE, WEIGHT_NOISE) to every float parameter and buffer
    (in named_parameters then named_buffers order), so that e.g. BatchNorm has random running
    statistics (its running_var stays >= 0.75) and the weights are not the trivial init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.is_floating_point():
                noise = torch.rand(t.shape, generator=gen, dtype=torch.float64)
                t.add_(((2 * noise - 1) * WEIGHT_NOISE).to(t.device, t.dtype))
    return module


def _with_lambda(module, e_lambda):
    if hasattr(module, "e_lambda"):  # SimAM's only hyperparameter
        module.e_lambda = e_lambda
    return module


def providers(op: str, e_lambda: float, x: torch.Tensor, training: bool = True):
    """Callables y = f(x) per provider for registry op ``op`` on tensors like x: the eager
    module (train() or eval() per ``training``) with perturbed weights, its torch.compile, the
    fused module with the same state_dict (strict) and x.clone(). Each call builds fresh module
    instances (the same weights for the same op and shape) and a fresh torch.compile."""
    import fusedattn.reference
    entry = registry.get(op)
    if entry.bench_providers is not None:  # the op's own providers: those of its module part
        return op_bench(op).case("module", x, e_lambda, training)[1]
    channels = x.shape[1]
    model = _with_lambda(perturb_weights(entry.baseline_module(channels, x.shape)), e_lambda)
    model = model.to(x.device, x.dtype).train(training)
    fused = _with_lambda(entry.build(entry.fused_cls(), x.shape), e_lambda).to(x.device, x.dtype)
    fused.load_state_dict(model.state_dict(), strict=True)
    fused.train(training)
    eager = model
    if op == "simam":  # the functional form SimAM is usually written in
        eager = (lambda t: fusedattn.reference.simam(t, e_lambda))
    return {"eager": eager, "compile": compiled(eager), "fused": fused,
            "clone": (lambda t: t.clone())}


def baseline_name(op: str, channels: int = 64) -> str:
    if op == "simam":
        return "fusedattn.reference.simam"
    entry = registry.get(op)
    if entry.make is not None:  # built for a shape: the eager provider is the reference class
        cls = entry.reference_cls()
        return f"{cls.__module__}.{cls.__qualname__}"
    m = entry.baseline_module(channels)
    return f"{type(m).__module__}.{type(m).__qualname__}"


@dataclass(frozen=True)
class OpBench:
    """What ``python -m fusedattn.bench`` runs for one op (``op_bench``)."""
    providers: tuple[str, ...]  # column order; "fused" and "clone" among them
    parts: tuple[str, ...]  # what is benchmarked, each a set of rows (the "part" column)
    case: Callable  # (part, x, e_lambda, training) -> (input, {provider: f}, dy or None)
    shapes: list  # default --shapes: names of SHAPES or (N, C, H, W) tuples
    quick_shapes: list  # the same under --quick
    layouts: str  # default --layouts
    round_periods: int  # default --reps in periods of the provider orders (--quick: 1)
    unsupported: Callable  # (provider, mode, device) -> why it cannot run there, or None
    compare: tuple[str, ...] = ()  # providers of "fused / fastest other" (custom table only)
    saved_bound: Callable | None = None  # (shape, dtype) -> bytes the fused op may save
    custom: bool = False  # the op's own module: its table has a column per provider
    saved_bound_note: str = ""  # the table's footnote on saved_bound ("": aaconv's)

    @property
    def period(self) -> int:
        return len(round_orders(len(self.providers)))


def _generic_case(op):
    def case(part, x, e_lambda, training=True):
        return x, providers(op, e_lambda, x, training), None
    return case


def op_bench(op: str) -> OpBench:
    """The providers, parts, default shapes and unsupported cells of registry op ``op``: its
    ``bench_providers`` module's (e.g. fusedattn.bench_aaconv: PROVIDERS, PARTS, case, SHAPES,
    QUICK_SHAPES, LAYOUTS, ROUND_PERIODS, unsupported, COMPARE, saved_bound), else the generic
    ones of this file (PROVIDERS, one part "module", SHAPES, 4 periods of rounds). The module may
    also have SAVED_BOUND_NOTE (the table's footnote on saved_bound), and its provider callables
    a ``grad_inputs`` attribute (further leaves that bwd and fwd+bwd differentiate along with x:
    ``grad_inputs``)."""
    entry = registry.get(op)
    if entry.bench_providers is None:
        return OpBench(PROVIDERS, ("module",), _generic_case(op), list(SHAPES),
                       ["rn50-s1", "rn50-s4"], "contiguous,channels_last", 4,
                       lambda provider, mode, device: None)
    mod = importlib.import_module(entry.bench_providers)
    return OpBench(tuple(mod.PROVIDERS), tuple(mod.PARTS), mod.case, list(mod.SHAPES),
                   list(mod.QUICK_SHAPES), mod.LAYOUTS, mod.ROUND_PERIODS, mod.unsupported,
                   tuple(getattr(mod, "COMPARE", ())), getattr(mod, "saved_bound", None),
                   custom=True, saved_bound_note=getattr(mod, "SAVED_BOUND_NOTE", ""))


class Backward:
    """A backward-only timing target: ``prepare(k)`` runs k forwards (untimed), then each call
    runs the backward of one of them (graphs are not retained: torch.compile's backward donates
    its buffers and refuses retain_graph)."""

    def __init__(self, f, x, g):
        self.f, self.x, self.g, self.ys = f, x, g, []
        self.wrt = grad_inputs(f, x)

    def prepare(self, k: int) -> None:
        self.ys = [self.f(self.x) for _ in range(k)]

    def __call__(self):
        return torch.autograd.grad(self.ys.pop(), self.wrt, self.g)


def grad_inputs(f, x) -> tuple:
    """What the backward of provider ``f`` differentiates: x, and the further leaves ``f`` names
    in its ``grad_inputs`` attribute (e.g. fusedattn/bench_stn.py's theta)."""
    return (x, *getattr(f, "grad_inputs", ()))


def mode_callables(f, x, g, with_grad: bool):
    """The training-mode timing targets of provider ``f`` (x requires grad)."""
    calls = {"fwd": lambda: f(x)}
    if with_grad:
        wrt = grad_inputs(f, x)
        calls["bwd"] = Backward(f, x, g)
        calls["fwd+bwd"] = lambda: torch.autograd.grad(f(x), wrt, g)
    return calls


def infer_callable(f, x):
    """The inference timing target of provider ``f`` (an eval() instance): y = f(x) under
    torch.no_grad() with x not requiring grad."""
    xi = x.detach()

    def infer():
        with torch.no_grad():
            return f(xi)
    return infer


def round_orders(k: int) -> list[list[int]]:
    """A Williams Latin square on k providers, row r starting at provider r mod k: over its rows
    every provider takes every position once and directly follows every other provider once
    (k even; for odd k the k mirrored rows are added, again row r starting at r mod k)."""
    base, lo, hi = [0], 1, k - 1
    while len(base) < k:
        base.append(lo)
        lo += 1
        if len(base) < k:
            base.append(hi)
            hi -= 1
    rows = [[(r + b) % k for b in base] for r in range(k)]
    if k % 2:
        rows += [[(r - base[-1] + b) % k for b in base][::-1] for r in range(k)]
    return rows


def bench_case(op, shape, dtype, device, reps, channels_last, e_lambda, peak_bw, backend=None):
    """Rows of one (shape, dtype, layout) case of op: every part, provider and mode that can run
    on this device (``op_bench(op).unsupported`` cells are skipped)."""
    spec = op_bench(op)
    x = torch.randn(shape, dtype=dtype, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn_like(x)
    torch._dynamo.reset()  # a fresh compiled function per shape: no dynamic-shape recompiles
    measured = [_bench_part(spec, part, x, g, device, reps, e_lambda) for part in spec.parts]
    if device.type == "cpu":
        peaks = peaks_in_child(op, shape, dtype, channels_last, e_lambda, backend, spec.parts)
    else:
        peaks = {part: m["peaks"] for part, m in zip(spec.parts, measured)}
    bound = spec.saved_bound(shape, dtype) if spec.saved_bound else None
    rows = []
    for part, meas in zip(spec.parts, measured):
        nbytes = meas["input_bytes"]
        for p in spec.providers:
            for m in MODES:
                if (p, m) not in meas["samples"]:
                    continue
                # memory is that of training; an inference forward saves nothing (peak: not
                # measured)
                saved, peak = ((0, None) if m == "infer"
                               else (meas["saved"][p], peaks.get(part, {}).get(p)))
                ts = sorted(meas["samples"][p, m])
                med = statistics.median(ts)
                q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [med] * 4
                moved = (2 if p == "clone" else TRAFFIC[m]) * nbytes
                gbps = moved / med / 1e9 if part == "module" else None  # y like x: module only
                row = {
                    "op": op, "part": part, "shape": "x".join(map(str, shape)),
                    "dtype": str(dtype).split(".")[-1],
                    "layout": "channels_last" if channels_last else "contiguous",
                    "device": device.type, "provider": p, "mode": m,
                    "median_ms": med * 1e3, "p20_ms": q[0] * 1e3, "p80_ms": q[3] * 1e3,
                    "gbps": gbps,
                    "pct_peak_bw": (100 * gbps * 1e9 / peak_bw) if peak_bw and gbps else None,
                    "saved_bytes": saved,
                    "saved_over_input": None if saved is None else saved / nbytes,
                    "peak_added_bytes": peak, "input_bytes": nbytes,
                }
                if spec.saved_bound:
                    row["saved_bound_bytes"] = bound
                rows.append(row)
    return rows


def _bench_part(spec: OpBench, part, x, g, device, reps, e_lambda) -> dict:
    """Times one part of a case: its providers interleaved in the rotating orders; also the
    bytes autograd saves (and on a GPU the peak memory) of each provider's training forward."""
    inp, fns, dy = spec.case(part, x, e_lambda, training=True)
    evals = spec.case(part, x, e_lambda, training=False)[1]
    gp = g if dy is None else dy
    calls = {}
    for p in spec.providers:
        c = {**mode_callables(fns[p], inp, gp, with_grad=(p != "clone")),
             "infer": infer_callable(evals[p], inp)}
        calls[p] = {m: f for m, f in c.items() if not spec.unsupported(p, m, device)}
    prefix = "" if spec.parts == ("module",) else f"{part}/"
    width = max([8] + [len(f"{pt}/{p}") for pt in spec.parts for p in spec.providers if prefix])
    for p in spec.providers:  # warm-up (compiles torch.compile's forward, backward, infer graphs)
        t0 = time.perf_counter()
        for c in calls[p].values():
            time_call(c, device, 1)
        log(f"    warm-up {prefix + p:{width}s} {time.perf_counter() - t0:7.2f} s")
    inner = {}
    for p in spec.providers:
        for m, c in calls[p].items():
            est = time_call(c, device, 1)
            cap = 8 if m == "bwd" else 100  # backward keeps `inner` graphs alive at once
            inner[p, m] = max(1, min(cap, int(2e-3 / max(est, 1e-7))))
    samples = {(p, m): [] for p in spec.providers for m in calls[p]}
    orders = round_orders(len(spec.providers))
    for r in range(reps):  # interleaved: one sample of every provider and mode per round,
        order = [spec.providers[i] for i in orders[r % len(orders)]]  # in a rotating order
        for m in MODES:
            for p in order:
                if m in calls[p]:
                    samples[p, m].append(time_call(calls[p][m], device, inner[p, m]))
    saved = {p: (None if "fwd" not in calls[p]  # cannot train here
                 else 0 if p == "clone" else saved_bytes(fns[p], inp)) for p in spec.providers}
    peaks = None
    if device.type != "cpu":
        peaks = {}
        for p in spec.providers:
            call = _peak_target(spec, p, calls[p], device)
            peaks[p] = None if call is None else peak_added_bytes(call, device)
    return {"samples": samples, "saved": saved, "peaks": peaks,
            "input_bytes": inp.numel() * inp.element_size()}


# ----------------------------------------------------------------------------- reporting

def _get(rows, **kw):
    for r in rows:
        if all(r[k] == v for k, v in kw.items()):
            return r
    return None


def table(rows, gpu: bool) -> str:
    """Markdown table: one line per (shape, dtype, layout, mode); the memory of the training
    forward(+backward) on the fwd line."""
    head = ["shape", "dtype", "layout", "mode", "eager ms", "compile ms", "fused ms", "clone ms",
            "fused/compile", "eager/fused"]
    if gpu:
        head += ["fused GB/s", "% peak"]
    head += ["saved/input (eager, compile, fused)", "train peak MiB (eager, compile, fused)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = []
    for r in rows:
        k = (r["shape"], r["dtype"], r["layout"], r["mode"])
        if k not in keys:
            keys.append(k)
    for shape, dtype, layout, mode in keys:
        sel = dict(shape=shape, dtype=dtype, layout=layout)
        get = {p: _get(rows, provider=p, mode=mode, **sel) for p in PROVIDERS}
        ms = {p: (f"{get[p]['median_ms']:.3f}" if get[p] else "") for p in PROVIDERS}
        f, c, e = get["fused"], get["compile"], get["eager"]
        cells = [shape, dtype, layout, mode, ms["eager"], ms["compile"], ms["fused"], ms["clone"],
                 f"{f['median_ms'] / c['median_ms']:.2f}", f"{e['median_ms'] / f['median_ms']:.1f}"]
        if gpu:
            cells += [f"{f['gbps']:.0f}", f"{f['pct_peak_bw']:.0f}" if f["pct_peak_bw"] else ""]
        if mode == "fwd":
            cells.append(", ".join(f"{get[p]['saved_over_input']:.2f}" for p in ("eager", "compile", "fused")))
            cells.append(", ".join("?" if get[p]["peak_added_bytes"] is None else
                                   f"{get[p]['peak_added_bytes'] / 2**20:.0f}"
                                   for p in ("eager", "compile", "fused")))
        else:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mib(b) -> str:
    v = b / 2**20
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.3f}"


def table_providers(rows, spec: OpBench) -> str:
    """Markdown table of an op with its own providers (``spec.custom``): one line per (part,
    shape, dtype, layout, mode) with every provider's median ms, "fused / fastest other" (fused
    over the fastest of ``spec.compare`` that ran), and on the fwd line the bytes autograd saves
    and the peak one training forward+backward adds, per provider (clone left out), and fused's
    saved bytes over ``spec.saved_bound`` (when the op has one). A (provider, mode) that cannot
    run on the device is "n/a [k]", footnote k saying why."""
    mem = [p for p in spec.providers if p != "clone"]
    head = ["part", "shape", "dtype", "layout", "mode", *(f"{p} ms" for p in spec.providers),
            "fused / fastest other", f"saved MiB ({', '.join(mem)})",
            f"train peak MiB ({', '.join(mem)})"]
    if spec.saved_bound:
        head.append("fused saved / bound")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = {}  # reason -> (number, {provider: [modes]})

    def na(p, mode, device):
        why = spec.unsupported(p, mode, device)
        if not why:
            return None
        k, cells = notes.setdefault(why, (len(notes) + 1, {}))
        if mode not in cells.setdefault(p, []):
            cells[p].append(mode)
        return f"n/a [{k}]"

    cases = []
    for r in rows:
        k = (r["part"], r["shape"], r["dtype"], r["layout"], r["device"])
        if k not in cases:
            cases.append(k)
    cases.sort(key=lambda k: spec.parts.index(k[0]))  # stable: per part, the cases in run order
    keys = [(*k, m) for k in cases for m in MODES  # a mode no provider ran has no line
            if _get(rows, part=k[0], shape=k[1], dtype=k[2], layout=k[3], device=k[4], mode=m)]
    for part, shape, dtype, layout, device, mode in keys:
        sel = dict(part=part, shape=shape, dtype=dtype, layout=layout, device=device)
        get = {p: _get(rows, provider=p, mode=mode, **sel) for p in spec.providers}
        cells = [part, shape, dtype, layout, mode]
        for p in spec.providers:
            cells.append(f"{get[p]['median_ms']:.3f}" if get[p] else na(p, mode, device) or "")
        ran = [p for p in spec.compare if get[p]]
        if get.get("fused") and ran:
            best = min(ran, key=lambda p: get[p]["median_ms"])
            cells.append(f"{get['fused']['median_ms'] / get[best]['median_ms']:.2f} ({best})")
        else:
            cells.append("")
        if mode == "fwd":
            saved, peak = [], []
            for p in mem:
                why = na(p, mode, device)
                r = get[p]
                saved.append(why or ("?" if r is None or r["saved_bytes"] is None
                                     else _mib(r["saved_bytes"])))
                peak.append(why or ("?" if r is None or r["peak_added_bytes"] is None
                                    else _mib(r["peak_added_bytes"])))
            cells += [", ".join(saved), ", ".join(peak)]
            if spec.saved_bound:
                f = get.get("fused")
                cells.append(f"{f['saved_bytes'] / f['saved_bound_bytes']:.3f}"
                             if f and f.get("saved_bound_bytes") else "")
        else:
            cells += ["", ""] + ([""] if spec.saved_bound else [])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("fused / fastest other: fused's median over the fastest of "
                 f"{', '.join(spec.compare)} that ran (named); saved MiB: the unique storages "
                 "autograd saves in the training forward; train peak MiB: the memory one training "
                 "forward+backward adds at its peak.")
    if spec.saved_bound:
        lines.append("")
        lines.append(spec.saved_bound_note or
                     "fused saved / bound: fused's saved bytes over q + k + v + out + one fp32 "
                     "per (query, head), N Nh HW (2 dkh + 2 dvh) elem + N Nh HW 4 (the target: at "
                     "most 1; the relative tables, parameters, come on top). The module part "
                     "also saves x, the convolutions' weights and their inputs.")
    for why, (k, cells) in sorted(notes.items(), key=lambda kv: kv[1][0]):
        where = "; ".join(f"{p} {', '.join(ms)}" for p, ms in cells.items())
        lines.append("")
        lines.append(f"[{k}] {where}: {why}")
    return "\n".join(lines)


def op_table(rows, spec: OpBench, gpu: bool) -> str:
    return table_providers(rows, spec) if spec.custom else table(rows, gpu)


def plot(rows, path: Path, title: str, providers=PROVIDERS) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    cases = []
    for r in rows:
        k = (r["part"], r["shape"], r["dtype"], r["layout"])
        if k not in cases:
            cases.append(k)
    ncols = 2
    nrows = -(-len(MODES) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, nrows * (0.5 * len(cases) + 2.5)),
                             squeeze=False)
    width = 0.8 / len(providers)
    for ax, mode in zip(axes.flat, MODES):
        for i, p in enumerate(providers):
            ys, meds, lo, hi = [], [], [], []
            for j, (part, shape, dtype, layout) in enumerate(cases):
                r = _get(rows, part=part, shape=shape, dtype=dtype, layout=layout, provider=p,
                         mode=mode)
                if r:
                    ys.append(j + i * width)
                    meds.append(r["median_ms"])
                    lo.append(r["median_ms"] - r["p20_ms"])
                    hi.append(r["p80_ms"] - r["median_ms"])
            if ys:
                ax.barh(ys, meds, height=width, xerr=[lo, hi], label=p, capsize=2)
        ax.set_yticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_yticklabels([f"{'' if pt == 'module' else pt + ' '}{s} {d}"
                            f"{' CL' if l == 'channels_last' else ''}" for pt, s, d, l in cases],
                           fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no overlapping labels
        ax.set_xlabel("ms (median, p20-p80)")
        ax.set_title(mode)
        ax.invert_yaxis()
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m fusedattn.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default=",".join(registry.OPS),
                    help=f"comma list of {', '.join(registry.OPS)} (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default=None,
                    help="comma list of fp16,bf16,fp32,fp64 (default: fp32 on CPU; fp16,bf16,fp32 on GPU)")
    ap.add_argument("--shapes", default=None,
                    help=f"comma list of {', '.join(SHAPES)}, or NxCxHxW (default: all of "
                         "those; an op with its own benchmark module (aaconv): its SHAPES)")
    ap.add_argument("--layouts", default=None,
                    help="comma list of contiguous,channels_last (default: both; aaconv: "
                         "contiguous)")
    ap.add_argument("--reps", type=int, default=None,
                    help="interleaved rounds per case (default 16, a multiple of the provider "
                         "order's period, 4; aaconv: 14, the period for its 7 providers)")
    ap.add_argument("--quick", action="store_true",
                    help="one period of rounds (4; aaconv 14), shapes rn50-s1,rn50-s4 (aaconv: "
                         "the first and last of its ResNet shapes), contiguous only (unless given)")
    ap.add_argument("--backend", default=None, help="fused backend (default: dispatcher's choice)")
    ap.add_argument("--e-lambda", type=float, default=1e-4)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    from fusedattn import bench_models
    bench_models.add_arguments(ap)  # --models and its options
    args = ap.parse_args(argv)
    args.given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    if args.models is not None:
        bench_models.check_args(ap, args)
    unknown = [o for o in args.ops.split(",") if o not in registry.OPS]
    if unknown and not args.peak_child:
        ap.error(f"unknown op(s) {', '.join(unknown)}; expected some of {', '.join(registry.OPS)}")
    return args


def _backend_ctx(backend):
    """A fresh context manager per use (use_backend's is single-use)."""
    import fusedattn
    return fusedattn.use_backend(backend) if backend else _null()


def _unavailable(op: str, device: torch.device, backend) -> str:
    """Why op cannot be benchmarked here ('' if it can)."""
    import fusedattn
    entry = registry.get(op)
    if entry.bench_providers is not None:
        try:
            importlib.import_module(entry.bench_providers)
        except ImportError as exc:
            return f"its benchmark module {entry.bench_providers} cannot be imported ({exc})"
    try:
        entry.fused_cls()
    except AttributeError:
        return f"fusedattn.{entry.fused} does not exist (yet)"
    try:
        baseline_name(op)
    except Exception as exc:  # e.g. a timm without the baseline class
        return f"its eager baseline cannot be built ({type(exc).__name__}: {exc})"
    try:
        with _backend_ctx(backend):
            fusedattn.dispatch.select(op, torch.empty(0, device=device))
    except fusedattn.BackendUnavailable as exc:
        return str(exc)
    return ""


def _shape(s) -> tuple:
    if isinstance(s, tuple):
        return s
    return SHAPES[s] if s in SHAPES else tuple(int(v) for v in s.split("x"))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.peak_child:
        return _peak_child(args.peak_child)
    if args.models is not None:
        from fusedattn import bench_models
        return bench_models.main(args, argv)
    device = torch.device(args.device)
    import fusedattn
    dtypes = args.dtypes or ("fp32" if device.type == "cpu" else "fp16,bf16,fp32")
    peak_bw = peak_bandwidth(device)
    where = machine(device)

    for op in args.ops.split(","):
        why = _unavailable(op, device, args.backend)
        if why:
            log(f"fusedattn.bench: skipping {op} on {device.type}: {why}")
            continue
        spec = op_bench(op)
        period = spec.period
        # explicit --shapes / --layouts / --reps win; else the op's defaults (--quick: fewer)
        shapes = (args.shapes.split(",") if args.shapes is not None
                  else spec.quick_shapes if args.quick else spec.shapes)
        shapes = [_shape(s) for s in shapes]
        layouts = (args.layouts if args.layouts is not None
                   else "contiguous" if args.quick else spec.layouts)
        reps = (args.reps if args.reps is not None
                else period if args.quick else spec.round_periods * period)
        if reps % period:
            log(f"fusedattn.bench: --reps {reps} is not a multiple of {period}: the provider "
                "orders are not balanced")
        cases = [(s, DTYPES[d], l == "channels_last") for s in shapes for d in dtypes.split(",")
                 for l in layouts.split(",")]
        if spec.custom:
            log(f"fusedattn.bench: {op} (eager: {baseline_name(op)}) on {where}; torch "
                f"{torch.__version__}; {len(cases)} cases x {len(spec.parts)} parts "
                f"({', '.join(spec.parts)}) x {len(MODES)} modes x {len(spec.providers)} "
                f"providers ({', '.join(spec.providers)}), {reps} rounds (the provider orders "
                f"repeat every {period} rounds for {len(spec.providers)} providers; default: "
                f"{'1' if args.quick else spec.round_periods} x {period})")
        else:
            log(f"fusedattn.bench: {op} (eager: {baseline_name(op)}) on {where}; torch "
                f"{torch.__version__}; {len(cases)} cases x {len(MODES)} modes x "
                f"{len(spec.providers)} providers, {reps} rounds")
        for p in spec.providers:
            skipped = {}
            for m in MODES:
                why = spec.unsupported(p, m, device)
                if why:
                    skipped.setdefault(why, []).append(m)
            for why, ms in skipped.items():
                log(f"    not run: {p} {', '.join(ms)} on {device.type}: {why}")
        rows = []
        with _backend_ctx(args.backend):
            for i, (shape, dtype, cl) in enumerate(cases, 1):
                log(f"[{i}/{len(cases)}] {op} {'x'.join(map(str, shape))} {dtype} "
                    f"{'channels_last' if cl else 'contiguous'}")
                t0 = time.perf_counter()
                rows += bench_case(op, shape, dtype, device, reps, cl, args.e_lambda,
                                   peak_bw, args.backend)
                log(f"    done in {time.perf_counter() - t0:.1f} s "
                    f"(fused backend: {fusedattn.last_backend(op)})")
        write_results(op, rows, args, device, where, peak_bw, reps=reps, spec=spec)
    return 0


def write_results(op, rows, args, device, where, peak_bw, reps=None, spec=None) -> None:
    import fusedattn
    spec = spec or op_bench(op)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"{op}_{device.type}" + (f"_{args.backend}" if args.backend else ""))
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    meta = {"command": "python -m fusedattn.bench " + " ".join(sys.argv[1:]), "machine": where,
            "torch": torch.__version__, "device": device.type, "peak_bandwidth_Bps": peak_bw,
            "fused_backend": fusedattn.last_backend(op), "eager": baseline_name(op),
            "rounds": args.reps if reps is None else reps, "weight_noise": WEIGHT_NOISE,
            "weight_seed": WEIGHT_SEED, "date": time.strftime("%Y-%m-%d %H:%M")}
    if spec.custom:
        meta["providers"] = list(spec.providers)
        meta["parts"] = list(spec.parts)
        meta["unsupported"] = {p: {m: spec.unsupported(p, m, device) for m in MODES
                                   if spec.unsupported(p, m, device)}
                               for p in spec.providers
                               if any(spec.unsupported(p, m, device) for m in MODES)}
    with open(f"{stem}.json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = op_table(rows, spec, gpu=device.type == "cuda")
    with open(f"{stem}.md", "w") as f:
        f.write(f"`{meta['command']}` on {where}, torch {torch.__version__}, {meta['date']}\n\n{md}\n")
    plot(rows, Path(f"{stem}.png"), f"{op} on {where}", spec.providers)
    print(f"\n{op}:\n{md}")
    log(f"wrote {stem}.csv, .json, .md, .png")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    sys.exit(main())
