"""Start `labkit serve` as a subprocess on 127.0.0.1 and stop it cleanly: for notebooks, tests, benchmarks.

    with ServerProcess(max_num_seqs=64) as server:
        httpx.get(server.url + "/v1/models")

A separate process (not a thread in the notebook kernel) is what production looks like: the server has
its own interpreter and GIL, and the client's CPU work does not run inside it.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def terminate_with_parent():
    """Linux: SIGTERM the server if the process that started it (a notebook kernel, pytest) dies,
    so a crashed kernel never leaves an orphan server holding a port and CPU."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def process_cpu_seconds(pid: int) -> float | None:
    """Nanosecond-exact from the scheduler (/proc/PID/task/*/schedstat: each live thread's run time); else
    /proc/PID/stat's utime + stime, counted in clock ticks (10 ms: too coarse for a short notebook run)."""
    if os.path.exists(f"/proc/{pid}/schedstat"):
        total = 0
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return None
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):  # the thread ended meanwhile
                continue
        return total / 1e9
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def terminate(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM a child, then SIGKILL if it has not exited within `timeout` s. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(
        self,
        model: str | None = None,
        port: int | None = None,
        startup_timeout: float = 300.0,
        **options,
    ):
        """options become CLI flags: max_num_seqs=64 -> --max-num-seqs 64 (True -> bare flag)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "labkit.serve", "--port", str(self.port)]
        if model:
            self.args += ["--model", model]
        for key, value in options.items():
            if value is None or value is False:
                continue
            self.args.append("--" + key.replace("_", "-"))
            if value is not True:
                self.args.append(str(value))
        self.startup_timeout = startup_timeout
        # vLLM's OpenAI server (--backend vllm) has /health but no /ready
        self.ready_path = "/health" if options.get("backend") == "vllm" else "/ready"
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(
            "w+", prefix="labkit-serve-", suffix=".log", delete=False
        )

    def start(self) -> "ServerProcess":
        self.spawn()
        return self.wait_ready()

    def spawn(self) -> None:
        """Start the process without waiting for it (start() = spawn() + wait_ready()). Call it from a
        thread that outlives the server: Linux's parent-death signal fires when the *thread* that forked
        it ends (see replicas.py, which spawns several and then waits for them together)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # its own session: Ctrl-C in the terminal or notebook does not hit the server directly (stop() drains
        # it with SIGTERM), and on Linux the scheduler gives it its own CPU share (sched_autogroup) instead
        # of splitting ours with the load generator: as on a real deployment, client and server do not
        # compete inside one group.
        self.proc = subprocess.Popen(
            self.args,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=terminate_with_parent if sys.platform == "linux" else None,
        )

    def wait_ready(self) -> "ServerProcess":
        """Poll the readiness endpoint until it answers 200; raise (and stop the server) if it dies or
        does not get there within startup_timeout."""
        assert self.proc is not None, "spawn() first"
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} during startup:\n{self.output()}"
                )
            try:
                if httpx.get(self.url + self.ready_path, timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {self.startup_timeout}s:\n{self.output()}")

    def processes(self) -> dict[int, str]:
        """{pid: role} for the server and its child processes: "server" (HTTP), "engine" (the engine process,
        --engine-mode process) or "helper" (multiprocessing's resource tracker). Linux (/proc); else {}."""
        if self.proc is None:
            return {}
        found, todo = {}, [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                continue
            found[pid] = (
                "server"
                if pid == self.proc.pid
                else "engine"
                if b"spawn_main" in cmdline
                else "helper"
            )
        return found

    def cpu_seconds(self, role: str | None = None) -> float | None:
        """CPU time (user + system, all threads) the server's processes have used so far, or only those with
        `role` (see processes()); None where /proc is missing (not Linux). Differences around a load test
        give the server's CPU per generated token."""
        total = None
        for pid, r in self.processes().items():
            if role in (None, r):
                cpu = process_cpu_seconds(pid)
                total = total if cpu is None else (total or 0.0) + cpu
        return total

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time. Returns the exit code."""
        return None if self.proc is None else terminate(self.proc, timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
