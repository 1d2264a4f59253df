"""The same workload through labkit's engine or real vLLM, timed by one worker: only the import differs.

    python -m labkit.workers.bench_worker                  # main venv: labkit's engine
    .venv-vllm/bin/python -m labkit.workers.bench_worker   # vLLM's venv (see mk/vllm.mk)

Started by bench_client (see client.py and protocol.py). The first request starts an engine:
{"engine": "labkit" | "vllm", "model": path, "workload": [[prompt, max_tokens], ...],
"max_num_seqs": n, ...}; the answer says what started (engine, version, start-up time, sample texts).
Each later request {"run": TAG} runs the whole workload once and answers its measurements, so a
client can alternate this engine's runs with another's (paired runs, see bench_client.PairedRunner).
Every request of a run arrives at t=0; latency = time to a request's last token, TTFT = to its first.
vLLM starts worker processes of its own, so everything sits under the `if __name__ == "__main__"` guard.
"""

import statistics
import time

from labkit.workers.protocol import serve


def _percentile(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def start(spec: dict):
    """Start the engine `spec` asks for; return (run, info): run(tag, workload) times one pass."""
    t0 = time.perf_counter()
    which = spec["engine"]
    if which == "vllm":
        from vllm import LLM, SamplingParams
    elif which == "labkit":
        from labkit.engine import LLM, SamplingParams
    else:
        raise ValueError(f"engine must be 'labkit' or 'vllm', got {which!r}")
    if spec.get("torch_threads"):
        # either engine: vLLM's CPU engine, run in this process, computes on torch's threads too (every
        # core by default; its own VLLM_CPU_OMP_THREADS_BIND only applies to worker processes it spawns)
        import torch

        torch.set_num_threads(spec["torch_threads"])
    kwargs = dict(
        model=spec["model"],
        dtype=spec.get("dtype", "float32"),
        max_model_len=spec.get("max_model_len", 512),
        max_num_seqs=spec["max_num_seqs"],
        seed=0,
        enforce_eager=spec.get("enforce_eager", True),
        enable_prefix_caching=spec.get("enable_prefix_caching", True),
    )
    # optional engine arguments, passed through when set (speculative_config is vLLM's only)
    for key in ("quantization", "speculative_config"):
        if spec.get(key):
            kwargs[key] = spec[key]
    llm = LLM(**kwargs)
    if which == "labkit" and not kwargs["enforce_eager"]:
        llm.engine.warm_up()  # compile every batch size now, as vLLM does at start-up
    startup = time.perf_counter() - t0
    engine = llm.llm_engine

    def run(tag, workload):
        began = time.perf_counter()
        for i, (prompt, n) in enumerate(workload):
            engine.add_request(
                f"{tag}-{i}", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            )
        first: dict[str, float] = {}  # request id -> time of its first token
        done: dict[str, float] = {}  # request id -> time of its last token
        ids: dict[str, list[int]] = {}  # request id -> its output token ids
        while engine.has_unfinished_requests():
            for o in engine.step():
                now = time.perf_counter()
                ids[o.request_id] = list(o.outputs[0].token_ids)
                if ids[o.request_id]:
                    first.setdefault(o.request_id, now)
                if o.finished:
                    done[o.request_id] = now
        wall = time.perf_counter() - began
        lat = sorted(t - began for t in done.values())
        ttft = sorted(t - began for t in first.values())
        n_tok = sum(len(v) for v in ids.values())
        return {
            "output_tokens": n_tok,
            "wall_s": wall,
            "tokens_per_s": n_tok / wall,
            "latency_mean_s": statistics.mean(lat),
            "latency_p50_s": _percentile(lat, 0.5),
            "latency_p90_s": _percentile(lat, 0.9),
            "ttft_mean_s": statistics.mean(ttft),
            "ttft_p90_s": _percentile(ttft, 0.9),
            "token_ids": [ids[f"{tag}-{i}"] for i in range(len(workload))],
        }

    run("warmup", [[p, 4] for p, _ in spec["workload"][:4]])
    texts = llm.generate(
        [p for p, _ in spec["workload"][:3]],
        SamplingParams(temperature=0, max_tokens=24),
        use_tqdm=False,  # vLLM's progress bar divides by its elapsed time, which can be 0 here
    )
    info = {
        "engine": which,
        "startup_s": startup,
        "engine_kwargs": kwargs,
        "sample_texts": [o.outputs[0].text for o in texts],
    }
    if which == "vllm":
        import vllm

        cache = engine.vllm_config.cache_config
        info["version"] = vllm.__version__
        # what vLLM sized its KV cache to (it logs the same as "KV cache size: ... tokens")
        info["kv_cache"] = {
            "num_blocks": cache.num_gpu_blocks,
            "block_size": cache.block_size,
            "budget_bytes": cache.kv_cache_memory_bytes,
        }
    else:
        blocks = llm.engine.block_manager
        info["kv_cache"] = {"num_blocks": blocks.num_blocks, "block_size": blocks.block_size}
    return run, info


class BenchWorker:
    """Answers the start request, then one run per request: of the start request's workload, or of the
    request's own ("workload": [[prompt, max_tokens], ...])."""

    def __init__(self) -> None:
        self.spec: dict | None = None

    def handle(self, request: dict) -> dict:
        if self.spec is None:
            self.spec = request
            self.run, info = start(request)
            return info
        if "run" not in request:
            raise ValueError(f'after the start request, send {{"run": TAG}}; got {request!r}')
        return self.run(str(request["run"]), request.get("workload", self.spec["workload"]))


if __name__ == "__main__":
    serve(BenchWorker().handle)
