"""Workloads at the sizes people analyse, shared by ``realistic.py`` and ``gpu_check.py``.

Each :func:`build` returns a :class:`workloads.Workload` (the form the adapters in
``peers.py`` take): one batch, ``criterion(model(x), y)`` and ``loss_fn(model, batch)``,
a model in eval mode built from seed 0 (random initialisation, no training).

* ``cnn``: a ResNet-style CNN with BatchNorm (stem, four residual blocks of two 3x3
  convolutions with BatchNorm, widths w, 2w, 4w, 8w, average pool, linear head), a batch
  of 64 random 32x32x3 images and 10 classes. ``w = 48``: 2.78M parameters.
* ``lm``: a GPT-2-style language model (``transformers.GPT2LMHeadModel`` from
  ``GPT2Config``: 4 layers, d=256, 4 heads, context 128, vocabulary 1024, tied
  embeddings, eager attention, dropout off) on 16 random sequences of 128 tokens:
  3.45M parameters. ``model(ids)`` returns the next-token logits flattened to
  ``(B*(T-1), V)`` and ``y`` the shifted tokens, so the loss is the mean token
  cross-entropy (``GPT2LMHeadModel(..., labels=ids).loss``).
* ``lm50k``: the same LM with GPT-2's vocabulary of 50257 tokens (16.1M parameters,
  12.9M of them in the tied embedding); also offered as a HuggingFace model with
  ``{"input_ids", "labels"}`` batches for the GGN operator (:func:`hf_batches`).

``size="small"`` gives the same architectures scaled down for a quick check on a CPU
(CNN w=8 on a batch of 8; LM d=64, 2 layers, 4 sequences of 32 tokens).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from workloads import Workload

__all__ = ["SIZES", "Block", "LogitsLM", "build", "cnn", "gpt2", "hf_batches"]


class Block(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a (projected) skip connection."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + self.skip(x))


def cnn(width: int, classes: int = 10) -> nn.Module:
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, 1, 1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        Block(w, w, 1),
        Block(w, 2 * w, 2),
        Block(2 * w, 4 * w, 2),
        Block(4 * w, 8 * w, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * w, classes),
    )


def gpt2(vocab: int, d: int, layers: int, context: int = 128) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=0,
        n_positions=context,
        n_embd=d,
        n_layer=layers,
        n_head=4,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    cfg._attn_implementation = "eager"  # twice differentiable on every device
    return GPT2LMHeadModel(cfg)


class LogitsLM(nn.Module):
    """``ids -> logits`` of the next token, flattened to ``(B*(T-1), V)``."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids: Tensor) -> Tensor:
        logits = self.hf(input_ids=ids).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])


#: name -> size -> config
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "cnn": {"full": {"width": 48, "batch": 64}, "small": {"width": 8, "batch": 8}},
    "lm": {
        "full": {"vocab": 1024, "d": 256, "layers": 4, "batch": 16, "seq": 128},
        "small": {"vocab": 1024, "d": 64, "layers": 2, "batch": 4, "seq": 32},
    },
    "lm50k": {
        "full": {"vocab": 50257, "d": 256, "layers": 4, "batch": 16, "seq": 128},
        "small": {"vocab": 50257, "d": 64, "layers": 2, "batch": 4, "seq": 32},
    },
}


def _ce(model: nn.Module, batch: Any) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def build(
    name: str, size: str = "full", device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Workload:
    """The workload ``name`` at ``size`` ("full" or "small"), on ``device`` in ``dtype``."""
    cfg = dict(SIZES[name][size])
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "cnn":
        model: nn.Module = cnn(cfg["width"])
        x = torch.randn(cfg["batch"], 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (cfg["batch"],), generator=g)
        desc = f"ResNet-style CNN with BatchNorm, width {cfg['width']}, batch {cfg['batch']} of 32x32x3"
    else:
        model = LogitsLM(gpt2(cfg["vocab"], cfg["d"], cfg["layers"]))
        ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g)
        x, y = ids, ids[:, 1:].reshape(-1)
        desc = (
            f"GPT-2 LM (GPT2Config: {cfg['layers']} layers, d={cfg['d']}, vocab {cfg['vocab']}), "
            f"batch {cfg['batch']} x {cfg['seq']} tokens"
        )
    model = model.to(device=device, dtype=dtype).eval()
    batches = [(x.to(device=device, dtype=dtype if x.is_floating_point() else None), y.to(device))]
    return Workload(
        name=name,
        description=desc,
        model=model,
        batches=batches,
        criterion=nn.CrossEntropyLoss(),
        loss_fn=_ce,
        num_params=sum(p.numel() for p in model.parameters()),
        num_samples=int(x.shape[0]),
        config={"size": size, **cfg},
    )


def hf_batches(w: Workload) -> list[dict[str, Tensor]]:
    """An LM workload's batches as HuggingFace ``{"input_ids", "labels"}`` dicts (for
    ``hf_lm_forward`` / ``hf_lm_loss_of_output`` on ``w.model.hf``)."""
    return [{"input_ids": x, "labels": x} for x, _ in w.batches]
