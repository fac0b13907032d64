"""``python -m modalkv.cli``: the same as the ``modalkv`` command."""

from . import main

main()
