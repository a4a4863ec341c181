"""Command line: ``hessian-spectra demo``, ``info`` and ``analyze``."""

from __future__ import annotations

from pathlib import Path

import typer

from hessian_spectra.analyze_cli import register as register_analyze

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Hessian, GGN and Fisher spectra of neural-network losses.",
)


@app.command()
def demo(
    out: Path = typer.Option(
        Path("hessian-spectra-demo"), help="Directory for density.png and report.json."
    ),
    seed: int = typer.Option(
        0, help="Seed for data split, initialisation, training and estimators."
    ),
    k: int = typer.Option(5, min=1, help="Number of top eigenpairs."),
) -> None:
    """Train a small MLP on scikit-learn's digits and report its Hessian spectrum."""
    from hessian_spectra.demo import run_demo

    try:
        run_demo(out, seed=seed, k=k, echo=typer.echo)
    except (ValueError, OSError) as err:  # a user mistake: one line, no traceback
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(code=2) from None


def _version(value: bool) -> None:
    if value:
        from hessian_spectra import __version__

        typer.echo(f"hessian-spectra {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Hessian, GGN and Fisher spectra of neural-network losses."""


register_analyze(app)


@app.command()
def info() -> None:
    """Versions and available backends."""
    import torch

    import hessian_spectra

    typer.echo(
        f"hessian-spectra {hessian_spectra.__version__}, torch {torch.__version__}, "
        f"cuda available: {torch.cuda.is_available()}"
    )


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
