"""``python -m hessian_spectra``: the ``hessian-spectra`` command line."""

from hessian_spectra.cli import main

if __name__ == "__main__":
    main()
