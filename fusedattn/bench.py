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
is a multiple of that period for the 4 providers.

Memory: bytes autograd saves for backward in the training forward (unique storages, via
saved_tensors_hooks) and the peak memory one training forward+backward adds (GPU: the caching
allocator's peak; CPU: the peak resident set, measured in a child process whose large
allocations are mmapped so that freed memory leaves it); both on the fwd row. On a GPU, GB/s
counts the minimum traffic of the op (forward and infer: read x, write y; backward: read x and
dy, write dx) and is compared with the device's peak bandwidth.
Results go to benchmarks/results/<op>_<device>[_<backend>].{csv,json,md,png}; progress to stderr.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def peaks_in_child(op, shape, dtype, channels_last, e_lambda, backend=None) -> dict:
    """CPU peak memory of one training forward+backward per provider, measured in a child
    process whose large allocations are all mmapped (glibc's MALLOC_MMAP_THRESHOLD_ fixed), so
    that freed tensors leave the resident set. Timings stay in this process: mmapping every
    tensor adds page faults that would distort them."""
    spec = json.dumps({"op": op, "shape": shape, "dtype": str(dtype).split(".")[-1],
                       "channels_last": channels_last, "e_lambda": e_lambda, "backend": backend})
    env = {**os.environ, _MMAP_ENV: "65536"}
    r = subprocess.run([sys.executable, "-m", "fusedattn.bench", "--peak-child", spec],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        log(f"    peak-memory child failed: {r.stderr.strip().splitlines()[-1:]}")
        return {}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _peak_child(spec: str) -> int:
    c = json.loads(spec)
    x = torch.randn(c["shape"], dtype=getattr(torch, c["dtype"]))
    if c["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn_like(x)
    out = {}
    with _backend_ctx(c.get("backend")):
        for p, f in providers(c["op"], c["e_lambda"], x, training=True).items():
            calls = mode_callables(f, x, g, with_grad=(p != "clone"))
            out[p] = peak_added_bytes(calls["fwd+bwd"] if "fwd+bwd" in calls else calls["fwd"],
                                      x.device)
    print(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------- the providers

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
    channels = x.shape[1]
    model = _with_lambda(perturb_weights(entry.baseline_module(channels)), e_lambda)
    model = model.to(x.device, x.dtype).train(training)
    fused = _with_lambda(entry.fused_cls()(channels), e_lambda).to(x.device, x.dtype)
    fused.load_state_dict(model.state_dict(), strict=True)
    fused.train(training)
    eager = model
    if op == "simam":  # the functional form SimAM is usually written in
        eager = (lambda t: fusedattn.reference.simam(t, e_lambda))
    return {"eager": eager, "compile": torch.compile(eager, dynamic=False), "fused": fused,
            "clone": (lambda t: t.clone())}


def baseline_name(op: str, channels: int = 64) -> str:
    if op == "simam":
        return "fusedattn.reference.simam"
    m = registry.get(op).baseline_module(channels)
    return f"{type(m).__module__}.{type(m).__qualname__}"


class Backward:
    """A backward-only timing target: ``prepare(k)`` runs k forwards (untimed), then each call
    runs the backward of one of them (graphs are not retained: torch.compile's backward donates
    its buffers and refuses retain_graph)."""

    def __init__(self, f, x, g):
        self.f, self.x, self.g, self.ys = f, x, g, []

    def prepare(self, k: int) -> None:
        self.ys = [self.f(self.x) for _ in range(k)]

    def __call__(self):
        return torch.autograd.grad(self.ys.pop(), self.x, self.g)


def mode_callables(f, x, g, with_grad: bool):
    """The training-mode timing targets of provider ``f`` (x requires grad)."""
    calls = {"fwd": lambda: f(x)}
    if with_grad:
        calls["bwd"] = Backward(f, x, g)
        calls["fwd+bwd"] = lambda: torch.autograd.grad(f(x), x, g)
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
    x = torch.randn(shape, dtype=dtype, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn_like(x)
    torch._dynamo.reset()  # a fresh compiled function per shape: no dynamic-shape recompiles
    fns = providers(op, e_lambda, x, training=True)
    evals = providers(op, e_lambda, x, training=False)
    calls = {p: {**mode_callables(f, x, g, with_grad=(p != "clone")),
                 "infer": infer_callable(evals[p], x)} for p, f in fns.items()}
    for p in PROVIDERS:  # warm-up (compiles torch.compile's forward, backward, inference graphs)
        t0 = time.perf_counter()
        for c in calls[p].values():
            time_call(c, device, 1)
        log(f"    warm-up {p:8s} {time.perf_counter() - t0:7.2f} s")
    inner = {}
    for p in PROVIDERS:
        for m, c in calls[p].items():
            est = time_call(c, device, 1)
            cap = 8 if m == "bwd" else 100  # backward keeps `inner` graphs alive at once
            inner[p, m] = max(1, min(cap, int(2e-3 / max(est, 1e-7))))
    samples = {(p, m): [] for p in PROVIDERS for m in calls[p]}
    orders = round_orders(len(PROVIDERS))
    for r in range(reps):  # interleaved: one sample of every provider and mode per round,
        order = [PROVIDERS[i] for i in orders[r % len(orders)]]  # in a rotating order
        for m in MODES:
            for p in order:
                if m in calls[p]:
                    samples[p, m].append(time_call(calls[p][m], device, inner[p, m]))
    nbytes = x.numel() * x.element_size()
    peaks = (peaks_in_child(op, shape, dtype, channels_last, e_lambda, backend)
             if device.type == "cpu"
             else {p: peak_added_bytes(calls[p].get("fwd+bwd", calls[p]["fwd"]), device)
                   for p in PROVIDERS})
    rows = []
    for p in PROVIDERS:
        mem_saved = saved_bytes(fns[p], x) if p != "clone" else 0
        for m in MODES:
            if m not in calls[p]:
                continue
            # memory is that of training; an inference forward saves nothing (peak: not measured)
            saved, peak = (0, None) if m == "infer" else (mem_saved, peaks.get(p))
            ts = sorted(samples[p, m])
            med = statistics.median(ts)
            q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [med] * 4
            moved = (2 if p == "clone" else TRAFFIC[m]) * nbytes
            gbps = moved / med / 1e9
            rows.append({
                "op": op, "shape": "x".join(map(str, shape)), "dtype": str(dtype).split(".")[-1],
                "layout": "channels_last" if channels_last else "contiguous",
                "device": device.type, "provider": p, "mode": m,
                "median_ms": med * 1e3, "p20_ms": q[0] * 1e3, "p80_ms": q[3] * 1e3,
                "gbps": gbps, "pct_peak_bw": (100 * gbps * 1e9 / peak_bw) if peak_bw else None,
                "saved_bytes": saved, "saved_over_input": saved / nbytes,
                "peak_added_bytes": peak, "input_bytes": nbytes,
            })
    return rows


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


def plot(rows, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    cases = []
    for r in rows:
        k = (r["shape"], r["dtype"], r["layout"])
        if k not in cases:
            cases.append(k)
    ncols = 2
    nrows = -(-len(MODES) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, nrows * (0.5 * len(cases) + 2.5)),
                             squeeze=False)
    width = 0.8 / len(PROVIDERS)
    for ax, mode in zip(axes.flat, MODES):
        for i, p in enumerate(PROVIDERS):
            ys, meds, lo, hi = [], [], [], []
            for j, (shape, dtype, layout) in enumerate(cases):
                r = _get(rows, shape=shape, dtype=dtype, layout=layout, provider=p, mode=mode)
                if r:
                    ys.append(j + i * width)
                    meds.append(r["median_ms"])
                    lo.append(r["median_ms"] - r["p20_ms"])
                    hi.append(r["p80_ms"] - r["median_ms"])
            if ys:
                ax.barh(ys, meds, height=width, xerr=[lo, hi], label=p, capsize=2)
        ax.set_yticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_yticklabels([f"{s} {d}{' CL' if l == 'channels_last' else ''}" for s, d, l in cases],
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
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help=f"comma list of {', '.join(SHAPES)}, or NxCxHxW")
    ap.add_argument("--layouts", default="contiguous,channels_last")
    ap.add_argument("--reps", type=int, default=None,
                    help="interleaved rounds per case (default 16; a multiple of the provider "
                         "order's period, 4)")
    ap.add_argument("--quick", action="store_true",
                    help="4 rounds, shapes rn50-s1,rn50-s4, contiguous only (unless given)")
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
    period = len(round_orders(len(PROVIDERS)))
    if args.quick:  # explicit --shapes / --layouts win
        args.shapes = args.shapes if "--shapes" in args.given else "rn50-s1,rn50-s4"
        args.layouts = args.layouts if "--layouts" in args.given else "contiguous"
    if args.reps is None:
        args.reps = period if args.quick else 4 * period
    if args.reps % period:
        log(f"fusedattn.bench: --reps {args.reps} is not a multiple of {period}: the provider "
            "orders are not balanced")
    dtypes = args.dtypes or ("fp32" if device.type == "cpu" else "fp16,bf16,fp32")
    shapes = [SHAPES[s] if s in SHAPES else tuple(int(v) for v in s.split("x"))
              for s in args.shapes.split(",")]
    cases = [(s, DTYPES[d], l == "channels_last") for s in shapes for d in dtypes.split(",")
             for l in args.layouts.split(",")]
    peak_bw = peak_bandwidth(device)
    where = machine(device)

    for op in args.ops.split(","):
        why = _unavailable(op, device, args.backend)
        if why:
            log(f"fusedattn.bench: skipping {op} on {device.type}: {why}")
            continue
        log(f"fusedattn.bench: {op} (eager: {baseline_name(op)}) on {where}; torch "
            f"{torch.__version__}; {len(cases)} cases x {len(MODES)} modes x {len(PROVIDERS)} "
            f"providers, {args.reps} rounds")
        rows = []
        with _backend_ctx(args.backend):
            for i, (shape, dtype, cl) in enumerate(cases, 1):
                log(f"[{i}/{len(cases)}] {op} {'x'.join(map(str, shape))} {dtype} "
                    f"{'channels_last' if cl else 'contiguous'}")
                t0 = time.perf_counter()
                rows += bench_case(op, shape, dtype, device, args.reps, cl, args.e_lambda,
                                   peak_bw, args.backend)
                log(f"    done in {time.perf_counter() - t0:.1f} s "
                    f"(fused backend: {fusedattn.last_backend(op)})")
        write_results(op, rows, args, device, where, peak_bw)
    return 0


def write_results(op, rows, args, device, where, peak_bw) -> None:
    import fusedattn
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
            "rounds": args.reps, "weight_noise": WEIGHT_NOISE, "weight_seed": WEIGHT_SEED,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    with open(f"{stem}.json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = table(rows, gpu=device.type == "cuda")
    with open(f"{stem}.md", "w") as f:
        f.write(f"`{meta['command']}` on {where}, torch {torch.__version__}, {meta['date']}\n\n{md}\n")
    plot(rows, Path(f"{stem}.png"), f"{op} on {where}")
    print(f"\n{op}:\n{md}")
    log(f"wrote {stem}.csv, .json, .md, .png")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    sys.exit(main())
