"""Time one block product of k vectors against k single products and one gradient.

Compares, on a ~10k-parameter MLP and a small transformer (float32, CPU):

* ``grad``: one forward + backward of the loss (the unit of cost);
* ``block``: ``HessianOperator.matmat`` of a ``(k, n)`` block (one forward, one
  ``create_graph`` backward, one vmapped second backward);
* ``loop``: the same block with the vmap fallback (one second backward per row);
* ``singles``: ``k`` separate ``matvec`` calls;
* ``fwd-over-rev``: ``vmap(jvp(grad(f)))`` with ``torch.func``, the alternative
  to reverse-over-reverse.

Each block result is first checked against the singles. Run:

    OMP_NUM_THREADS=1 python bench/bench_hessian_block.py
    python bench/bench_hessian_block.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from hessian_spectra.operators.hessian import HessianOperator
from hessian_spectra.state import differentiable_mode


def _mlp() -> tuple[nn.Module, list, Callable]:
    model = nn.Sequential(
        nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 32), nn.Tanh(), nn.Linear(32, 10)
    )
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g))]
    return model, data, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(dim=1))


def _transformer() -> tuple[nn.Module, list, Callable]:
    model = _Tiny().eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 16, 32, generator=g), torch.randint(0, 10, (64,), generator=g))]
    return model, data, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])


def _best(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class _LossModule(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: Callable, batch: object) -> None:
        super().__init__()
        self.model = model
        self.loss_fn, self.batch = loss_fn, batch

    def forward(self) -> torch.Tensor:
        return self.loss_fn(self.model, self.batch)


def run(name: str, model: nn.Module, data: list, loss_fn: Callable, k: int, repeat: int) -> None:
    op = HessianOperator(model, data, loss_fn)
    params = op.params
    g = torch.Generator().manual_seed(1)
    V = torch.randn(k, op.size, generator=g)

    def one_grad() -> object:
        loss = loss_fn(model, data[0])
        return torch.autograd.grad(loss, params)

    wrapped = _LossModule(model, loss_fn, data[0])
    theta = {"model." + n: p.detach() for n, p in zip(op.names, params, strict=True)}

    def f(th: dict) -> torch.Tensor:
        return functional_call(wrapped, th, ())

    def fwd_over_rev(Vb: torch.Tensor) -> torch.Tensor:
        def hvp(v: torch.Tensor) -> torch.Tensor:
            tang = dict(zip(theta, op.layout.split(v), strict=True))
            out = jvp(grad(f), (theta,), (tang,))[1]
            return torch.cat([out[n].reshape(-1) for n in theta])

        with differentiable_mode():
            return vmap(hvp)(Vb)

    block = op.matmat(V)
    singles = torch.stack([op.matvec(v) for v in V])
    scale = singles.abs().max()
    assert (block - singles).abs().max() <= 1e-4 * scale, "block != singles"
    fr = fwd_over_rev(V)
    assert (fr - singles).abs().max() <= 1e-4 * scale, "fwd-over-rev != singles"

    t_grad = _best(one_grad, repeat)
    t_block = _best(lambda: op.matmat(V), repeat)
    t_single = _best(lambda: [op.matvec(v) for v in V], repeat)
    t_fr = _best(lambda: fwd_over_rev(V), repeat)
    op._batched = False  # force the loop fallback
    t_loop = _best(lambda: op.matmat(V), repeat)
    print(
        f"{name:12s} n={op.size:6d} threads={torch.get_num_threads()} | "
        f"grad {t_grad * 1e3:7.2f} ms | "
        f"block k={k} {t_block * 1e3:7.2f} ms | loop {t_loop * 1e3:7.2f} ms | "
        f"{k} singles {t_single * 1e3:7.2f} ms | fwd-over-rev {t_fr * 1e3:7.2f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    for name, make in (("mlp", _mlp), ("transformer", _transformer)):
        model, data, loss_fn = make()
        run(name, model, data, loss_fn, args.k, args.repeat)


if __name__ == "__main__":
    main()
