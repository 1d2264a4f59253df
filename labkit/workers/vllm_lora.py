"""Greedy answers of LoRA adapters through vLLM's `enable_lora`, in vLLM's venv (notebook 08d).

    request:  {"model": path, "requests": [[adapter name, adapter path, prompt], ...], "max_tokens": int,
               "max_lora_rank": int}
    answer:   {"version", "token_ids": [[int, ...], ...], "texts": [str, ...]}

The same peft directories labkit's engine serves, each as a `LoRARequest` (vLLM's way of naming an
adapter per request), all requests in one `generate` call so that vLLM batches the adapters together too.
"""

from labkit.workers.protocol import serve


def generate(request: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    names = sorted({name for name, _, _ in request["requests"]})
    llm = LLM(
        model=request["model"],
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        enable_lora=True,
        max_loras=len(names),
        max_lora_rank=request["max_lora_rank"],
        gpu_memory_utilization=0.3,  # on a CPU: the share of RAM vLLM reserves
    )
    ids = {name: i + 1 for i, name in enumerate(names)}  # vLLM's lora_int_id: unique, from 1
    outputs = llm.generate(
        [prompt for _, _, prompt in request["requests"]],
        SamplingParams(temperature=0, max_tokens=request["max_tokens"]),
        lora_request=[LoRARequest(name, ids[name], path) for name, path, _ in request["requests"]],
        use_tqdm=False,
    )
    return {
        "version": vllm.__version__,
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
    }


if __name__ == "__main__":
    serve(generate)
