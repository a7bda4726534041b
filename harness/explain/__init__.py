"""Explain, token by token, where each request of an agent's log leaves the KV prefix cache.

An engine with automatic prefix caching (vLLM) reuses the KV of a new prompt's longest prefix
that it has already computed, in whole blocks. One changed token early in the prompt (a clock
in the system prompt, a re-serialized JSON state, a reordered tool list) throws away every block
after it. This tool reads the requests an agent sent, renders each one through vLLM's own chat
rendering into the very token IDs the engine sees, and says for every request:

* how many of its tokens the cache serves (vLLM's rule, ``harness.prefix``):
  ``cached = B * floor(min(P, L - 1) / B)`` for a prompt of ``L`` tokens sharing ``P`` leading
  tokens with what the engine computed before (prompts, and the replies when the log has them),
  ``B`` the block size;
* the first token that differs from the session's earlier prompt it meant to extend (its index,
  the text on both sides in whole characters, what the earlier prompt had there), which message
  and role it falls in, the tokens that break lost, and a hint naming what changed;
* with responses in the log, the cached tokens the server reported next to the prediction,
  and why they differ when they do.

Run it::

    python -m harness.explain requests.jsonl                 # table + one detail block per break
    python -m harness.explain requests.jsonl --json out.json # the same as JSON
    python -m harness.explain requests.jsonl --verify        # also replay them on the real engine
    python -m harness.explain requests.jsonl --endpoint http://host:8000   # ... on your server

The modules, one concern each: ``formats`` (what a line may be), ``render`` (a body into token
IDs, as vLLM's server does it), ``analyze`` (the lookups: status, divergence, lost tokens),
``hints`` (why a prompt changed), ``reconcile`` (reported usage vs prediction), ``verify`` (the
replay on an engine), ``spans`` (volatile spans and their fixes), ``provider_view`` (a body as a
hosted provider reads it: where it breaks in that provider's pieces and tokens), ``costs`` (the
log priced per ``--provider``, every lost dollar with its cause), ``origin`` (which server
answered a logged request: a log from a hosted API is held to that provider's rules),
``diagnostics`` (the providers' own cache-miss reasons next to the explainer's), ``report``
(table and JSON), ``cli``.

Definitions used in the output:

``first_divergence``
    Index of the first prompt token not shared with the *reference*: the earlier request of the
    session (prompt, plus reply when logged) with the longest common prefix (the most recent
    one on a tie, since that is the one an agent means to extend). Equal to ``prompt_tokens``
    when the whole prompt was seen before.
``status``
    ``cold`` (nothing earlier in the session), ``extends`` (the reference is a prefix of this
    prompt: append-only, the good case), ``repeat`` (this prompt is a prefix of the reference),
    ``break`` (the prompt changes a token the reference had).
``lost_tokens``
    The tokens the cache would serve had this prompt kept the reference's tokens unchanged
    (extended it append-only), minus those it does serve; both after block rounding. Zero for
    ``cold``, ``extends`` and ``repeat``; for a ``break`` it is exactly the cached KV the change
    throws away. (``prompt_tokens - predicted_cached_tokens`` would also count the new tokens
    every turn must compute anyway.)
``predicted_cached_tokens``
    Under ``--scope shared`` (the default: one vLLM server, no ``cache_salt``) what any earlier
    request of the log left in the cache counts, whatever its session (``cached_from_line``
    names it); under ``--scope session`` only the session's own requests. No eviction is
    modelled: the engine's (or the reported) count shows when that assumption fails.

Exit status: 0; 1 when ``--verify`` finds the engine disagreeing with the prediction; 2 for bad
input (a malformed line, a missing file, ...), reported as one line on stderr: ``error: ...``.
"""

from harness.explain.analyze import (
    SCOPES,
    SESSION,
    SHARED,
    LogExplainer,
    RequestExplanation,
    explain_requests,
)
from harness.explain.formats import ChatRequest, SkippedLine, parse_record, read_requests
from harness.explain.hints import Hint, detect_hint, explain_change
from harness.explain.report import check_json_target, report_json

__all__ = [
    "SCOPES",
    "SESSION",
    "SHARED",
    "ChatRequest",
    "Hint",
    "LogExplainer",
    "RequestExplanation",
    "SkippedLine",
    "check_json_target",
    "detect_hint",
    "explain_change",
    "explain_requests",
    "parse_record",
    "read_requests",
    "report_json",
]
