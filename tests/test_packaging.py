"""Packaging: fusedattn installs from its sources without the checkout, and runs there.

From a copy of the repository's files (``git ls-files``: tracked files and untracked ones that are
not ignored, as a clean clone would have them after a commit), in a temporary folder so that the
checkout's own build (``build/``, ``fusedattn/_C*.so``, ``fusedattn/_build_info.py``) is never
touched, with ``FUSEDATTN_CUDA=0`` (the CPU-only build, the README's CPU-only recipe):

1. ``pip install --no-build-isolation --no-deps .`` (not editable) into a fresh venv ``dot``;
2. ``pip wheel --no-build-isolation --no-deps .`` from the same copy, and
   ``pip install --no-deps --no-index <wheel>`` into a second fresh venv ``wheel``.

``pip install .`` builds a wheel and installs it, so step 2 compiles nothing again: ninja finds the
objects of step 1 up to date (same interpreter, same flags) and only the wheel is packed. Both
install paths are exercised for the price of one compilation of csrc/ (the expensive part: a few
minutes on 2 cores).

The venvs get torch (and triton, numpy, pip, setuptools, ninja) without downloading anything: a
``.pth`` line in each venv's site-packages names a folder of symlinks to the entries of the
running interpreter's site-packages, minus every trace of fusedattn there (the editable install's
``__editable__*`` finder, its dist-info) and minus its ``.pth`` files. The checks assert that
``fusedattn`` is imported from the venv's own site-packages.

In each venv, in a subprocess whose working directory is outside the repository: the ``cpu``
backend is available, SimAM / HAM / SE run forward and backward on it and match the eager
reference, ``fusedattn.convert`` swaps a small model's modules, the Triton kernels are installed
(and SimAM's run in the interpreter), the specs the docstrings cite are installed, and no installed
module cites a spec or doc the package does not hold. With another torch version recorded in the
installed ``_build_info.py``, ``fusedattn._C`` is not loaded and the reason names both versions.

The tests that need the build are marked ``slow`` (``pytest -m "not slow"`` leaves them out; the
README's test command runs them).
"""
import os
import re
import shutil
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_SPEC = ROOT.parent / "shared" / "spec"  # the project's shared specs, where present
SPECS = ("simam", "ham", "zoo", "aaconv", "passes", "README")
BUILD_TIMEOUT_S = 3600


def _run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, (f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n"
                               f"{r.stdout[-6000:]}\n{r.stderr[-6000:]}")
    return r


def _repo_files() -> list[str]:
    out = _run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    return [f for f in out.stdout.split("\0") if f and (ROOT / f).is_file()]


def _build_outputs_in_repo() -> dict[str, int]:
    """What a build leaves in a checkout (build/, *.egg-info, _C*.so, _build_info.py), with
    modification times."""
    found = {}
    for pattern in ("build", "*.egg-info", "fusedattn/_C*.so", "fusedattn/_build_info.py"):
        for p in ROOT.glob(pattern):
            found[str(p.relative_to(ROOT))] = p.stat().st_mtime_ns
    return found


def _site_without_fusedattn(dest: Path) -> Path:
    """A folder of symlinks to everything in torch's site-packages except fusedattn (editable
    finder, dist-info, package) and the .pth files (which only real site dirs process)."""
    site = Path(torch.__file__).resolve().parents[1]
    dest.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("fusedattn", "__editable__")) or name.endswith(".pth"):
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


def _fresh_venv(path: Path, deps: Path) -> Path:
    venv.EnvBuilder(with_pip=False, symlinks=True).create(path)
    py = path / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    (site / "_fusedattn_test_deps.pth").write_text(f"{deps}\n")
    return py


def _env(tmp: Path, py: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
    import ninja  # the build runs `ninja` from PATH: the one of the pinned pip package, alone
    tools = tmp / "tools"
    tools.mkdir(exist_ok=True)
    exe = shutil.which("ninja", path=ninja.BIN_DIR) or shutil.which("ninja")
    assert exe, "no ninja executable (requirements.txt pins the ninja package)"
    if not (tools / "ninja").exists():
        (tools / "ninja").symlink_to(exe)
    env["PATH"] = os.pathsep.join([str(py.parent), str(tools), env.get("PATH", "")])
    env.update(FUSEDATTN_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)),
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1", PIP_NO_INPUT="1",
               TRITON_INTERPRET="1", TMPDIR=str(tmp))
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """{"dot": python of the `pip install .` venv, "wheel": python of the wheel's venv,
    "wheel_file": the wheel, "cwd": a folder outside the repo, "env": the environment}."""
    tmp = tmp_path_factory.mktemp("packaging")
    before = _build_outputs_in_repo()
    src = tmp / "src"
    for f in _repo_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    deps = _site_without_fusedattn(tmp / "deps")
    dot, whl_py = _fresh_venv(tmp / "venv_dot", deps), _fresh_venv(tmp / "venv_wheel", deps)
    env = _env(tmp, dot)
    pip = ["-m", "pip", "--no-input"]
    t0 = time.perf_counter()
    _run([dot, *pip, "install", "--no-build-isolation", "--no-deps", "--no-index", src],
         cwd=tmp, env=env, timeout=BUILD_TIMEOUT_S)
    t1 = time.perf_counter()
    _run([dot, *pip, "wheel", "--no-build-isolation", "--no-deps", "--no-index",
          "-w", tmp / "dist", src], cwd=tmp, env=env, timeout=BUILD_TIMEOUT_S)
    t2 = time.perf_counter()
    (wheel,) = (tmp / "dist").glob("fusedattn-*.whl")
    _run([whl_py, *pip, "install", "--no-deps", "--no-index", wheel], cwd=tmp, env=env,
         timeout=600)
    print(f"\n[packaging] pip install . {t1 - t0:.0f}s, pip wheel (objects reused) {t2 - t1:.0f}s, "
          f"wheel install {time.perf_counter() - t2:.0f}s")
    assert (src / "build").is_dir(), "the build did not run in the copy"
    yield {"dot": dot, "wheel": whl_py, "wheel_file": wheel, "cwd": tmp, "env": env,
           "before": before}


# Runs in each venv, cwd outside the repository.
CHECK = r'''
import re, sys
from pathlib import Path
import torch
import fusedattn
from fusedattn import _build_info, dispatch, reference

pkg = Path(fusedattn.__file__).resolve().parent
venv = Path(sys.prefix).resolve()
assert pkg.is_relative_to(venv), f"fusedattn from {pkg}, not from the venv {venv}"
assert Path(dispatch.native().__file__).resolve().parent == pkg
assert _build_info.TORCH_VERSION == torch.__version__, _build_info.TORCH_VERSION
for op, report in fusedattn.backends().items():
    assert report["cpu"].available, (op, report["cpu"].reason)
assert not dispatch.native().cuda_compiled()  # FUSEDATTN_CUDA=0

torch.manual_seed(0)
def same(fused, ref, op, shape):
    ref.load_state_dict(fused.state_dict())
    ref.train(); fused.train()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y_ref = ref(x); g = torch.randn_like(y_ref)
    dx_ref, = torch.autograd.grad(y_ref, x, g)
    with fusedattn.use_backend("cpu"):
        y = fused(x)
    assert fusedattn.last_backend(op) == "cpu", (op, fusedattn.last_backend(op))
    dx, = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-10)

same(fusedattn.SimAM().double(), reference.SimAM().double(), "simam", (2, 3, 5, 7))
same(fusedattn.HAM(16).double(), reference.HAM(16).double(), "ham", (2, 16, 5, 7))
same(fusedattn.SE(16).double(), reference.SE(16).double(), "se", (2, 16, 5, 7))

model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), reference.SE(16),
                            reference.HAM(16), reference.SimAM()).double()
x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
expected = model(x)
fusedattn.convert(model)
assert [type(m) for m in model[1:]] == [fusedattn.SE, fusedattn.HAM, fusedattn.SimAM], model
with fusedattn.use_backend("cpu"):
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)

import fusedattn.triton_kernels.passes, fusedattn.triton_kernels.simam  # noqa: E401
assert Path(fusedattn.triton_kernels.simam.__file__).resolve().parent == pkg / "triton_kernels"
for op, report in fusedattn.backends().items():
    assert report["triton"].available, (op, report["triton"].reason)
x = torch.randn(1, 2, 3, 5)
with fusedattn.use_backend("triton"):
    y = fusedattn.simam(x)
assert fusedattn.last_backend() == "triton"
torch.testing.assert_close(y, reference.simam(x))

for name in SPECS:
    assert (pkg / "spec" / f"{name}.md").is_file(), name
cited = set()
for f in pkg.rglob("*.py"):
    text = f.read_text()
    bad = re.findall(r"(?:shared/spec|docs)/\w+\.md|(?<![\w/])spec/\w+\.md", text)
    assert not bad, (f, bad)
    cited |= set(re.findall(r"fusedattn/spec/\w+\.md", text))
missing = [c for c in cited if not (pkg.parent / c).is_file()]
assert cited and not missing, (cited, missing)
print("OK", pkg, sorted(cited))
'''.replace("SPECS", repr(SPECS))


def _check(py: Path, installed):
    r = _run([py, "-c", CHECK], cwd=installed["cwd"], env=installed["env"], timeout=600)
    assert r.stdout.startswith("OK"), r.stdout


@pytest.mark.slow  # one CPU-only build of csrc/: minutes
def test_pip_install_dot_runs_outside_the_checkout(installed):
    _check(installed["dot"], installed)


@pytest.mark.slow  # one CPU-only build of csrc/: minutes
def test_wheel_installs_and_runs_in_a_fresh_venv(installed):
    _check(installed["wheel"], installed)
    names = zipfile.ZipFile(installed["wheel_file"]).namelist()
    assert any(re.fullmatch(r"fusedattn/_C\..*\.so", n) for n in names), names
    for needed in ["fusedattn/_build_info.py", "fusedattn/triton_kernels/simam.py",
                   "fusedattn/triton_kernels/passes.py", "fusedattn/ops/passes.py",
                   *(f"fusedattn/spec/{s}.md" for s in SPECS)]:
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("tests/", "csrc/", "benchmarks/", "scripts/"))]
    meta = zipfile.ZipFile(installed["wheel_file"]).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: torch==2.14.1" in meta, meta


@pytest.mark.slow  # one CPU-only build of csrc/: minutes
def test_extension_for_another_torch_is_not_loaded(installed):
    """A build record naming another torch: `_C` stays unloaded (its ABI may not match), the cpu
    backend says why, with both versions, and asking for it raises that."""
    py = installed["wheel"]
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    info = site / "fusedattn" / "_build_info.py"
    original = info.read_text()
    info.write_text('TORCH_VERSION = "2.0.0+other"\n')
    try:
        code = ("import sys, torch, fusedattn\n"
                "st = fusedattn.backends('simam')['cpu']\n"
                "print(st.available, st.reason)\n"
                "assert 'fusedattn._C' not in sys.modules\n"
                "try:\n"
                "    fusedattn.simam(torch.randn(1, 2, 3, 3))\n"
                "except fusedattn.BackendUnavailable as e:\n"
                "    print('raised', e)\n")
        r = _run([py, "-c", code], cwd=installed["cwd"], env=installed["env"], timeout=600)
    finally:
        info.write_text(original)
    expected = f"built against torch 2.0.0+other, running torch {torch.__version__}"
    assert r.stdout.startswith("False ") and expected in r.stdout, r.stdout
    raised = r.stdout.split("raised ", 1)[-1]
    assert "raised " in r.stdout and f"fusedattn._C was not loaded: {expected}" in raised, r.stdout


def test_torch_pins_agree():
    """The runtime pin, the build pin and requirements.txt name the same torch."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    requirements = (ROOT / "requirements.txt").read_text()
    (pin,) = re.findall(r"^torch==(\S+)$", requirements, flags=re.M)
    assert f'dependencies = ["torch=={pin}"]' in pyproject
    assert f'"torch=={pin}"' in pyproject.split("[project]")[0]
    assert torch.__version__.split("+")[0] == pin


@pytest.mark.slow  # one CPU-only build of csrc/: minutes
def test_build_left_nothing_in_the_checkout(installed):
    assert _build_outputs_in_repo() == installed["before"]


def test_spec_copies_match_the_shared_specs():
    """fusedattn/spec/ holds the shared specs unchanged (where the workspace has them)."""
    if not SHARED_SPEC.is_dir():
        pytest.skip(f"no shared specs at {SHARED_SPEC} to compare with")
    shared = sorted(p.name for p in SHARED_SPEC.glob("*.md"))
    assert shared
    for name in shared:
        ours = ROOT / "fusedattn" / "spec" / name
        assert ours.is_file() and ours.read_bytes() == (SHARED_SPEC / name).read_bytes(), (
            f"fusedattn/spec/{name} differs from {SHARED_SPEC / name}: copy the shared spec")
