"""A recording reverse proxy that explains every request live: ``python -m harness.proxy``.

Most agents cannot be edited to write a request log (closed coding agents, CLIs, frameworks that
hide the HTTP call), but all of them take a base URL. Put this proxy on it::

    python -m harness.proxy --upstream http://127.0.0.1:8000 --chat-template examples/chatml_tools.jinja
    export OPENAI_BASE_URL=http://127.0.0.1:8800/v1 ANTHROPIC_BASE_URL=http://127.0.0.1:8800
    my-agent ...

and every call goes through unchanged (streams chunk by chunk), every Chat Completions,
Responses and Messages call is written to a log in the explainer's format (the response as the
client saw it, streams put back together, usage with cached tokens), and each one gets a line on
the console: its session, its prompt and cached tokens as the upstream reported them, the
explainer's prediction, and for a break where it is, the text on both sides, the hint, and what
it lost (in dollars too, under ``--provider``). Ctrl-C prints the explainer's summary of what
passed and where the log is; ``python -m harness.explain LOG`` reads the log as it is.

The modules, one concern each:

``forward``   the HTTP passthrough (aiohttp server and client): what is forwarded, what is
              recorded, what the client gets when the upstream is down or slow or it goes away
``streams``   a server-sent-event stream put back together into one response body
``sessions``  which session a call belongs to (a header, else what its body carries)
``record``    the log record, written in the order sent, off the request path, 0600, never
              overwritten; no credential is ever written
``live``      the analysis process: ``LogExplainer`` fed record by record, a console line per
              call, the summary at the end
``cli``       the flags, the checks before anything starts, Ctrl-C

The proxy adds well under a millisecond to a call's first byte on this project's machines
(``bench/proxy_bench.py``; docs/proxy.md has the figures and everything it cannot see).
"""
