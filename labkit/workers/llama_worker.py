"""llama.cpp on the GGUF file itself: the CPU engine a laptop user would pick (runs in .venv-llama).

Started by llama_client.decode_speed (see client.py and protocol.py). One request:
    {"gguf": path, "prompt_ids": [...], "new_tokens": 32, "threads": 2, "rounds": 3}
loads the model once (llama-cpp-python's `Llama`), then per round: feeds the prompt (prefill, not
timed) and decodes `new_tokens` greedily one at a time, timing the decode alone, the same way
benchmarks/roofline.py times labkit. Answers the decode tokens/s of each round and the greedy ids.
Imports only the standard library, llama_cpp and labkit.workers.protocol (no torch in this venv).
"""

import time

from labkit.workers.protocol import serve


def decode(request: dict) -> dict:
    import llama_cpp

    prompt, n = list(request["prompt_ids"]), int(request["new_tokens"])
    llm = llama_cpp.Llama(
        model_path=request["gguf"],
        n_ctx=len(prompt) + n + 8,
        n_threads=int(request["threads"]),
        n_batch=max(len(prompt), 8),
        logits_all=False,
        verbose=False,
    )
    rounds, ids = [], []
    for _ in range(int(request.get("rounds", 3))):
        llm.reset()
        llm.eval(prompt)  # prefill
        ids = [llm.sample(temp=0.0)]
        start = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([ids[-1]])
            ids.append(llm.sample(temp=0.0))
        rounds.append((n - 1) / (time.perf_counter() - start))
    return {
        "tokens_per_s": rounds,
        "token_ids": ids,
        "llama_cpp": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
    }


if __name__ == "__main__":
    serve(decode)
