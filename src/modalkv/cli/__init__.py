"""The ``modalkv`` command line: one module per command group, registered here in the order ``--help`` lists them.

* ``methods`` (:mod:`~modalkv.cli.info`): the registered methods and storage formats;
* ``generate`` (:mod:`~modalkv.cli.generate`, display in :mod:`~modalkv.cli.comparison`): compressed caches on one
  prompt, compared with the full cache;
* ``bench``, ``report``, ``continual`` (:mod:`~modalkv.cli.bench`): the benchmarks;
* ``serve`` (:mod:`~modalkv.cli.serve`): vLLM with modalkv's compression;
* ``train-vlm`` (:mod:`~modalkv.cli.train`): train the bundled VLM.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import typer  # noqa: E402  (after the offline switches above)

from .bench import bench, continual, report  # noqa: E402
from .generate import generate  # noqa: E402
from .info import methods  # noqa: E402
from .serve import serve  # noqa: E402
from .train import train_vlm  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help="modalkv: KV-cache compression that frees memory.")
app.command()(methods)
app.command()(generate)
app.command()(bench)
app.command()(report)
app.command()(continual)
app.command()(serve)
app.command("train-vlm")(train_vlm)


def main() -> None:  # pragma: no cover
    app()
