"""The analysis: each request of the log against what the engine already holds.

Per request, in log order:

1. render it into the engine's token IDs (``render.ChatRenderer``, vLLM's own code path);
2. look it up in the cache model of its *scope* (``--scope``): ``shared``, one vLLM server
   without ``cache_salt`` (every session can reuse every other session's blocks, e.g. a common
   system prompt), or ``session``, each session its own cache (a ``cache_salt`` per session, or a
   router that keeps a session on one worker with nothing else on it); a ``cache_salt`` in the
   body keeps its request apart in either scope, as vLLM does. That gives the cached tokens;
3. look it up among the earlier requests of its own *session*: the most recent one sharing the
   longest prefix is its *reference*, the request it meant to extend. That gives the status
   (``cold``, ``extends``, ``repeat``, ``break``), the first divergent token and the tokens the
   break lost;
4. on a break, say where (message and role) and why (``hints``);
5. record it, plus its reply's tokens when the log has the response (the engine caches the
   prompt and the generated tokens but the last), and reconcile the usage the server reported
   with the prediction (``reconcile``).

Each lookup walks a dict of chained blocks (``harness.prefix.PrefixCacheModel``), so the whole
analysis grows with the number of tokens in the log, not with its square.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from harness.explain.formats import ChatRequest, LoggedUsage
from harness.explain.hints import Hint, explain_change
from harness.explain.pieces import Split
from harness.explain.profile import DISABLED, Profile
from harness.explain.reconcile import Reconciliation, reconcile
from harness.explain.render import ChatRenderer, Rendered
from harness.prefix import (
    BlockChain,
    Divergence,
    PrefixCacheModel,
    cached_tokens_for,
    explain_divergence,
    resync,
)

SHARED = "shared"
SESSION = "session"
SCOPES = (SHARED, SESSION)
DEFAULT_CONTEXT_TOKENS = 12
GENERATION_PROMPT = "generation-prompt"  # the role shown for tokens after the last message


@dataclass(frozen=True)
class RequestExplanation:
    """Everything the tool says about one request."""

    line: int
    session_id: str | None
    prompt_tokens: int
    predicted_cached_tokens: int
    status: str  # cold | extends | repeat | break
    reference_line: int | None  # the earlier request of the session it is compared with
    first_divergence: int  # first token not shared with the reference (== prompt_tokens: none)
    message_index: int | None  # message holding the first divergent token (None: generation prompt)
    role: str | None
    divergence: Divergence | None  # text around first_divergence (None when it is past the end)
    lost_tokens: int
    hint: Hint | None
    cached_from_line: int | None = None  # the request whose tokens serve the cache hit (any session)
    cache_common_prefix: int = 0  # tokens shared with anything in the cache (token-exact, any session)
    reference_tokens: int = 0  # length of the reference (its prompt and logged reply), 0 without one
    reply_tokens: int = 0  # tokens the logged reply added to the cache (0: no response logged)
    reply_tokens_source: str | None = None  # "token_ids" (exact) | "rendered" (as the template writes it)
    usage: LoggedUsage | None = None
    reconciliation: Reconciliation | None = None
    longer_than_context: bool = False  # a vLLM server with this model would refuse it
    # On a break, the changed span (``harness.prefix.resync``): where this prompt and its
    # reference agree again, in each, and the span's text; found here, while both are at hand.
    span_end: int = 0
    span_reference_end: int = 0
    span_text: str = ""
    span_stable_end: int = 0  # where the stable part would end with the span moved out
    token_ids: Sequence[int] = field(default=(), repr=False, compare=False)  # the prompt as rendered
    reply_ids: Sequence[int] = field(default=(), repr=False, compare=False)  # the reply as generated

    @property
    def is_break(self) -> bool:
        return self.status == "break"

    @property
    def cause(self) -> str | None:
        """What broke the prefix, as the costs and spans count it: the hint's kind, ``changed_text``
        for a change no heuristic names; None when it did not break."""
        if not self.is_break:
            return None
        return self.hint.kind if self.hint is not None else "changed_text"

    def to_json(self) -> dict[str, Any]:
        d = self.divergence
        previous = d.previous_token if d is not None and self.is_break else None
        out: dict[str, Any] = {
            "line": self.line,
            "session_id": self.session_id,
            "prompt_tokens": self.prompt_tokens,
            "predicted_cached_tokens": self.predicted_cached_tokens,
            "status": self.status,
            "reference_line": self.reference_line,
            "first_divergence": self.first_divergence,
            "message_index": self.message_index,
            "role": self.role,
            "before": d.before if d is not None else "",
            "token": d.token if d is not None else "",
            "after": d.after if d is not None else "",
            "previous_token": previous,
            "lost_tokens": self.lost_tokens,
            "hint": self.hint.kind if self.hint is not None else None,
            "hint_detail": self.hint.describe() if self.hint is not None else None,
            "cached_from_line": self.cached_from_line,
            "reply_tokens": self.reply_tokens,
            "reply_tokens_source": self.reply_tokens_source,
            "longer_than_context": self.longer_than_context,
        }
        if self.reconciliation is not None:
            out.update(self.reconciliation.to_json())
        return out


@dataclass
class _Cache:
    """One cache namespace: the block model and, per recorded sequence, which request it was."""

    model: PrefixCacheModel
    owners: array[int] = field(default_factory=lambda: array("q"))  # sequence -> its request's line

    def record(self, line: int, chain: BlockChain, reply: Sequence[int]) -> None:
        self.model.record(chain, reply)
        self.owners.append(line)


def share(previous: Sequence[Any] | None, current: Sequence[Any]) -> tuple[Any, ...]:
    """``current`` with every item equal to ``previous``'s item at the same place replaced by that
    object: a session's requests repeat their history, which is then held once, not per request."""
    if not previous:
        return tuple(current)
    n = len(previous)
    return tuple(previous[i] if i < n and previous[i] == item else item for i, item in enumerate(current))


SHARED_FIELDS = ("messages", "input", "tools", "system")  # the parts of a body that repeat


def compact(request: ChatRequest, previous: ChatRequest | None) -> ChatRequest:
    """``request`` holding the same objects as ``previous`` wherever their bodies agree."""
    if previous is None:
        return request
    body = dict(request.body)
    for name in SHARED_FIELDS:
        value, before = body.get(name), previous.body.get(name)
        if value is None or before is None:
            continue
        if value == before:
            body[name] = before
        elif isinstance(value, list) and isinstance(before, list):
            body[name] = list(share(before, value))
    return replace(request, body=body)


@dataclass
class _Session:
    """What the analysis keeps of one open session: every request's tokens (each stored as what it
    adds to an earlier one), shape and body, to compare a new request with the one it meant to
    extend. What repeats from request to request is held once (``share``, ``compact``), so a
    session costs its distinct messages, not the sum of its requests."""

    cache: _Cache
    # sequence -> (conversation, tools) as the template saw them: what the hints compare.
    shapes: list[tuple[tuple[dict[str, Any], ...], list[dict[str, Any]] | None]] = field(default_factory=list)
    prompt_lengths: array[int] = field(default_factory=lambda: array("q"))  # sequence -> its prompt's tokens
    salts: list[str | None] = field(default_factory=list)  # sequence -> its request's cache_salt
    requests: dict[int, ChatRequest] = field(default_factory=dict)  # line -> the request (kept_requests)
    chain: BlockChain | None = None  # the latest request's blocks: the next one hashes only what is new
    split: Split | None = None  # the latest request's text in pieces: the next one splits only what is new
    last_seen: float = 0.0  # when it was last used (the log's timestamp, else the request's number)

    def shape(self, rendered: Rendered) -> tuple[tuple[dict[str, Any], ...], list[dict[str, Any]] | None]:
        conversation, tools = self.shapes[-1] if self.shapes else ((), None)
        shared_tools = tools if tools is not None and tools == rendered.tools else rendered.tools
        return share(conversation, rendered.conversation), shared_tools


def response_id(request: ChatRequest) -> str | None:
    """The id of the request's logged response (what a later request names as its baseline)."""
    said = request.response.diagnostics if request.response is not None else None
    return said.response_id if said is not None else None


def _status(first_divergence: int, prompt_len: int, reference_len: int | None) -> str:
    if reference_len is None:
        return "cold"
    if first_divergence >= prompt_len:
        return "repeat"
    if first_divergence >= reference_len:
        return "extends"
    return "break"


DEFAULT_SESSION_WINDOW_S = 3600.0  # a session idle this long is closed (its state dropped)
DEFAULT_SESSION_WINDOW_REQUESTS = 20_000  # the same for a log without timestamps, in requests


@dataclass(frozen=True)
class CacheUse:
    """How much the cache models held: what an engine needs to serve the log as predicted."""

    scope: str
    peak_blocks: int  # the most full blocks one cache held at once
    block_size: int
    evicted_blocks: int  # under --cache-tokens
    capacity_blocks: int | None
    sessions_closed: int  # sessions idle longer than the window, their state dropped
    sessions_reopened: int  # of those, how many came back (analysed as new sessions)

    def to_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "peak_tokens": self.peak_blocks * self.block_size,
            "evicted_tokens": self.evicted_blocks * self.block_size,
            "capacity_tokens": (
                None if self.capacity_blocks is None else self.capacity_blocks * self.block_size
            ),
            "sessions_closed": self.sessions_closed,
            "sessions_reopened": self.sessions_reopened,
        }


class LogExplainer:
    """The analysis of a log, one request at a time, in the order sent (see the module docstring).

    It holds the cache models of both scopes and the state of every open session, so a caller can
    feed it requests as they arrive (a log read line by line, a proxy's live traffic) and get each
    request's explanation at once. What it holds is bounded by the caches, not by the log:

    * the cache models keep one entry per distinct block (``harness.prefix.PrefixCacheModel``),
      at most ``cache_tokens`` per cache when given (least recently used evicted, as vLLM does);
    * a session keeps what its requests add to each other, and is closed (its state dropped; under
      ``--scope session`` its cache too) once idle longer than ``session_window``: seconds of the
      log's timestamps, or ``DEFAULT_SESSION_WINDOW_REQUESTS`` requests for a log without them.
    """

    def __init__(
        self,
        renderer: ChatRenderer,
        block_size: int,
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
        scope: str = SHARED,
        cache_tokens: int | None = None,
        session_window: float | None = DEFAULT_SESSION_WINDOW_S,
        keep_tokens: bool = True,
        keep_requests: bool = False,
        profile: Profile = DISABLED,
    ) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.renderer = renderer
        self.block_size = block_size
        self.context_tokens = context_tokens
        self.scope = scope
        self.other_scope = SESSION if scope == SHARED else SHARED
        self.capacity_blocks = None if cache_tokens is None else max(1, cache_tokens // block_size)
        self.session_window = session_window
        self.keep_tokens = keep_tokens  # every explanation keeps its tokens (a replay sends them)
        self.keep_requests = keep_requests  # open sessions keep their bodies (``request_at``)
        self.profile = profile
        # Both scopes are kept: the one asked for predicts, the other names a disagreement's cause.
        self._caches: dict[str, dict[tuple[str | None, str | None], _Cache]] = {SHARED: {}, SESSION: {}}
        # every request of a session, whatever its salt; least recently used first
        self._sessions: OrderedDict[str | None, _Session] = OrderedDict()
        self._closed: set[str | None] = set()
        self._responses: dict[str, tuple[str | None, int]] = {}  # response id -> (session, line)
        self._requests = 0
        self._peak_blocks = 0
        self._evicted_blocks = 0
        self.sessions_closed = 0
        self.sessions_reopened = 0

    def _new_cache(self) -> _Cache:
        return _Cache(PrefixCacheModel(self.block_size, self.capacity_blocks, keep_sequences=False))

    def _clock(self, request: ChatRequest) -> tuple[float, float | None]:
        """(now, window) on the log's clock: its timestamps, else the request count."""
        if request.timestamp is not None:
            return request.timestamp, self.session_window
        return float(self._requests), None if self.session_window is None else DEFAULT_SESSION_WINDOW_REQUESTS

    def _close_idle(self, now: float, window: float | None) -> None:
        """Close the sessions idle longer than ``window``. ``_sessions`` is kept least recently
        used first, so this looks at the few at its front, not at every open session."""
        if window is None:
            return
        while self._sessions:
            sid, state = next(iter(self._sessions.items()))
            if now - state.last_seen <= window:
                return
            closing = self._sessions.pop(sid)
            for request in closing.requests.values():
                self._responses.pop(response_id(request) or "", None)
            for key in [k for k in self._caches[SESSION] if k[0] == sid]:
                closed = self._caches[SESSION].pop(key)
                if self.scope == SESSION:
                    self._count_cache(closed)
            self._closed.add(sid)
            self.sessions_closed += 1

    def _count_cache(self, cache: _Cache) -> None:
        self._peak_blocks = max(self._peak_blocks, cache.model.peak_blocks)
        self._evicted_blocks += cache.model.evicted_blocks

    def cache_use(self) -> CacheUse:
        for cache in self._caches[self.scope].values():
            self._count_cache(cache)
        evicted, self._evicted_blocks = self._evicted_blocks, 0  # counted once per call
        return CacheUse(
            self.scope,
            self._peak_blocks,
            self.block_size,
            evicted,
            self.capacity_blocks,
            self.sessions_closed,
            self.sessions_reopened,
        )

    def _unsalted_cache(self, session: _Session) -> _Cache:
        """The session's unsalted requests in a cache of their own, once a salted one joins its
        history: the history's unsalted sequences recorded again."""
        cache = self._new_cache()
        for seq, salt in enumerate(session.salts):
            if salt is None:
                cache.model.record(session.cache.model.sequence(seq))
                cache.owners.append(session.cache.owners[seq])
        return cache

    def request_at(self, session_id: str | None, line: int) -> ChatRequest | None:
        """An earlier request of an open session (``keep_requests``): a reference, a baseline."""
        session = self._sessions.get(session_id)
        return session.requests.get(line) if session is not None else None

    def by_response_id(self, said: str) -> ChatRequest | None:
        """The earlier request whose logged response has this id (in an open session)."""
        where = self._responses.get(said)
        return self.request_at(*where) if where is not None else None

    def explain(self, request: ChatRequest) -> RequestExplanation:
        """Predict and explain one request's cache hit, then remember it for the ones after."""
        renderer, block_size, scope, stage = self.renderer, self.block_size, self.scope, self.profile.stage
        now, window = self._clock(request)
        self._requests += 1
        self._close_idle(now, window)
        tokenizing = renderer.tokenize_seconds
        with stage("render"):
            known = self._sessions.get(request.session_id)
            rendered = renderer.render(request, known.split if known is not None else None)
            split = renderer.last_split
        self.profile.move("render", "tokenize", renderer.tokenize_seconds - tokenizing)
        prompt = rendered.token_ids

        with stage("cache model"):
            keys = {
                SHARED: (None, rendered.cache_salt),
                SESSION: (request.session_id, rendered.cache_salt),
            }
            session = self._sessions.get(request.session_id)
            if session is None:
                if request.session_id in self._closed:
                    self._closed.discard(request.session_id)
                    self.sessions_reopened += 1
                # A session's own history is not an engine's cache: never evicted, only closed.
                history = _Cache(PrefixCacheModel(block_size, keep_sequences=True))
                session = self._sessions[request.session_id] = _Session(history)
                if self.capacity_blocks is None and rendered.cache_salt is None:
                    # Unbounded, the session's unsalted cache holds exactly its history (until a
                    # salted request comes: ``_unsalted_cache``): one model, not two.
                    self._caches[SESSION].setdefault((request.session_id, None), history)
            session.last_seen = now
            self._sessions.move_to_end(request.session_id)  # most recently used last
            unsalted = keys[SESSION][:1] + (None,)
            if rendered.cache_salt is not None and self._caches[SESSION].get(unsalted) is session.cache:
                self._caches[SESSION][unsalted] = self._unsalted_cache(session)
            cache, other = (
                self._caches[name].setdefault(keys[name], self._new_cache())
                for name in (scope, self.other_scope)
            )
            chain = BlockChain(prompt, block_size, previous=session.chain)
            hit = cache.model.predict(chain)
            cached_from = cache.owners[hit.source] if hit.source is not None and hit.cached_tokens else None
            own = hit if cache is session.cache else session.cache.model.predict(chain)
            ref = own.source if len(session.cache.owners) else None
            reference_len = session.cache.model.sequence_length(ref) if ref is not None else None
            index = own.common_prefix
            status = _status(index, len(prompt), reference_len)
            lost = 0
            if reference_len is not None:
                kept = cached_tokens_for(len(prompt), reference_len, block_size)
                lost = max(0, kept - hit.cached_tokens)

        message_index: int | None = None
        role: str | None = None
        divergence: Divergence | None = None
        hint: Hint | None = None
        span_end = span_reference_end = span_stable_end = 0
        span_text = ""
        if ref is not None and index < len(prompt):
            with stage("messages"):
                message_index = renderer.message_at(rendered, index)
                role = (
                    GENERATION_PROMPT
                    if message_index is None
                    else str(rendered.conversation[message_index]["role"])
                )
            with stage("hints and spans"):
                # The reference's own tokens matter only where it has some past the divergence.
                assert reference_len is not None
                reference = session.cache.model.sequence(ref) if index < reference_len else array("i")
                divergence = explain_divergence(
                    prompt, reference, renderer.decode, self.context_tokens, index=index
                )
                if status == "break":
                    conversation, tools = session.shapes[ref]
                    hint = explain_change(
                        list(conversation), rendered.conversation, tools, rendered.tools, message_index
                    )
                    span_end, span_reference_end = resync(prompt, reference, index)
                    span_text = renderer.decode(prompt[index:span_end])
                    # With the span moved out, the reference's prompt but the span is the stable part.
                    stable = session.prompt_lengths[ref] - (span_reference_end - index)
                    span_stable_end = max(index, stable)

        reply: list[int] = []
        reply_source: str | None = None
        with stage("messages"):
            if request.response is not None:
                tokens = renderer.reply_tokens(request, rendered, request.response)
                reply, reply_source = tokens.token_ids, tokens.source
        usage = request.response.usage if request.response is not None else None
        with stage("cache model"):
            reconciliation = None
            if usage is not None and usage.cached_tokens is not None:
                reconciliation = reconcile(
                    usage,
                    prompt_tokens=len(prompt),
                    predicted=hit.cached_tokens,
                    common_prefix=hit.common_prefix,
                    block_size=block_size,
                    other_scope=(
                        self.other_scope,
                        (own if other is session.cache else other.model.predict(chain)).cached_tokens,
                    ),
                )
            for holder in {id(h): h for h in (cache, other, session.cache)}.values():
                holder.record(request.line, chain, reply)
            session.chain = chain
            session.split = split
        with stage("hints and spans"):
            session.shapes.append(session.shape(rendered))
            session.prompt_lengths.append(len(prompt))
            session.salts.append(rendered.cache_salt)
            if self.keep_requests:
                owners = session.cache.owners  # this request's line is the last
                latest = session.requests.get(owners[-2]) if len(owners) > 1 else None
                session.requests[request.line] = compact(request, latest)
                said = response_id(request)
                if said is not None:
                    self._responses[said] = (request.session_id, request.line)
        return RequestExplanation(
            line=request.line,
            session_id=request.session_id,
            prompt_tokens=len(prompt),
            predicted_cached_tokens=hit.cached_tokens,
            status=status,
            reference_line=session.cache.owners[ref] if ref is not None else None,
            first_divergence=index,
            message_index=message_index,
            role=role,
            divergence=divergence,
            lost_tokens=lost,
            hint=hint,
            cached_from_line=cached_from,
            cache_common_prefix=hit.common_prefix,
            reference_tokens=reference_len or 0,
            reply_tokens=max(0, len(reply) - 1),
            reply_tokens_source=reply_source,
            usage=usage,
            reconciliation=reconciliation,
            longer_than_context=len(prompt) > renderer.max_model_len,
            span_end=span_end,
            span_reference_end=span_reference_end,
            span_text=span_text,
            span_stable_end=span_stable_end,
            token_ids=array("q", prompt) if self.keep_tokens else (),
            reply_ids=array("q", reply) if self.keep_tokens else (),
        )


def explain_requests(
    requests: Sequence[ChatRequest],
    renderer: ChatRenderer,
    block_size: int,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    scope: str = SHARED,
    on_request: Callable[[RequestExplanation], None] | None = None,
) -> list[RequestExplanation]:
    """Predict and explain each request's cache hit (see the module docstring)."""
    explainer = LogExplainer(renderer, block_size, context_tokens, scope)
    results: list[RequestExplanation] = []
    for request in requests:
        result = explainer.explain(request)
        results.append(result)
        if on_request is not None:
            on_request(result)
    return results
