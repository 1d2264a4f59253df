"""Chat answers under a JSON schema through vLLM's structured outputs, in vLLM's venv (notebook 07b).

    request:  {"model": path, "messages": [...], "schema": {...}, "n": int, "temperature": float,
               "max_tokens": int, "seed": int}
    answer:   {"version", "backend", "texts": [str, ...], "finish_reasons": [...], "seconds"}

The same schema the notebook gives labkit's engine, through `StructuredOutputsParams(json=schema)` with
vLLM's default backend choice ("auto"), so the lesson can check vLLM's answers with the same validator.
"""

import time

from labkit.workers.protocol import serve


def generate(request: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    began = time.perf_counter()
    llm = LLM(
        model=request["model"],
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        seed=request["seed"],
        gpu_memory_utilization=0.3,  # on a CPU: the share of RAM vLLM reserves
    )
    params = SamplingParams(
        n=request["n"],
        temperature=request["temperature"],
        max_tokens=request["max_tokens"],
        seed=request["seed"],
        structured_outputs=StructuredOutputsParams(json=request["schema"]),
    )
    outputs = llm.chat(request["messages"], params, use_tqdm=False)[0].outputs
    backend = llm.llm_engine.vllm_config.structured_outputs_config.backend
    return {
        "version": vllm.__version__,
        "backend": backend,
        "texts": [o.text for o in outputs],
        "finish_reasons": [o.finish_reason for o in outputs],
        "seconds": time.perf_counter() - began,
    }


if __name__ == "__main__":
    serve(generate)
