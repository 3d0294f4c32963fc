"""The README's quick start runs as written: every ```python block of its "Quick start" section,
in order, in one namespace, in a scratch directory."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_quick_start_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", _section(README.read_text(), "Quick start"), re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README quick start block {i + 1}", "exec"), namespace)
    assert (tmp_path / "seresnet50.onnx").exists()
