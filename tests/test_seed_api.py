"""hessian-eigenthings v1's API: names, module paths, signatures and defaults, and each
documented difference of ``docs/migrating.md``."""

from __future__ import annotations

import importlib
import inspect
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessian_spectra as hs
from reference import extreme_eigenvalues, sym_matrix_with_spectrum

D = torch.float64
P, KW = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY

# (module, name, [(argument, kind or None, default or ...)]) as the seed documents them
SIGNATURES = [
    (
        "hessian_spectra.algorithms",
        "lanczos",
        [
            ("operator", P, ...),
            ("k", P, 10),
            ("max_iter", P, None),
            ("tol", P, ...),
            ("which", P, "LM"),
            ("reorthogonalize", KW, None),
            ("seed", KW, None),
            ("backend", KW, None),
        ],
    ),
    (
        "hessian_spectra.algorithms",
        "lanczos_tridiagonal",
        [("operator", P, ...), ("v0", P, ...), ("max_iter", P, ...), ("reorthogonalize", KW, True)],
    ),
    (
        "hessian_spectra.algorithms.power_iteration",
        "power_iteration_one",
        [
            ("operator", P, ...),
            ("max_iter", None, 100),
            ("momentum", None, 0.0),
            ("seed", None, None),
        ],
    ),
    (
        "hessian_spectra.algorithms",
        "deflated_power_iteration",
        [("operator", P, ...), ("k", P, 10), ("max_iter", P, 100), ("seed", None, None)],
    ),
    (
        "hessian_spectra.algorithms",
        "hutchinson",
        [("operator", P, ...), ("num_samples", None, 100), ("distribution", KW, "rademacher")],
    ),
    (
        "hessian_spectra.algorithms",
        "hutch_plus_plus",
        [("operator", P, ...), ("num_matvecs", None, 99)],
    ),
    (
        "hessian_spectra.algorithms",
        "trace",
        [
            ("operator", P, ...),
            ("num_matvecs", P, 100),
            ("method", KW, "hutch++"),
            ("seed", KW, None),
        ],
    ),
    (
        "hessian_spectra.algorithms.spectral_density",
        "spectral_density",
        [
            ("operator", P, ...),
            ("num_runs", None, 10),
            ("lanczos_steps", None, 80),
            ("num_grid_points", None, 10000),
            ("sigma", None, None),
            ("grid_padding", None, 0.1),
            ("seed", None, None),
            ("backend", None, None),
        ],
    ),
    (
        "hessian_spectra.operators",
        "HessianOperator",
        [
            ("model", P, ...),
            ("dataloader", P, ...),
            ("loss_fn", P, ...),
            ("param_filter", KW, None),
            ("full_dataset", KW, True),
            ("num_batches", KW, None),
            ("microbatch_size", KW, None),
            ("method", KW, "autograd"),
            ("fd_eps", KW, None),
            ("backend", KW, None),
        ],
    ),
    (
        "hessian_spectra.operators",
        "GGNOperator",
        [
            ("model", P, ...),
            ("dataloader", P, ...),
            ("forward_fn", P, ...),
            ("loss_of_output_fn", P, ...),
            ("loss_hvp", KW, "analytical"),
            ("backend", KW, None),
        ],
    ),
    (
        "hessian_spectra.operators",
        "EmpiricalFisherOperator",
        [
            ("model", P, ...),
            ("dataloader", P, ...),
            ("per_sample_loss_fn", P, ...),
            ("sample_dim", KW, 0),
            ("backend", KW, None),
        ],
    ),
    (
        "hessian_spectra.operators",
        "LambdaOperator",
        [
            ("matvec_fn", P, ...),
            ("size", P, ...),
            ("device", P, "cpu"),
            ("dtype", P, torch.float32),
        ],
    ),
    (
        "hessian_spectra.operators.distributed.ddp",
        "DDPHessianOperator",
        [("model", P, ...), ("dataloader", P, ...), ("loss_fn", P, ...)],
    ),
    (
        "hessian_spectra.param_utils",
        "match_regex",
        [("patterns", inspect.Parameter.VAR_POSITIONAL, ...)],
    ),
    (
        "hessian_spectra.param_utils",
        "select_parameters",
        [("model", P, ...), ("param_filter", P, None)],
    ),
    ("hessian_spectra.loss_fns.huggingface", "hf_lm_loss", [("fused", None, None)]),
    ("hessian_spectra.loss_fns.huggingface", "hf_lm_shifted_ce", [("fused", None, "auto")]),
    ("hessian_spectra.batching", "iterate_batches", [("source", P, ...), ("num_batches", P, None)]),
    ("hessian_spectra.batching", "move_batch_to_device", [("batch", P, ...), ("device", P, ...)]),
    ("hessian_spectra.batching", "assert_microbatch_safe", [("model", P, ...)]),
]


@pytest.mark.parametrize(("module", "name", "args"), SIGNATURES, ids=lambda x: str(x)[:40])
def test_signature_as_the_seed_documents_it(module, name, args):
    obj = getattr(importlib.import_module(module), name)
    params = inspect.signature(obj).parameters
    order = [p for p in params if p != "self"]
    positional = [a for a, kind, _ in args if kind is P]
    assert order[: len(positional)] == positional  # the positional order
    for arg, kind, default in args:
        assert arg in params, f"{name} has no argument {arg}"
        p = params[arg]
        if kind is not None:
            assert p.kind is kind, f"{name}({arg}) is {p.kind}"
        if default is not ...:
            assert p.default == default, f"{name}({arg}={p.default!r}), expected {default!r}"


SEED_NAMES = {
    "hessian_spectra": [
        "CurvatureOperator", "DDPHessianOperator", "EigenResult", "EmpiricalFisherOperator",
        "GGNOperator", "HessianOperator", "LambdaOperator", "LanczosTridiag", "ParamFilter",
        "SpectralDensityResult", "TraceResult", "deflated_power_iteration", "hf_lm_forward",
        "hf_lm_loss", "hf_lm_loss_of_output", "hf_seq2seq_loss", "hutch_plus_plus", "hutchinson",
        "lanczos", "lanczos_tridiagonal", "match_names", "match_regex", "params_to_vector",
        "power_iteration_one", "select_parameters", "spectral_density", "supervised_forward",
        "supervised_loss", "supervised_loss_of_output", "supervised_per_sample_loss",
        "tlens_forward", "tlens_loss", "tlens_loss_of_output", "trace", "vector_to_params",
    ],
    "hessian_spectra.algorithms": ["stochastic_power_iteration", "LanczosTridiag"],
    "hessian_spectra.algorithms.result": ["EigenResult"],
    "hessian_spectra.algorithms.power_iteration": ["power_iteration_one", "deflated_power_iteration"],
    "hessian_spectra.algorithms.spectral_density": ["SpectralDensityResult", "spectral_density"],
    "hessian_spectra.operators": [
        "ForwardFn", "LossFn", "LossOfOutputFn", "PerSampleLossFn", "HvpMethod", "DDPHessianOperator",
    ],
    "hessian_spectra.operators.distributed": ["DDPHessianOperator"],
    "hessian_spectra.loss_fns": ["cross_entropy_loss_of_output", "mse_loss_of_output"],
    "hessian_spectra.loss_fns.standard": ["cross_entropy_loss_of_output", "mse_loss_of_output"],
    "hessian_spectra.loss_fns.huggingface": ["hf_lm_shifted_ce", "hf_lm_loss", "FusedCEHvpBackend"],
    "hessian_spectra.loss_fns.transformer_lens": ["tlens_loss"],
    "hessian_spectra.param_utils": [
        "total_size", "get_param_names", "get_param_list", "get_param_sizes",
        "get_filtered_params", "flatten_params", "unflatten_params",
    ],
    "hessian_spectra.util": ["match_names"],
    "hessian_spectra.linalg": ["LinAlgBackend", "SingleDeviceBackend"],
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(SEED_NAMES))
def test_seed_names_import_from_the_seed_modules(module):
    mod = importlib.import_module(module)
    for name in SEED_NAMES[module]:
        assert hasattr(mod, name), f"{module}.{name}"


def test_algorithms_spectral_density_is_the_function_and_the_module_imports():
    module = importlib.import_module("hessian_spectra.algorithms.spectral_density")
    from hessian_spectra.algorithms.spectral_density import spectral_density

    assert hs.algorithms.spectral_density is spectral_density is module.spectral_density


# -- the differences of docs/migrating.md, one test each ---------------------------------


def _spectrum_matrix(n=60, seed=0):
    eigs = torch.cat([torch.tensor([9.0, -7.0, 5.0]), torch.linspace(-1, 1, n - 3)]).to(D)
    return sym_matrix_with_spectrum(eigs, seed=seed)


def test_lanczos_defaults_are_ten_pairs_of_largest_magnitude_converged():
    A = _spectrum_matrix()
    res = hs.lanczos(A, seed=0)
    assert res.which == "LM" and len(res) == 10 and res.converged
    want = extreme_eigenvalues(A, 10, "LM").abs().sort().values
    torch.testing.assert_close(res.eigenvalues.abs().sort().values, want, rtol=0, atol=1e-6 * 9)
    assert res.tol == 1e-6  # right by default, not the seed's 1e-4


def test_lanczos_max_iter_bounds_the_lanczos_steps_and_iterations_counts_them():
    A = _spectrum_matrix()
    res = hs.lanczos(A, k=3, max_iter=15, seed=0)
    assert res.iterations <= 15 and res.num_matvecs <= 15
    assert res.iterations == res.info["matvecs"]["search"] + res.info["matvecs"]["verification"]
    full = hs.lanczos(A, k=3, max_iter=60, seed=0)  # the whole space: exact
    torch.testing.assert_close(
        full.eigenvalues,
        extreme_eigenvalues(A, 3, "LM")[torch.tensor([0, 1, 2])],
        atol=1e-10,
        rtol=0,
    )
    with pytest.raises(ValueError, match="max_iter=61 exceeds operator size n=60"):
        hs.lanczos(A, k=3, max_iter=61)
    with pytest.raises(ValueError, match=r"give max_iter .* or max_matvecs"):
        hs.lanczos(A, k=3, max_iter=20, max_matvecs=30)


def test_reorthogonalize_false_is_refused_with_a_warning_and_the_answer_stays_right():
    A = _spectrum_matrix()
    with pytest.warns(UserWarning, match="reorthogonalize=False is ignored"):
        res = hs.lanczos(A, k=3, reorthogonalize=False, seed=0)
    assert res.converged and len(set(torch.round(res.eigenvalues, decimals=6).tolist())) == 3
    with pytest.raises(TypeError, match="reorthogonalize must be None, True or False"):
        hs.lanczos(A, k=3, reorthogonalize="yes")


def test_power_iteration_one_returns_the_seed_tuple():
    A = torch.diag(torch.tensor([1.0, 2.0, 10.0], dtype=D))
    lam, v, res, its, ok = hs.power_iteration_one(A, seed=0)
    assert isinstance(lam, float) and abs(lam - 10.0) < 1e-9 and ok and its <= 100
    assert float(torch.linalg.vector_norm(A @ v - lam * v)) == pytest.approx(res, abs=1e-12)
    # too few steps for tol: says so instead of calling it converged
    B = torch.diag(torch.tensor([1.0, 9.9, 10.0], dtype=D))
    with pytest.warns(hs.ConvergenceWarning):
        *_, ok = hs.power_iteration_one(B, max_iter=5, seed=0)
    assert not ok


def test_deflated_and_stochastic_power_iteration_take_max_iter_per_pair():
    A = torch.diag(torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=D))
    res = hs.deflated_power_iteration(A, 2, 200, seed=0)
    assert res.num_matvecs <= 400 and res.converged
    torch.testing.assert_close(res.eigenvalues, torch.tensor([8.0, 4.0], dtype=D))
    res2 = hs.stochastic_power_iteration(A, k=2, max_iter=200, seed=0)
    torch.testing.assert_close(res2.eigenvalues, res.eigenvalues)


def test_spectral_density_seed_fields_and_grid_padding():
    A = torch.diag(torch.linspace(1.0, 2.0, 30, dtype=D))
    res = hs.spectral_density(A, num_runs=2, lanczos_steps=30, grid_padding=0.5, seed=0)
    assert res.raw_eigenvalues is res.nodes and res.raw_weights is res.weights
    assert float(res.grid[0]) <= 0.5 + 1e-12 and float(res.grid[-1]) >= 2.5 - 1e-12
    assert abs(float(torch.trapezoid(res.density, res.grid)) - 1) < 1e-6
    assert res.eigenvectors is None
    with_vecs = hs.spectral_density(
        A, num_runs=2, lanczos_steps=30, seed=0, return_eigenvectors=True
    )
    for r in range(2):  # each run's Ritz vectors are eigenvectors of A (30 steps: exact)
        X = with_vecs.eigenvectors[r]
        torch.testing.assert_close(X @ A, with_vecs.nodes[r][:, None] * X, atol=1e-9, rtol=0)
    with pytest.warns(DeprecationWarning, match="num_grid_points"):
        hs.spectral_density(A, num_runs=1, lanczos_steps=5, grid_points=50, seed=0)


def test_earlier_names_still_work_with_a_deprecation_warning():
    A = torch.diag(torch.arange(1.0, 11.0, dtype=D))
    with pytest.warns(DeprecationWarning, match="num_steps is deprecated"):
        old = hs.lanczos_tridiagonal(A, torch.ones(10, dtype=D), num_steps=4)
    new = hs.lanczos_tridiagonal(A, torch.ones(10, dtype=D), 4)
    assert torch.equal(old.alphas, new.alphas) and new.iterations == 4


def test_hutchinson_num_samples():
    A = torch.diag(torch.arange(1.0, 11.0, dtype=D))
    res = hs.hutchinson(A, num_samples=7, seed=0)
    assert res.num_matvecs == 7 and res.estimate == pytest.approx(55.0)  # diagonal: exact
    assert hs.trace(torch.diag(torch.arange(1.0, 51.0, dtype=D)), seed=0).num_matvecs == 100
    # on n = 10 the sketch's range is the whole space after 10 products: they are all it makes
    small = hs.trace(A, seed=0)
    assert small.num_matvecs == 33 + 10 + 34 and small.estimate == pytest.approx(55.0)


def test_backend_argument():
    A = torch.diag(torch.arange(1.0, 11.0, dtype=D))
    b = hs.SingleDeviceBackend()
    assert hs.lanczos(A, k=2, backend=b, seed=0).converged
    assert isinstance(b, hs.LinAlgBackend)

    class Other:
        pass

    for fn in (hs.lanczos, hs.trace, hs.spectral_density):
        with pytest.raises(TypeError, match=r"backend must be None or the operator.s own backend"):
            fn(A, backend=Other())
    x = torch.tensor([3.0, 4.0])
    g = torch.Generator().manual_seed(0)
    assert set(b.rademacher_like(x, generator=g).tolist()) <= {-1.0, 1.0}
    assert b.randn_like(x, generator=g).shape == x.shape and float(b.norm(x)) == 5.0


def test_lambda_operator_positional_and_seed_style_subclasses():
    op = hs.LambdaOperator(lambda v: 2.0 * v, 5, "cpu", D)
    assert op.size == 5 and op.dtype == D
    v = torch.ones(5, dtype=D)
    torch.testing.assert_close(op(v), 2 * v)
    torch.testing.assert_close(op.rmatvec(v), 2 * v)
    A = _spectrum_matrix(n=30)

    class SeedStyle(hs.CurvatureOperator):  # implements matvec, never calls __init__
        def __init__(self, M):
            self.M = M

        @property
        def size(self):
            return self.M.shape[0]

        @property
        def device(self):
            return self.M.device

        @property
        def dtype(self):
            return self.M.dtype

        def matvec(self, v):
            return self.M @ v

    class Underscored(SeedStyle):
        matvec = hs.CurvatureOperator.matvec

        def _matvec(self, v):
            return self.M @ v

    for cls in (SeedStyle, Underscored):
        res = hs.lanczos(cls(A), k=3, which="LA", seed=0)
        torch.testing.assert_close(
            res.eigenvalues, extreme_eigenvalues(A, 3, "LA"), atol=1e-8, rtol=0
        )

    class Nothing(SeedStyle):
        matvec = hs.CurvatureOperator.matvec

    with pytest.raises(TypeError, match="implements no product"):
        Nothing(A) @ torch.ones(30, dtype=D)


def test_param_utils_as_the_seed_defines_them():
    from hessian_spectra import param_utils as pu

    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    sel = pu.select_parameters(model, pu.match_names("*.bias", "0.weight"))
    assert list(sel) == ["0.weight", "0.bias", "2.bias"]
    assert list(pu.select_parameters(model, pu.match_regex(r"^2\.", r"^0\.bias$"))) == [
        "0.bias",
        "2.weight",
        "2.bias",
    ]
    vec = pu.params_to_vector(sel)
    assert vec.shape == (pu.total_size(sel),) == (6 + 3 + 1,)
    back = pu.vector_to_params(vec, sel)
    assert list(back) == list(sel) and all(torch.equal(back[k], sel[k]) for k in sel)
    assert pu.get_param_names(model) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert pu.get_param_sizes(model)[0] == torch.Size([3, 2])
    names, params = pu.get_filtered_params(model, pu.match_names("2.*"))
    un = pu.unflatten_params(
        pu.flatten_params(dict(zip(names, params, strict=True))), names, params
    )
    assert all(torch.equal(un[n], p) for n, p in zip(names, params, strict=True))
    assert pu.match_names("layer.4.*")("layer.4.0.conv1.weight", None)  # * spans dots
    with pytest.raises(ValueError, match="zero parameters"):
        pu.select_parameters(model, pu.match_names("nonexistent.*"))


def test_loss_helpers_take_one_direction_or_a_block():
    ce = hs.cross_entropy_loss_of_output()
    out = torch.randn(4, 3, dtype=D)
    y = torch.tensor([0, 1, 2, 1])
    u = torch.randn(4, 3, dtype=D)
    H = torch.func.hessian(lambda o: F.cross_entropy(o, y))(out).reshape(12, 12)
    torch.testing.assert_close(ce.hvp(out, (None, y), u).reshape(-1), H @ u.reshape(-1))
    block = ce.hvp(out, (None, y), torch.stack([u, 2 * u]))
    torch.testing.assert_close(block[1].reshape(-1), 2 * (H @ u.reshape(-1)))
    mse = hs.mse_loss_of_output()
    torch.testing.assert_close(mse.hvp(out, (None, out), u), 2 * u / out.numel())
    model = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    assert torch.equal(hs.supervised_forward(model, (x, None)), model(x))
    assert hs.supervised_forward() is hs.supervised_forward


def test_empirical_fisher_per_sample_loss_fn_takes_unbatched_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=D), torch.randn(6, 2, dtype=D)

    def per_sample(m, sample):
        xs, ys = sample
        assert xs.shape == (3,)  # no batch dimension, as the seed documents
        return ((m(xs) - ys) ** 2).mean()

    params = list(model.parameters())
    G = []
    for i in range(6):
        g = torch.autograd.grad(per_sample(model, (x[i], y[i])), params)
        G.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(G)
    op = hs.EmpiricalFisherOperator(model, [(x, y)], per_sample_loss_fn=per_sample)
    torch.testing.assert_close(op.to_dense(), G.T @ G / 6)
    with pytest.raises(ValueError, match="sample_dim=1"):
        hs.EmpiricalFisherOperator(model, [(x, y)], per_sample, sample_dim=1)


def test_foreign_operators_scipy_numpy_and_torch_linear_operators():
    from scipy.sparse.linalg import LinearOperator

    A = _spectrum_matrix(n=40).numpy()
    want = extreme_eigenvalues(torch.from_numpy(A), 3, "LA")
    calls = []

    def mm(X):
        calls.append(X.shape[1])
        return A @ X

    scipy_op = LinearOperator(A.shape, matvec=lambda x: A @ x, matmat=mm, dtype=np.float64)
    for op in (scipy_op, A):
        res = hs.lanczos(op, k=3, which="LA", seed=0)
        torch.testing.assert_close(res.eigenvalues, want, atol=1e-8, rtol=0)
    assert calls

    class TorchLinearOperator:  # the interface of curvlinops' CurvatureLinearOperator
        def __init__(self, M):
            self.M, self.shape, self.dtype, self.device = M, M.shape, M.dtype, M.device

        def __matmul__(self, X):
            assert X.dim() == 2 and X.shape[0] == self.shape[0]  # (n, k) blocks
            return self.M @ X

    res = hs.eigenpairs(TorchLinearOperator(torch.from_numpy(A)), k=3, which="LA", seed=0)
    torch.testing.assert_close(res.eigenvalues, want, atol=1e-8, rtol=0)
    with pytest.raises(TypeError, match="real floating-point"):
        hs.as_operator(A.astype(np.complex128))


def test_pyhessian_adapter_against_dense_references():
    from hessian_spectra.compat.pyhessian import hessian

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().train()
    x, y = torch.randn(24, 4, dtype=D), torch.randint(0, 3, (24,))
    loader = [(x[:10], y[:10]), (x[10:], y[10:])]
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach() for n, p in model.named_parameters()}

    def loss(flat):
        ps, i = {}, 0
        for n in names:
            ps[n] = flat[i : i + theta[n].numel()].reshape(theta[n].shape)
            i += theta[n].numel()
        return F.cross_entropy(torch.func.functional_call(model, ps, (x,)), y)

    flat = torch.cat([theta[n].reshape(-1) for n in names])
    H = torch.func.hessian(loss)(flat)
    evals = torch.linalg.eigvalsh(H)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kw in ({"dataloader": loader}, {"data": (x, y)}):
        comp = hessian(model, nn.CrossEntropyLoss(), cuda=False, seed=0, **kw)
        top, vecs = comp.eigenvalues(top_n=2)
        lm = evals[evals.abs().argsort(descending=True)][:2]
        assert np.allclose(top, lm.tolist(), atol=1e-8)
        assert len(vecs) == 2 and [t.shape for t in vecs[0]] == [
            p.shape for p in model.parameters()
        ]
        samples = comp.trace(maxIter=60)
        assert 1 <= len(samples) <= 60
        tr = comp.results["trace"]
        assert abs(np.mean(samples) - float(torch.trace(H))) <= 6 * tr.stderr + 1e-9
        eig, w = comp.density(iter=flat.numel(), n_v=2)  # full runs: exact quadrature
        assert len(eig) == 2 and abs(sum(w[0]) - 1) < 1e-9
        for node in eig[0]:  # every Ritz value of a full run is an eigenvalue
            assert float((evals - node).abs().min()) < 1e-8
    assert model.training  # PyHessian leaves eval mode behind; the mode comes back here
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="exactly one of data"):
        hessian(model, nn.CrossEntropyLoss())


def test_ggn_backend_and_hf_fused_arguments_are_checked():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError):
            hs.hf_lm_loss(fused="bogus")
