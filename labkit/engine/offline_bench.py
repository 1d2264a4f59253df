"""The same workload through labkit's engine or real vLLM, timed by one script: only the import differs.

    python offline_bench.py labkit spec.json result.json          # main venv
    .venv-vllm/bin/python offline_bench.py vllm spec.json result.json   # vLLM's venv (see mk/vllm.mk)

spec: {"model": path, "workload": [[prompt, max_tokens], ...], "max_num_seqs": 32, ...}; with "interactive": true
it stays up and runs the workload on demand (see `serve_runs`). Standalone on purpose (standard library + the
engine) so it runs in vLLM's venv, where labkit is not installed. vLLM
starts worker processes, so everything sits under the `if __name__ == "__main__"` guard.
Every request arrives at t=0; latency = time to a request's last token, TTFT = to its first.
"""

import json
import statistics
import sys
import time


def main(which: str, spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    t0 = time.perf_counter()
    if which == "vllm":
        from vllm import LLM, SamplingParams
    elif which == "labkit":
        import torch

        from labkit.engine import LLM, SamplingParams

        if spec.get("torch_threads"):
            torch.set_num_threads(spec["torch_threads"])
    else:
        raise SystemExit(f"engine must be 'labkit' or 'vllm', got {which!r}")
    kwargs = dict(
        model=spec["model"],
        dtype=spec.get("dtype", "float32"),
        max_model_len=spec.get("max_model_len", 512),
        max_num_seqs=spec[
            "max_num_seqs"
        ],  # vllm_runner always sets it (from EngineConfig's default)
        seed=0,
        enforce_eager=spec.get("enforce_eager", True),
        enable_prefix_caching=spec.get("enable_prefix_caching", True),
    )
    if spec.get("quantization"):
        kwargs["quantization"] = spec["quantization"]
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0
    engine = llm.llm_engine

    def run(tag, workload):
        start = time.perf_counter()
        for i, (prompt, n) in enumerate(workload):
            engine.add_request(
                f"{tag}-{i}", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            )
        first, done, ids = {}, {}, {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                now = time.perf_counter()
                ids[o.request_id] = list(o.outputs[0].token_ids)
                if ids[o.request_id]:
                    first.setdefault(o.request_id, now)
                if o.finished:
                    done[o.request_id] = now
        wall = time.perf_counter() - start
        lat = sorted(t - start for t in done.values())
        ttft = sorted(t - start for t in first.values())
        pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
        n_tok = sum(len(v) for v in ids.values())
        return {
            "output_tokens": n_tok,
            "wall_s": wall,
            "tokens_per_s": n_tok / wall,
            "latency_mean_s": statistics.mean(lat),
            "latency_p50_s": pct(lat, 0.5),
            "latency_p90_s": pct(lat, 0.9),
            "ttft_mean_s": statistics.mean(ttft),
            "ttft_p90_s": pct(ttft, 0.9),
            "token_ids": [ids[f"{tag}-{i}"] for i in range(len(workload))],
        }

    run("warmup", [[p, 4] for p, _ in spec["workload"][:4]])
    texts = llm.generate(
        [p for p, _ in spec["workload"][:3]], SamplingParams(temperature=0, max_tokens=24)
    )
    info = {
        "engine": which,
        "startup_s": startup,
        "engine_kwargs": kwargs,
        "sample_texts": [o.outputs[0].text for o in texts],
    }
    if which == "vllm":
        import vllm

        info["version"] = vllm.__version__
    if spec.get("interactive"):
        serve_runs(run, spec["workload"], info)
        return
    result = run("run", spec["workload"])
    result.update(info)
    json.dump(result, open(out_path, "w"))


MARK = "@@offline_bench "  # prefixes our lines on stdout, which the engine's own logging may share


def serve_runs(run, workload, info) -> None:
    """Interactive mode: the caller writes "run" on stdin, we run the workload once and answer one marked
    JSON line. The caller can then alternate this engine's runs with another engine's, so that each pair of
    runs meets the same machine load (paired measurements, see vllm_runner.PairedRunner)."""
    print(MARK + json.dumps(info), flush=True)
    for k, line in enumerate(sys.stdin):
        if line.strip() != "run":
            break
        print(MARK + json.dumps(run(f"run{k}", workload)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
