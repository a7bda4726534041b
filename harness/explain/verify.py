"""``--verify``: replay the log on a real engine and hold the prediction to its cached-token counts.

The replay reproduces what the analysis assumed, so the engine must agree on every request:

* the cache starts empty (the embedded engine is reset; on a server a fresh random salt for the
  run keeps it apart from everything else there);
* ``--scope shared``: every request of the run shares that salt; ``--scope session``: each
  session gets a salt of its own (a body's own ``cache_salt`` is kept apart in both);
* a request is sent for one generated token, which adds nothing to the cache (the last sampled
  token's KV is never computed);
* when the log has the reply, the reply's tokens are then computed the way the original engine
  computed them: one more request made of the prompt and the reply's tokens but the last, which
  leaves exactly the blocks the original request and its generation left.

On the embedded engine the rendered token IDs are sent; to a server the body itself goes
(``/v1/chat/completions``, ``/v1/messages`` or ``/v1/responses``), so the server renders it: a
different prompt length there means a different rendering, and is flagged. A Responses request
that continues an earlier response (``previous_response_id``) cannot name it on the replay
server, which never saw the log's responses: its chain goes written out as ``input`` items
(``ChatRenderer.standalone_body``), or, when no body renders to the same tokens, as its token IDs
to ``/v1/completions``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from harness.api_key import NO_API_KEY, ApiKey
from harness.backend import http_json
from harness.errors import UserError
from harness.explain.analyze import SESSION, RequestExplanation
from harness.explain.formats import ANTHROPIC, RESPONSES, ChatRequest


@dataclass(frozen=True)
class Sent:
    """What the engine said about one request."""

    prompt_tokens: int
    cached_tokens: int


class Replay(Protocol):
    """Where ``verify`` sends the log: the embedded engine or a server."""

    block_size: int

    def reset(self) -> None:
        """Start from an empty cache (or one nothing else can reach)."""
        ...

    def send(self, request: ChatRequest, prompt_ids: Sequence[int], salt: str) -> Sent: ...

    def compute(self, token_ids: Sequence[int], salt: str) -> None:
        """Have the engine compute (and so cache) these tokens, as a generation would have."""
        ...


@dataclass(frozen=True)
class VerifiedRequest:
    """One request run on the engine: the prediction next to the engine's own count."""

    line: int
    session_id: str | None
    prompt_tokens: int  # as the engine saw them
    predicted_cached_tokens: int
    engine_cached_tokens: int
    rendered_prompt_tokens: int  # as the analysis rendered them

    @property
    def matches(self) -> bool:
        return (
            self.predicted_cached_tokens == self.engine_cached_tokens
            and self.prompt_tokens == self.rendered_prompt_tokens
        )


def salt_for(run: str, scope: str, request: ChatRequest) -> str:
    """The ``cache_salt`` that reproduces the scope on the engine (never empty)."""
    salt = run
    if scope == SESSION:
        salt += f"-session-{request.session_id}" if request.session_id is not None else "-no-session"
    own = request.body.get("cache_salt")
    return f"{salt}-{own}" if own else salt


class Verifier:
    """Replays a log request by request (``add``) on a fresh cache (see the module docstring)."""

    def __init__(self, replay: Replay, scope: str) -> None:
        self.replay = replay
        self.scope = scope
        replay.reset()
        self.run = f"explain-{secrets.token_hex(6)}"

    def add(self, request: ChatRequest, explained: RequestExplanation) -> VerifiedRequest:
        """``explained`` must keep its tokens (``LogExplainer(keep_tokens=True)``)."""
        salt = salt_for(self.run, self.scope, request)
        sent = self.replay.send(request, explained.token_ids, salt)
        if explained.reply_ids:
            self.replay.compute([*explained.token_ids, *explained.reply_ids[:-1]], salt)
        return VerifiedRequest(
            request.line,
            request.session_id,
            sent.prompt_tokens,
            explained.predicted_cached_tokens,
            sent.cached_tokens,
            explained.prompt_tokens,
        )


def verify(
    requests: Sequence[ChatRequest],
    explanations: Sequence[RequestExplanation],
    replay: Replay,
    scope: str,
    on_request: Callable[[VerifiedRequest], None] | None = None,
) -> list[VerifiedRequest]:
    """Send ``requests`` in order (``Verifier``) and keep the engine's counts."""
    verifier = Verifier(replay, scope)
    results: list[VerifiedRequest] = []
    for request, explained in zip(requests, explanations, strict=True):
        results.append(verifier.add(request, explained))
        if on_request is not None:
            on_request(results[-1])
    return results


class EngineReplay:
    """The embedded vLLM engine (``harness.backend.OfflineBackend``), fed token IDs."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.block_size = int(backend.info.block_size)

    def reset(self) -> None:
        self.backend.start_variant()

    def send(self, request: ChatRequest, prompt_ids: Sequence[int], salt: str) -> Sent:
        reply = self.backend.generate_tokens(prompt_ids, max_tokens=1, cache_salt=salt)
        return Sent(reply.prompt_tokens, reply.cached_tokens)

    def compute(self, token_ids: Sequence[int], salt: str) -> None:
        self.backend.generate_tokens(token_ids, max_tokens=1, cache_salt=salt)


def _post(url: str, payload: dict[str, Any], api_key: ApiKey) -> dict[str, Any]:
    try:
        return dict(http_json(url, payload, timeout=600.0, api_key=api_key))
    except OSError as exc:  # HTTP errors are UserErrors already; this is a lost connection
        raise UserError(f"lost the connection to {url}: {getattr(exc, 'reason', exc)}") from None


class ServerReplay:
    """A running vLLM server: the body goes as logged (the server renders it), asking for one
    token, greedily, with the run's ``cache_salt``; a tool list with ``tool_choice`` "none", which
    renders the same prompt and needs no tool parser on the server. ``api_key`` goes with each
    request (``harness.api_key``); ``renderer`` writes out Responses chains (see the module
    docstring)."""

    def __init__(
        self, base: str, model: str, block_size: int, api_key: ApiKey = NO_API_KEY, renderer: Any = None
    ) -> None:
        self.base = base.rstrip("/")
        self.model = model
        self.block_size = block_size
        self.api_key = api_key
        self.renderer = renderer

    def reset(self) -> None:
        pass  # the run's own salt is the empty cache

    def send(self, request: ChatRequest, prompt_ids: Sequence[int], salt: str) -> Sent:
        if request.format == RESPONSES:
            return self._send_responses(request, prompt_ids, salt)
        body = dict(request.body)
        body.update(model=self.model, max_tokens=1, temperature=0, stream=False, cache_salt=salt)
        body.pop("max_completion_tokens", None)
        if request.format == ANTHROPIC:
            if body.get("tools"):
                body["tool_choice"] = {"type": "none"}
            usage = _post(self.base + "/v1/messages", body, self.api_key).get("usage") or {}
            read = int(usage.get("cache_read_input_tokens") or 0)
            written = int(usage.get("cache_creation_input_tokens") or 0)
            return Sent(int(usage.get("input_tokens") or 0) + read + written, read)
        if body.get("tools"):
            body["tool_choice"] = "none"
        body.pop("stream_options", None)
        usage = _post(self.base + "/v1/chat/completions", body, self.api_key).get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is None:
            raise UserError(
                f"{self.base} reports no cached tokens: start it with --enable-prompt-tokens-details"
            )
        return Sent(int(usage.get("prompt_tokens") or 0), int(details["cached_tokens"]))

    def _send_responses(self, request: ChatRequest, prompt_ids: Sequence[int], salt: str) -> Sent:
        body: dict[str, Any] | None = dict(request.body)
        if request.previous is not None:
            if self.renderer is None:
                raise UserError(f"line {request.line}: a previous_response_id chain needs the renderer")
            body = self.renderer.standalone_body(request, prompt_ids)
        if body is None:  # no body renders to these tokens: the engine gets the tokens themselves
            usage = self._complete(prompt_ids, salt)
            details = usage.get("prompt_tokens_details") or {}
            return Sent(int(usage.get("prompt_tokens") or 0), int(details.get("cached_tokens") or 0))
        body.update(model=self.model, max_output_tokens=1, temperature=0, stream=False, store=False)
        body.update(cache_salt=salt)
        if body.get("tools"):
            body["tool_choice"] = "none"
        usage = _post(self.base + "/v1/responses", body, self.api_key).get("usage") or {}
        details = usage.get("input_tokens_details") or {}
        return Sent(int(usage.get("input_tokens") or 0), int(details.get("cached_tokens") or 0))

    def compute(self, token_ids: Sequence[int], salt: str) -> None:
        self._complete(token_ids, salt)

    def _complete(self, token_ids: Sequence[int], salt: str) -> dict[str, Any]:
        """Token IDs to ``/v1/completions``, one token generated; the usage the server reported."""
        payload = {
            "model": self.model,
            "prompt": list(token_ids),
            "max_tokens": 1,
            "temperature": 0,
            "cache_salt": salt,
        }
        return dict(_post(self.base + "/v1/completions", payload, self.api_key).get("usage") or {})
