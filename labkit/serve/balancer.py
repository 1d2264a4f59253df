"""HAProxy in front of several `labkit serve` replicas: the config, and a process to run it.

Why a real load balancer: one replica is one engine, and its batch is bounded by one machine's compute
(here one core). More replicas need something in front that picks a replica per request, takes a dead one
out of rotation, and retries what never reached a replica, so clients see one URL and few errors. HAProxy
does all three, is what many clusters run (directly, or inside Kubernetes ingress controllers), and is one
Debian package (`make prod-tools`). Everything here is its configuration; the load balancer's own work
(tens of microseconds of CPU per streamed token, measured in notebook 08b) is not what limits an LLM service.

    servers = [("r0", "127.0.0.1:8001"), ("r1", "127.0.0.1:8002")]
    cfg = haproxy_config(servers, "leastconn", 8080)         # the config text
    with LoadBalancer(servers, "affinity") as lb:          # lb.url -> http://127.0.0.1:<port>
        lb.server_stats()["r0"]["status"]                  # "UP", "DOWN", ... (HAProxy's stats CSV)
    python -m labkit.serve.balancer --servers a:8000,b:8000 --policy leastconn --port 8080   # prints it
    haproxy_config(servers, key_requests_per_minute=600)   # + a per-key request cap, enforced here

docker/haproxy.cfg and k8s/haproxy.yaml are this module's output (tests/test_deploy.py regenerates them).

Policies (`balance` in the backend):
- roundrobin: each request to the next replica in turn, blind to how busy they are.
- leastconn: to the replica with the fewest requests in flight. LLM requests last from 0.1 s to minutes,
  so "in flight" is a far better load signal than "sent last"; it shortens the latency tail.
- affinity: a consistent hash of a session header (X-Session-Id): every turn of one conversation lands
  on the replica that already holds its prefix in its KV cache (labkit/engine/block_manager.py). A request
  without the header is balanced round robin (HAProxy's rule for `balance hdr`). Consistent hashing: when
  a replica goes down, only its own sessions move (a plain modulo hash would reshuffle nearly all).

A per-key request cap (key_requests_per_minute): the replicas meter each API key exactly (token buckets,
x-ratelimit-* headers: ratelimit.py), but each on its own, so behind N replicas a key gets N times its
limit, and every refusal still costs a replica a few hundred microseconds of Python: a client that
resends at once on each 429 (thousands a second) slows every tenant on that machine. The cap is a coarse
backstop in C, before any replica: one stick table in the frontend counts each Authorization header's
requests over the last minute, and above the cap HAProxy answers 429 itself (OpenAI's error JSON, with
Retry-After). The table is shared by all replicas behind this HAProxy (several HAProxy instances would
share it with a `peers` section). Set it above the replicas' own per-key limits and above any honest
key's rate (say 2-5x the largest requests-per-minute limit): honest clients then only ever meet the
replicas' exact limits, and a flood is refused here. Refused requests count toward the rate: a flooder that keeps flooding stays capped.

Invariants (tests/test_serve_balancer.py): every policy's config passes `haproxy -c` without warnings; a
dead or draining replica is marked DOWN (after `fall` failed checks: `time_to_down` gives the window) and
gets no request after that; a request that never got a response byte from a replica is retried
elsewhere or answered with a JSON 503, never lost (failover.py counts what clients saw).
"""

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time

import httpx

from .launch import free_port, process_cpu_seconds, terminate, terminate_with_parent

POLICIES = ("roundrobin", "leastconn", "affinity")
SESSION_HEADER = "X-Session-Id"
# health checks: GET /ready every INTER_MS; FALL failures in a row mark a replica DOWN, RISE passes UP
INTER_MS, FALL, RISE = 500, 2, 2
# the per-key cap: its window, and the stick table's bounds (keys tracked at once, a key's idle lifetime)
CAP_WINDOW_S, CAP_TABLE_SIZE, CAP_KEY_LEN = 60, "100k", 128


def time_to_down(inter_ms: int = INTER_MS, fall: int = FALL) -> tuple[float, float]:
    """(fastest, slowest) seconds from a replica's death to DOWN, for a death that fails checks at once
    (connection refused). The first failing check comes 0..inter after the death, then fall-1 more."""
    return (fall - 1) * inter_ms / 1000, fall * inter_ms / 1000


def find_haproxy() -> str:
    """The haproxy binary (PATH, then /usr/sbin, where Debian puts it), or an error that says how to get it."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise FileNotFoundError(
            "haproxy not found: run `make prod-tools` (as root with apt-get it installs Debian's "
            "package), or `apt-get install --no-install-recommends haproxy`"
        )
    return found


def haproxy_config(
    servers: list[tuple[str, str]],
    policy: str = "leastconn",
    port: int = 8080,
    stats_port: int | None = None,
    bind: str = "127.0.0.1",
    retries: int = 3,
    dns_slots: int | None = None,
    key_requests_per_minute: int | None = None,
) -> str:
    """An HAProxy configuration: a frontend on bind:port, the replicas `servers` [(name, "host:port")] with
    health checks on /ready, and (stats_port) a stats page (/stats, CSV at /stats;csv) and Prometheus
    metrics (/metrics).

    dns_slots (containers, Kubernetes): replicas are found by DNS at run time, through the resolvers in
    /etc/resolv.conf, and never at start (`init-addr none`), so the config also checks on a machine where
    the names do not resolve. Each server is then a DNS name: a replica's own (compose: server-1), or a
    headless Service whose A records are the ready pods, filling up to dns_slots servers named
    <name>1..<name>N (`server-template`): pods come and go without a config change.

    key_requests_per_minute: each Authorization header may send this many requests per minute; above
    it HAProxy answers 429 itself (see the module docstring; None: no cap, the replicas' limits only)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not servers:
        raise ValueError("need at least one (name, 'host:port') server")
    if key_requests_per_minute is not None and key_requests_per_minute < 1:
        raise ValueError(f"key_requests_per_minute must be >= 1, got {key_requests_per_minute}")
    balance = {
        "roundrobin": "balance roundrobin",
        "leastconn": "balance leastconn",
        "affinity": f"balance hdr({SESSION_HEADER})\n    hash-type consistent",
    }[policy]
    error_body = (
        '{"error": {"message": "No replica could take the request; retry shortly.", '
        '"type": "server_error", "code": "no_replica"}}'
    )
    lines = [
        "global",
        "    nbthread 1          # the replicas need the cores; a proxy thread moves >10k chunks/s",
        "    maxconn 4096",
        "    log stderr format raw local0 info",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 1s       # replicas are local: a connect that slow means a dead one",
        "    timeout client 10m       # streams: idle time allowed between two chunks, not a",
        "    timeout server 10m       #   request's total time (a long answer is not an error)",
        "    timeout http-request 10s",
        "    timeout queue 30s",
        "    timeout check 2s         # a busy replica answers /ready late but answers: not dead",
        "    option http-no-delay     # forward each SSE chunk at once, no coalescing",
        # L7 retries. A POST may be replayed only while no byte of the response reached the client: then
        # the client cannot tell, and a completion has no side effect beyond compute. HAProxy keeps the
        # request in its buffer to replay it (http-buffer-request waits for the whole body first); once a
        # response has started streaming it is forwarded as it comes and can no longer be retried.
        "    option http-buffer-request",
        f"    retries {retries}",
        "    option redispatch 1       # every retry may go to another replica (needed for affinity)",
        "    retry-on conn-failure empty-response 503   # dead, died before answering, or draining",
        # the load balancer's own errors in the API's (OpenAI's) error shape, with a Retry-After
        *(
            f"    http-error status {code} content-type application/json hdr Retry-After 1 "
            f"string '{error_body}'"
            for code in (502, 503, 504)
        ),
        "",
        "frontend api",
        f"    bind {bind}:{port}",
        "    log global           # one line per request: which replica, retries, how it ended",
        '    log-format "%ci:%cp %HM %HU %ST server=%s retries=%rc time=%Tt state=%tsc"',
        *(key_cap_lines(key_requests_per_minute) if key_requests_per_minute else []),
        "    default_backend replicas",
        "",
        "backend replicas",
        f"    {balance}",
        "    option httpchk GET /ready      # a draining replica answers 503 here: out of rotation",
        "    http-check expect status 200",
        f"    default-server check inter {INTER_MS}ms fall {FALL} rise {RISE}"
        + (" resolvers dns init-addr none" if dns_slots else ""),
        "    http-response set-header X-Served-By %s   # which replica answered",
        *(
            f"    server-template {name} {dns_slots} {address}"
            if dns_slots and dns_slots > 1
            else f"    server {name} {address}"
            for name, address in servers
        ),
    ]
    if dns_slots:
        lines += [
            "",
            "resolvers dns",
            "    parse-resolv-conf        # Docker's embedded DNS, or the cluster's",
            "    hold valid 5s            # re-resolve often: replicas restart with new addresses",
        ]
    if stats_port is not None:
        lines += [
            "",
            "frontend stats",
            f"    bind {bind}:{stats_port}",
            "    http-request use-service prometheus-exporter if { path /metrics }",
            "    stats enable",
            "    stats uri /stats",
            "    stats refresh 1s",
        ]
    return "\n".join(lines) + "\n"


def key_cap_lines(requests_per_minute: int) -> list[str]:
    """The frontend's per-key cap: a stick table of request rates keyed on the Authorization header,
    and a 429 from HAProxy (no replica involved) for a key above `requests_per_minute`.

    Every request is counted, refused ones too (track-sc0 runs before the check), so a client that keeps
    resending stays above the cap until it stops. Its rate is HAProxy's sliding estimate over the last
    CAP_WINDOW_S (this period's count plus the last one's, weighted by how much of it is still in the
    window): after it stops sending, it falls below the cap within one to two windows. Retry-After says
    one window, the figure a client can reason about; one that comes back early is refused again, at a
    cost of microseconds, and its single retry barely moves its rate. A request without the header is
    not tracked (the replicas refuse it if they require keys)."""
    body = (  # in single quotes in the config: no apostrophe in it
        '{"error": {"message": "Rate limit reached: the load balancer caps this API key at '
        f"{requests_per_minute} requests per minute, above the per-key limits of the replicas. "
        'Wait Retry-After seconds.", '
        '"type": "requests", "param": null, "code": "rate_limit_exceeded"}}'
    )
    return [
        # one row per key: its request rate over the window; the expiry (two windows) outlives the
        # rate's memory, and the size bounds memory (about 50 bytes + the key per row; oldest evicted)
        f"    stick-table type string len {CAP_KEY_LEN} size {CAP_TABLE_SIZE} "
        f"expire {2 * CAP_WINDOW_S}s store http_req_rate({CAP_WINDOW_S}s)",
        "    http-request track-sc0 req.hdr(Authorization)",
        f"    http-request return status 429 content-type application/json "
        f"hdr Retry-After {CAP_WINDOW_S} string '{body}' "
        f"if {{ sc_http_req_rate(0) gt {requests_per_minute} }}",
    ]


class LoadBalancer:
    """HAProxy as a child process: config written to a temp dir, checked with `haproxy -c`, run in the
    foreground (-db), and killed with its parent, like launch.py's servers."""

    def __init__(
        self,
        servers: list[tuple[str, str]],
        policy: str = "leastconn",
        port: int | None = None,
        **options,
    ):
        self.servers, self.policy = servers, policy
        self.port, self.stats_port = port or free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stats_url = f"http://127.0.0.1:{self.stats_port}"
        self.config = haproxy_config(servers, policy, self.port, self.stats_port, **options)
        self.dir = tempfile.mkdtemp(prefix="labkit-haproxy-")
        self.config_path = os.path.join(self.dir, "haproxy.cfg")
        self.log_path = os.path.join(self.dir, "haproxy.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "LoadBalancer":
        haproxy = find_haproxy()
        with open(self.config_path, "w") as f:
            f.write(self.config)
        check = subprocess.run(
            [haproxy, "-c", "-f", self.config_path], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise ValueError(f"haproxy rejects the config:\n{check.stdout}{check.stderr}")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [haproxy, "-db", "-f", self.config_path],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=terminate_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.output()}")
            try:  # listening, and every replica checked once (HAProxy says "INI" before that)
                if all(row["check_status"] != "INI" for row in self.server_stats().values()):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"haproxy not listening after {timeout}s:\n{self.output()}")

    def server_stats(self) -> dict[str, dict[str, str]]:
        """{server name: its row of HAProxy's stats CSV}, plus "BACKEND" (the totals). Useful columns:
        status (UP / DOWN / "UP 1/2" while changing), scur (requests in flight), stot (total), wretr
        (retries), wredis (redispatches), chkdown (UP->DOWN transitions), hrsp_5xx, eresp (responses cut)."""
        text = httpx.get(self.stats_url + "/stats;csv", timeout=5).text.lstrip("# ")
        return {
            row["svname"]: row
            for row in csv.DictReader(io.StringIO(text))
            if row["pxname"] == "replicas"
        }

    def cpu_seconds(self) -> float | None:
        return None if self.proc is None else process_cpu_seconds(self.proc.pid)

    def output(self) -> str:
        """HAProxy's log: one line per request (server, retries, termination state) and health changes."""
        with open(self.log_path) as f:
            return f.read()

    def request_lines(self, expect: int = 0, since: int = 0, timeout: float = 5.0) -> list[str]:
        """The log's request lines (one per request, retries included) after character `since` of the
        log, waiting up to `timeout` s until at least `expect` are there: HAProxy logs a request as its
        stream closes, just after the client has read the answer."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.output()[since:].splitlines() if " server=" in line]
            if len(lines) >= expect or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout=10)

    def __enter__(self) -> "LoadBalancer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m labkit.serve.balancer", description="print an HAProxy config for replicas"
    )
    ap.add_argument("--servers", required=True, help="host:port,host:port,... (named r0, r1, ...)")
    ap.add_argument("--policy", default="leastconn", choices=POLICIES)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--stats-port", type=int, default=8404, help="stats page and /metrics")
    ap.add_argument("--bind", default="127.0.0.1", help="0.0.0.0 inside a container")
    ap.add_argument(
        "--dns-slots",
        type=int,
        default=None,
        help="resolve the servers by DNS at run time (containers: 1; a Kubernetes headless Service: "
        "the most pods it may list)",
    )
    ap.add_argument(
        "--key-requests-per-minute",
        type=int,
        default=None,
        help="cap each API key (Authorization header) here, in C, before any replica: a backstop "
        "above the replicas' own per-key limits that refuses floods (default: no cap)",
    )
    args = ap.parse_args(argv)
    addresses = args.servers.split(",")
    many = (args.dns_slots or 0) > 1  # server-template: the slots are named pod1..podN
    servers = [("pod" if many else f"r{i}", address) for i, address in enumerate(addresses)]
    config = haproxy_config(
        servers,
        args.policy,
        args.port,
        args.stats_port,
        args.bind,
        dns_slots=args.dns_slots,
        key_requests_per_minute=args.key_requests_per_minute,
    )
    print(config, end="")


if __name__ == "__main__":
    main()
