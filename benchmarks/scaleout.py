"""Scale-out benchmark: two labkit replicas behind HAProxy (labkit/serve/balancer.py).

    python benchmarks/scaleout.py [--clients 64] [--requests 256] [--kill-after 2.0] [--repeats 2]

Writes results/scaleout.json and the committed record benchmarks/results/scaleout.json.

(i) Failover: `--clients` streaming clients through HAProxy (leastconn) on two replicas; `--kill-after` s
    in, replica r1 is killed, once as a crash (SIGKILL) and once as a drain (SIGTERM), restarted between.
    Targets, each judged on both runs:
    - kill_loses_no_unstarted_request: every request that had not started streaming was answered (HAProxy
      retried it) or got a 503 with a JSON body; none got a bare error (`failover.outcome` == "lost");
    - cut_streams_counted: the streams cut mid-way are errors the load generator saw, exactly as many as
      HAProxy logged as cut by the server (and none in a drain).
    Reported: answered / retried / cut / 503 / lost, seconds from the signal to HAProxy's DOWN.
(ii) Throughput of 2 replicas vs 1 at the same client count (alternated, --repeats times each), with CPU
    microseconds per generated token of every process: each replica's HTTP and engine process, HAProxy and
    the load generator. No target: on a 2-core machine two replicas share the cores the one had.
Each replica runs one torch thread (`--threads`): this machine has 2 cores. The load average is recorded
before and after each part: the figures are only as good as the machine is quiet.
"""

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labkit.results import save_record
from labkit.serve.balancer import LoadBalancer, time_to_down
from labkit.serve.failover import kill_under_load
from labkit.serve.loadgen import workload
from labkit.serve.replicas import Replicas, load_with_cpu


def load_average() -> float:
    return os.getloadavg()[0]


def failover(args) -> dict:
    runs = {}
    with Replicas(2, threads=args.threads, max_num_seqs=args.failover_max_num_seqs) as replicas:
        for kind, graceful in (("sigkill", False), ("sigterm", True)):
            load0 = load_average()
            with LoadBalancer(replicas.addresses(), "leastconn") as lb:
                payloads = workload(args.requests, seed=21, min_tokens=16, max_tokens=64)
                report = asyncio.run(
                    kill_under_load(
                        replicas, lb, payloads, args.clients, args.kill_after, graceful=graceful
                    )
                )
            replicas.restart(1)
            s = report.load.summary()
            runs[kind] = {
                "requests": s["requests"],
                **report.outcomes,
                "retried_by_haproxy": report.retried,
                "redispatched_in_haproxy_stats": report.redispatched,
                "cut_logged_by_haproxy": report.cut_by_server,
                "time_to_down_s": report.time_to_down,
                "sent_to_killed_replica_after_down": report.sent_to_victim_after_down,
                "health_log": report.health_log,
                "throughput_tok_s": s["throughput_tok_s"],
                "ttft_p99_s": s["ttft_p99_s"],
                "load_average_before": load0,
                "load_average_after": load_average(),
            }
            print(kind, {k: v for k, v in runs[kind].items() if k != "health_log"})
    fastest, slowest = time_to_down()
    return {
        "clients": args.clients,
        "kill_after_s": args.kill_after,
        "max_num_seqs_per_replica": args.failover_max_num_seqs,
        "time_to_down_predicted_s": [fastest, slowest],
        "runs": runs,
    }


def throughput(args) -> dict:
    """1 vs 2 replicas, alternated, each replica with a batch big enough for every client."""
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with Replicas(2, threads=args.threads, max_num_seqs=args.clients) as replicas:
        payloads = workload(args.requests, seed=31, min_tokens=16, max_tokens=64)
        for _ in range(args.repeats):
            for n in (1, 2):
                with LoadBalancer(replicas.addresses()[:n], "leastconn") as lb:
                    meters = {
                        name: meter
                        for name, meter in replicas.cpu_meters().items()
                        if int(name[1]) < n
                    }
                    load0 = load_average()
                    r = asyncio.run(
                        load_with_cpu(
                            lb.url, payloads, args.clients, {**meters, "haproxy": lb.cpu_seconds}
                        )
                    )
                runs[n].append(
                    {
                        "throughput_tok_s": r["throughput_tok_s"],
                        "errors": r["errors"],
                        "ttft_p50_s": r["ttft_p50_s"],
                        "tpot_p50_s": r["tpot_p50_s"],
                        "cpu_us_per_token": r["cpu_us_per_token"],
                        "load_average_before": load0,
                        "load_average_after": load_average(),
                    }
                )
                print(f"{n} replica(s): {r['throughput_tok_s']:.0f} tok/s", r["cpu_us_per_token"])
    ratios = [b["throughput_tok_s"] / a["throughput_tok_s"] for a, b in zip(runs[1], runs[2])]
    return {
        "clients": args.clients,
        "max_num_seqs_per_replica": args.clients,
        "runs": {f"{n}_replicas": v for n, v in runs.items()},
        "throughput_ratio_2_vs_1": statistics.median(ratios),
        "throughput_ratio_runs": ratios,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--kill-after", type=float, default=2.0)
    ap.add_argument(
        "--failover-max-num-seqs",
        type=int,
        default=16,
        help="batch per replica in the kill runs: smaller than the clients, so some requests wait "
        "(not yet answered, so retryable) while others stream",
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    args = ap.parse_args(argv)
    result = {"load_average_start": load_average()}
    result["failover"] = failover(args)
    result["throughput"] = throughput(args)
    result["load_average_end"] = load_average()
    runs = result["failover"]["runs"].values()
    targets_met = {
        "kill_loses_no_unstarted_request": all(r["lost"] == 0 for r in runs),
        "cut_streams_counted": all(r["cut"] == r["cut_logged_by_haproxy"] for r in runs)
        and result["failover"]["runs"]["sigterm"]["cut"] == 0,
    }
    print(f"2 vs 1 replicas: {result['throughput']['throughput_ratio_2_vs_1']:.2f}x", targets_met)
    print("wrote", save_record("scaleout", result, targets_met))
    return result


if __name__ == "__main__":
    main()
