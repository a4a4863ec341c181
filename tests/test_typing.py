"""String options are ``Literal`` types: a type checker refuses ``which="la"``."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest

import hessian_spectra as hs

SRC = Path(__file__).resolve().parents[1] / "src"

EXPECTED = {
    (hs.lanczos, "which"): ("LA", "SA", "LM"),
    (hs.block_lanczos, "which"): ("LA", "SA", "LM"),
    (hs.eigenpairs, "which"): ("LA", "SA", "LM"),
    (hs.eigenpairs, "method"): ("auto", "lanczos", "block"),
    (hs.trace, "method"): ("hutch++", "hutchinson", "exact"),
    (hs.trace, "distribution"): ("rademacher", "gaussian"),
    (hs.hutchinson, "distribution"): ("rademacher", "gaussian"),
    (hs.hutch_plus_plus, "distribution"): ("rademacher", "gaussian"),
    (hs.diagonal, "distribution"): ("rademacher", "gaussian"),
    (hs.block_spectra, "which"): ("LA", "SA", "LM"),
    (hs.CurvatureTracker.__init__, "which"): ("LA", "SA", "LM"),
    (hs.model_sharpness, "method"): ("auto", "dense", "lanczos"),
    (hs.loss_sharpness, "method"): ("auto", "dense", "lanczos"),
    (hs.mse_hvp, "reduction"): ("mean", "sum"),
}


@pytest.mark.parametrize(("fn", "arg"), list(EXPECTED), ids=lambda x: getattr(x, "__qualname__", x))
def test_string_options_are_literals(fn, arg):
    hint = typing.get_type_hints(fn)[arg]
    assert typing.get_origin(hint) is typing.Literal
    assert typing.get_args(hint) == EXPECTED[(fn, arg)]


@pytest.mark.slow
def test_mypy_refuses_lowercase_which(tmp_path):
    """A type checker catches a string option that is not one of the choices (a cold mypy run,
    about 20 s; mypy is in the test extra)."""
    script = tmp_path / "use.py"
    script.write_text(
        "import torch\n"
        "from hessian_spectra import lanczos, trace\n"
        "A = torch.eye(3)\n"
        'lanczos(A, which="la")\n'
        'trace(A, method="hutch")\n'
        'lanczos(A, which="LA")\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-incremental", str(script)],
        capture_output=True,
        text=True,
        env={"MYPYPATH": str(SRC), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        timeout=300,
    )
    lines = [ln for ln in out.stdout.splitlines() if ": error:" in ln]
    assert len(lines) == 2, out.stdout
    assert "use.py:4:" in lines[0] and "\"Literal['LA', 'SA', 'LM']\"" in lines[0]
    assert "use.py:5:" in lines[1] and "hutch++" in lines[1]
