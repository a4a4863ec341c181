"""``hessian-spectra analyze``: load a user's model and data, run :func:`analyze`, write the report.

Inputs are named as ``pkg.module:attr`` (or ``path/to/file.py:attr``); a model
comes from a factory plus an optional ``state_dict`` checkpoint (``.pt`` read
with ``weights_only=True``, or ``.safetensors``), or from a local HuggingFace
directory (offline) with a text or token file cut into fixed-length sequences.
Mistakes in the inputs end with a one-line ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import typer
from torch import nn

__all__ = ["InputError", "analyze_command", "load_object"]


class InputError(ValueError):
    """A user's input (module path, checkpoint, data file) cannot be used."""


def load_object(spec: str, what: str) -> Any:
    """``pkg.module:attr`` or ``path/to/file.py:attr`` -> the attribute."""
    if ":" not in spec:
        raise InputError(f"--{what} must look like pkg.module:name or file.py:name, got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise InputError(f"--{what}: no file {mod_name!r}")
            modspec = importlib.util.spec_from_file_location(f"_hs_user_{path.stem}", path)
            assert modspec is not None and modspec.loader is not None
            module = importlib.util.module_from_spec(modspec)
            modspec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(mod_name)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"--{what}: cannot import {mod_name!r}: {err}") from err
    if not hasattr(module, attr):
        raise InputError(f"--{what}: module {mod_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"--checkpoint: no file {str(path)!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(
            f"--checkpoint: cannot read {str(path)!r} as a state_dict (.pt loaded with "
            f"weights_only=True, or .safetensors): {msg}"
        ) from err
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(
            f"--checkpoint: {str(path)!r} holds a {type(sd).__name__}, not a state_dict "
            "(save one with torch.save(model.state_dict(), path))"
        )
    return sd


def _build_model(factory_spec: str, checkpoint: Path | None) -> nn.Module:
    factory = load_object(factory_spec, "model")
    if not callable(factory):
        raise InputError(f"--model: {factory_spec!r} is not callable (give a factory function)")
    try:
        model = factory()
    except Exception as err:
        raise InputError(
            f"--model: calling {factory_spec}() raised {type(err).__name__}: {err}"
        ) from err
    if not isinstance(model, nn.Module):
        raise InputError(
            f"--model: {factory_spec}() returned {type(model).__name__}, not an nn.Module"
        )
    if checkpoint is not None:
        sd = _load_state_dict(checkpoint)
        own = model.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise InputError(
                f"--checkpoint: keys do not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
        if bad:
            raise InputError(
                f"--checkpoint: shapes differ for {bad[:5]} (model {tuple(own[bad[0]].shape)}, "
                f"checkpoint {tuple(sd[bad[0]].shape)})"
            )
        model.load_state_dict(sd)
    return model


def _cast(batch: Any, dtype: torch.dtype | None, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            batch = batch.to(dtype)
        return batch.to(device)
    if isinstance(batch, dict):
        return type(batch)({k: _cast(v, dtype, device) for k, v in batch.items()})
    if isinstance(batch, list | tuple):
        return type(batch)(_cast(v, dtype, device) for v in batch)
    return batch


def _batches(fn_spec: str, max_batches: int | None) -> list[Any]:
    fn = load_object(fn_spec, "data")
    try:
        data = fn() if callable(fn) else fn
        out = []
        for i, b in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            out.append(b)
    except Exception as err:
        raise InputError(
            f"--data: reading batches from {fn_spec} raised {type(err).__name__}: {err}"
        ) from err
    if not out:
        raise InputError(f"--data: {fn_spec} gave no batches")
    return out


def _token_batches(
    tokenizer: Any, text: Path | None, tokens: Path | None, seq_len: int, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    if (text is None) == (tokens is None):
        raise InputError("--hf needs exactly one of --text FILE or --tokens FILE")
    src = text if text is not None else tokens
    assert src is not None
    if not src.is_file():
        raise InputError(f"no file {str(src)!r}")
    if text is not None:
        try:
            ids = tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
        except Exception as err:
            raise InputError(f"--text: cannot tokenise {str(text)!r}: {err}") from err
    else:
        try:
            if src.suffix == ".pt":
                ids = torch.load(src, map_location="cpu", weights_only=True).reshape(-1).tolist()
            else:
                ids = [int(t) for t in src.read_text().split()]
        except Exception as err:
            raise InputError(
                f"--tokens: {str(src)!r} must hold whitespace-separated ints or a .pt tensor: {err}"
            ) from err
    ids_t = torch.tensor(ids, dtype=torch.long)
    nseq = ids_t.numel() // seq_len
    if nseq == 0:
        raise InputError(f"{str(src)!r} has {ids_t.numel()} tokens, fewer than --seq-len {seq_len}")
    seqs = ids_t[: nseq * seq_len].reshape(nseq, seq_len)
    return [
        {"input_ids": seqs[i : i + batch_size], "labels": seqs[i : i + batch_size].clone()}
        for i in range(0, nseq, batch_size)
    ]


def _losses(name: str) -> dict[str, Any]:
    import torch.nn.functional as F

    from hessian_spectra.losses.standard import (
        supervised_forward,
        supervised_loss,
        supervised_loss_of_output,
        supervised_per_sample_loss,
    )

    if name in ("cross_entropy", "mse"):
        crit = F.cross_entropy if name == "cross_entropy" else F.mse_loss
        return {
            "loss_fn": supervised_loss(crit),
            "forward_fn": supervised_forward,
            "loss_of_output_fn": supervised_loss_of_output(crit),
            "per_sample_loss_fn": supervised_per_sample_loss(crit),
        }
    fn = load_object(name, "loss")
    if not callable(fn):
        raise InputError(f"--loss: {name!r} is not callable")
    return {"loss_fn": fn}


def _hf(
    directory: Path, text: Path | None, tokens: Path | None, seq_len: int, batch_size: int
) -> tuple[nn.Module, list[Any], dict[str, Any]]:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise InputError("--hf needs transformers: pip install 'hessian-spectra[hf]'") from err
    from hessian_spectra.losses.huggingface import (
        hf_lm_forward,
        hf_lm_loss,
        hf_lm_loss_of_output,
        hf_lm_per_sample_loss,
    )

    if not directory.is_dir():
        raise InputError(f"--hf: no directory {str(directory)!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, attn_implementation="eager"
        )
    except Exception as err:
        raise InputError(f"--hf: cannot load a causal LM from {str(directory)!r}: {err}") from err
    tokenizer = None
    if text is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as err:
            raise InputError(f"--hf: no tokenizer in {str(directory)!r} for --text: {err}") from err
    batches = _token_batches(tokenizer, text, tokens, seq_len, batch_size)
    fns = {
        "loss_fn": hf_lm_loss(),
        "forward_fn": hf_lm_forward(),
        "loss_of_output_fn": hf_lm_loss_of_output(),
        "per_sample_loss_fn": hf_lm_per_sample_loss(),
    }
    return model, batches, fns


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def analyze_command(
    model: str | None = typer.Option(
        None, "--model", help="pkg.module:factory building the nn.Module."
    ),
    checkpoint: Path | None = typer.Option(
        None, help="state_dict: .pt (weights_only) or .safetensors."
    ),
    hf: Path | None = typer.Option(
        None, "--hf", help="Local HuggingFace causal-LM directory (offline)."
    ),
    text: Path | None = typer.Option(
        None, help="With --hf: a text file, tokenised with the model's tokenizer."
    ),
    tokens: Path | None = typer.Option(
        None, help="With --hf: token ids (whitespace-separated ints or .pt)."
    ),
    seq_len: int = typer.Option(32, min=2, help="With --hf: tokens per sequence."),
    batch_size: int = typer.Option(8, min=1, help="With --hf: sequences per batch."),
    data: str | None = typer.Option(None, help="pkg.module:fn returning an iterable of batches."),
    loss: str = typer.Option(
        "cross_entropy", help="cross_entropy, mse, or pkg.module:fn(model, batch)."
    ),
    operator: str = typer.Option("hessian", help="hessian, ggn or fisher."),
    top_k: int = typer.Option(5, min=0, help="Largest eigenpairs."),
    bottom_k: int = typer.Option(0, min=0, help="Smallest eigenpairs."),
    trace: bool = typer.Option(True, "--trace/--no-trace", help="Estimate the trace."),
    density: bool = typer.Option(False, "--density", help="SLQ spectral density."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Per-module spectra."),
    landscape: bool = typer.Option(False, "--landscape", help="Loss along the top eigenvector."),
    dtype: str = typer.Option("float32", help="float32, float64 or bfloat16."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1, ... or auto."),
    seed: int = typer.Option(0, help="Seed for the factory and every estimator."),
    max_batches: int | None = typer.Option(None, min=1, help="Use at most this many batches."),
    out: Path = typer.Option(Path("hessian-spectra-report"), help="Output directory."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Analyse the curvature of your own model: eigenvalues, trace, density, plots, report.md."""
    from hessian_spectra.analyze import analyze

    try:
        if dtype not in _DTYPES:
            raise InputError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if operator not in ("hessian", "ggn", "fisher"):
            raise InputError(f"--operator must be hessian, ggn or fisher, got {operator!r}")
        dev = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        torch.manual_seed(seed)
        if hf is not None:
            if model is not None or data is not None:
                raise InputError("give either --hf (with --text/--tokens) or --model with --data")
            net, batches, fns = _hf(hf, text, tokens, seq_len, batch_size)
            if max_batches is not None:
                batches = batches[:max_batches]
        else:
            if model is None or data is None:
                raise InputError(
                    "give --model pkg.module:factory and --data pkg.module:fn (or --hf DIR)"
                )
            net = _build_model(model, checkpoint)
            batches = _batches(data, max_batches)
            fns = _losses(loss)
        net = net.to(device=dev, dtype=_DTYPES[dtype])
        batches = [_cast(b, _DTYPES[dtype], dev) for b in batches]
        typer.echo(
            f"analysing {type(net).__name__} on {len(batches)} batches ({operator}, {dtype}, {dev})"
        )
        report = analyze(
            net,
            batches,
            fns["loss_fn"],
            out,
            operator=operator,  # type: ignore[arg-type]
            top_k=top_k,
            bottom_k=bottom_k,
            trace=trace,
            density=density,
            per_layer=per_layer,
            landscape=landscape,
            forward_fn=fns.get("forward_fn"),
            loss_of_output_fn=fns.get("loss_of_output_fn"),
            per_sample_loss_fn=fns.get("per_sample_loss_fn"),
            seed=seed,
            progress=progress,
        )
    except (InputError, ValueError, TypeError, FileNotFoundError) as err:
        msg = " ".join(str(err).split())
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(2) from None
    if report.top is not None:
        typer.echo(
            "top eigenvalues: " + ", ".join(f"{x:.6g}" for x in report.top.eigenvalues.tolist())
        )
    if report.trace is not None:
        typer.echo(f"trace: {report.trace.estimate:.6g} ({report.trace.method})")
    typer.echo(f"converged: {report.converged}; report written to {out / 'report.md'}")


def register(app: typer.Typer) -> Callable[..., None]:
    """Add ``analyze`` to ``app``."""
    return app.command("analyze")(analyze_command)
