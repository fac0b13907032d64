"""``modalkv serve``: vLLM's OpenAI-compatible server with modalkv's compression (see docs/serving.md)."""

from __future__ import annotations

import os

import typer

from ..serving.launch import describe, serve_command
from ..serving.policy import ServingConfig
from .common import console, fail, parse_params


def serve(
    model: str = typer.Option("smollm2-135m", help="A bundled model or a local transformers folder."),
    method: str = typer.Option("snapkv", help="snapkv or streamingllm (one entry count per request)."),
    budget: float = typer.Option(1.0, help="Default budget, a ratio in (0, 1]; a request sets its own with "
                                           "vllm_xargs={\"modalkv_budget\": 0.25}. 1.0 = the full cache."),
    param: list[str] = typer.Option([], "--param", "-p", help="Method parameter KEY=VALUE (repeatable)."),
    host: str = typer.Option("127.0.0.1", help="Address the server listens on."),
    port: int = typer.Option(8000, help="Port."),
    kv_space: int = typer.Option(1, help="vLLM's KV cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE)."),
    max_model_len: int = typer.Option(4096, help="Longest prompt + output in tokens."),
    dry_run: bool = typer.Option(False, help="Print the server command instead of starting it."),
) -> None:
    """Serve a model with vLLM's OpenAI-compatible server, KV compressed by modalkv (needs scripts/vllm_setup.sh)."""
    try:
        argv, env = serve_command(model, ServingConfig(method, budget, parse_params(param)), host, port,
                                  max_model_len, kv_space)
    except (ValueError, TypeError, FileNotFoundError) as err:
        fail(str(err))
    if dry_run:
        console.print(describe(argv, env), markup=False, highlight=False, soft_wrap=True)
        return
    os.execve(argv[0], argv, env)
