"""Model-level benchmark: whole models of ``fusedattn.models``, eager vs ``fusedattn.convert``.

    python -m fusedattn.bench --models                            # the models of DEFAULT_MODELS
    python -m fusedattn.bench --models seresnet50,tv_resnet50_ham  # some of them
    python -m fusedattn.bench --models --quick                     # 3 rounds
    python -m fusedattn.bench --models --batch 16 --size 160 --rounds 12

Variants: ``eager`` is the model as ``fusedattn.models.build`` makes it (timm's / the authors' /
our reference attention modules); ``fused`` is a deep copy of it after ``fusedattn.convert``. A
plain model (no attention: ``resnet50``, ``resnet50d``, ``tv_resnet50``, ...) has nothing to
convert and is measured once per group, as built. Before copying, every BatchNorm's affine
parameters and running statistics get a seeded uniform(-0.25, 0.25) added: timm zero-initialises
the last BatchNorm of each residual branch, which would make the attention modules there
invisible in the logits that the check below compares.

Groups: each attention model is timed together with its plain model
(``fusedattn.models.PLAIN``): the group [plain, eager, fused] runs interleaved, one step of each
per round, in the order of row r of ``bench.round_orders(3)`` (a Williams Latin square: over its
6 rows every variant takes every position once and follows every other once). A requested plain
model that no requested attention model uses forms a group of its own.

Modes, one step each: ``train`` (model in train(); forward, cross-entropy on random labels,
backward, ``torch.optim.SGD(lr=0.01, momentum=0.9).step()``, ``zero_grad()`` (grads to None)) and
``infer`` (model in eval(), forward under ``torch.inference_mode()``). Input: batch x 3 x size x
size, fp32, contiguous (channels-first), the same tensor and labels for every variant of a group.

Time: wall time of one step (CUDA: synchronised), median over the rounds; 1 untimed warm-up step
per variant and mode, and the profiled step below, come first. Memory: the peak of one step
(after warm-up, so the momentum buffers exist) above what was live before it. On CPU it is
computed from the torch profiler's memory events (``profile_memory=True``): the alloc/free sizes
of torch's CPU allocator in time order, summed, and the maximum of that running sum taken. It
counts tensor bytes allocated by torch during the step that are live at once (activations saved
for backward, gradients, temporaries); not memory outside torch's allocator (oneDNN scratchpads,
Python objects), and frees of tensors that existed before the step do not lower it (the profiler
does not see them; in these steps none of the big ones is freed). On CUDA: the caching
allocator's peak minus what was allocated before the step.

Attention share (per attention model, mode and variant): time = median over the rounds of
(variant's step - plain model's step in the same round), memory = variant's peak - plain's peak.
The project's target: fused share / eager share <= 1/3, for time and for memory.

Check: before anything is timed, the eager and fused models' logits in eval() on the benchmark
input agree within fp32 tolerance, and so do the losses of their first training step; otherwise
the run stops (a broken convert must not produce a flattering number). ``convert`` must also swap
at least one module of an attention model.

Results: benchmarks/results/models_<device>.{md,json,png}; progress to stderr.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fusedattn import bench, models

DEFAULT_MODELS = ("resnet50", "seresnet50", "resnet50_cbam", "resnet50d", "ecaresnet50d",
                  "tv_resnet50", "tv_resnet50_simam", "tv_resnet50_ham")
MODES = ("train", "infer")
VARIANTS = ("plain", "eager", "fused")  # the roles within a group
TARGET_RATIO = 1 / 3
NORM_NOISE = 0.25
SEED = 0
log = bench.log


def add_arguments(ap) -> None:
    """The ``--models`` options of ``python -m fusedattn.bench`` (``--quick``, ``--device`` and
    ``--out`` are shared with the op benchmark)."""
    g = ap.add_argument_group("model benchmark (--models)")
    g.add_argument("--models", nargs="?", const=",".join(DEFAULT_MODELS), default=None,
                   help="benchmark whole models instead of ops: a comma list of "
                        f"{', '.join(models.NAMES)} (alone: {', '.join(DEFAULT_MODELS)})")
    g.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    g.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    g.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds per group (default 6, --quick 3)")
    g.add_argument("--warmup", type=int, default=1,
                   help="untimed steps per variant and mode before the profiled one (default 1)")


_OP_OPTIONS = ("--ops", "--dtypes", "--shapes", "--layouts", "--reps", "--e-lambda")


def check_args(ap, args) -> None:
    """ap.error on unknown model names or on op-benchmark options given with --models."""
    unknown = [n for n in args.models.split(",") if n not in models.NAMES]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; expected some of "
                 f"{', '.join(models.NAMES)}")
    clash = [o for o in _OP_OPTIONS if o in args.given]
    if clash:
        ap.error(f"{', '.join(clash)}: options of the op benchmark, not of --models")


# ----------------------------------------------------------------------------- the models

def groups(names) -> list[list[str]]:
    """[plain, attention model] per requested attention model, then [plain] for each requested
    plain model that none of them uses."""
    out = [[models.PLAIN[n], n] for n in names if n in models.PLAIN]
    used = {g[0] for g in out}
    out += [[n] for n in names if n not in models.PLAIN and n not in used]
    return out


def perturb_norms(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Adds seeded uniform(-NORM_NOISE, NORM_NOISE) to every BatchNorm's weight, bias,
    running_mean and running_var (which stays >= 0.75), so that no residual branch is zeroed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t in (m.weight, m.bias, m.running_mean, m.running_var):
                    if t is not None:
                        noise = torch.rand(t.shape, generator=gen, dtype=torch.float64)
                        t.add_(((2 * noise - 1) * NORM_NOISE).to(t.dtype))
    return model


def build_variants(group: list[str], device) -> tuple[dict, dict]:
    """{role: (model name, nn.Module)} for the group's plain model and, for an attention model,
    its eager and fused variants; and what convert reported {"swapped": n, "left": [...]}."""
    plain = group[0]
    out = {"plain": (plain, perturb_norms(models.build(plain)).to(device))}
    report = {}
    if len(group) > 1:
        name = group[1]
        eager = perturb_norms(models.build(name)).to(device)
        import fusedattn
        fused, rep = fusedattn.convert(copy.deepcopy(eager), return_report=True)
        if not rep.swapped:
            raise RuntimeError(f"fusedattn.convert swapped nothing in {name}:\n{rep}")
        out["eager"], out["fused"] = (name, eager), (name, fused)
        report = {"swapped": len(rep.swapped), "left": [list(x) for x in rep.left]}
    return out, report


def check_same_outputs(eager: nn.Module, fused: nn.Module, x, y) -> dict:
    """Asserts that eager and fused agree: eval() logits on x (inference_mode) and the loss of a
    training forward (train(), BatchNorm batch statistics; run on deep copies so the models'
    running statistics stay untouched). Returns the largest differences."""
    out = {}
    with torch.inference_mode():
        le, lf = eager.eval()(x), fused.eval()(x)
    scale = le.abs().max().item()
    out["logits_max_abs"] = scale
    out["logits_max_diff"] = (lf - le).abs().max().item()
    torch.testing.assert_close(lf, le, rtol=1e-4, atol=1e-4 * max(scale, 1e-6),
                               msg=lambda m: f"eval logits of fused and eager differ: {m}")
    te, tf = copy.deepcopy(eager).train(), copy.deepcopy(fused).train()
    with torch.no_grad():
        lse, lsf = F.cross_entropy(te(x), y), F.cross_entropy(tf(x), y)
    out["train_loss"] = lse.item()
    out["train_loss_diff"] = abs(lsf.item() - lse.item())
    torch.testing.assert_close(lsf, lse, rtol=1e-4, atol=1e-5,
                               msg=lambda m: f"training losses of fused and eager differ: {m}")
    return out


# ----------------------------------------------------------------------------- the steps

def make_steps(model: nn.Module, x, y) -> dict:
    """{mode: step()} for one model: a training step with its own SGD(lr=0.01, momentum=0.9),
    and an inference forward."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train():
        model.train()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    def infer():
        model.eval()
        with torch.inference_mode():
            model(x)

    return {"train": train, "infer": infer}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step, device) -> float:
    """Seconds of one call of ``step``."""
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def peak_added_bytes(step, device) -> int:
    """Peak bytes allocated by torch during one call of ``step`` above what was live before it
    (CPU: from the profiler's memory events, see the module docstring; CUDA: allocator peak)."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------- one group

def bench_group(group, args, device) -> tuple[list[dict], dict]:
    """Rows {model, role, mode, samples_ms, median_ms, p20_ms, p80_ms, peak_bytes} of one
    group, timed interleaved; and facts about it (convert's report, the output check)."""
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    variants, report = build_variants(group, device)
    facts = {"group": group, "convert": report}
    if "fused" in variants:
        facts["check"] = check_same_outputs(variants["eager"][1], variants["fused"][1], x, y)
        log(f"    outputs agree: {facts['check']}")
    roles = [r for r in VARIANTS if r in variants]
    steps = {r: make_steps(m, x, y) for r, (_, m) in variants.items()}
    for r in roles:
        for mode in MODES:
            for _ in range(args.warmup):
                steps[r][mode]()
    peaks = {}
    for r in roles:
        for mode in MODES:
            peaks[r, mode] = peak_added_bytes(steps[r][mode], device)
            log(f"    peak {variants[r][0]:22s} {r:5s} {mode:5s} {peaks[r, mode] / 2**20:8.1f} MiB")
    samples = {(r, mode): [] for r in roles for mode in MODES}
    orders = bench.round_orders(len(roles))
    for i in range(args.rounds):
        order = [roles[k] for k in orders[i % len(orders)]]
        for mode in MODES:
            for r in order:
                t = time_step(steps[r][mode], device)
                samples[r, mode].append(t * 1e3)
                log(f"    round {i + 1}/{args.rounds} {mode:5s} {variants[r][0]:22s} {r:5s} "
                    f"{t * 1e3:9.1f} ms")
    rows = []
    for r in roles:
        for mode in MODES:
            ts = samples[r, mode]
            med = statistics.median(ts)
            q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [med] * 4
            rows.append({"group": group[-1], "model": variants[r][0], "role": r, "mode": mode,
                         "median_ms": med, "p20_ms": q[0], "p80_ms": q[3], "samples_ms": ts,
                         "peak_bytes": peaks[r, mode]})
    return rows, facts


# ----------------------------------------------------------------------------- the shares

def _row(rows, **kw):
    return next((r for r in rows if all(r[k] == v for k, v in kw.items())), None)


def _ratio(a, b):
    return a / b if b > 0 else None


def shares(rows) -> list[dict]:
    """Per attention model and mode: the plain/eager/fused medians and peaks, each variant's
    attention share (time: median of per-round differences to the plain model; memory: peak
    difference) and fused share / eager share."""
    out = []
    for g in dict.fromkeys(r["group"] for r in rows if r["role"] == "fused"):
        for mode in MODES:
            get = {v: _row(rows, group=g, role=v, mode=mode) for v in VARIANTS}
            s = {"model": g, "plain": get["plain"]["model"], "mode": mode}
            for v in VARIANTS:
                s[f"{v}_ms"] = get[v]["median_ms"]
                s[f"{v}_peak_bytes"] = get[v]["peak_bytes"]
            for v in ("eager", "fused"):
                s[f"{v}_share_ms"] = statistics.median(
                    a - b for a, b in zip(get[v]["samples_ms"], get["plain"]["samples_ms"]))
                s[f"{v}_share_bytes"] = get[v]["peak_bytes"] - get["plain"]["peak_bytes"]
            s["time_ratio"] = _ratio(s["fused_share_ms"], s["eager_share_ms"])
            s["memory_ratio"] = _ratio(s["fused_share_bytes"], s["eager_share_bytes"])
            out.append(s)
    return out


# ----------------------------------------------------------------------------- reporting

def _mib(b) -> str:
    return f"{b / 2**20:.0f}"


def _r(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def per_model(rows) -> list[dict]:
    """One line per (model, mode): eager (as built) and fused median ms and peak bytes; a plain
    model timed in several groups gets the median of all its samples."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        for mode in MODES:
            line = {"model": name, "mode": mode}
            for v, roles in (("eager", ("plain", "eager")), ("fused", ("fused",))):
                sel = [r for r in rows if r["model"] == name and r["mode"] == mode
                       and r["role"] in roles]
                if sel:
                    line[f"{v}_ms"] = statistics.median(t for r in sel for t in r["samples_ms"])
                    line[f"{v}_peak_bytes"] = max(r["peak_bytes"] for r in sel)
            out.append(line)
    return out


def tables(rows, share_rows) -> str:
    """Markdown: the attention-share table, then the per-model table."""
    head = ["model (plain)", "mode", "plain ms", "eager ms", "fused ms", "eager share ms",
            "fused share ms", "time ratio", "plain MiB", "eager MiB", "fused MiB",
            "eager share MiB", "fused share MiB", "memory ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in share_rows:
        cells = [f"{s['model']} ({s['plain']})", s["mode"]]
        cells += [f"{s[f'{v}_ms']:.1f}" for v in VARIANTS]
        cells += [f"{s['eager_share_ms']:.1f}", f"{s['fused_share_ms']:.1f}", _r(s["time_ratio"])]
        cells += [_mib(s[f"{v}_peak_bytes"]) for v in VARIANTS]
        cells += [_mib(s["eager_share_bytes"]), _mib(s["fused_share_bytes"]),
                  _r(s["memory_ratio"])]
        lines.append("| " + " | ".join(cells) + " |")
    head2 = ["model", "mode", "eager ms", "fused ms", "eager peak MiB", "fused peak MiB"]
    lines2 = ["| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for m in per_model(rows):
        cells = [m["model"], m["mode"], f"{m['eager_ms']:.1f}",
                 f"{m['fused_ms']:.1f}" if "fused_ms" in m else "-", _mib(m["eager_peak_bytes"]),
                 _mib(m["fused_peak_bytes"]) if "fused_peak_bytes" in m else "-"]
        lines2.append("| " + " | ".join(cells) + " |")
    parts = []
    if share_rows:
        parts.append("Attention share (variant - plain model; time: median over rounds of the "
                     "per-round difference; ratio = fused share / eager share, target <= "
                     f"{TARGET_RATIO:.2f}):\n\n" + "\n".join(lines))
    parts.append("Per model (a plain model timed in several groups: median of all its samples):"
                 "\n\n" + "\n".join(lines2))
    return "\n\n".join(parts)


def plot(rows, path: Path, title: str) -> None:
    """Bars per model: step time and peak memory, train and infer; plain (grey), eager, fused."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups_ = list(dict.fromkeys(r["group"] for r in rows))
    fig, axes = plt.subplots(2, 2, figsize=(12, 3 + 1.2 * len(groups_)), squeeze=False)
    colors = {"plain": "0.6", "eager": "C0", "fused": "C1"}
    labels = {"plain": "plain model", "eager": "eager", "fused": "fused (convert)"}
    ticks = [g if g not in models.PLAIN else f"{g}\n(plain: {models.PLAIN[g]})" for g in groups_]
    width = 0.27
    for row_ax, mode in zip(axes, MODES):
        for ax, (key, scale, unit) in zip(row_ax, (("median_ms", 1, "ms (median, p20-p80)"),
                                                   ("peak_bytes", 2**-20, "peak MiB"))):
            for i, v in enumerate(VARIANTS):
                ys, vals, err = [], [], [[], []]
                for j, g in enumerate(groups_):
                    r = _row(rows, group=g, role=v, mode=mode)
                    if r:
                        ys.append(j + (i - 1) * width)
                        vals.append(r[key] * scale)
                        lo, hi = ((r["median_ms"] - r["p20_ms"], r["p80_ms"] - r["median_ms"])
                                  if key == "median_ms" else (0, 0))
                        err[0].append(lo)
                        err[1].append(hi)
                if ys:
                    ax.barh(ys, vals, height=width, color=colors[v], label=labels[v],
                            **({"xerr": err, "capsize": 2} if key == "median_ms" else {}))
            ax.set_yticks(range(len(groups_)))
            ax.set_yticklabels(ticks, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(unit)
            ax.set_title(f"{mode} step")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper right", fontsize=8, ncols=3)
    fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(rows, share_rows, facts, args, device, where, seconds, load) -> Path:
    """models_<device>.{json,md,png} under --out; prints the tables."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"models_{device.type}"
    import fusedattn
    from fusedattn import registry
    meta = {"command": "python -m fusedattn.bench " + " ".join(args.argv), "machine": where,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": device.type, "batch": args.batch, "size": args.size, "dtype": "float32",
            "layout": "contiguous", "rounds": args.rounds, "warmup": args.warmup,
            "norm_noise": NORM_NOISE, "seed": SEED, "seconds": round(seconds, 1),
            "loadavg_1min_start_end": load,
            "fused_backends": {op: fusedattn.last_backend(op) for op in registry.OPS},
            "date": time.strftime("%Y-%m-%d %H:%M")}
    with open(f"{stem}.json", "w") as f:
        json.dump({"meta": meta, "groups": facts, "shares": share_rows, "rows": rows}, f,
                  indent=1)
    md = tables(rows, share_rows)
    busiest = max(max(f["loadavg_1min_start_end"]) for f in facts)
    if busiest > (os.cpu_count() or 1):
        md = (f"**Note:** the machine was busy during the run (1-min load average up to "
              f"{busiest:.1f} on {os.cpu_count()} CPUs, per group in the JSON): the times include "
              "other processes' interference; the memory figures do not depend on it.\n\n" + md)
    backends = ", ".join(f"{k}: {v}" for k, v in meta["fused_backends"].items() if v)
    with open(f"{stem}.md", "w") as f:
        f.write(f"`{meta['command']}` on {where}, torch {torch.__version__}, {meta['date']}; "
                f"batch {args.batch}, {args.size}x{args.size}, fp32, contiguous, "
                f"{args.rounds} rounds, {meta['seconds']:.0f} s (1-min load average at start, "
                f"end: {load[0]:.1f}, {load[1]:.1f}); fused backends: {backends or '-'}\n\n"
                f"{md}\n")
    plot(rows, Path(f"{stem}.png"),
         f"models, batch {args.batch}, {args.size}x{args.size}, fp32, on {where}")
    print(f"\nmodels:\n{md}")
    log(f"wrote {stem}.json, .md, .png")
    return stem


# ----------------------------------------------------------------------------- main

def main(args, argv) -> int:
    """Runs the model benchmark for ``bench.parse(argv)``'s args (``args.models`` set)."""
    names = list(dict.fromkeys(args.models.split(",")))
    args.argv = argv
    device = torch.device(args.device)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 6
    where = bench.machine(device)
    todo = groups(names)
    log(f"fusedattn.bench --models: {len(todo)} groups on {where}; torch {torch.__version__}; "
        f"batch {args.batch}, {args.size}x{args.size}, fp32; {args.rounds} rounds")
    period = len(bench.round_orders(3))
    if any(len(g) > 1 for g in todo) and args.rounds % period:
        log(f"fusedattn.bench --models: --rounds {args.rounds} is not a multiple of {period}: "
            "the orders of plain, eager, fused are not balanced")
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    rows, facts = [], []
    for i, g in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {' vs '.join(g)}")
        tg = time.perf_counter()
        load = os.getloadavg()[0]
        with bench._backend_ctx(args.backend):
            r, f = bench_group(g, args, device)
        f["loadavg_1min_start_end"] = (load, os.getloadavg()[0])
        rows += r
        facts.append(f)
        log(f"    done in {time.perf_counter() - tg:.1f} s")
    write_results(rows, shares(rows), facts, args, device, where, time.perf_counter() - t0,
                  (load0, os.getloadavg()[0]))
    return 0
