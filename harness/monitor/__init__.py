"""Watch the prefix cache of running vLLM servers: ``python -m harness.monitor URL [URL ...]``.

The lessons show, request by request, that a prompt which changes early loses the KV cache. In
production nobody watches single requests; they watch the server. This monitor reads each
server's Prometheus ``/metrics`` every ``--interval`` seconds and shows, per server and in
total, what the cache did in the last interval and since the monitor started: the token-weighted
hit rate, requests and prompt tokens per second, TTFT quantiles, load and, with ``--kv-events``,
the KV blocks stored and evicted. Servers that restart, go down or run without prefix caching
are shown as such. See docs/monitor.md.

Run it::

    python -m harness.monitor http://gpu-box:8000 http://gpu-box:8001   # live dashboard; Ctrl-C ends it
    python -m harness.monitor URL --once --json snap.json                # counters since each server started
    python -m harness.monitor URL --record run.csv --plot run.png --save-dashboard dash.svg
    python -m harness.monitor URL --kv-events tcp://gpu-box:5557         # KV blocks stored / evicted

The modules, one concern each: ``poll`` (reading ``/metrics``; what the monitor remembers about
each server; the total), ``kv_events`` (the blocks vLLM's KV-cache events store and evict),
``dashboard`` (the table, the log line, a saved dashboard), ``outputs`` (the JSON snapshot, the
CSV, the plot), ``cli`` (flags, checks, the polling loop, exit status).
"""

from harness.monitor.dashboard import hit_cell
from harness.monitor.kv_events import BlockCounts, KvEventCounter
from harness.monitor.outputs import CSV_COLUMNS
from harness.monitor.poll import (
    NO_DETAILS,
    PREFIX_CACHING_OFF,
    Reading,
    ServerTrack,
    Target,
    check_details,
    read_server,
    total_view,
)

__all__ = [
    "CSV_COLUMNS",
    "NO_DETAILS",
    "PREFIX_CACHING_OFF",
    "BlockCounts",
    "KvEventCounter",
    "Reading",
    "ServerTrack",
    "Target",
    "check_details",
    "hit_cell",
    "read_server",
    "total_view",
]
