"""Every usage example of hessian-eigenthings' documentation runs here with only the import
changed, and its numbers match dense float64 references.

``seed_examples/blocks.json`` holds the usage code blocks of the seed documents
(``../shared/seeds/003…`` and ``004…``; the API signature excerpts are left out, and
so is block 57, whose ``hf_lm_loss_of_output(..., fused="auto")`` is pseudo-code
that raises in both libraries). Each block runs with ``hessian_eigenthings``
replaced by ``hessian_spectra`` in a namespace that supplies what the block names
but does not build (``model``, ``dataloader``, ``loss_fn``, ...): a tiny GPT-2 for
blocks about ``transformer.h`` or HuggingFace losses, a tiny TransformerLens model
for ``blocks.*`` filters, a one-process ``torch.distributed`` group for the DDP
blocks, a small float64 classifier otherwise. Every algorithm call made by a
block is recorded and its result checked against the dense matrix of the
operator it ran on.
"""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessian_spectra
import hessian_spectra.algorithms
from hessian_spectra import (
    EigenResult,
    SpectralDensityResult,
    TraceResult,
    cross_entropy_loss_of_output,
    hf_lm_loss,
    match_names,
    supervised_forward,
    tlens_loss,
)

BLOCKS: dict[str, str] = json.loads(
    (Path(__file__).parent / "seed_examples" / "blocks.json").read_text()
)
D = torch.float64
DENSE_LIMIT = 2500  # operators up to this size are formed and diagonalised


class Layered(nn.Module):
    """A classifier whose parameters are named ``layer.{0..4}.*`` and ``head.*`` (one of
    them over 1000 entries), as the seed's filter examples expect."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        sizes = [6, 10, 10, 10, 10, 40]
        self.layer = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.head = nn.Linear(40, 30)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.layer:
            x = torch.tanh(lin(x))
        return self.head(x)


def _classifier() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 6, generator=g, dtype=D)
    y = torch.randint(0, 30, (48,), generator=g)
    data = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    model = Layered()

    def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    return {"model": model, "dataloader": data, "loss_fn": loss_fn}


def _gpt2() -> dict[str, Any]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, attn_pdrop=0.0,
        resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(D).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 16, (4, 8), generator=g)
    data = [{"input_ids": ids[i : i + 2], "labels": ids[i : i + 2]} for i in (0, 2)]
    return {"model": model, "dataloader": data, "loss_fn": hf_lm_loss()}


def _tlens() -> dict[str, Any]:
    tl = pytest.importorskip("transformer_lens")
    cfg = tl.HookedTransformerConfig(
        n_layers=1, d_model=8, n_ctx=8, d_head=4, n_heads=2, d_mlp=16, d_vocab=16,
        act_fn="gelu", dtype=D, seed=0,
    )  # fmt: skip
    model = tl.HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 16, (4, 8), generator=g)
    return {"model": model, "dataloader": [tokens[:2], tokens[2:]], "loss_fn": tlens_loss()}


@contextlib.contextmanager
def _one_process_group() -> Any:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _context(name: str, code: str, stack: contextlib.ExitStack) -> dict[str, Any]:
    """What the block names but does not build."""
    if "DDP" in code or "ddp_model" in code:
        stack.enter_context(_one_process_group())
        from torch.nn.parallel import DistributedDataParallel

        ctx = _classifier()
        ctx["ddp_model"] = DistributedDataParallel(ctx["model"])
    elif "blocks" in code:
        ctx = _tlens()
    elif "transformer.h" in code or "hf_" in code or "huggingface" in code:
        ctx = _gpt2()
    else:
        ctx = _classifier()
    if "GGNOperator" in code:  # the GGN examples pass a loss of the output
        ctx["model_forward"] = supervised_forward
        if "loss_of_output_fn=loss_fn" in code:
            ctx["loss_fn"] = cross_entropy_loss_of_output()
        ctx["loss_of_output_fn"] = cross_entropy_loss_of_output()
        if "transformer.h" in code or "hf_" in code:
            ctx["model_forward"] = lambda m, b: m(**b).logits
    if "hessian_op" in code and "hessian_op =" not in code:  # built in the block before
        ctx["hessian_op"] = hessian_spectra.HessianOperator(
            ctx["model"], ctx["dataloader"], ctx["loss_fn"]
        )
    ctx["filter_func"] = match_names("layer.0.*")
    ctx["custom_computation"] = lambda v: 2.0 * v
    ctx["SomeResult"] = object
    for public in hessian_spectra.__all__:  # names the surrounding text imported
        ctx.setdefault(public, getattr(hessian_spectra, public))
    ctx.update(torch=torch, nn=nn)
    return ctx


_RECORDED = ("lanczos", "trace", "spectral_density", "deflated_power_iteration", "hutchinson")


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, Any]]:
    calls: list[tuple[str, Any, Any]] = []
    for fname in _RECORDED:
        original = getattr(hessian_spectra, fname)

        def wrapper(operator: Any, *args: Any, _f: Any = original, _n: str = fname, **kw: Any):
            result = _f(operator, *args, **kw)
            calls.append((_n, operator, result))
            return result

        for module in (hessian_spectra, hessian_spectra.algorithms):
            monkeypatch.setattr(module, fname, wrapper)
    return calls


def _check_eigen(op: Any, res: EigenResult) -> None:
    """Each pair's eigenvalue lies within its reported true residual of the spectrum of the
    dense matrix (for a symmetric matrix some eigenvalue is within ``||A v - lambda v||``),
    and the reported residual is the true one; a converged result at a tight tolerance is
    the wanted end of the spectrum."""
    A = op.to_dense().to(D)
    A = (A + A.T) / 2
    evals = torch.linalg.eigvalsh(A)
    scale = float(evals.abs().max())
    V = res.eigenvectors.to(D)
    lam = res.eigenvalues.to(D).cpu()
    true_res = torch.linalg.vector_norm(V @ A - lam[:, None] * V, dim=1)
    eps = 1e-9 * scale if op.dtype == D else 1e-4 * scale
    torch.testing.assert_close(res.residuals.to(D).cpu(), true_res, rtol=1e-3, atol=eps)
    for value, r in zip(lam, true_res, strict=True):
        assert float((evals - value).abs().min()) <= float(r) + eps
    if res.converged and res.tol <= 1e-5:
        if res.which == "LM":
            want = evals[evals.abs().argsort(descending=True)][: len(lam)].abs().sort().values
            got = lam.abs().sort().values
        elif res.which == "SA":
            want, got = evals[: len(lam)], lam.sort().values
        else:
            want, got = evals.flip(0)[: len(lam)], lam.sort(descending=True).values
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)


def _check(name: str, op: Any, res: Any) -> None:
    if op.size > DENSE_LIMIT:  # too large to diagonalise here: check the residuals' truth
        assert isinstance(res, EigenResult)
        V = res.eigenvectors
        AV = op.matmat(V)
        true_res = torch.linalg.vector_norm(
            (AV - res.eigenvalues.to(V.dtype)[:, None] * V).double(), dim=1
        )
        scale = float(res.eigenvalues.abs().max())
        torch.testing.assert_close(
            res.residuals.double().cpu(), true_res.cpu(), rtol=1e-2, atol=1e-5 * scale
        )
        return
    if isinstance(res, EigenResult):
        _check_eigen(op, res)
    elif isinstance(res, TraceResult):
        exact = float(torch.trace(op.to_dense().to(D)))
        assert abs(res.estimate - exact) <= 6 * res.stderr + 1e-8 * abs(exact), (res, exact)
    elif isinstance(res, SpectralDensityResult):
        evals = torch.linalg.eigvalsh(op.to_dense().to(D))
        spread = float(evals[-1] - evals[0]) + 1e-12
        live = res.nodes[res.weights > 0]
        assert float(live.min()) >= float(evals[0]) - 1e-6 * spread
        assert float(live.max()) <= float(evals[-1]) + 1e-6 * spread
        assert abs(float(torch.trapezoid(res.density, res.grid)) - 1) < 1e-3
    else:  # pragma: no cover - a new algorithm was recorded without a check
        raise AssertionError(f"{name}: no check for {type(res).__name__}")


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_seed_usage_block_runs_with_only_the_import_changed(name, monkeypatch, recwarn):
    code = BLOCKS[name].replace("hessian_eigenthings", "hessian_spectra")
    assert "hessian_eigenthings" not in code
    calls = _recording(monkeypatch)
    with contextlib.ExitStack() as stack:
        ns = _context(name, code, stack)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"<seed block {name}>", "exec"), ns)
        for fname, op, res in calls:
            _check(fname, op, res)
        printed = [float(x) for x in re.findall(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?", out.getvalue())]
        results = [r for _, _, r in calls]
        # every printed number is one of the values computed
        values = [float(v) for r in results if isinstance(r, EigenResult) for v in r.eigenvalues]
        values += [r.estimate for r in results if isinstance(r, TraceResult)]
        values += [r.stderr for r in results if isinstance(r, TraceResult)]
        for x in printed:
            assert any(abs(x - v) <= 1e-3 * max(abs(v), 1e-12) + 1e-4 for v in values), x
        # nothing may hold a DistributedDataParallel past its process group (its reducer
        # then waits for the group's threads forever)
        ran = bool(calls)
        ns.clear()
        calls.clear()
        del results
        gc.collect()
    if any(fn in code for fn in ("lanczos(", "trace(", "spectral_density(")):
        assert ran, f"{name} ran no recorded algorithm"


def test_the_vendored_blocks_are_the_seed_documents_blocks():
    """The copy in blocks.json equals the seed document's code blocks (when the seeds are
    beside the checkout, as in this project's CI)."""
    seed = Path(__file__).resolve().parents[2] / "shared" / "seeds"
    docs = sorted(seed.glob("004_*.txt")) if seed.is_dir() else []
    if not docs:
        pytest.skip("the seed documents are not beside this checkout")
    text = docs[0].read_text()
    fenced = re.findall(r"```(\w*)\n(.*?)```", text, re.S)
    import textwrap

    for name, code in BLOCKS.items():
        if name.startswith("004-"):
            lang, body = fenced[int(name[4:])]
            assert lang == "python" and textwrap.dedent(body) == code, name
