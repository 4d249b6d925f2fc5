"""The repository documents itself: every "DESIGN.md §N" a docstring, comment or guide cites
exists in docs/DESIGN.md, nothing points outside the checkout, and help() on an op shows its
schema and its maths."""

from __future__ import annotations

import pydoc
import re
from pathlib import Path

import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels import _op_docs

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for pattern in ("*.md", "docs/*.md", "lowrank_kernels/**/*.py", "triton_kernels/*.py",
                             "csrc/**/*.cpp", "csrc/**/*.h", "csrc/**/*.cu", "bench/*.py",
                             "tests/*.py", "scripts/*.sh", "*.txt", "setup.py", "CMakeLists.txt")
           for p in sorted(ROOT.glob(pattern)) if p.is_file()]


def design_sections() -> set[str]:
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.MULTILINE))


def test_every_cited_design_section_exists():
    sections = design_sections()
    assert {"1", "2", "3", "4", "4.1", "4.2", "4.5", "4.10", "5", "6"} <= sections
    cited = {}
    for path in SOURCES:
        text = path.read_text(errors="replace")
        # "DESIGN.md §4.2", "DESIGN §4.3-§4.4", "§4.5" inside a DESIGN.md reference
        for ref in re.findall(r"DESIGN(?:\.md)?\s*(§[\d.§\s,\-–]+)", text):
            for number in re.findall(r"§\s*(\d+(?:\.\d+)?)", ref):
                cited.setdefault(number.rstrip("."), set()).add(path.relative_to(ROOT).as_posix())
    missing = {n: sorted(where) for n, where in cited.items() if n not in sections}
    assert cited and not missing


def test_nothing_points_outside_the_checkout():
    outside = [p.relative_to(ROOT).as_posix() for p in SOURCES
               if p.name != "test_docs.py" and re.search(r"\.\./shared|shared/DESIGN|PEERS\.md|"
                                                         r"STYLE\.md", p.read_text(errors="replace"))]
    assert outside == []


@pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="the ops need the extension")
def test_the_readme_quick_start_runs_and_steps_the_weight():
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(import torch, lowrank_kernels.*?)```", readme, re.DOTALL).group(1)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102  (the README's own code)
    m, n, r = scope["m"], scope["n"], scope["r"]
    assert scope["M"].shape == scope["V"].shape == (m, r) and scope["Q"].shape == (r, n)
    assert scope["V"].abs().sum() > 0  # three steps ran


@pytest.mark.skipif(not lk.EXTENSION_AVAILABLE, reason="the ops need the extension")
@pytest.mark.parametrize("name", _op_docs.OPS)
def test_help_on_an_op_shows_its_schema_and_the_wrapper_docstring(name):
    text = pydoc.plain(pydoc.render_doc(getattr(torch.ops.lowrank, name)))
    assert f"lowrank::{name}(" in text
    assert getattr(lk.ops, name).__doc__.strip().splitlines()[0] in text
    assert "docs/DESIGN.md" in text
    overload = pydoc.plain(pydoc.render_doc(getattr(torch.ops.lowrank, name).default))
    assert f"lowrank::{name}(" in overload
