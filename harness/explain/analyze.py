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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.explain.formats import ChatRequest, LoggedUsage
from harness.explain.hints import Hint, explain_change
from harness.explain.reconcile import Reconciliation, reconcile
from harness.explain.render import ChatRenderer, Rendered
from harness.prefix import Divergence, PrefixCacheModel, cached_tokens_for, explain_divergence

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
    owners: list[int] = field(default_factory=list)  # sequence -> the log line of its request
    # sequence -> (conversation, tools) as the template saw them: what the hints compare. Only
    # these two are kept (not the whole rendering) so a large log stays small in memory.
    shapes: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = field(default_factory=list)

    def record(self, line: int, prompt: Sequence[int], reply: Sequence[int], rendered: Rendered) -> None:
        self.model.record(prompt, reply)
        self.owners.append(line)
        self.shapes.append((rendered.conversation, rendered.tools))


def _status(first_divergence: int, prompt_len: int, reference_len: int | None) -> str:
    if reference_len is None:
        return "cold"
    if first_divergence >= prompt_len:
        return "repeat"
    if first_divergence >= reference_len:
        return "extends"
    return "break"


class LogExplainer:
    """The analysis of a log, one request at a time, in the order sent (see the module docstring).

    It holds the cache models of both scopes and of every session, so a caller can feed it
    requests as they arrive (a log read line by line, a proxy's live traffic) and get each
    request's explanation at once.
    """

    def __init__(
        self,
        renderer: ChatRenderer,
        block_size: int,
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
        scope: str = SHARED,
    ) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.renderer = renderer
        self.block_size = block_size
        self.context_tokens = context_tokens
        self.scope = scope
        self.other_scope = SESSION if scope == SHARED else SHARED
        # Both scopes are kept: the one asked for predicts, the other names a disagreement's cause.
        self._caches: dict[str, dict[tuple[str | None, str | None], _Cache]] = {SHARED: {}, SESSION: {}}
        self._sessions: dict[str | None, _Cache] = {}  # every request of a session, whatever its salt

    def _new_cache(self) -> _Cache:
        return _Cache(PrefixCacheModel(self.block_size))

    def explain(self, request: ChatRequest) -> RequestExplanation:
        """Predict and explain one request's cache hit, then remember it for the ones after."""
        renderer, block_size, scope = self.renderer, self.block_size, self.scope
        rendered = renderer.render(request)
        prompt = rendered.token_ids

        keys = {
            SHARED: (None, rendered.cache_salt),
            SESSION: (request.session_id, rendered.cache_salt),
        }
        cache, other = (
            self._caches[name].setdefault(keys[name], self._new_cache()) for name in (scope, self.other_scope)
        )
        session = self._sessions.setdefault(request.session_id, self._new_cache())

        hit = cache.model.predict(prompt)
        cached_from = cache.owners[hit.source] if hit.source is not None and hit.cached_tokens else None
        own = session.model.predict(prompt)
        ref = own.source if len(session.owners) else None
        reference = session.model.sequence(ref) if ref is not None else None
        index = own.common_prefix
        status = _status(index, len(prompt), len(reference) if reference is not None else None)

        lost = 0
        if reference is not None:
            kept = cached_tokens_for(len(prompt), len(reference), block_size)
            lost = max(0, kept - hit.cached_tokens)

        message_index: int | None = None
        role: str | None = None
        divergence: Divergence | None = None
        hint: Hint | None = None
        if reference is not None and index < len(prompt):
            message_index = renderer.message_at(rendered, index)
            role = (
                GENERATION_PROMPT
                if message_index is None
                else str(rendered.conversation[message_index]["role"])
            )
            divergence = explain_divergence(prompt, reference, renderer.decode, self.context_tokens)
        if status == "break" and ref is not None:
            conversation, tools = session.shapes[ref]
            hint = explain_change(conversation, rendered.conversation, tools, rendered.tools, message_index)

        reply: list[int] = []
        reply_source: str | None = None
        if request.response is not None:
            tokens = renderer.reply_tokens(request, rendered, request.response)
            reply, reply_source = tokens.token_ids, tokens.source
        usage = request.response.usage if request.response is not None else None
        reconciliation = None
        if usage is not None and usage.cached_tokens is not None:
            reconciliation = reconcile(
                usage,
                prompt_tokens=len(prompt),
                predicted=hit.cached_tokens,
                common_prefix=hit.common_prefix,
                block_size=block_size,
                other_scope=(self.other_scope, other.model.predict(prompt).cached_tokens),
            )
        for holder in (cache, other, session):
            holder.record(request.line, prompt, reply, rendered)
        return RequestExplanation(
            line=request.line,
            session_id=request.session_id,
            prompt_tokens=len(prompt),
            predicted_cached_tokens=hit.cached_tokens,
            status=status,
            reference_line=session.owners[ref] if ref is not None else None,
            first_divergence=index,
            message_index=message_index,
            role=role,
            divergence=divergence,
            lost_tokens=lost,
            hint=hint,
            cached_from_line=cached_from,
            cache_common_prefix=hit.common_prefix,
            reference_tokens=len(reference) if reference is not None else 0,
            reply_tokens=max(0, len(reply) - 1),
            reply_tokens_source=reply_source,
            usage=usage,
            reconciliation=reconciliation,
            longer_than_context=len(prompt) > renderer.max_model_len,
            token_ids=array("q", prompt),
            reply_ids=array("q", reply),
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
