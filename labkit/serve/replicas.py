"""Several `labkit serve` replicas on 127.0.0.1, for a load balancer (balancer.py) to spread traffic over.

    with Replicas(2, threads=1) as replicas:            # options as for ServerProcess
        replicas.addresses()                            # [("r0", "127.0.0.1:41231"), ("r1", ...)]
        replicas.kill(1)                                # a crash: SIGKILL, no goodbye
        replicas.kill(0, graceful=True)                 # a rolling update: SIGTERM, the server drains

Two ways a replica leaves, and clients see them differently:
- crash (SIGKILL to its process group: HTTP process and engine process die at once): its connections are
  reset. Requests it had not answered yet can be retried by the load balancer (nothing reached the
  client); streams it was sending end mid-way, and only the client can notice (no [DONE]).
- drain (SIGTERM, what `docker stop` and Kubernetes send): /ready turns 503, so health checks take the
  replica out; new requests that still arrive get a 503 the load balancer retries elsewhere; streams in
  flight finish; then the process exits (draining.py).

Each replica loads torch and the model (seconds of CPU), so they start concurrently, one thread each.
`load_with_cpu` runs a load test and says what each process (every replica's HTTP and engine process, the
load balancer, the load generator) spent per generated token: where a scaled-out service's CPU goes.
"""

import functools
import os
import signal
import threading
import time
from collections.abc import Callable

from .launch import ServerProcess
from .loadgen.runner import run_load


class Replicas:
    def __init__(self, n: int, **options):
        """n replicas, each a ServerProcess(**options) on a free port."""
        if n < 1:
            raise ValueError(f"need at least one replica, got {n}")
        self.options = options
        self.servers = [ServerProcess(**options) for _ in range(n)]

    def start(self) -> "Replicas":
        self._start_all(range(len(self.servers)))
        return self

    def _start_all(self, indices) -> None:
        """Spawn the processes here (the parent-death signal is tied to the thread that forks: a helper
        thread's exit would take its server with it), then wait for them side by side."""
        errors: list[BaseException] = []

        def wait(server: ServerProcess) -> None:
            try:
                server.wait_ready()
            except BaseException as err:  # reported below, in the caller's thread
                errors.append(err)

        for i in indices:
            self.servers[i].spawn()
        threads = [threading.Thread(target=wait, args=(self.servers[i],)) for i in indices]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]

    def addresses(self) -> list[tuple[str, str]]:
        """[(name, "host:port")] in the form balancer.haproxy_config takes."""
        return [(f"r{i}", f"127.0.0.1:{s.port}") for i, s in enumerate(self.servers)]

    def kill(self, i: int, graceful: bool = False) -> None:
        """graceful=False: SIGKILL replica i's whole process group (a crash), and reap it.
        graceful=True: SIGTERM its HTTP process, which drains and exits by itself (stop() waits)."""
        proc = self.servers[i].proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"replica r{i} is not running")
        if graceful:
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session (launch.py): the engine goes too
            proc.wait()

    def restart(self, i: int) -> None:
        """Replace replica i (after kill) with a new one on the same port: the load balancer's health
        checks see it come back."""
        self.servers[i].stop()
        self.servers[i] = ServerProcess(port=self.servers[i].port, **self.options)
        self._start_all([i])

    def cpu_meters(self) -> dict[str, Callable[[], float | None]]:
        """{"r0 HTTP": f, "r0 engine": f, ...}: f() = the CPU seconds that process has used so far."""
        return {
            f"r{i} {label}": functools.partial(server.cpu_seconds, role)
            for i, server in enumerate(self.servers)
            for role, label in (("server", "HTTP"), ("engine", "engine"))
        }

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def __enter__(self) -> "Replicas":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def load_with_cpu(
    url: str, payloads: list[dict], concurrency: int, meters: dict[str, Callable[[], float | None]]
) -> dict:
    """run_load's summary, plus "cpu_us_per_token": {process: CPU microseconds per generated token} for
    each of `meters` (e.g. Replicas.cpu_meters() and the load balancer's cpu_seconds) and for this
    process ("load generator"). None where a process cannot be measured (not Linux, or it died)."""
    meters = {**meters, "load generator": time.process_time}
    before = {name: meter() for name, meter in meters.items()}
    summary = (await run_load(url, payloads, concurrency)).summary()
    tokens = max(1, summary["output_tokens"])
    cpu: dict[str, float | None] = {}
    for name, meter in meters.items():
        start, end = before[name], meter()
        cpu[name] = None if start is None or end is None else (end - start) / tokens * 1e6
    return {**summary, "cpu_us_per_token": cpu}
