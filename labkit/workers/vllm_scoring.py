"""Perplexity through vLLM with a chosen --kv-cache-dtype, in vLLM's venv (benchmarks/kv_quant.py).

    request:  {"model": path, "kv_cache_dtype": "auto" | "fp8_e4m3" | ..., "windows": [[ids], ...],
               "context": n}
    answer:   {"version", "kv_cache_dtype", "scored_tokens", "perplexity"}

Each window is one prompt scored with prompt_logprobs=0 (the true token's logprob only: vLLM does not hand
back whole distributions, so no KL here); positions with >= `context` tokens before them are counted, as in
labkit/kv_quality.py. vLLM starts worker processes of its own, hence the `__main__` guard.
"""

import math

from labkit.workers.protocol import serve


def score(request: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams

    windows, context = request["windows"], request["context"]
    llm = LLM(
        model=request["model"],
        kv_cache_dtype=request["kv_cache_dtype"],
        dtype="float32",
        max_model_len=max(len(w) for w in windows) + 1,
        enforce_eager=True,
        enable_prefix_caching=False,
        # on a CPU this is the share of RAM vLLM reserves (its error message says so): keep it small
        gpu_memory_utilization=0.3,
    )
    outputs = llm.generate(
        [{"prompt_token_ids": w} for w in windows],
        SamplingParams(max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    nll, n = 0.0, 0
    for window, out in zip(windows, outputs):
        for position in range(context, len(window)):
            nll -= out.prompt_logprobs[position][window[position]].logprob
            n += 1
    return {
        "version": vllm.__version__,
        "kv_cache_dtype": request["kv_cache_dtype"],
        "scored_tokens": n,
        "perplexity": math.exp(nll / n),
    }


if __name__ == "__main__":
    serve(score)
