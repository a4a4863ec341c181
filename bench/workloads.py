"""The three benchmark workloads, built deterministically from a seed.

Each workload is a small model, a fixed list of equally sized ``(x, y)`` batches
and its loss in the two forms the tools take:

* ``criterion(logits, y)`` with ``model(x) -> logits`` (PyHessian, curvlinops);
* ``loss_fn(model, batch) -> scalar`` (hessian-spectra, hessian-eigenthings).

Sizes are chosen for a 2-core CPU: one full-data gradient takes milliseconds.
All batches have the same number of samples, so averaging per batch (as
hessian-eigenthings does) and per sample (as the others do) give the same
matrix, and every tool sees the same Hessian.

The models are briefly trained (full-batch Adam, fixed seed) so the Hessian is
that of a partly trained network rather than of a random initialisation, then
put in eval mode (BatchNorm uses its running statistics; PyHessian forces eval
mode anyway) and converted to the benchmark dtype.

Workloads:
    mlp: 64-96-48-10 ReLU MLP on scikit-learn digits (1024 samples, 8 batches of 128).
    cnn: two 3x3 conv + BatchNorm + ReLU layers, average pool, two linear layers,
        on 8x8 digits (256 samples, 2 batches of 128).
    lm: a 2-layer causal transformer (pre-LayerNorm, GELU MLP, learned positions)
        from :class:`GPTConfig`, on tokens of a fixed random Markov chain
        (128 sequences of 16 tokens, 2 batches of 64); ``model(x)`` returns
        logits flattened to ``(B*T, V)`` and targets are flattened to ``(B*T,)``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["GPT", "GPTConfig", "WORKLOADS", "Workload", "build", "build_all"]

Batch = tuple[Tensor, Tensor]


@dataclass
class Workload:
    """A model with its data and loss, ready for every tool.

    Attributes:
        name: short name used in tables.
        description: one line for the docs.
        model: the model, in eval mode, in the benchmark dtype.
        batches: list of ``(x, y)`` batches (equal sizes).
        criterion: ``nn.CrossEntropyLoss()`` (``reduction='mean'``), for ``criterion(model(x), y)``.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        num_params: ``n``, the Hessian's dimension.
        num_samples: samples over all batches.
        config: everything the workload was built from (for the reference cache key).
    """

    name: str
    description: str
    model: nn.Module
    batches: list[Batch]
    criterion: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    num_params: int
    num_samples: int
    config: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Hash of the config, the parameters' bytes and the data (changes when anything does)."""
        h = hashlib.sha256(repr(sorted(self.config.items())).encode())
        for p in self.model.parameters():
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        for b in self.model.buffers():
            h.update(b.detach().cpu().contiguous().numpy().tobytes())
        for x, y in self.batches:
            h.update(x.cpu().contiguous().numpy().tobytes())
            h.update(y.cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def _ce_loss_fn(criterion: nn.Module) -> Callable[[nn.Module, Any], Tensor]:
    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        return criterion(model(x), y)

    return loss_fn


def _split(x: Tensor, y: Tensor, batch_size: int) -> list[Batch]:
    return list(zip(x.split(batch_size), y.split(batch_size), strict=True))


def _train(model: nn.Module, batches: list[Batch], steps: int, lr: float) -> None:
    """Full-batch Adam for ``steps`` steps (deterministic given the model and data)."""
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    total = sum(int(x.shape[0]) for x, _ in batches)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for x, y in batches:
            (crit(model(x), y) * (x.shape[0] / total)).backward()
        opt.step()
    model.eval()


def _digits(num: int, seed: int, image: bool) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=g)[:num]
    x, y = x[idx], y[idx]
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return x.contiguous(), y.contiguous()


# -- models ---------------------------------------------------------------------------
class MLP(nn.Sequential):
    def __init__(self, sizes: tuple[int, ...] = (64, 96, 48, 10)) -> None:
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class CNN(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )


@dataclass(frozen=True)
class GPTConfig:
    """A minimal GPT's shape."""

    vocab_size: int = 32
    context: int = 16
    d_model: int = 24
    n_layer: int = 2
    n_head: int = 4
    d_mlp: int = 48


class _Attention(nn.Module):
    """Causal multi-head self-attention written out (softmax of masked scores).

    Written with plain ops (no fused SDPA kernel, no ``nn.MultiheadAttention``
    fast path) so that double backward and forward-over-reverse AD work in
    every tool.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        mask = torch.ones(cfg.context, cfg.context, dtype=torch.bool).tril()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, h: Tensor) -> Tensor:
        B, T, D = h.shape
        q, k, v = self.qkv(h).split(D, dim=-1)
        q, k, v = (t.reshape(B, T, self.n_head, self.d_head).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.d_head)
        scores = scores.masked_fill(~self.mask[:T, :T], float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = _Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.out = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


class GPT(nn.Module):
    """A minimal causal transformer LM; ``forward(idx (B, T)) -> logits (B*T, V)``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h)).reshape(-1, self.cfg.vocab_size)


def _markov_tokens(cfg: GPTConfig, num: int, seed: int) -> tuple[Tensor, Tensor]:
    """Sequences from a fixed random Markov chain with peaked transitions (learnable)."""
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(cfg.vocab_size, cfg.vocab_size, generator=g)
    P = logits.softmax(-1)
    seq = torch.empty(num, cfg.context + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(cfg.vocab_size, (num,), generator=g)
    for t in range(cfg.context):
        seq[:, t + 1] = torch.multinomial(P[seq[:, t]], 1, generator=g).squeeze(1)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


# -- builders -------------------------------------------------------------------------
def _finish(
    name: str,
    description: str,
    model: nn.Module,
    batches: list[Batch],
    dtype: torch.dtype,
    config: dict[str, Any],
) -> Workload:
    model = model.to(dtype).eval()
    batches = [(x.to(dtype) if x.is_floating_point() else x, y) for x, y in batches]
    for p in model.parameters():
        p.grad = None
    crit = nn.CrossEntropyLoss()
    return Workload(
        name=name,
        description=description,
        model=model,
        batches=batches,
        criterion=crit,
        loss_fn=_ce_loss_fn(crit),
        num_params=sum(p.numel() for p in model.parameters()),
        num_samples=sum(int(x.shape[0]) for x, _ in batches),
        config={**config, "dtype": str(dtype)},
    )


def build_mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> Workload:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLP()
    x, y = _digits(1024, seed, image=False)
    batches = _split(x, y, 128)
    _train(model, batches, steps=40, lr=3e-3)
    return _finish(
        "mlp",
        "MLP 64-96-48-10 (ReLU), digits, 1024 samples in 8 batches of 128",
        model, batches, dtype, {"name": "mlp", "seed": seed, "steps": 40},
    )


def build_cnn(seed: int = 0, dtype: torch.dtype = torch.float64) -> Workload:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CNN()
    x, y = _digits(256, seed + 1, image=True)
    batches = _split(x, y, 128)
    _train(model, batches, steps=60, lr=3e-3)
    return _finish(
        "cnn",
        "CNN 2x(conv3x3+BatchNorm+ReLU)+2 linear, 8x8 digits, 256 samples in 2 batches of 128, eval-mode BN",
        model, batches, dtype, {"name": "cnn", "seed": seed, "steps": 60},
    )


def build_lm(seed: int = 0, dtype: torch.dtype = torch.float64, cfg: GPTConfig | None = None) -> Workload:
    cfg = cfg or GPTConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(cfg)
    x, y = _markov_tokens(cfg, 128, seed + 2)
    batches = [(xb, yb.reshape(-1)) for xb, yb in _split(x, y, 64)]
    _train(model, batches, steps=60, lr=1e-2)
    return _finish(
        "lm",
        f"causal transformer {cfg}, Markov-chain tokens, 128 sequences in 2 batches of 64",
        model, batches, dtype, {"name": "lm", "seed": seed, "steps": 60, **cfg.__dict__},
    )


WORKLOADS: dict[str, Callable[..., Workload]] = {"mlp": build_mlp, "cnn": build_cnn, "lm": build_lm}


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> Workload:
    """Build one workload by name (``"mlp"``, ``"cnn"`` or ``"lm"``)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical training whatever the thread setting
    try:
        return WORKLOADS[name](seed=seed, dtype=dtype)
    finally:
        torch.set_num_threads(threads)


def build_all(names: list[str] | None = None, seed: int = 0, dtype: torch.dtype = torch.float64) -> list[Workload]:
    return [build(n, seed, dtype) for n in (names or list(WORKLOADS))]
