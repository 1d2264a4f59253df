"""uvicorn's server with a drain phase before its own shutdown (what `labkit serve` runs).

On SIGTERM/SIGINT uvicorn would stop listening at once, so a load balancer that has not yet noticed
(Kubernetes removes the pod from its Service concurrently with the SIGTERM) gets `connection refused`.
Instead: 1) draining: the listener stays open, /ready answers 503 so traffic moves elsewhere, new
generation requests get a clear 503 + Retry-After, in-flight requests (streams included) run on;
2) once none is left (or the drain timeout passed), uvicorn's normal shutdown. A second signal skips
the rest of the drain; a third forces exit (uvicorn's rule).
"""

import math
import threading
import time

import uvicorn


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, drain_timeout: float = 30.0):
        """state: the app's Server (app.py): its `draining` flag is set here, and its engine's
        num_active says when the drain is done."""
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self.drain_started: float | None = None
        self.exit_signals: list[int] = []

    def handle_exit(self, sig, frame):
        self.exit_signals.append(sig)
        if self.drain_started is not None or self.should_exit:
            return super().handle_exit(sig, frame)
        self.drain_started = time.monotonic()
        self.state.draining = True
        deadline = self.drain_started + self.drain_timeout
        threading.Thread(
            target=self._drain, args=(sig, frame, deadline), name="labkit-drain", daemon=True
        ).start()

    def _drain(self, sig, frame, deadline: float):
        while self.state.engine.num_active and time.monotonic() < deadline and not self.should_exit:
            time.sleep(0.05)
        # what is left of the budget bounds uvicorn's own wait for responses still being written
        # (uvicorn's setting is in whole seconds)
        self.config.timeout_graceful_shutdown = max(1, math.ceil(deadline - time.monotonic()))
        if not self.should_exit:  # (a second signal has already started uvicorn's shutdown)
            super().handle_exit(sig, frame)
