"""Turning a logged request body into the prompt token IDs vLLM's server computes for it.

Nothing here re-implements vLLM's chat handling: the body goes through the very code path of
vLLM's OpenAI server (``ChatCompletionRequest`` validation, then ``OnlineRenderer.render_chat``:
``tools`` passed to the template as ``tool.model_dump()``, ``content: null`` and text parts as
the server joins them, ``tool_calls`` arguments parsed into objects, ``chat_template_kwargs``,
``add_generation_prompt``, ``continue_final_message``, ``documents``, ``reasoning_effort``,
``truncate_prompt_tokens``, the ``developer`` role, ...), an Anthropic Messages body first
through the converter of vLLM's own ``/v1/messages`` endpoint, and a Responses body through
the code of vLLM's ``/v1/responses`` (``ResponsesRequest`` validation, then
``OnlineRenderer.render_responses``: ``instructions`` as a system message, ``input`` items into
chat messages by ``construct_input_messages``, flat function tools into chat tools). For
``previous_response_id`` the renderer keeps what vLLM's response store keeps: per response id,
the messages its request was rendered from and the response's output items (vLLM carries only
the output's ``message`` items forward, not its reasoning or tool calls). Rendering with the
same model, chat template and vLLM version therefore gives the same token IDs as the server, by
construction.

Two things the server does not need and the explainer does, both from that one rendering:

* which message holds a given token: the template is rendered again as *text* (no
  tokenization) for the first k messages, and a binary search finds the first message whose
  text reaches the token's character offset (the offsets come from the same tokenization);
* the tokens of a logged reply, which the engine also caches (prompt plus generated tokens but
  the last): the reply as the template renders it after the prompt, up to and including the
  end-of-turn token, or the exact ``token_ids`` when the server returned them.

Importing vLLM takes 10-20 s; it happens when a ``ChatRenderer`` is built, after the log has
been read and checked.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import UserError, first_line
from harness.explain.formats import (
    ANTHROPIC,
    OPENAI,
    RESPONSES,
    ChatRequest,
    LoggedResponse,
    input_items,
)
from harness.explain.pieces import PieceTokenizer, Split
from harness.prefix import common_prefix_len

# Fields of a logged body that are the log's bookkeeping and never reach the prompt, but that
# vLLM's request models type strictly: ``session_id`` (vLLM's own is a routing hint, a string;
# loggers write the session as a number, ``"session_id": 42``) and, for Responses, ``metadata``
# (OpenAI's is string to string; loggers put numbers there). The explainer reads the session
# itself (formats.py); dropping them before validation changes no token.
BOOKKEEPING_FIELDS = {OPENAI: ("session_id",), RESPONSES: ("session_id", "metadata"), ANTHROPIC: ()}


@dataclass(frozen=True)
class Rendered:
    """One request as the engine sees it."""

    token_ids: list[int]
    text: str  # the prompt text the chat template produced
    offsets: list[tuple[int, int]]  # per token: its character span in ``text``
    conversation: list[dict[str, Any]]  # the chat messages exactly as the template saw them
    tools: list[dict[str, Any]] | None  # the tool list exactly as the template saw it
    template_kwargs: dict[str, Any]  # what vLLM passed to the chat template besides the messages
    cache_salt: str | None  # the body's own cache_salt (vLLM keeps such requests apart)

    def char_at(self, index: int) -> int:
        """The character offset where token ``index`` starts (the prompt's length past the end)."""
        if index >= len(self.offsets):
            return len(self.text)
        start, end = self.offsets[index]
        if (start, end) == (0, 0) and index > 0:  # fast tokenizers give special tokens (0, 0)
            return self.offsets[index - 1][1]
        return start


@dataclass(frozen=True)
class ReplyTokens:
    """The tokens a logged reply added to the engine's cache, and how sure that is."""

    token_ids: list[int]  # as generated: the last one (end of turn) is never cached
    source: str  # "token_ids" (exact, from the response) | "rendered" (as the template renders it)


class ChatRenderer:
    """vLLM's own chat rendering for one model and chat template, without an engine."""

    def __init__(
        self,
        model: str,
        chat_template: Path | None = None,
        trust_request_chat_template: bool = False,
        exclude_tools_when_tool_choice_none: bool = False,
        pieces: bool = True,
    ) -> None:
        """``pieces=False`` tokenizes every prompt whole, as the server does (``--tokenize whole``)."""
        import os

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            from openai.types.responses import ResponseOutputItem
            from pydantic import TypeAdapter
            from vllm.config import ModelConfig, VllmConfig
            from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
            from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
            from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
            from vllm.entrypoints.openai.responses.utils import construct_chat_messages_with_tool_call
            from vllm.renderers.chat_utils import load_chat_template, parse_chat_messages
            from vllm.renderers.hf import resolve_chat_template_content_format, safe_apply_chat_template
            from vllm.renderers.online_renderer import OnlineRenderer
            from vllm.renderers.registry import renderer_from_config
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise UserError(f"vLLM is not installed ({exc}): run `python setup_and_test.py`") from exc

        template: str | None = None
        if chat_template is not None:
            if not chat_template.is_file():
                raise UserError(f"--chat-template {chat_template}: no such file")
            template = load_chat_template(chat_template)
        try:
            self.model_config = ModelConfig(model=model)
        except Exception as exc:
            raise UserError(f"could not load the model config of {model}: {first_line(exc)}") from exc
        # The server refuses a prompt longer than the model's context; the analysis renders it
        # anyway (the log may come from a longer-context deployment) and says so per request.
        self.max_model_len = int(self.model_config.max_model_len)
        self.model_config.max_model_len = 1 << 40
        renderer = renderer_from_config(VllmConfig(model_config=self.model_config))
        self.tokenizer = renderer.get_tokenizer()
        if getattr(self.tokenizer, "chat_template", None) is None and template is None:
            raise UserError(
                f"model {model} has no chat template: use an instruct/chat model or --chat-template"
            )
        self._online = OnlineRenderer(
            self.model_config,
            renderer,
            request_logger=None,
            chat_template=template,
            chat_template_content_format="auto",
            trust_request_chat_template=trust_request_chat_template,
            # tool_choice never changes the prompt of a Hugging Face chat template (vLLM only
            # reads it to parse the reply), but a server without a tool parser refuses "auto":
            # the log's requests were served, so render them as the server that served them did.
            enable_auto_tools=True,
            exclude_tools_when_tool_choice_none=exclude_tools_when_tool_choice_none,
        )
        # Keep what vLLM hands to the chat template for the request being rendered: the
        # template is then rendered again with exactly those arguments (prefixes, replies).
        self._template_call: tuple[list[dict[str, Any]], dict[str, Any]] = ([], {})

        async def recording(model_config: Any, tokenizer: Any, conversation: Any, **kwargs: Any) -> Any:
            self._template_call = (list(conversation), dict(kwargs))
            # The function vLLM's executor would run, run here: one request at a time, a thread
            # hop per request would only add a wait.
            return safe_apply_chat_template(model_config, tokenizer, conversation, **kwargs)

        renderer._apply_chat_template_async = recording
        # Tokenize only the pieces of the prompt not seen lately (harness.explain.pieces): the
        # same IDs and offsets as vLLM's own call, checked on a sample of prompts.
        self.pieces = PieceTokenizer(self.tokenizer, split=pieces)
        self.notes: list[str] = []  # what the run should say once (e.g. splitting switched off)
        whole_tokenize = renderer._tokenize_prompt
        wants_offsets = renderer._wants_offsets
        # vLLM's Responses path asks for special tokens; most chat tokenizers add none (the
        # template writes them): then the flag changes nothing and the pieces serve it too.
        probe = "a"
        adds_none = list(self.tokenizer(probe, add_special_tokens=True)["input_ids"]) == list(
            self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        )

        self.tokenize_seconds = 0.0  # time spent tokenizing (the explainer's --profile)
        # The prompt the next ``render`` most likely repeats (``render(..., previous=)``) and the
        # one it just tokenized: only the text after what they share is split and looked up.
        self.previous_split: Split | None = None
        self.last_split: Split | None = None

        async def tokenize(prompt: Any, params: Any) -> Any:
            start = time.perf_counter()
            try:
                return pieces(prompt, params)
            finally:
                self.tokenize_seconds += time.perf_counter() - start

        def pieces(prompt: Any, params: Any) -> Any:
            kwargs = params.get_encode_kwargs()
            if (kwargs.get("add_special_tokens") and not adds_none) or prompt.get("multi_modal_data"):
                return whole_tokenize(prompt, params)
            ids, offsets, note, self.last_split = self.pieces.tokenize(prompt["prompt"], self.previous_split)
            limit = kwargs.get("max_length") if kwargs.get("truncation") else None
            if limit is not None and len(ids) > limit:
                return whole_tokenize(prompt, params)  # the tokenizer truncates: let it
            if note is not None:
                self.notes.append(note)
            if wants_offsets(prompt, params):
                return {"prompt_token_ids": ids, "prompt_token_offsets": offsets, **prompt}
            return {"prompt_token_ids": ids, **prompt}

        renderer._tokenize_prompt_async = tokenize
        self._loop = asyncio.new_event_loop()
        self._request_cls = ChatCompletionRequest
        self._responses_cls = _with_offsets(ResponsesRequest)
        # What vLLM's response store keeps, by response id: the messages that response's request
        # was rendered from, and its output items (see the module docstring).
        self._responses_store: dict[str, tuple[list[Any], list[Any]]] = {}
        self._output_item = TypeAdapter(ResponseOutputItem)
        self._items_to_messages = construct_chat_messages_with_tool_call
        self._anthropic_cls = AnthropicMessagesRequest
        self._anthropic = AnthropicServingMessages
        self._merge_inline_system = AnthropicServingMessages._detect_merge_inline_system(
            template or self.tokenizer.chat_template
        )
        self._apply_template = safe_apply_chat_template
        self._parse_messages = parse_chat_messages
        self._content_format = resolve_chat_template_content_format
        self.eos_token_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids = {int(self.tokenizer.eos_token_id)} if self.tokenizer.eos_token_id is not None else set()
        config = self.model_config.try_get_generation_config() or {}
        extra = config.get("eos_token_id")
        ids.update(int(i) for i in (extra if isinstance(extra, list) else [extra]) if i is not None)
        return ids

    # ------------------------------------------------------------------ the request as sent

    def chat_request(self, request: ChatRequest) -> Any:
        """The vLLM ``ChatCompletionRequest`` the server builds from this body."""
        body = _without_bookkeeping(request)
        try:
            if request.format == ANTHROPIC:
                body.setdefault("max_tokens", 1)
                anthropic = self._anthropic_cls.model_validate(body)
                converted = self._anthropic.to_chat_completion_request(
                    anthropic, merge_inline_system=self._merge_inline_system
                )
                body = converted.model_dump(exclude_unset=True)
            body["return_token_offsets"] = True
            if body.get("tools") and body.get("tool_choice") not in (None, "auto", "none"):
                body["tool_choice"] = "auto"  # "required" or a named tool: the same prompt
            # Generation settings never change the prompt's tokens; the server checks them
            # against the context only when it generates.
            for key in ("max_tokens", "max_completion_tokens"):
                body.pop(key, None)
            return self._request_cls.model_validate(body)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"line {request.line}: vLLM refuses this body: {_validation_message(exc)}"
            ) from None

    def responses_request(self, request: ChatRequest) -> Any:
        """The vLLM ``ResponsesRequest`` the server builds from this body (``/v1/responses``)."""
        body = _without_bookkeeping(request)
        body.pop("max_output_tokens", None)  # a generation setting: no prompt token changes
        try:
            return self._responses_cls.model_validate(body)
        except Exception as exc:
            raise UserError(
                f"line {request.line}: vLLM refuses this body: {_validation_message(exc)}"
            ) from None

    def _previous(self, request: ChatRequest) -> tuple[list[Any] | None, list[Any] | None]:
        """The stored messages and output items ``previous_response_id`` names, as vLLM's
        ``_render_resolved_response_inputs`` hands them to ``render_responses``."""
        previous = request.previous
        if previous is None:
            return None, None
        assert previous.response is not None and previous.response.response_id is not None
        if previous.response.response_id not in self._responses_store:
            self.render(previous)  # rendered out of order: render the chain first
        messages, outputs = self._responses_store[previous.response.response_id]
        return messages.copy(), list(outputs)

    def _output_items(self, request: ChatRequest, items: Sequence[dict[str, Any]]) -> list[Any]:
        """A logged response's output items as the objects vLLM keeps in its store."""
        try:
            return [self._output_item.validate_python(item) for item in items]
        except Exception as exc:
            problem = f"vLLM cannot read the response's output items: {_validation_message(exc)}"
            raise UserError(f"line {request.line}: {problem}") from None

    def _render_responses(self, request: ChatRequest) -> tuple[Any, Any]:
        responses_request = self.responses_request(request)
        previous_messages, previous_outputs = self._previous(request)
        try:
            result = self._loop.run_until_complete(
                self._online.render_responses(
                    responses_request,
                    previous_messages=previous_messages,
                    previous_response_outputs=previous_outputs,
                )
            )
        except Exception as exc:  # vLLM's item conversion or the template refused
            raise UserError(f"line {request.line}: vLLM refuses this body: {first_line(exc)}") from exc
        if not hasattr(result, "engine_input"):
            raise _refused(request, result)
        response = request.response
        if response is not None and response.response_id is not None:
            # vLLM stores the very list it rendered from (later requests get a shallow copy).
            outputs = self._output_items(request, response.output or [])
            self._responses_store[response.response_id] = (result.messages, outputs)
        return result.messages, result.engine_input

    def render(self, request: ChatRequest, previous: Split | None = None) -> Rendered:
        """The request as the engine sees it. ``previous``: the ``split`` of the request it most
        likely repeats and extends (its session's last), which makes tokenizing it cheaper."""
        self.previous_split, self.last_split = previous, None
        try:
            return self._render(request)
        finally:
            self.previous_split = None

    def _render(self, request: ChatRequest) -> Rendered:
        if request.format == RESPONSES:
            conversation, engine_input = self._render_responses(request)
            cache_salt = engine_input.get("cache_salt")
        else:
            chat = self.chat_request(request)
            cache_salt = getattr(chat, "cache_salt", None)
            try:
                result = self._loop.run_until_complete(self._online.render_chat(chat))
            except Exception as exc:  # the template itself may refuse (e.g. an unknown role)
                problem = f"the chat template refused the messages: {first_line(exc)}"
                raise UserError(f"line {request.line}: {problem}") from exc
            if not isinstance(result, tuple):
                raise _refused(request, result)
            conversation, (engine_input,) = result
        template_conversation, kwargs = self._template_call
        # vLLM's own lists (ints and (start, end) pairs), kept as they are: no copy per token.
        return Rendered(
            token_ids=engine_input["prompt_token_ids"],
            text=str(engine_input.get("prompt", "")),
            offsets=engine_input.get("prompt_token_offsets") or [],
            conversation=template_conversation or list(conversation),
            tools=kwargs.get("tools"),
            template_kwargs=kwargs,
            cache_salt=cache_salt,
        )

    def standalone_body(self, request: ChatRequest, prompt_ids: Sequence[int]) -> dict[str, Any] | None:
        """The body to send a server that holds none of the log's responses, rendering to
        ``prompt_ids`` (this request as rendered here); None when there is no such body.

        Only a Responses request with ``previous_response_id`` needs rewriting: its chain is
        written out as ``input`` items (each earlier request's items, system items left out,
        then the text of its response's ``message`` items as assistant messages, as vLLM's
        ``construct_input_messages`` carries them forward). vLLM merges a tool call or reasoning
        item into an assistant message just before it, which the chain would not have done
        across a response boundary: the rewritten body is rendered here and kept only when its
        tokens are the request's own.
        """
        if request.format != RESPONSES or request.previous is None:
            return dict(request.body)
        chain = [request]
        while chain[-1].previous is not None:
            chain.append(chain[-1].previous)  # type: ignore[arg-type]
        items: list[dict[str, Any]] = []
        for earlier in reversed(chain[1:]):
            items = [i for i in [*items, *input_items(earlier.body)] if i.get("role") != "system"]
            output = earlier.response.output if earlier.response is not None else None
            items += [
                {"role": "assistant", "content": part["text"]}
                for item in output or []
                if item.get("type") == "message"
                for part in item.get("content") or []
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            ]
        body = {k: v for k, v in request.body.items() if k != "previous_response_id"}
        body["input"] = [*items, *input_items(request.body)]
        alone = ChatRequest(request.line, body, RESPONSES, request.session_id)
        return body if list(self.render(alone).token_ids) == list(prompt_ids) else None

    def render_messages(self, messages: Sequence[dict[str, Any]]) -> Rendered:
        """A plain chat (an OpenAI ``messages`` list) as the engine sees it."""
        return self.render(ChatRequest(0, {"messages": list(messages)}, OPENAI, None))

    # ------------------------------------------------------------------ text of the template

    def template_text(self, rendered: Rendered, conversation: Sequence[dict[str, Any]]) -> str:
        """The template's text for ``conversation`` with the request's own arguments, as a
        finished conversation (no generation prompt)."""
        kwargs = dict(rendered.template_kwargs)
        kwargs.update(add_generation_prompt=False, continue_final_message=False, tokenize=False)
        return str(self._apply_template(self.model_config, self.tokenizer, list(conversation), **kwargs))

    def message_at(self, rendered: Rendered, index: int) -> int | None:
        """The message (index into ``rendered.conversation``) holding token ``index``; None for the
        generation prompt after the last message.

        Message k ends where the template's text for the first k + 1 messages ends: exact
        whenever that text is a prefix of the whole prompt (every message keeps its text when
        more follow). A template that rewrites earlier turns moves the end to where the two
        texts stop agreeing, the closest boundary the text allows. The search starts from the
        last message and widens its steps backwards (a request usually changes, or adds, its
        last messages), then halves: a few renderings of the template, not one per message.
        """
        char = rendered.char_at(index)
        n = len(rendered.conversation)

        def end(k: int) -> int:
            text = self.template_text(rendered, rendered.conversation[: k + 1])
            return len(text) if rendered.text.startswith(text) else common_prefix_len(text, rendered.text)

        lo, hi = 0, n  # the answer, the first message ending past ``char``, is in [lo, hi]
        k, step = n - 1, 1
        while k >= lo:
            if end(k) > char:
                hi, k = k, k - step
                step = step * 2 if hi < n - 2 else 1  # one by one over the last three messages
            else:
                lo = k + 1
                break
        while lo < hi:
            mid = (lo + hi) // 2
            if end(mid) > char:
                hi = mid
            else:
                lo = mid + 1
        return lo if lo < n else None

    # ------------------------------------------------------------------ replies

    def reply_tokens(self, request: ChatRequest, rendered: Rendered, response: LoggedResponse) -> ReplyTokens:
        """The tokens the engine generated for ``response`` (see the module docstring)."""
        if response.token_ids:
            return ReplyTokens(list(response.token_ids), "token_ids")
        messages = self._reply_messages(request, response)
        kwargs = dict(rendered.template_kwargs)
        fmt = self._content_format(
            chat_template=kwargs.get("chat_template"),
            tools=kwargs.get("tools"),
            given_format="auto",
            tokenizer=self.tokenizer,
            model_config=self.model_config,
        )
        reply_conversation, _, _ = self._parse_messages(messages, self.model_config, content_format=fmt)
        full = self.template_text(rendered, [*rendered.conversation, *reply_conversation])
        if not full.startswith(rendered.text):
            # The generation prompt is not how the template writes an assistant turn's start:
            # fall back to the reply's own text.
            text = "".join(m.get("content") for m in messages if isinstance(m.get("content"), str))
            tail = [*self.encode(text)]
        else:
            tail = self.encode(full[len(rendered.text) :])
        ids: list[int] = []
        for token in tail:
            if token in self.eos_token_ids:
                if response.finish_reason != "length":
                    ids.append(token)  # the end of turn was generated (and is never cached)
                break
            ids.append(token)
        return ReplyTokens(ids, "rendered")

    def _reply_messages(self, request: ChatRequest, response: LoggedResponse) -> list[dict[str, Any]]:
        """The reply as OpenAI chat messages, converted the way the request itself was (a
        Responses output by vLLM's own item conversion, as if the items came back as input)."""
        if request.format == RESPONSES:
            items = self._output_items(request, response.output or [])
            return [dict(m) for m in self._items_to_messages(items)] or [{"role": "assistant", "content": ""}]
        if request.format != ANTHROPIC:
            return [dict(response.message)]
        body = {"model": "log", "max_tokens": 1, "messages": [response.message]}
        converted = self._anthropic.to_chat_completion_request(self._anthropic_cls.model_validate(body))
        messages = list(converted.messages)
        return [dict(messages[0]) if messages else {"role": "assistant", "content": ""}]

    # ------------------------------------------------------------------ tokens

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids)))

    def close(self) -> None:
        self._loop.close()


def _refused(request: ChatRequest, error: Any) -> UserError:
    """vLLM's ``ErrorResponse`` for a body, as the one-line error naming its line."""
    message = getattr(getattr(error, "error", None), "message", None) or str(error)
    return UserError(f"line {request.line}: vLLM refuses this body: {str(message).splitlines()[0]}")


def _without_bookkeeping(request: ChatRequest) -> dict[str, Any]:
    """The body as vLLM's request model should see it (see ``BOOKKEEPING_FIELDS``)."""
    body = {k: v for k, v in request.body.items() if k not in BOOKKEEPING_FIELDS[request.format]}
    body.setdefault("model", "log")
    return body


def _with_offsets(responses_request: Any) -> Any:
    """vLLM's ``ResponsesRequest``, asking the tokenizer for each token's character span (the
    chat request model has ``return_token_offsets`` for this; the Responses one does not). The
    token IDs are unchanged: offsets come from the same tokenization."""
    import dataclasses

    class ResponsesRequestWithOffsets(responses_request):  # type: ignore[misc, valid-type]
        def build_tok_params(self, model_config: Any) -> Any:
            params = super().build_tok_params(model_config)
            return dataclasses.replace(params, return_token_offsets=True)

    return ResponsesRequestWithOffsets


def _validation_message(exc: Exception) -> str:
    """pydantic's first error as one line: where in the body, and what."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            return f"{where}: {first.get('msg', '')}" if where else str(first.get("msg", ""))
        except Exception:
            pass
    return first_line(exc)


def tools_digest(tools: list[dict[str, Any]] | None) -> list[tuple[str, str]]:
    """(name, canonical JSON) per tool, in order: what the structural hints compare."""
    out: list[tuple[str, str]] = []
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        name = str(function.get("name", "")) if isinstance(function, dict) else ""
        out.append((name, json.dumps(tool, sort_keys=True, ensure_ascii=False)))
    return out
