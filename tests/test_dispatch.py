"""Backend reporting and choice: nothing falls back silently."""
import os
import subprocess
import sys

import pytest
import torch

import fusedattn
from fusedattn import dispatch
from helpers import GPU


def test_backends_report_every_backend_with_a_reason():
    report = fusedattn.backends()
    assert set(report) == {"cpu", "cuda", "triton", "eager"}
    for name, st in report.items():
        assert isinstance(st.available, bool) and st.reason, name
    assert report["cpu"].available and report["eager"].available
    if not GPU:
        assert not report["cuda"].available


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
            "st = fusedattn.backends()['cpu']\n"
            "print(st.available, st.reason)\n"
            "with fusedattn.use_backend('eager'): fusedattn.simam(torch.randn(1,2,3,3))\n"
            "try:\n"
            "    fusedattn.simam(torch.randn(1,2,3,3))\n"
            "except fusedattn.BackendUnavailable as e: print('raised', e)\n")
    r = _run_python(code)
    assert r.returncode == 0, r.stderr
    assert "False fusedattn._C could not be loaded" in r.stdout
    assert "simulated missing build" in r.stdout and "raised" in r.stdout
