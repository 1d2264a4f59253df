"""Serving benchmark: the labkit server under 1..64 concurrent streaming clients vs the offline engine.

    python benchmarks/serve.py [--requests 64] [--concurrency 1 8 32 64] [--disconnect-requests 1000]

Writes results/serve.json. Targets (checked here, reported as pass/fail, never as wall-clock asserts):
  - at the highest concurrency: zero failed or lost requests;
  - server throughput >= 0.8x the offline engine (LLM.generate) on the same workload;
  - KV blocks in use back to 0 after the run;
  - N requests with random client disconnects leak nothing (no blocks, no active requests left).
"""
import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from labkit.results import save_result  # noqa: E402
from labkit.serve.launch import ServerProcess  # noqa: E402
from labkit.serve.loadgen import run_load, workload  # noqa: E402


def scrape(url: str) -> dict[str, float]:
    """The server's /metrics as {series: value} (labels dropped: one model per server)."""
    from prometheus_client.parser import text_string_to_metric_families
    values = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            values[s.name] = values.get(s.name, 0.0) + s.value
    return values


def wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    """Poll until the server holds no requests (aborts are processed on the next loop turn)."""
    deadline = time.time() + timeout
    while True:
        m = scrape(url)
        if (m["labkit:active_requests"] == 0 and m["labkit:kv_blocks_used"] == 0) or time.time() > deadline:
            return m
        time.sleep(0.2)


def offline_throughput(payloads: list[dict], max_num_seqs: int, model: str | None) -> dict:
    from labkit.engine import LLM, SamplingParams
    llm = LLM(model, max_num_seqs=max_num_seqs)
    params = [SamplingParams(temperature=0.0, max_tokens=p["max_tokens"], ignore_eos=True) for p in payloads]
    prompts = [p["prompt"] for p in payloads]
    llm.generate(prompts[:4], params[:4])                       # warm up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tokens": tokens, "wall_s": wall, "throughput_tok_s": tokens / wall,
            "texts": [o.outputs[0].text for o in outs]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--min-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--disconnect-requests", type=int, default=1000, help="0 to skip the leak test")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both the server and the offline engine (1 is steadier on a shared "
                         "2-core machine: the other core runs HTTP and the clients)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    top = max(args.concurrency)
    payloads = workload(max(args.requests, top), seed=0, min_tokens=args.min_tokens, max_tokens=args.max_tokens)
    print(f"offline engine: {len(payloads)} requests ...", flush=True)
    offline = offline_throughput(payloads, args.max_num_seqs, args.model)
    print(f"  {offline['throughput_tok_s']:.0f} tok/s", flush=True)

    levels, result = [], {}
    with ServerProcess(args.model, max_num_seqs=args.max_num_seqs, max_waiting=4 * args.disconnect_requests + 256,
                       threads=args.threads) as srv:
        asyncio.run(run_load(srv.url, payloads[:8], 4))          # warm up the server
        for c in args.concurrency:
            res = asyncio.run(run_load(srv.url, payloads[:max(args.requests, c)], c))
            s = res.summary()
            s["kv_blocks_used_after"] = wait_idle(srv.url)["labkit:kv_blocks_used"]
            levels.append(s)
            print(f"  {c:3d} clients: {s['throughput_tok_s']:7.0f} tok/s  TTFT p50 {s['ttft_p50_s'] * 1e3:6.0f} ms "
                  f"p99 {s['ttft_p99_s'] * 1e3:6.0f} ms  TPOT p50 {s['tpot_p50_s'] * 1e3:5.1f} ms  "
                  f"errors {s['errors']}", flush=True)
        if args.disconnect_requests:
            n = args.disconnect_requests
            leak_payloads = workload(n, seed=1, min_tokens=4, max_tokens=24)
            res = asyncio.run(run_load(srv.url, leak_payloads, top, disconnect_prob=0.5, seed=1))
            after = wait_idle(srv.url)
            s = res.summary()
            result["disconnect_test"] = {"requests": n, "disconnected": s["disconnected"], "completed": s["ok"],
                                         "errors": s["errors"], "kv_blocks_used_after": after["labkit:kv_blocks_used"],
                                         "active_requests_after": after["labkit:active_requests"]}
            print(f"  disconnect test: {result['disconnect_test']}", flush=True)
        final = wait_idle(srv.url)
        exit_code = srv.stop()

    # measure the offline engine again now that the server is gone; keep the faster run (the stricter
    # comparison for the server: noise from other processes can only make a run slower)
    again = offline_throughput(payloads, args.max_num_seqs, args.model)
    print(f"offline engine (again): {again['throughput_tok_s']:.0f} tok/s", flush=True)
    offline_runs = [offline["throughput_tok_s"], again["throughput_tok_s"]]
    if again["throughput_tok_s"] > offline["throughput_tok_s"]:
        offline = again
    offline["runs_tok_s"] = offline_runs

    at_top = levels[-1]
    ratio = at_top["throughput_tok_s"] / offline["throughput_tok_s"]
    dt = result.get("disconnect_test")
    targets = {
        "zero_errors_at_top": at_top["errors"] == 0 and at_top["ok"] == at_top["requests"],
        "throughput_ratio_vs_offline": ratio, "throughput_ratio_ok": ratio >= 0.8,
        "kv_blocks_zero_after": final["labkit:kv_blocks_used"] == 0,
        "disconnects_leak_nothing": None if dt is None else
        (dt["kv_blocks_used_after"] == 0 and dt["active_requests_after"] == 0 and dt["errors"] == 0),
        "graceful_exit_code": exit_code,
    }
    offline.pop("texts")
    result.update({"workload": {"requests": len(payloads), "min_tokens": args.min_tokens,
                                "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs,
                                "torch_threads": args.threads},
                   "offline": offline, "levels": levels, "targets": targets})
    print(json.dumps(targets, indent=2))
    print("wrote", save_result("serve", result))
    return result


if __name__ == "__main__":
    main()
