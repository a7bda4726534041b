"""Which session a call belongs to, from what the agent already sends.

The explainer compares each request with the earlier requests of its *session* (the one it meant
to extend), so the log names the session of every call. The first of these that the call
carries wins:

1. the header ``X-Session-Id`` (``--session-header`` names another): set it when you can, e.g.
   ``default_headers={"X-Session-Id": run_id}`` on the SDK client; vLLM's router uses the same
   header for session affinity (``vllm-router --policy consistent_hash``);
2. ``prompt_cache_key`` (OpenAI Chat Completions and Responses): the key OpenAI routes its
   cache by, which agents set per conversation;
3. ``conversation`` (Responses API): the conversation's id, or ``{"id": ...}``;
4. ``previous_response_id`` (Responses API): the session of the call that produced that response
   (a chain of responses is one session);
5. ``metadata.session_id``, then ``metadata.user_id`` (Anthropic Messages: Claude Code and other
   agents put their session there);
6. ``session_id`` in the body;
7. ``user``, then ``safety_identifier`` (OpenAI): an end user's id, which may span several
   conversations, hence last.

None of them: the call is in the default session (``session_id: null``), where the explainer
still finds each request's best match among the others. The record keeps where the id came from
(``session_source``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_HEADER = "X-Session-Id"
REMEMBERED_RESPONSES = 100_000  # response id -> session, for previous_response_id chains

# Body fields, in the order they are tried (after the header), as (source name, path).
BODY_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prompt_cache_key", ("prompt_cache_key",)),
    ("conversation", ("conversation",)),
    ("previous_response_id", ("previous_response_id",)),
    ("metadata.session_id", ("metadata", "session_id")),
    ("metadata.user_id", ("metadata", "user_id")),
    ("session_id", ("session_id",)),
    ("user", ("user",)),
    ("safety_identifier", ("safety_identifier",)),
)


@dataclass(frozen=True)
class Session:
    id: str | None  # None: the default session
    source: str | None  # where it came from: "header X-Session-Id", "prompt_cache_key", ...


def _dig(body: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(body, dict):
            return None
        body = body.get(key)
    return body


def _as_id(value: Any) -> str | None:
    if isinstance(value, dict):  # a Responses API conversation object
        value = value.get("id")
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    return text or None


class SessionResolver:
    """Names the session of each call, in the order the calls were sent (see the module docstring)."""

    def __init__(self, header: str = DEFAULT_HEADER) -> None:
        self.header = header
        self._responses: OrderedDict[str, str] = OrderedDict()  # response id -> session id

    def resolve(self, header_value: str | None, body: Any) -> Session:
        if header_value:
            return Session(header_value, f"header {self.header}")
        for source, path in BODY_FIELDS:
            value = _as_id(_dig(body, path))
            if value is None:
                continue
            if source == "previous_response_id":
                earlier = self._responses.get(value)
                if earlier is None:
                    continue  # a response this proxy did not see: no session to inherit
                return Session(earlier, source)
            return Session(value, source)
        return Session(None, None)

    def remember(self, response: Any, session: Session) -> None:
        """A Responses API response's id, so a later ``previous_response_id`` finds its session."""
        if session.id is None or not isinstance(response, dict) or response.get("object") != "response":
            return
        response_id = response.get("id")
        if isinstance(response_id, str):
            self._responses[response_id] = session.id
            if len(self._responses) > REMEMBERED_RESPONSES:
                self._responses.popitem(last=False)
