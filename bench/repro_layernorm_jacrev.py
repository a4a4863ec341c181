"""Why curvlinops misses 1e-6 on the transformer: ``jvp(jacrev(f))`` is wrong through LayerNorm.

curvlinops 3.0.1 builds its Hessian-vector product as forward-over-reverse
``torch.func.jvp(jacrev(loss), params, v)``. On torch 2.13 the rows of a
LayerNorm's ``weight`` come out wrong when the LayerNorm's input depends on
earlier parameters, while ``jvp(grad(loss))`` and reverse-over-reverse
(double backward) agree with each other and with central differences of
gradients. Run::

    python bench/repro_layernorm_jacrev.py

It prints the relative difference per parameter between the two
forward-over-reverse forms (only ``1.weight``, the LayerNorm's, differs), and
then curvlinops' ``HessianLinearOperator`` against double backward on the same
small model.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, jacrev, jvp


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randint(3, (7,))
    crit = torch.nn.CrossEntropyLoss()
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    argnums = tuple(range(len(names)))

    def f(*p: torch.Tensor) -> torch.Tensor:
        return crit(functional_call(model, dict(zip(names, p, strict=True)), (x,)), y)

    v = tuple(torch.randn_like(p) for p in params.values())
    via_grad = jvp(grad(f, argnums=argnums), tuple(params.values()), v)[1]
    via_jacrev = jvp(jacrev(f, argnums=argnums), tuple(params.values()), v)[1]
    leaves = [p.clone().requires_grad_() for p in params.values()]
    g = torch.autograd.grad(f(*leaves), leaves, create_graph=True)
    double_bw = torch.autograd.grad(g, leaves, v)
    print(f"torch {torch.__version__}: relative difference per parameter")
    print(f"{'param':10s} {'jvp(grad) vs double bw':>24s} {'jvp(jacrev) vs double bw':>26s}")
    for name, a, b, c in zip(names, via_grad, via_jacrev, double_bw, strict=True):
        s = c.abs().max()
        print(f"{name:10s} {float((a - c).abs().max() / s):24.1e} {float((b - c).abs().max() / s):26.1e}")
    try:
        from curvlinops import HessianLinearOperator
    except ImportError:
        return
    A = HessianLinearOperator(model, crit, list(model.parameters()), [(x, y)], check_deterministic=False)
    vec = torch.cat([t.reshape(-1) for t in v])
    ref = torch.cat([t.reshape(-1) for t in double_bw])
    print(f"curvlinops HessianLinearOperator @ v vs double backward: "
          f"{float((A @ vec - ref).norm() / ref.norm()):.1e} (relative, whole vector)")


if __name__ == "__main__":
    main()
