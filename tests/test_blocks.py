"""Per-block spectra against the eigenvalues of the diagonal blocks of dense float64 matrices."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_spectra.blocks import block_spectra, parameter_blocks
from hessian_spectra.losses import supervised_forward, supervised_loss, supervised_loss_of_output
from hessian_spectra.params import match_names
from test_ggn import _data, dense_ggn

D = torch.float64


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def dense_hessian(model, data):
    """Hessian of sum_b n_b/N CE(model(x_b), y_b) w.r.t. all parameters, by torch.func.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    N = sum(x.shape[0] for x, _ in data)

    def L(vec):
        parts = torch.split(vec, [s.numel() for s in shapes])
        params = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        return sum(
            x.shape[0] / N * F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
            for x, y in data
        )

    return torch.func.hessian(L)(theta)


def _slices(model, groups):
    offs, out, o = {}, {}, 0
    for n, p in model.named_parameters():
        offs[n] = torch.arange(o, o + p.numel())
        o += p.numel()
    for b, names in groups.items():
        out[b] = torch.cat([offs[n] for n in names])
    return out


@pytest.mark.parametrize("blocks", ["module", "parameter"])
def test_hessian_blocks_match_dense_diagonal_blocks(blocks):
    model, data = _model(), _data()
    res = block_spectra(
        model, data, supervised_loss(F.cross_entropy), blocks=blocks, k=3, trace_matvecs=50
    )
    H = dense_hessian(model, data)
    idx = _slices(model, parameter_blocks(model, blocks))
    assert [b.name for b in res] == list(idx)
    for b in res:
        Hb = H[idx[b.name]][:, idx[b.name]]
        ev = torch.linalg.eigvalsh(Hb).flip(0)[: len(b.eigenvalues)]
        scale = ev.abs().max().item()
        assert b.eigen.converged
        torch.testing.assert_close(b.eigen.eigenvalues, ev, rtol=0, atol=1e-6 * scale)
        assert b.trace.method == "exact"  # every block here has <= 50 parameters
        assert abs(b.trace.estimate - float(torch.trace(Hb))) <= 1e-10 * max(1.0, scale)


def test_ggn_blocks_and_filters_and_hutchpp_trace():
    model, data = _model(), _data()
    loss = supervised_loss_of_output(F.cross_entropy)
    groups = {"first": match_names("0.*"), "last_weight": "2.weight", "all": ["0.*", "2.*"]}
    res = block_spectra(
        model,
        data,
        operator="ggn",
        forward_fn=supervised_forward(),
        loss_of_output_fn=loss,
        blocks=groups,
        k=2,
        trace_matvecs=9,
        seed=3,
    )
    G = dense_ggn(model, data, loss)
    idx = _slices(model, parameter_blocks(model, groups))
    for b in res:
        Gb = G[idx[b.name]][:, idx[b.name]]
        ev = torch.linalg.eigvalsh(Gb).flip(0)[:2]
        torch.testing.assert_close(
            b.eigen.eigenvalues, ev, rtol=0, atol=1e-6 * ev.abs().max().item()
        )
        assert b.trace.method == "hutch++"  # blocks larger than 9 parameters
        assert abs(b.trace.estimate - float(torch.trace(Gb))) <= 5 * b.trace.stderr + 1e-10
    assert res["all"].size == sum(p.numel() for p in model.parameters())


def test_table_save_json_and_csv(tmp_path):
    model, data = _model(), _data()
    res = block_spectra(model, data, supervised_loss(F.cross_entropy), k=2)
    rows = res.to_rows()
    assert [r["block"] for r in rows] == ["0", "2"]
    assert {
        "lambda_1",
        "lambda_2",
        "residual_1",
        "converged",
        "trace",
        "trace_stderr",
        "num_matvecs",
    } <= set(rows[0])
    js = json.loads(res.save(tmp_path / "spectra.json").read_text())
    assert js["blocks"][0]["params"] == ["0.weight", "0.bias"]
    assert js["blocks"][1]["eigen"]["eigenvalues"] == res["2"].eigenvalues
    with res.save(tmp_path / "spectra.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert float(table[1]["lambda_1"]) == pytest.approx(rows[1]["lambda_1"], rel=1e-12)
    assert res.converged
    with pytest.raises(ValueError, match=r"writes \.json or \.csv"):
        res.save(tmp_path / "spectra.txt")
    with pytest.raises(KeyError, match="no block 'x'"):
        res["x"]


def test_errors():
    model, data = _model(), _data()
    loss = supervised_loss(F.cross_entropy)
    with pytest.raises(ValueError, match="blocks must be 'module', 'parameter'"):
        block_spectra(model, data, loss, blocks="layer")
    with pytest.raises(TypeError, match="non-empty dict name -> filter"):
        block_spectra(model, data, loss, blocks={})
    with pytest.raises(ValueError, match="block 'attn' selects no parameter"):
        block_spectra(model, data, loss, blocks={"attn": "*.attn.*"})
    with pytest.raises(TypeError, match="expected a ParamFilter, a glob string"):
        block_spectra(model, data, loss, blocks={"x": 3})
    with pytest.raises(ValueError, match="operator must be 'hessian' or 'ggn'"):
        block_spectra(model, data, loss, operator="fisher")
    with pytest.raises(TypeError, match="needs loss_fn"):
        block_spectra(model, data)
    with pytest.raises(TypeError, match="operator='ggn' needs forward_fn"):
        block_spectra(model, data, operator="ggn")
    with pytest.raises(ValueError, match="k must be a positive int"):
        block_spectra(model, data, loss, k=0)
    with pytest.raises(ValueError, match="trace_matvecs must be 0"):
        block_spectra(model, data, loss, trace_matvecs=2)
