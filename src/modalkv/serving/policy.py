"""What a served request keeps: the budget, the block plan and the selection (no vLLM import here).

A paged engine reads one sequence length per request for every layer and KV head, so a served method must keep the
same number of entries in every (layer, KV head); each head still chooses *which* entries. SnapKV and StreamingLLM
do this as written. Methods whose counts differ per head or per layer (Ada-KV, MadaKV, PyramidKV's pyramid, HAE's
head budgets, the decoding evictions of H2O) would need a kernel that reads a length per (layer, head): they are
refused here instead of being served with a different meaning.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from ..methods import make_method
from ..protocol import PrefillContext

# method name -> the parameters the serving path fixes (StreamingLLM does not evict while decoding: the paged cache
# only appends; its prompt selection is the paper's sinks + recent window)
SERVABLE_METHODS = {"snapkv": {}, "streamingllm": {"evict_during_decode": False}}

ENV_METHOD = "MODALKV_VLLM_METHOD"
ENV_BUDGET = "MODALKV_VLLM_BUDGET"
ENV_PARAMS = "MODALKV_VLLM_PARAMS"  # "window=32,kernel=7"
REQUEST_BUDGET = "modalkv_budget"  # SamplingParams.extra_args key (OpenAI API: "vllm_xargs")


def check_ratio(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a ratio in (0, 1], got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{what} must be a ratio in (0, 1] (1.0 = the full cache), got {value}")
    return value


def parse_params(text: str) -> dict:
    """``"window=32,kernel=7"`` -> {"window": 32, "kernel": 7} (ints, floats, or strings)."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, eq, value = part.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"method parameter {part!r}: write name=value, e.g. window=32")
        for cast in (int, float):
            try:
                out[name.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[name.strip()] = value.strip()
    return out


@dataclass
class ServingConfig:
    """The server-wide method and default budget (per-request budgets override the budget)."""

    method: str = "snapkv"
    budget: float = 1.0
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in SERVABLE_METHODS:
            raise ValueError(f"method {self.method!r} cannot be served inside vLLM; servable: "
                             f"{', '.join(SERVABLE_METHODS)} (a served request keeps one entry count in every layer and "
                             "KV head, chosen once when its prompt is done; docs/serving.md says why others are not)")
        self.budget = check_ratio(self.budget, "budget")
        self.make()  # refuse bad parameters now, not inside the engine

    def make(self):
        return make_method(self.method, **{**self.params, **SERVABLE_METHODS[self.method]})

    @classmethod
    def from_env(cls) -> "ServingConfig":
        return cls(os.environ.get(ENV_METHOD, "snapkv"), float(os.environ.get(ENV_BUDGET, "1.0")),
                   parse_params(os.environ.get(ENV_PARAMS, "")))

    def to_env(self) -> dict[str, str]:
        return {ENV_METHOD: self.method, ENV_BUDGET: repr(self.budget),
                ENV_PARAMS: ",".join(f"{k}={v}" for k, v in self.params.items())}

    def request_budget(self, extra_args: dict | None) -> float:
        """The budget of one request: its ``modalkv_budget`` extra argument, else the server's."""
        if extra_args and REQUEST_BUDGET in extra_args:
            return check_ratio(extra_args[REQUEST_BUDGET], f"request parameter {REQUEST_BUDGET}")
        return self.budget


def block_plan(n: int, budget: float, block_size: int) -> tuple[int, int]:
    """(kept, dropped) entries for a prefill of ``n`` tokens at a ratio ``budget``.

    ``kept = ceil(budget * n)`` (at least 1, at most n), the same count :class:`modalkv.KVCache` keeps for that
    ratio, in every layer and KV head; the kept entries fill the request's first ``ceil(kept / block_size)``
    blocks and the blocks after them go back to the engine's pool. CHOICE: the last kept block may be partly
    empty; the next generated tokens fill it before a new block is taken.
    """
    if n < 0 or block_size < 1:
        raise ValueError(f"block_plan needs n >= 0 and block_size >= 1, got n={n}, block_size={block_size}")
    kept = min(n, max(1, math.ceil(n * budget))) if n else 0
    return kept, n - kept


class _Layer:
    """The part of a modalkv layer a uniform method's prefill reads (its rank among the managed layers)."""

    def __init__(self, rank: int, num_layers: int) -> None:
        self.rank = rank
        self.cache = type("C", (), {"num_managed": num_layers})()


def select_kept(method, window_queries: torch.Tensor, keys: torch.Tensor, scaling: float, kept: int,
                layer_rank: int = 0, num_layers: int = 1) -> torch.Tensor:
    """Entries each KV head keeps: LongTensor [H, kept], ascending, from modalkv's own method code.

    window_queries [Hq, w, d] are the last ``w`` prompt queries (post-RoPE), keys [H, n, d] the post-RoPE keys of
    the whole prompt. The method sees exactly what :class:`modalkv.KVCache` gives it at prefill with an absolute
    budget of ``kept`` tokens; only the window rows of the query are filled (SnapKV reads no others), and the
    servable methods read no values (the keys stand in for them).
    """
    H, n, d = keys.shape
    Hq, w, _ = window_queries.shape
    if kept >= n:
        return torch.arange(n).expand(H, n)
    query = keys.new_zeros(1, Hq, n, d, dtype=torch.float32)
    query[0, :, n - w:] = window_queries.float()
    ctx = PrefillContext(
        layer=_Layer(layer_rank, num_layers), query=query, keys=keys[None].float(), values=keys[None].float(),
        scaling=scaling, real=torch.ones(1, n, dtype=torch.bool), modality=torch.zeros(1, n, dtype=torch.int8),
        positions=torch.arange(n), n_real=torch.tensor([n]), budget_tokens=torch.tensor([kept]), caps={})
    idx = method.prefill(ctx).indices[0]
    if bool((idx < 0).any()) or idx.shape[-1] != kept:
        raise RuntimeError(f"{method.name}: expected {kept} entries per head, the selection kept fewer")
    return idx
