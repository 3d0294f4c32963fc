"""Backend reporting and choice: nothing falls back silently; a choice holds for its thread
(and asyncio task) only; compiled functions follow the choice (they recompile, never run a stale
one); Triton launches go to the input's device and its current stream."""
import asyncio
import contextlib
import copy
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fusedattn
from fusedattn import dispatch, registry
from helpers import GPU, INTERPRET


def test_backends_report_every_op_and_backend_with_a_reason():
    report = fusedattn.backends()
    assert set(report) == set(registry.OPS)
    for op, per_op in report.items():
        assert set(per_op) == {"cpu", "cuda", "triton", "eager"}, op
        for name, st in per_op.items():
            assert isinstance(st.available, bool) and st.reason, (op, name)
        assert per_op["cpu"].available and per_op["eager"].available, op
        if not GPU:
            assert not per_op["cuda"].available, op
        assert fusedattn.backends(op) == per_op
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        fusedattn.backends("nope")


def test_default_backend_for_cpu_tensors_is_cpu():
    fusedattn.simam(torch.randn(1, 2, 3, 3))
    assert fusedattn.last_backend() == "cpu"


def test_use_backend_nests_and_restores():
    x = torch.randn(1, 2, 3, 3)
    with fusedattn.use_backend("eager"):
        fusedattn.simam(x)
        assert fusedattn.last_backend() == "eager"
        with fusedattn.use_backend("cpu"):
            fusedattn.simam(x)
            assert fusedattn.last_backend() == "cpu"
        fusedattn.simam(x)
        assert fusedattn.last_backend() == "eager"
    assert dispatch.chosen() is None or "FUSEDATTN_BACKEND" in os.environ


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        with fusedattn.use_backend("tpu"):
            pass


@pytest.mark.skipif(GPU, reason="checks the no-GPU error")
def test_chosen_backend_that_cannot_run_raises():
    x = torch.randn(1, 2, 3, 3)
    with fusedattn.use_backend("cuda"):
        with pytest.raises(fusedattn.BackendUnavailable, match="backend 'cuda' cannot run"):
            fusedattn.simam(x)


def test_triton_on_cpu_tensors_needs_the_interpreter():
    r = _run_python("import torch, fusedattn\n"
                    "with fusedattn.use_backend('triton'):\n"
                    "    fusedattn.simam(torch.randn(1, 2, 3, 3))", TRITON_INTERPRET="0")
    assert r.returncode != 0 and "BackendUnavailable" in r.stderr
    assert "TRITON_INTERPRET" in r.stderr


def _run_python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_env_var_chooses_backend():
    r = _run_python("import torch, fusedattn; fusedattn.simam(torch.randn(1,2,3,3)); "
                    "print(fusedattn.last_backend())", FUSEDATTN_BACKEND="eager")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "eager"
    r = _run_python("import torch, fusedattn; fusedattn.simam(torch.randn(1,2,3,3))",
                    FUSEDATTN_BACKEND="nope")
    assert r.returncode != 0 and "FUSEDATTN_BACKEND='nope' is not a backend" in r.stderr


def test_import_never_fails_without_the_extension(tmp_path):
    """A missing _C makes 'cpu' unavailable with the reason; import and 'eager' still work."""
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'fusedattn._C': raise ImportError('simulated missing build')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import torch, fusedattn\n"
            "st = fusedattn.backends('simam')['cpu']\n"
            "print(st.available, st.reason)\n"
            "with fusedattn.use_backend('eager'): fusedattn.simam(torch.randn(1,2,3,3))\n"
            "try:\n"
            "    fusedattn.simam(torch.randn(1,2,3,3))\n"
            "except fusedattn.BackendUnavailable as e: print('raised', e)\n")
    r = _run_python(code)
    assert r.returncode == 0, r.stderr
    assert "False fusedattn._C could not be loaded" in r.stdout
    assert "simulated missing build" in r.stdout and "raised" in r.stdout


def test_env_var_is_read_once_and_a_later_change_warns(monkeypatch):
    """FUSEDATTN_BACKEND is the process default as fusedattn read it at import: a later change
    of os.environ does not move it (compiled functions could not follow), and says so once."""
    monkeypatch.setattr(dispatch, "_env_warned", set())
    other = "eager" if dispatch._ENV != "eager" else "cpu"
    monkeypatch.setenv("FUSEDATTN_BACKEND", other)
    x = torch.randn(1, 2, 3, 3)
    with pytest.warns(UserWarning, match=f"FUSEDATTN_BACKEND is now '{other}', but it is read"):
        fusedattn.simam(x)
    assert fusedattn.last_backend() == (dispatch._ENV or "cpu")
    with fusedattn.use_backend(other):  # the way to change it while running
        fusedattn.simam(x)
    assert fusedattn.last_backend() == other


# ----------------------------------------------------------------------------- threads, tasks


def _in_threads(*bodies):
    """Run each body(wait) in its own thread; wait() is a barrier of all of them (the steps of the
    interleaving). Re-raises the first failure."""
    barrier = threading.Barrier(len(bodies), timeout=120)
    errors = []

    def run(body):
        try:
            body(barrier.wait)
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_use_backend_is_per_thread():
    """Thread A inside use_backend('cpu'), thread B inside use_backend('eager'), interleaved:
    neither sees the other's choice, and leaving a block restores only its own thread's (a
    process-wide stack gave A B's 'eager' and popped A's choice when B left)."""
    x = torch.randn(1, 2, 3, 3)
    seen = {}

    def ran(key):
        fusedattn.simam(x)
        seen[key] = (dispatch.chosen(), fusedattn.last_backend())

    def a(wait):
        with fusedattn.use_backend("cpu"):
            wait()                                  # 1: A is in
            wait()                                  # 2: B is in
            ran("A, B inside")
            wait()                                  # 3
            wait()                                  # 4: B ran and left
            ran("A, B left")
        wait()                                      # 5: A left
        wait()                                      # 6: B ran

    def b(wait):
        wait()                                      # 1
        seen["B before its block, A inside"] = dispatch.chosen()
        with fusedattn.use_backend("eager"):
            wait()                                  # 2
            wait()                                  # 3: A ran
            ran("B, A inside")
        wait()                                      # 4
        wait()                                      # 5
        ran("B, both left")
        wait()                                      # 6

    _in_threads(a, b)
    default = dispatch._ENV
    assert seen == {"B before its block, A inside": default,
                    "A, B inside": ("cpu", "cpu"),
                    "B, A inside": ("eager", "eager"),
                    "A, B left": ("cpu", "cpu"),
                    "B, both left": (default, default or "cpu")}
    assert dispatch.chosen() == default  # the main thread never had a choice


def test_use_backend_is_per_asyncio_task():
    """Two tasks of one thread, each inside its own use_backend block, each running while the
    other is inside its block too."""
    x = torch.randn(1, 2, 3, 3)

    def ran():
        fusedattn.simam(x)
        return dispatch.chosen(), fusedattn.last_backend()

    async def main():
        a_in, b_in, a_done = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def a():
            with fusedattn.use_backend("cpu"):
                a_in.set()
                await b_in.wait()
                out = ran()
                a_done.set()
                return out

        async def b():
            with fusedattn.use_backend("eager"):
                b_in.set()
                await a_in.wait()
                await a_done.wait()
                return ran()

        return await asyncio.gather(a(), b())

    assert asyncio.run(main()) == [("cpu", "cpu"), ("eager", "eager")]
    assert dispatch.chosen() == dispatch._ENV


# ----------------------------------------------------------------------------- torch.compile


def _fused_ops(gm) -> set:
    return {str(n.target) for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("fusedattn.")}


def _graph_runs(backend: str, ops: set) -> bool:
    """Whether a dynamo graph with these fusedattn ops is one of backend's."""
    if backend == "eager":
        return not ops
    return bool(ops) and all(o.split(".")[1].endswith("_triton") == (backend == "triton")
                             for o in ops)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compiled_function_recompiles_when_the_choice_changes(compiler):
    """torch.compile(fullgraph=True) of a net with SE and SimAM under the default, then under
    use_backend('cpu'), 'eager' (and 'triton' in the interpreter), then back: each choice is
    compiled once, with its own backend's ops in the graph, and a cached graph is reused when its
    choice comes back; last_backend follows every call, cached ones included."""
    torch._dynamo.reset()
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), fusedattn.SE(8), fusedattn.SimAM()).double()
    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(net, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    with fusedattn.use_backend("eager"):
        expected = net(x)
        dx_expected, = torch.autograd.grad(expected.sum(), x)

    default = dispatch._ENV or "cpu"
    choices = [None, "cpu", "eager", None, "eager", "cpu"]
    if INTERPRET:
        choices += ["triton", None, "triton"]
    graph_of = {}
    for choice in choices:
        frames = counter.frame_count
        with fusedattn.use_backend(choice) if choice else contextlib.nullcontext():
            y = compiled(x)
        backend = choice or default
        assert fusedattn.last_backend("se") == backend, (choice, fusedattn.last_backend("se"))
        assert fusedattn.last_backend("simam") == backend, choice
        if choice in graph_of:
            assert counter.frame_count == frames, f"{choice}: recompiled, its graph was cached"
        else:
            assert counter.frame_count == frames + 1, f"{choice}: not recompiled"
            graph_of[choice] = _fused_ops(counter.graphs[-1])
        assert _graph_runs(backend, graph_of[choice]), (choice, graph_of[choice])
        dx, = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dx, dx_expected, rtol=1e-10, atol=1e-10)
    assert graph_of[None] == graph_of[default]  # the default picked the same backend


def test_compiled_function_follows_each_threads_choice():
    """One compiled function called from two threads at once, each inside its own use_backend:
    dynamo evaluates the guard on the choice in the calling thread, so each runs its own graph."""
    torch._dynamo.reset()
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), fusedattn.SimAM())
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(net, backend=counter, fullgraph=True)
    x = torch.randn(1, 3, 5, 5)
    graph_of = {}
    for name in ("cpu", "eager"):  # compile both up front: the threads only hit the cache
        with fusedattn.use_backend(name):
            compiled(x)
        graph_of[name] = _fused_ops(counter.graphs[-1])
    assert graph_of["cpu"] and not graph_of["eager"]
    seen = {"cpu": [], "eager": []}

    def turns(name, first):
        """Both threads stay inside their blocks; they take turns to call the compiled function
        and read last_backend (process-wide) while the other waits at the barrier."""
        def run(wait):
            with fusedattn.use_backend(name):
                wait()                                      # both inside
                for _ in range(3):
                    for mine in ((True, False) if first else (False, True)):
                        if mine:
                            compiled(x)
                            seen[name].append(fusedattn.last_backend())
                        wait()
        return run

    _in_threads(turns("cpu", first=True), turns("eager", first=False))
    assert counter.frame_count == 2  # no recompilation in the threads
    assert seen["cpu"] == ["cpu"] * 3 and seen["eager"] == ["eager"] * 3, seen


def test_compiled_function_under_the_env_default():
    """FUSEDATTN_BACKEND=eager: a compiled function runs eager by default, recompiles for
    use_backend('cpu'), and returns to its eager graph (cached) after the block."""
    code = ("import torch, fusedattn\n"
            "from torch._dynamo.testing import CompileCounterWithBackend\n"
            "counter = CompileCounterWithBackend('aot_eager')\n"
            "net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), fusedattn.SimAM())\n"
            "f = torch.compile(net, backend=counter, fullgraph=True)\n"
            "x = torch.randn(1, 3, 5, 5)\n"
            "def run():\n"
            "    y = f(x)\n"
            "    ops = sorted({str(n.target) for n in counter.graphs[-1].graph.nodes\n"
            "                  if str(n.target).startswith('fusedattn.')})\n"
            "    print(fusedattn.last_backend(), counter.frame_count, ops)\n"
            "run()\n"
            "with fusedattn.use_backend('cpu'):\n"
            "    run()\n"
            "run()\n")
    r = _run_python(code, FUSEDATTN_BACKEND="eager")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["eager 1 []",
                                     "cpu 2 ['fusedattn.simam_forward.default']",
                                     "eager 2 ['fusedattn.simam_forward.default']"], r.stdout


# ----------------------------------------------------------------------------- devices, streams

_DEVICES = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(_DEVICES < 2, reason=f"needs 2 CUDA devices ({_DEVICES} visible to torch here)")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", list(registry.OPS))
def test_second_device_and_its_current_stream(op, backend):
    """x on cuda:1 while cuda:0 is the current device, and cuda:1's current stream a side
    stream that is still busy (a sleep) when its copy into x is queued: forward and backward
    must launch on cuda:1 and on that stream (a launch on cuda:0 faults or reads the wrong
    memory; one on another stream of cuda:1 reads x before the copy). Same numbers as the module
    on cuda:0."""
    st = fusedattn.backends(op)[backend]
    if not st.available:
        pytest.skip(f"backend {backend} cannot run {op} here: {st.reason}")
    entry = registry.get(op)
    C = 16
    module = entry.build(entry.fused_cls(), (2, C, 9, 11))
    src = torch.randn(2, C, 9, 11)
    g = torch.randn(2, C, 9, 11)

    def run(device, stream=None):
        m = copy.deepcopy(module).to(device)
        x_src, g_dev = src.to(device), g.to(device)
        torch.cuda.synchronize(device)
        with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
            x = torch.empty_like(x_src)
            if stream is not None:  # the current device is cuda:1 here, stream its current one
                torch.cuda._sleep(100_000_000)
            x.copy_(x_src)
            x.requires_grad_()
            with torch.cuda.device(0):  # cuda:0 current; cuda:1's current stream stays `stream`
                assert torch.cuda.current_device() == 0
                if stream is not None:
                    assert torch.cuda.current_stream(device) == stream
                with fusedattn.use_backend(backend):
                    y = m(x)
                    assert fusedattn.last_backend(op) == backend
                    dx, = torch.autograd.grad(y, x, g_dev)
        torch.cuda.synchronize(device)
        return y.detach().cpu(), dx.cpu()

    y0, dx0 = run(torch.device("cuda", 0))
    y1, dx1 = run(torch.device("cuda", 1), torch.cuda.Stream(device=torch.device("cuda", 1)))
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(dx1, dx0)
