"""``hessian-spectra analyze`` end to end: a user's model module with a checkpoint, a tiny
HuggingFace GPT-2 with a text file; numbers against dense float64 Hessians; bad inputs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.autograd.functional import hessian
from torch.func import functional_call
from typer.testing import CliRunner

from hessian_spectra import AnalysisReport, analyze
from hessian_spectra.cli import app

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build():
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def batches():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(30, 4, generator=g)
        y = torch.arange(30) % 3
        return [(x[:20], y[:20]), (x[20:], y[20:])]

    def broken():
        raise OSError("disk on fire")
    """
)


def _user(tmp_path):
    path = tmp_path / "usermod.py"
    path.write_text(USER_MODULE)
    spec = importlib.util.spec_from_file_location("usermod_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(7)
    model = mod.build()
    ck = tmp_path / "model.pt"
    torch.save(model.state_dict(), ck)
    return path, mod, model.double(), ck


def _dense_hessian(model, batches, loss_of):
    """float64 Hessian of the sample-weighted mean loss over ``batches`` (double backward)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    numels = [p.numel() for p in model.parameters()]
    total = sum(loss_of.size(b) for b in batches)

    def f(theta):
        ps = {
            n: t.reshape(s)
            for n, t, s in zip(names, torch.split(theta, numels), shapes, strict=True)
        }
        return sum(
            loss_of(lambda *a, **k: functional_call(model, ps, a, k), b) * loss_of.size(b) / total
            for b in batches
        )

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    return hessian(f, theta), names, numels


class _CE:
    @staticmethod
    def size(b):
        return len(b[0])

    def __call__(self, call, b):
        return torch.nn.functional.cross_entropy(call(b[0].double()), b[1])


def test_analyze_model_module_with_checkpoint(tmp_path):
    path, mod, model, ck = _user(tmp_path)
    out = tmp_path / "out"
    args = [
        "analyze",
        "--model",
        f"{path}:build",
        "--checkpoint",
        str(ck),
        "--data",
        f"{path}:batches",
        "--loss",
        "cross_entropy",
        "--dtype",
        "float64",
        "--device",
        "cpu",
        "--top-k",
        "3",
        "--bottom-k",
        "1",
        "--density",
        "--per-layer",
        "--landscape",
        "--out",
        str(out),
        "--no-progress",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rep = AnalysisReport.load(out / "report.json")
    H, _names, numels = _dense_hessian(model, mod.batches(), _CE())
    ev = torch.linalg.eigvalsh(H)
    assert rep.num_params == H.shape[0] == 51
    torch.testing.assert_close(rep.top.eigenvalues, ev.flip(0)[:3], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(rep.bottom.eigenvalues, ev[:1], rtol=1e-6, atol=1e-9)
    assert rep.trace.method == "exact" and rep.trace.estimate == pytest.approx(
        float(H.trace()), rel=1e-10
    )
    # per layer: the top eigenvalue of each module's diagonal block
    off = [0, numels[0] + numels[1], sum(numels)]
    for i, b in enumerate(rep.per_layer.blocks):
        sub = H[off[i] : off[i + 1], off[i] : off[i + 1]]
        assert b.eigenvalues[0] == pytest.approx(float(torch.linalg.eigvalsh(sub)[-1]), rel=1e-8)
    assert rep.landscape.losses.shape == (41,) and rep.density is not None and rep.converged
    md = (out / "report.md").read_text()
    assert "All eigenvalue solves converged: yes" in md and "![density](density.png)" in md
    for png in ("eigenvalues", "density", "per_layer", "landscape"):
        assert (out / f"{png}.png").stat().st_size > 5_000
    # the same from Python
    rep2 = analyze(
        model,
        mod.batches(),
        lambda m, b: torch.nn.functional.cross_entropy(m(b[0].double()), b[1]),
        top_k=2,
        trace=False,
        progress=False,
    )
    torch.testing.assert_close(rep2.top.eigenvalues, ev.flip(0)[:2], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--model", "{p}:nope", "--data", "{p}:batches"], "has no attribute 'nope'"),
        (
            ["--model", "{p}:build", "--data", "{p}:batches", "--checkpoint", "{bad}"],
            r"keys do not match the model: missing \['0.bias'",
        ),
        (["--model", "{p}:build", "--data", "{p}:broken"], "disk on fire"),
        (
            ["--model", "{p}:build", "--data", "{p}:batches", "--checkpoint", "{p}"],
            "cannot read .* as a state_dict",
        ),
        (
            ["--model", "{p}:build", "--data", "{p}:batches", "--operator", "kfac"],
            "--operator must be hessian, ggn or fisher",
        ),
        (["--model", "{p}:build"], "give --model pkg.module:factory and --data"),
    ],
)
def test_bad_inputs_one_line_exit_2(tmp_path, extra, match):
    path, _, model, _ = _user(tmp_path)
    sd = {k: v for k, v in model.state_dict().items() if k != "0.bias"}
    torch.save(sd, tmp_path / "bad.pt")
    args = [
        "analyze",
        *[a.format(p=path, bad=tmp_path / "bad.pt") for a in extra],
        "--out",
        str(tmp_path / "o"),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    err = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1
    import re

    assert re.search(match, err[0]), err[0]


def test_python_m_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "hessian_spectra", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.startswith("hessian-spectra ")


def _tiny_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    cfg = transformers.GPT2Config(
        vocab_size=len(vocab), n_positions=8, n_embd=4, n_layer=1, n_head=1, n_inner=4
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    d = tmp_path / "gpt2"
    model.save_pretrained(d)
    fast.save_pretrained(d)
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(words[(3 * i) % len(words)] for i in range(50)))
    return d, text, fast


def test_analyze_tiny_hf_gpt2_text(tmp_path):
    transformers = pytest.importorskip("transformers")
    d, text, fast = _tiny_gpt2(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        [
            "analyze",
            "--hf",
            str(d),
            "--text",
            str(text),
            "--seq-len",
            "6",
            "--batch-size",
            "4",
            "--dtype",
            "float64",
            "--device",
            "cpu",
            "--top-k",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    rep = AnalysisReport.load(out / "report.json")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, attn_implementation="eager"
    ).double()
    ids = torch.tensor(fast(text.read_text(), add_special_tokens=False)["input_ids"])
    seqs = ids[: ids.numel() // 6 * 6].reshape(-1, 6)
    batches = [seqs[i : i + 4] for i in range(0, len(seqs), 4)]
    assert [len(b) for b in batches] == [4, 4]  # 50 tokens: 8 sequences, equal batches

    class _LM:
        @staticmethod
        def size(b):
            return len(b)

        def __call__(self, call, b):
            return call(input_ids=b, labels=b).loss

    model.eval()
    H, _, _ = _dense_hessian(model, batches, _LM())
    ev = torch.linalg.eigvalsh(H)
    assert rep.num_params == H.shape[0]
    torch.testing.assert_close(rep.top.eigenvalues, ev.flip(0)[:2], rtol=1e-7, atol=1e-9)
    assert rep.trace.estimate == pytest.approx(float(H.trace()), rel=0.5)  # Hutch++ estimate
