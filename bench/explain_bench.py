"""The explainer at a team's scale: wall time, peak memory and tokens per second, as users run it.

Writes agent-shaped logs (``bench/agent_logs.py``: many coding-agent sessions interleaved, each
growing to ~30k prompt tokens over 120 requests) and runs ``python -m harness.explain LOG
--scope session --jsonl OUT --profile`` on each, in a fresh process, measuring:

* wall time and peak RSS of that process (``os.wait4``: the kernel's own high-water mark),
* prompt tokens per second, from the explainer's own summary,
* where the time went (its ``--profile`` table), start-up (importing vLLM) apart;
* for the smallest log, the same run with ``--tokenize whole`` (every prompt tokenized whole, as a
  server does): what tokenizing only new pieces saves, as a ratio of the two runs;
* with ``--shards 2``, the team log split by session over two processes run at once
  (``--shard 1/2`` and ``--shard 2/2``) against one process.

Results go to ``--json`` (the committed ones: ``bench/explain-scale-*.json``). Logs are written
under ``--dir`` (default a temporary folder; 1.2 GB for the team log, 6 GB for 1B tokens) and
reused when present. Run:

    python bench/explain_bench.py --logs small,team,billion --json bench/explain-scale-DATE.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.agent_logs import write_log  # noqa: E402
from harness.engine import machine_summary  # noqa: E402

# name -> (sessions, requests per session, sessions active at once)
LOGS = {
    "small": (4, 120, 4),  # ~8M prompt tokens: the tokenize-whole comparison
    "team": (100, 120, 100),  # ~200M prompt tokens, ~700 MB: a team's day
    "billion": (530, 120, 100),  # ~1.07B prompt tokens, ~3.7 GB: the same, five times over
}


@dataclass(frozen=True)
class Run:
    log: str
    args: list[str]
    wall_s: float
    peak_rss_mb: float
    prompt_tokens: int
    requests: int
    profile: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        startup = self.profile.get("start-up", 0.0)
        return {
            "log": self.log,
            "args": self.args,
            "wall_s": round(self.wall_s, 1),
            "peak_rss_mb": round(self.peak_rss_mb),
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "tokens_per_s": round(self.prompt_tokens / self.wall_s),
            "tokens_per_s_after_startup": round(self.prompt_tokens / max(1e-9, self.wall_s - startup)),
            "profile_s": self.profile,
        }


def _summary(jsonl: Path) -> dict[str, Any]:
    """The last line of an explainer ``--jsonl`` file: its summary record."""
    with jsonl.open("rb") as handle:
        handle.seek(max(0, jsonl.stat().st_size - 1_000_000))
        last = handle.read().splitlines()[-1]
    return json.loads(last)


def explain(log: Path, name: str, out: Path, extra: list[str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "harness.explain", str(log), "--scope", "session", "--jsonl", str(out)]
    cmd += ["--profile", *extra]
    env = dict(os.environ, COLUMNS="160")
    stdout = out.with_suffix(".txt").open("wb")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=stdout, stderr=subprocess.STDOUT, env=env)


def finish(process: subprocess.Popen[bytes], log: str, args: list[str], out: Path, start: float) -> Run:
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        where = out.with_suffix(".txt")
        raise SystemExit(f"the explainer failed on {log} (exit {process.returncode}): see {where}")
    summary = _summary(out)
    return Run(
        log,
        args,
        wall,
        usage.ru_maxrss / 1024,
        int(summary["summary"]["prompt_tokens"]),
        int(summary["summary"]["requests"]),
        dict(summary.get("profile_s") or {}),
    )


def run_one(log: Path, name: str, work: Path, extra: list[str]) -> Run:
    out = work / f"{name}{'-'.join([''] + [a.strip('-').replace('/', 'of') for a in extra])}.jsonl"
    start = time.perf_counter()
    result = finish(explain(log, name, out, extra), name, extra, out, start)
    print(
        f"{name:8s} {' '.join(extra) or '(defaults)':22s} {result.prompt_tokens / 1e6:8.1f}M tokens "
        f"{result.wall_s:7.1f} s  {result.peak_rss_mb:6.0f} MB peak  "
        f"{result.prompt_tokens / result.wall_s / 1e6:5.2f}M tokens/s",
        flush=True,
    )
    return result


def run_sharded(log: Path, name: str, work: Path, shards: int) -> list[Run]:
    """``shards`` processes at once, each its share of the sessions; wall time is the slowest."""
    start = time.perf_counter()
    started = []
    for k in range(1, shards + 1):
        extra = ["--shard", f"{k}/{shards}"]
        out = work / f"{name}-shard{k}of{shards}.jsonl"
        started.append((explain(log, name, out, extra), extra, out))
    runs = [finish(p, name, extra, out, start) for p, extra, out in started]
    wall = max(r.wall_s for r in runs)
    tokens = sum(r.prompt_tokens for r in runs)
    print(
        f"{name:8s} {shards} shards at once         {tokens / 1e6:8.1f}M tokens {wall:7.1f} s  "
        f"{max(r.peak_rss_mb for r in runs):6.0f} MB peak each  {tokens / wall / 1e6:5.2f}M tokens/s",
        flush=True,
    )
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", default="small,team", help=f"which logs, of {', '.join(LOGS)}")
    parser.add_argument("--dir", type=Path, default=None, help="where logs are written (and reused)")
    parser.add_argument("--shards", type=int, default=2, help="also run the team log in N processes (0: no)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.logs.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOGS]
    if unknown:
        parser.error(f"unknown log {unknown[0]!r}; choose from {', '.join(LOGS)}")
    work = args.dir or Path(tempfile.mkdtemp(prefix="kvlessons-explain-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    logs: dict[str, dict[str, Any]] = {}
    for name in names:
        sessions, requests, concurrent = LOGS[name]
        log = work / f"{name}-{sessions}x{requests}c{concurrent}.jsonl"
        if not log.exists():
            print(f"writing {log} ...", flush=True)
            write_log(log, sessions, requests, concurrent)
        logs[name] = {
            "sessions": sessions,
            "requests_per_session": requests,
            "concurrent": concurrent,
            "bytes": log.stat().st_size,
        }
        rows.append(run_one(log, name, work, []).to_json())
        if name == "small":
            rows.append(run_one(log, name, work, ["--tokenize", "whole"]).to_json())
        if name == "team" and args.shards > 1:
            rows += [r.to_json() for r in run_sharded(log, name, work, args.shards)]
    if args.json is not None:
        document = {
            "bench": "explain_bench",
            "machine": machine_summary(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
            "logs": logs,
            "runs": rows,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
