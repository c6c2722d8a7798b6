"""``python -m tangent_kernels.taft``: the TAFT command line (``taft.cli``)."""

from .cli import main

main()
