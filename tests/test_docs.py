"""The README and the docs pages are executed, so their examples cannot drift.

Every fenced ``python`` block of a page runs, in order, in one namespace per
page. Blocks fenced ``pycon``/``text``/``bash`` are not run; a block whose
first line is ``# not run`` is skipped (for GPU- or torchrun-only snippets).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(page: Path) -> list[str]:
    return [b for b in FENCE.findall(page.read_text()) if not b.lstrip().startswith("# not run")]


@pytest.mark.parametrize(
    "page", [p for p in PAGES if _blocks(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns: dict[str, object] = {"__name__": "__docs__"}
    for i, block in enumerate(_blocks(page)):
        try:
            exec(compile(block, f"{page.name}[block {i}]", "exec"), ns)
        except Exception as err:  # pragma: no cover - reported with the block
            raise AssertionError(f"{page.name} block {i} failed: {err!r}\n{block}") from err


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme, "the README's test command and .ci/run have drifted apart"
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
