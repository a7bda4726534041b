"""Record the monitor's artefacts in docs/monitor/ from a real run (what docs/monitor.md shows).

Two local vLLM servers (SmolLM2-135M-Instruct, CPU, a deliberately small KV cache of 80 blocks
of 32 tokens so that evictions happen, KV-cache events on) get agent-like traffic in phases,
while ``python -m harness.monitor`` watches both with --record, --plot, --json and --kv-events:

1. stable:    a byte-stable system prompt, a new question each request (high hit rate)
2. timestamp: the time on the first line of the system prompt (hit rate ~0: a prefix change;
              the cache fills and evicts, but nothing evicted is ever asked for again)
3. thrash:    six different stable system prompts in turn, more than the cache holds
              (hit rate falls: evicted blocks are stored again, a capacity problem)
4. worker-1 stopped (shown down; a --once snapshot is taken), then restarted on the same port
   (shown down while it starts, then "restarted": its counters began again at zero)
5. both stable again; then Ctrl-C (SIGINT) ends the monitor while the traffic still runs

Run from the repository root, under the engine lock (one engine at a time on this machine):
    flock /tmp/kvlessons-engine.lock python docs/monitor/record_run.py
About 6 minutes on 2 cores. Every process it starts is stopped at the end, also on error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from harness.backend import ServerBackend  # noqa: E402
from harness.engine import EngineOptions  # noqa: E402
from harness.model import resolve_model  # noqa: E402
from harness.scenario import system_prompt  # noqa: E402
from harness.servers import (  # noqa: E402
    ServerProcess,
    free_port,
    server_command,
    server_environment,
    stop_process_group,
    wait_healthy,
)

OUT = Path(__file__).resolve().parent
LOGS = Path(tempfile.mkdtemp(prefix="kvmonitor-run-"))  # the servers' own logs, if something fails
PHASE_S = 40.0
KV_BLOCKS = 80  # 2,560 tokens of KV cache per server: six ~560-token prompts do not fit
QUESTIONS = [
    "What should I check first?",
    "Which file holds the rounding code?",
    "Summarise the failing test in one line.",
    "Which tool do I call to run the tests?",
    "Is the fix safe to merge?",
    "What does the error message say?",
    "Which step comes next?",
    "How long did the last build take?",
]
STABLE = system_prompt(quick=True)  # ~540 tokens: role, rules, tool schemas


def messages_for(phase: str, n: int) -> list[dict[str, str]]:
    question = QUESTIONS[n % len(QUESTIONS)]
    if phase == "timestamp":
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        system = f"Current time: {now} UTC\n\n{STABLE}"
    elif phase == "thrash":
        team = ["billing", "search", "auth", "web", "infra", "data"][n % 6]
        system = f"Agent profile {n % 6}: team {team}.\n\n{STABLE}"
    else:
        system = STABLE
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


class Worker:
    """One server process this script owns, restartable on the same ports."""

    def __init__(self, name: str, index: int, opts: EngineOptions) -> None:
        self.name, self.index, self.opts = name, index, opts
        self.port, self.events_port = free_port(), free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.backend: ServerBackend | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{self.events_port}",
            "topic": "kv-events",
        }
        extra = ["--kv-events-config", json.dumps(events), "--num-gpu-blocks-override", str(KV_BLOCKS)]
        log = open(LOGS / f"{self.name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            server_command(self.opts, self.port, extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=server_environment(self.opts, self.index, 2),
            start_new_session=True,
        )
        log.close()

    def wait(self) -> None:
        assert self.process is not None
        server = ServerProcess(self.name, self.port, LOGS / f"{self.name}.log", self.process)
        wait_healthy(server, time.monotonic() + 600)
        backend = ServerBackend(self.url)
        # A request caught by the worker's shutdown must fail, not hang the load generator.
        backend.client = backend.client.with_options(timeout=30.0)
        self.backend = backend

    def stop(self) -> None:
        self.backend = None  # the client thread may be using it: not closed under its feet
        if self.process is not None:
            stop_process_group(self.process)


def client(worker: Worker, phase: list[str], done: threading.Event, counts: dict[str, int]) -> None:
    """Sequential requests to one worker in the current phase; waits while it is down."""
    n = 0
    while not done.is_set():
        backend = worker.backend
        outage = phase[0] in ("down", "restarting")
        if backend is None or phase[0] == "idle" or (outage and worker.index == 1):
            time.sleep(0.2)
            continue
        current = "stable" if outage else phase[0]
        try:
            backend.generate(messages_for(current, n), max_tokens=1)
            counts[worker.name] = counts.get(worker.name, 0) + 1
        except Exception:  # noqa: BLE001 - a load generator: the worker went away, wait for it
            time.sleep(0.5)
        n += 1


def main() -> int:
    outputs = (
        "run.csv",
        "run.json",
        "run.png",
        "run.log",
        "dashboard.svg",
        "dashboard.txt",
        "dashboard-down.txt",
    )
    for name in outputs:
        (OUT / name).unlink(missing_ok=True)
    model = resolve_model(None).name_or_path
    opts = EngineOptions(model=model, device="cpu", max_model_len=2048)
    workers = [Worker(f"worker-{i}", i, opts) for i in range(2)]
    monitor: subprocess.Popen[str] | None = None
    done = threading.Event()
    phase = ["idle"]
    counts: dict[str, int] = {}
    timeline: list[tuple[str, str]] = []
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait()
        print("servers up:", ", ".join(w.url for w in workers), flush=True)
        events = [a for w in workers for a in ("--kv-events", f"{w.url}=tcp://127.0.0.1:{w.events_port}")]
        outputs_args = ["--record", str(OUT / "run.csv"), "--plot", str(OUT / "run.png"),
                        "--json", str(OUT / "run.json"), "--save-dashboard", str(OUT / "dashboard.svg"),
                        "--save-dashboard", str(OUT / "dashboard.txt")]  # fmt: skip
        cmd = [sys.executable, "-m", "harness.monitor", *(w.url for w in workers), "--interval", "2",
               "--history", "40", "--check-details", *events, *outputs_args]  # fmt: skip
        log = open(OUT / "run.log", "w")  # noqa: SIM115 - closed below
        monitor = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "COLUMNS": "230"})  # fmt: skip
        time.sleep(5)  # the monitor's baseline
        threads = [
            threading.Thread(target=client, args=(w, phase, done, counts), daemon=True) for w in workers
        ]
        for t in threads:
            t.start()
        t0 = time.monotonic()

        def enter(name: str) -> None:
            phase[0] = name
            timeline.append((datetime.now().astimezone().isoformat(timespec="seconds"), name))
            print(f"+{time.monotonic() - t0:5.1f}s phase {name}", flush=True)

        for name in ("stable", "timestamp", "thrash"):
            enter(name)
            time.sleep(PHASE_S)
        enter("down")
        workers[1].stop()
        time.sleep(10)
        snap = subprocess.run(
            [sys.executable, "-m", "harness.monitor", *(w.url for w in workers), "--once",
             "--save-dashboard", str(OUT / "dashboard-down.txt")],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "230"},
        )  # fmt: skip
        print("snapshot while worker-1 is down: exit", snap.returncode, flush=True)
        time.sleep(6)
        enter("restarting")
        workers[1].start()
        workers[1].wait()
        enter("stable")
        time.sleep(30)
        # Ctrl-C while the traffic still runs: the saved dashboard is a busy interval's frame.
        monitor.send_signal(signal.SIGINT)
        monitor.wait(timeout=120)
        log.close()
        done.set()
        for t in threads:
            t.join(timeout=60)
        (OUT / "phases.json").write_text(
            json.dumps(
                {"phases": [{"from": at, "phase": p} for at, p in timeline], "requests": counts}, indent=2
            )
            + "\n"
        )
        print("requests:", counts, "monitor exit:", monitor.returncode, flush=True)
        return 0
    finally:
        done.set()
        if monitor is not None and monitor.poll() is None:
            monitor.kill()
        for w in workers:
            w.stop()


if __name__ == "__main__":
    sys.exit(main())
