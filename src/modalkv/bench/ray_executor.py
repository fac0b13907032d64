"""Ray executor for ``modalkv bench --executor ray``: one actor per model, so each model's weights load once.

Groups (one prompt, all its methods and budgets) are independent tasks on the model's actor; rows come back to the
driver, which appends them to the results file exactly as the local executor does (same cells, same scores; only the
timings differ with the machine's load). Needs the optional extra: ``pip install modalkv[ray]``.
"""

from __future__ import annotations

from pathlib import Path

from rich.progress import Progress


def run_with_ray(config, todo: list[list[dict]], out: Path, runner_cls, append_rows, progress: bool = True) -> None:
    """Run the groups ``todo`` on Ray actors of ``runner_cls`` (the runner's ``ModelRunner``; one per model) and
    write each group's rows with ``append_rows(out, rows)`` as they come back."""
    try:
        import ray
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ImportError("the Ray executor needs Ray: pip install 'modalkv[ray]'") from err
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=max(1, config.threads), include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
        started = True
    try:
        Actor = ray.remote(num_cpus=config.threads)(runner_cls)
        actors = {}
        pending = {}
        for cells in todo:
            model = cells[0]["model"]
            if model not in actors:
                actors[model] = Actor.remote(model, config.threads)
            ref = actors[model].run_group.remote(cells, config.quantize)
            pending[ref] = cells
        with Progress(disable=not progress) as bar:
            job = bar.add_task("cells (ray)", total=sum(len(c) for c in todo))
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                cells = pending.pop(ready[0])
                rows = ray.get(ready[0])
                append_rows(out, [r for r in rows if not r.get("_skip")])
                bar.update(job, advance=len(cells))
    finally:
        if started:
            ray.shutdown()
