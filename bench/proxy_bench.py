"""What ``python -m harness.proxy`` adds to a call: time to first byte and to last byte, direct vs
through the proxy, and whether every streamed byte arrives as it would directly.

Two upstreams, each run the same way:

* ``fake``: a tiny aiohttp server in its own process that answers at once (a chat completion, or
  a stream of 16 chunks 20 ms apart, as a hosted API streams, plus usage and ``[DONE]``). It costs
  next to nothing, so what the proxy adds is the proxy's own cost;
* ``vllm``: the embedded model's OpenAI-compatible vLLM server (SmolLM2-135M-Instruct, CPU),
  prompts warmed first so every call is a cache hit, 16 tokens generated, greedy.

For each upstream, streamed and not, with 1 and with 64 concurrent clients (each sending calls
one after the other; the 64 start spread over one call's duration, so that 64 calls are in flight
at every moment instead of arriving at once), rounds alternate between direct and proxied (which
goes first alternates too), so drift in the machine's load hits both. Plain calls to the fake
with 64 clients are a saturation test: it answers at once, so 64 clients in a loop ask for as
many calls per second as the CPU can make, and what is added there is queueing at the proxy's
throughput (``calls_per_s``). The proxy runs as a user runs it (``python -m harness.proxy``:
recording every call to a log, explaining each in its analysis process); against the fake
upstream also with ``--record-only``, to show what the live analysis costs. Before each round
the bench waits for the analysis to catch up (its console lines), so one round's analysis never
runs during the next direct round.

Reported per case: p50 and p99 of time to first byte (the first body bytes: for a stream its
first event) and to last byte, direct and proxied, and their differences ("added"). Streams are
compared byte for byte with the same call made directly, after replacing ids and timestamps
(``"id"``, ``"created"``): ``identical`` counts the equal ones.

Run it alone on the machine, inside the engine lock (it starts a vLLM server)::

    flock /tmp/vllm-engine.lock python bench/proxy_bench.py --json bench/proxy-results-DATE.json
    python bench/proxy_bench.py --upstreams fake --quick        # no engine, a minute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.engine import machine_summary  # noqa: E402

CHUNKS = 16  # events of a fake stream, and tokens generated on vLLM
DEFAULT_GAP_MS = 20.0  # between a fake stream's events: 50 tokens/s per stream, a hosted API's pace
NORMALIZE = re.compile(rb'"(id|created|created_at|item_id|system_fingerprint)":\s*("[^"]*"|\d+)')


# --------------------------------------------------------------------------- the fake upstream


def serve_fake(port: int, gap_s: float) -> None:
    """The fake upstream (run in its own process: ``--serve-fake PORT``)."""
    from aiohttp import web

    text = "The rounding bug is in round_amount: it rounds half down. " * 2

    async def handle(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        base = {
            "id": f"chatcmpl-{secrets.token_hex(8)}",
            "created": int(time.time()),
            "model": body.get("model"),
        }
        if not body.get("stream"):
            usage = {"prompt_tokens": 300, "completion_tokens": CHUNKS, "total_tokens": 300 + CHUNKS}
            message = {"role": "assistant", "content": text}
            return web.json_response(
                base
                | {
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                }
                | {"usage": usage | {"prompt_tokens_details": {"cached_tokens": 288}}}
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        words = text.split(" ")
        for i in range(CHUNKS):
            delta = (
                {"role": "assistant", "content": ""} if i == 0 else {"content": words[i % len(words)] + " "}
            )
            chunk = base | {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(gap_s)
        usage = {
            "prompt_tokens": 300,
            "completion_tokens": CHUNKS,
            "total_tokens": 300 + CHUNKS,
            "prompt_tokens_details": {"cached_tokens": 288},
        }
        last = base | {"object": "chat.completion.chunk", "choices": [], "usage": usage}
        await response.write(b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception as exc:
            if getattr(exc, "code", None):  # an HTTP error: it is up
                return
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


# --------------------------------------------------------------------------- the proxy


class ProxyRun:
    """``python -m harness.proxy`` in its own process; counts the analysis's console lines."""

    def __init__(self, upstream: str, log: Path, *flags: str) -> None:
        command = [
            sys.executable,
            "-m",
            "harness.proxy",
            "--upstream",
            upstream,
            "--port",
            "0",
            "--log",
            str(log),
        ]
        self.proc = subprocess.Popen(
            [*command, *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.analysed = 0
        self.ready = threading.Event()
        self.lines: list[str] = []
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(60):
            raise RuntimeError("the proxy did not start: " + "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("harness.proxy: "):
                self.url = line.split()[1]
            if "Ctrl-C stops it" in line:
                self.ready.set()
            if re.search(r" line \d+ ", line):
                self.analysed += 1

    def wait_analysed(self, calls: int, timeout_s: float = 600.0) -> float:
        """Wait until the analysis has printed a line for ``calls`` calls; the seconds waited."""
        start = time.perf_counter()
        while self.analysed < calls and time.perf_counter() - start < timeout_s:
            time.sleep(0.05)
        return time.perf_counter() - start

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return "".join(self.lines)


# --------------------------------------------------------------------------- the clients


@dataclass
class Sample:
    ttfb_ms: float
    ttlb_ms: float
    data: bytes


@dataclass
class Case:
    upstream: str
    mode: str  # the proxy's flags, in words
    stream: bool
    concurrency: int
    direct: list[Sample] = field(default_factory=list)
    proxied: list[Sample] = field(default_factory=list)
    load: list[float] = field(default_factory=list)  # the machine's 1-minute load, before and after
    seconds: dict[str, float] = field(default_factory=lambda: {"direct": 0.0, "proxy": 0.0})


async def one_call(session: Any, url: str, body: bytes) -> Sample:
    start = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
        first = await response.content.readany()
        ttfb = time.perf_counter() - start
        parts = [first]
        while chunk := await response.content.readany():
            parts.append(chunk)
        ttlb = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}: {b''.join(parts)[:300]!r}")
    return Sample(ttfb * 1000.0, ttlb * 1000.0, b"".join(parts))


async def batch(base: str, bodies: list[list[bytes]], spread_s: float = 0.0) -> list[Sample]:
    """One client per list of bodies, each sending its bodies one after the other; client i starts
    ``i * spread_s / clients`` seconds in, so that with ``spread_s`` one call's duration the calls
    are in flight all the time rather than arriving 64 at once."""
    import aiohttp

    url = base + "/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:

        async def client(index: int, own: list[bytes]) -> list[Sample]:
            await asyncio.sleep(index * spread_s / len(bodies))
            return [await one_call(session, url, body) for body in own]

        results = await asyncio.gather(*(client(i, own) for i, own in enumerate(bodies)))
    return [sample for samples in results for sample in samples]


def bodies_for(
    model: str, stream: bool, clients: int, per_client: int, prompts: list[str]
) -> list[list[bytes]]:
    out = []
    for c in range(clients):
        own = []
        for k in range(per_client):
            prompt = prompts[(c * per_client + k) % len(prompts)]
            body: dict[str, Any] = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": CHUNKS,
                "temperature": 0.0,
                "seed": 0,
            }
            if stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            own.append(json.dumps(body).encode())
        out.append(own)
    return out


def percentile(values: list[float], q: float) -> float:
    import numpy

    return float(numpy.percentile(values, q))


def summarize(case: Case) -> dict[str, Any]:
    out: dict[str, Any] = {
        "upstream": case.upstream,
        "proxy": case.mode,
        "stream": case.stream,
        "concurrency": case.concurrency,
        "calls": len(case.proxied),
        "load_1min": [round(x, 2) for x in case.load],  # others' work on the machine shows here
        "calls_per_s_direct": round(len(case.direct) / case.seconds["direct"], 1),
        "calls_per_s_proxy": round(len(case.proxied) / case.seconds["proxy"], 1),
    }
    for metric in ("ttfb_ms", "ttlb_ms"):
        for q in (50, 99):
            direct = percentile([getattr(s, metric) for s in case.direct], q)
            proxied = percentile([getattr(s, metric) for s in case.proxied], q)
            out[f"{metric}_p{q}_direct"] = round(direct, 3)
            out[f"{metric}_p{q}_proxy"] = round(proxied, 3)
            out[f"{metric}_p{q}_added"] = round(proxied - direct, 3)
    if case.stream:
        same = sum(
            NORMALIZE.sub(rb'"\1":0', d.data) == NORMALIZE.sub(rb'"\1":0', p.data)
            for d, p in zip(case.direct, case.proxied, strict=True)
        )
        events = [s.data.count(b"data: ") for s in case.direct + case.proxied]
        out["identical_streams"] = same
        out["events_per_stream"] = [min(events), max(events)]
    return out


def call_duration_s(base: str, model: str, stream: bool, prompts: list[str]) -> float:
    """One call's duration, start to end: how far apart 64 clients start."""
    return asyncio.run(batch(base, bodies_for(model, stream, 1, 1, prompts)))[0].ttlb_ms / 1000.0


def run_case(
    case: Case, direct: str, proxy: ProxyRun, model: str, prompts: list[str], rounds: int, per: int
) -> None:
    case.load.append(os.getloadavg()[0])
    calls_before = proxy.analysed
    spread = call_duration_s(direct, model, case.stream, prompts) if case.concurrency > 1 else 0.0
    for r in range(rounds):
        bodies = bodies_for(model, case.stream, case.concurrency, per, prompts)
        order = [("direct", direct), ("proxy", proxy.url)]
        if r % 2:
            order.reverse()
        for name, base in order:
            start = time.perf_counter()
            samples = asyncio.run(batch(base, bodies, spread))
            case.seconds[name] += time.perf_counter() - start
            if name == "proxy":
                case.proxied += samples
                calls_before += len(samples)
                if case.mode != "record-only":
                    proxy.wait_analysed(calls_before)
            else:
                case.direct += samples
    case.load.append(os.getloadavg()[0])


def print_row(row: dict[str, Any]) -> None:
    kind = "stream" if row["stream"] else "plain"
    same = f"  identical {row['identical_streams']}/{row['calls']}" if row["stream"] else ""
    cells = [f"{row['upstream']:5} {row['proxy']:14} {kind:6} c={row['concurrency']:<3} n={row['calls']:<5}"]
    for metric, name in (("ttfb_ms", "TTFB"), ("ttlb_ms", "TTLB")):
        for q in (50, 99):
            d, p, a = (row[f"{metric}_p{q}_{k}"] for k in ("direct", "proxy", "added"))
            cells.append(f"{name} p{q} {d:8.2f} -> {p:8.2f} ({a:+.2f})")
    rate = f"  calls/s {row['calls_per_s_direct']:,.0f} -> {row['calls_per_s_proxy']:,.0f}"
    print("  ".join(cells) + " ms" + same + rate + f"  load {row['load_1min']}", flush=True)


# --------------------------------------------------------------------------- main


def fake_part(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from harness.servers import free_port

    port = free_port()
    command = [sys.executable, __file__, "--serve-fake", str(port), "--chunk-gap-ms", str(args.chunk_gap_ms)]
    fake = subprocess.Popen(command, cwd=ROOT)
    rows = []
    try:
        direct = f"http://127.0.0.1:{port}"
        wait_http(direct + "/v1/chat/completions")
        prompts = [f"Fix bug {i}." for i in range(64)]
        for mode, flags in (("record+explain", ()), ("record-only", ("--record-only",))):
            proxy = ProxyRun(direct, work / f"fake-{mode}.jsonl", *flags)
            try:
                if not flags:  # the analysis loads vLLM's renderer first: let it, then measure
                    asyncio.run(batch(proxy.url, bodies_for("fake", False, 1, 1, prompts)))
                    proxy.wait_analysed(1)
                for stream in (True, False):
                    for concurrency, rounds, per in (
                        (1, args.rounds, args.calls_1),
                        (64, args.rounds, args.calls_64),
                    ):
                        case = Case("fake", mode, stream, concurrency)
                        run_case(case, direct, proxy, "fake", prompts, rounds, per)
                        row = summarize(case)
                        print_row(row)
                        rows.append(row)
            finally:
                proxy.stop()
    finally:
        fake.terminate()
        fake.wait(10)
    return rows


def vllm_part(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from harness.engine import EngineOptions
    from harness.model import resolve_model
    from harness.servers import LocalServers

    opts = EngineOptions(model=resolve_model(None).name_or_path, device="cpu")
    rows = []
    with LocalServers(opts, count=1, log_dir=work / "server") as servers:
        direct = servers[0].url
        model = resolve_model(None).name_or_path
        preamble = "You review code for a small fintech team. Be brief and concrete. " * 6
        prompts = [f"{preamble}\nQuestion {i}: what does round_amount({i}.125) return?" for i in range(64)]
        # Warm every prompt once: all measured calls are cache hits, direct and proxied alike.
        asyncio.run(batch(direct, bodies_for(model, False, 8, 8, prompts)))
        proxy = ProxyRun(direct, work / "vllm.jsonl")
        try:
            asyncio.run(batch(proxy.url, bodies_for(model, False, 1, 1, prompts)))
            proxy.wait_analysed(1)
            for stream in (True, False):
                for concurrency, rounds, per in (
                    (1, args.rounds, args.vllm_calls_1),
                    (64, args.vllm_rounds_64, args.vllm_calls_64),
                ):
                    case = Case("vllm", "record+explain", stream, concurrency)
                    run_case(case, direct, proxy, model, prompts, rounds, per)
                    row = summarize(case)
                    print_row(row)
                    rows.append(row)
        finally:
            proxy.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstreams", default="fake,vllm", help="fake, vllm or both (default both)")
    parser.add_argument("--rounds", type=int, default=6, help="direct/proxy round pairs per case")
    parser.add_argument("--calls-1", type=int, default=50, help="calls per round with 1 client (fake)")
    parser.add_argument("--calls-64", type=int, default=4, help="calls per client per round with 64 (fake)")
    parser.add_argument("--vllm-calls-1", type=int, default=20, help="calls per round with 1 client (vLLM)")
    parser.add_argument("--vllm-rounds-64", type=int, default=4, help="rounds with 64 clients (vLLM)")
    parser.add_argument(
        "--vllm-calls-64", type=int, default=2, help="calls per client per round with 64 (vLLM)"
    )
    parser.add_argument(
        "--chunk-gap-ms",
        type=float,
        default=DEFAULT_GAP_MS,
        help=f"ms between a fake stream's events (default {DEFAULT_GAP_MS:g}: 50 tokens/s per stream)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: few calls")
    parser.add_argument("--json", type=Path, default=None, metavar="F")
    parser.add_argument("--serve-fake", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake is not None:
        serve_fake(args.serve_fake, args.chunk_gap_ms / 1000.0)
        return 0
    if args.quick:
        args.rounds, args.calls_1, args.calls_64 = 2, 5, 1
        args.vllm_calls_1, args.vllm_rounds_64, args.vllm_calls_64 = 3, 1, 1
    upstreams = [u.strip() for u in args.upstreams.split(",") if u.strip()]
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f.startswith("avx")})  # noqa: SIM115
    print(f"{machine_summary()}; CPU flags {' '.join(flags)}; {os.cpu_count()} CPUs", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as tmp:
        work = Path(tmp)
        if "fake" in upstreams:
            rows += fake_part(args, work)
        if "vllm" in upstreams:
            rows += vllm_part(args, work)
    if args.json is not None:
        document = {
            "bench": "proxy_bench",
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine_summary(),
            "cpu_flags": flags,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "serve_fake")},
            "chunks_per_stream": CHUNKS,
            "fake_chunk_gap_ms": args.chunk_gap_ms,
            "results": rows,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
