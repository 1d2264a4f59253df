"""Gateway benchmark: does a per-key limit protect quiet tenants from a noisy one?

    python benchmarks/gateway.py [--repeats 3] [--quiet-requests 40] [--noisy-concurrency 16]
                                 [--noisy-rpm 12 --noisy-tpm 1500]

One server, three keys: `quiet` (no limit), `noisy-limited` (--noisy-rpm / --noisy-tpm) and `noisy-free`
(no limit). The quiet tenant sends short requests as an open loop (Poisson arrivals) at
--quiet-load x the saturation rate (measured first: requests/s completed by --max-num-seqs closed-loop
clients). Each repeat measures the quiet tenant's TTFT three times, back to back on the same server:
alone; while a noisy client hammers on the limited key; while it hammers on the unlimited key. The noisy
client is a closed loop of --noisy-concurrency workers in a separate process (so its loop does not delay
the quiet client's sends and reads), sending long requests as fast as answers come back, 429s included:
it does not back off.

Targets (issue 14), judged on every repeat, reported as pass/fail:
  - the noisy client over its limit gets 429s, every one with Retry-After, and nobody gets a 5xx;
  - the quiet tenant's p99 TTFT with the limited noisy client stays within 1.5x of its p99 alone.
The same ratio with the unlimited noisy client is reported next to it: what the limit is worth.
Writes results/gateway.json and the committed record benchmarks/results/gateway.json.
"""

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labkit.results import save_record
from labkit.serve.launch import ServerProcess
from labkit.serve.loadgen import LoadResult, poisson_arrivals, run_load, run_open_loop, workload


def loadavg() -> float:
    return os.getloadavg()[0]


async def hammer(url: str, key: str, payloads: list[dict], concurrency: int, stop) -> dict:
    """Closed-loop batches on `key` until `stop` is set; the summary of every request sent."""
    records = []
    while not stop.is_set():
        records += (await run_load(url, payloads, concurrency, api_key=key, timeout=120)).records
    s = LoadResult(concurrency, 0.0, records).summary()
    return {k: s[k] for k in ("requests", "ok", "errors", "rejected_429", "server_errors_5xx")} | {
        "rejected_429_with_retry_after": s["rejected_429_with_retry_after"],
        "output_tokens": s["output_tokens"],
    }


def noisy_process(url, key, payloads, concurrency, stop, results) -> None:
    results.put(asyncio.run(hammer(url, key, payloads, concurrency, stop)))


def quiet_run(url: str, payloads: list[dict], rate: float, seed: int, noisy: dict | None) -> dict:
    """The quiet tenant's open loop, alone (noisy None) or beside a noisy process {key, payloads,
    concurrency}."""
    ctx = mp.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    proc = None
    if noisy is not None:
        proc = ctx.Process(
            target=noisy_process,
            args=(url, noisy["key"], noisy["payloads"], noisy["concurrency"], stop, results),
        )
        proc.start()
        time.sleep(
            noisy["ramp_s"]
        )  # the noisy client is at full pressure before the quiet one starts
    load0 = loadavg()
    res = asyncio.run(
        run_open_loop(
            url, payloads, poisson_arrivals(rate, len(payloads), seed), api_key="sk-quiet"
        )
    )
    out = {"quiet": res.summary(), "load_average": (load0 + loadavg()) / 2}
    if proc is not None:
        stop.set()
        out["noisy"] = results.get(timeout=300)
        proc.join(60)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server's engine")
    ap.add_argument("--quiet-requests", type=int, default=40, help="per measurement")
    ap.add_argument(
        "--quiet-load", type=float, default=0.3, help="the quiet rate, as a fraction of saturation"
    )
    ap.add_argument("--quiet-tokens", type=int, nargs=2, default=[16, 32], metavar=("MIN", "MAX"))
    ap.add_argument("--noisy-tokens", type=int, nargs=2, default=[64, 128], metavar=("MIN", "MAX"))
    ap.add_argument("--noisy-concurrency", type=int, default=16)
    ap.add_argument(
        "--noisy-rpm", type=int, default=12, help="the limited noisy key's requests/min"
    )
    ap.add_argument(
        "--noisy-tpm", type=int, default=1500, help="the limited noisy key's tokens/min"
    )
    ap.add_argument("--ramp-s", type=float, default=1.0, help="noisy head start before measuring")
    args = ap.parse_args(argv)

    keys = {
        "keys": [
            {"key": "sk-quiet", "id": "quiet"},
            {
                "key": "sk-noisy-limited",
                "id": "noisy-limited",
                "requests_per_minute": args.noisy_rpm,
                "tokens_per_minute": args.noisy_tpm,
            },
            {"key": "sk-noisy-free", "id": "noisy-free"},
        ]
    }
    keys_file = Path(tempfile.mkdtemp(prefix="gateway-bench-")) / "keys.json"
    keys_file.write_text(json.dumps(keys))
    quiet_min, quiet_max = args.quiet_tokens
    noisy_payloads = workload(
        64, seed=9, min_tokens=args.noisy_tokens[0], max_tokens=args.noisy_tokens[1]
    )
    result: dict = {"load_before": loadavg(), "repeats": []}
    with ServerProcess(
        args.model,
        max_num_seqs=args.max_num_seqs,
        max_waiting=1024,
        threads=args.threads,
        api_keys=keys_file,
    ) as srv:
        warm = workload(8, seed=1, min_tokens=quiet_min, max_tokens=quiet_max)
        asyncio.run(run_load(srv.url, warm, 4, api_key="sk-quiet"))
        sat = asyncio.run(
            run_load(
                srv.url,
                workload(3 * args.max_num_seqs, seed=2, min_tokens=quiet_min, max_tokens=quiet_max),
                args.max_num_seqs,
                api_key="sk-quiet",
            )
        ).summary()
        rate = args.quiet_load * sat["requests_per_s"]
        print(
            f"saturation {sat['requests_per_s']:.2f} req/s -> quiet rate {rate:.2f} req/s "
            f"(load {loadavg():.1f})",
            flush=True,
        )
        for r in range(args.repeats):
            payloads = workload(
                args.quiet_requests, seed=100 + r, min_tokens=quiet_min, max_tokens=quiet_max
            )
            runs = {}
            for name, key in (
                ("alone", None),
                ("limited", "sk-noisy-limited"),
                ("unlimited", "sk-noisy-free"),
            ):
                noisy = None
                if key is not None:
                    noisy = {
                        "key": key,
                        "payloads": noisy_payloads,
                        "concurrency": args.noisy_concurrency,
                        "ramp_s": args.ramp_s,
                    }
                runs[name] = quiet_run(srv.url, payloads, rate, seed=r, noisy=noisy)
                q = runs[name]["quiet"]
                extra = ""
                if "noisy" in runs[name]:
                    n = runs[name]["noisy"]
                    extra = f"; noisy {n['ok']} ok, {n['rejected_429']} x 429, {n['server_errors_5xx']} x 5xx"
                print(
                    f"  repeat {r} {name:9s}: quiet TTFT p50 {q['ttft_p50_s'] * 1e3:6.0f} ms "
                    f"p99 {q['ttft_p99_s'] * 1e3:6.0f} ms, errors {q['errors']}{extra} "
                    f"(load {runs[name]['load_average']:.1f})",
                    flush=True,
                )
            alone = runs["alone"]["quiet"]["ttft_p99_s"]
            runs["p99_ratio_limited"] = runs["limited"]["quiet"]["ttft_p99_s"] / alone
            runs["p99_ratio_unlimited"] = runs["unlimited"]["quiet"]["ttft_p99_s"] / alone
            result["repeats"].append(runs)
        server_log = srv.output()

    reps = result["repeats"]
    limited = [r["limited"]["noisy"] for r in reps]
    everyone = [r[m]["quiet"] for r in reps for m in ("alone", "limited", "unlimited")]
    everyone += [r[m]["noisy"] for r in reps for m in ("limited", "unlimited")]
    result.update(
        {
            "settings": {k: v for k, v in vars(args).items()},
            "saturation_requests_per_s": sat["requests_per_s"],
            "quiet_rate_requests_per_s": rate,
            "p99_ratios_limited": [r["p99_ratio_limited"] for r in reps],
            "p99_ratios_unlimited": [r["p99_ratio_unlimited"] for r in reps],
            "median_p99_ratio_limited": statistics.median(r["p99_ratio_limited"] for r in reps),
            "median_p99_ratio_unlimited": statistics.median(r["p99_ratio_unlimited"] for r in reps),
            "noisy_limited_429s": sum(n["rejected_429"] for n in limited),
            "noisy_limited_admitted": sum(n["ok"] for n in limited),
            "server_errors_5xx": sum(s["server_errors_5xx"] for s in everyone),
            "unexpected_errors_in_server_log": "unexpected error" in server_log,
            "load_after": loadavg(),
        }
    )
    targets_met = {
        "noisy_gets_429_with_retry_after_no_5xx": all(
            n["rejected_429"] > 0 and n["rejected_429_with_retry_after"] == n["rejected_429"]
            for n in limited
        )
        and result["server_errors_5xx"] == 0,
        "quiet_p99_ttft_within_1_5x": all(r["p99_ratio_limited"] <= 1.5 for r in reps),
    }
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "p99_ratios_limited",
                    "p99_ratios_unlimited",
                    "noisy_limited_429s",
                    "server_errors_5xx",
                )
            }
            | targets_met,
            indent=2,
        )
    )
    print("wrote", save_record("gateway", result, targets_met))
    return result


if __name__ == "__main__":
    main()
