"""Where requests go: the embedded vLLM engine, or an OpenAI-compatible vLLM server.

The lessons never know which one they talk to. Both give, per request, the token IDs the
engine saw, the engine's own cached-token count and the time to the first token; both start a
variant cold (the embedded engine resets its prefix cache and checks the reset; a server's cache
cannot be reset from outside, so each variant gets a fresh random ``cache_salt``, which vLLM
mixes into the block hashes) and both expose the engine's cumulative prefix-cache counters.
"""

from __future__ import annotations

import contextlib
import copy
import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from harness.api_key import NO_API_KEY, REFUSED_STATUSES, ApiKey
from harness.engine import EngineOptions, build_llm, vllm_version
from harness.errors import UserError, first_line
from harness.metrics import metric_label, parse_prometheus
from harness.prefix import CacheModel, PrefixCacheModel

Message = dict[str, Any]  # an OpenAI chat message: role, content; an assistant's tool_calls; a tool's id


@dataclass(frozen=True)
class RequestOptions:
    """What a request carries besides its messages; the default is a plain chat, greedy.

    Rendering (they change the prompt's tokens):

    * ``tools``: the tool list in the OpenAI format, which the chat template renders into the
      prompt (most templates put it in the system message);
    * ``chat_template``: the template's text; ``None``: the model's own on the embedded engine,
      the server's own on a server (which refuses a request's template unless started with
      ``--trust-request-chat-template``);
    * ``continue_final_message``: the prompt ends inside the last message (an assistant message
      holding the start of the reply, a *prefill*) and the model continues it, instead of a new
      assistant turn (vLLM's ``continue_final_message`` with ``add_generation_prompt`` off).

    Decoding (they change only what may be generated):

    * ``structured_outputs``: the fields of vLLM's ``StructuredOutputsParams``, one constraint:
      ``{"json": schema}``, ``{"regex": ...}``, ``{"choice": [...]}``, ``{"grammar": ...}`` or
      ``{"structural_tag": json_text}``; the engine masks every token the constraint forbids;
    * ``allowed_token_ids``: the only tokens any generated position may take;
    * ``stop``: strings that end the reply (kept in the text); ``min_tokens``: no end before that
      many tokens (with ``max_tokens`` equal to it: exactly that many, to time decoding alone).
    """

    tools: Sequence[dict[str, Any]] | None = None
    chat_template: str | None = None
    continue_final_message: bool = False
    structured_outputs: dict[str, Any] | None = None
    allowed_token_ids: Sequence[int] | None = None
    stop: Sequence[str] | None = None
    min_tokens: int = 0

    def changes_rendering(self) -> bool:
        return bool(self.tools) or self.chat_template is not None or self.continue_final_message

    def sampling_fields(self) -> dict[str, Any]:
        """The decoding options under their vLLM names (the same in ``SamplingParams`` and in a
        server's request body), only those set."""
        out: dict[str, Any] = {}
        if self.structured_outputs is not None:
            out["structured_outputs"] = dict(self.structured_outputs)
        if self.allowed_token_ids is not None:
            out["allowed_token_ids"] = [int(t) for t in self.allowed_token_ids]
        if self.stop:
            out.update(stop=list(self.stop), include_stop_str_in_output=True)
        if self.min_tokens:
            out["min_tokens"] = self.min_tokens
        return out

    def chat_fields(self) -> dict[str, Any]:
        """The rendering options as a chat request body (and ``/tokenize``) spells them."""
        out: dict[str, Any] = {}
        if self.tools:
            out["tools"] = [dict(tool) for tool in self.tools]
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        if self.continue_final_message:
            out.update(continue_final_message=True, add_generation_prompt=False)
        return out


@dataclass(frozen=True)
class EngineInfo:
    backend: str  # "vllm" (embedded) or "vllm-server"
    model: str
    device: str
    block_size: int
    vllm_version: str
    endpoint: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "backend": self.backend,
            "model": self.model,
            "device": self.device,
            "block_size": self.block_size,
            "vllm_version": self.vllm_version,
        }
        if self.endpoint:
            out["endpoint"] = self.endpoint
        return out


@dataclass(frozen=True)
class Reply:
    """One request's truth, as the engine reported it."""

    prompt_tokens: int
    cached_tokens: int
    ttft_ms: float
    prompt_token_ids: list[int] | None  # what the engine saw, when it says
    output_token_ids: list[int] | None
    text: str
    decode_ms: float | None = None  # from the first generated token to the last (None: not known)
    finish_reason: str | None = None  # "stop" (an end token or a stop string) or "length" (max_tokens)

    @property
    def output_tokens(self) -> int | None:
        return len(self.output_token_ids) if self.output_token_ids is not None else None

    def ms_per_output_token(self) -> float | None:
        """Decoding time per token after the first (the first token's time is the TTFT)."""
        n = self.output_tokens
        if self.decode_ms is None or n is None or n < 2:
            return None
        return self.decode_ms / (n - 1)


@dataclass(frozen=True)
class PrefixCounters:
    """The engine's cumulative prefix-cache counters, in tokens."""

    queries: int
    hits: int

    def __sub__(self, other: PrefixCounters) -> PrefixCounters:
        return PrefixCounters(self.queries - other.queries, self.hits - other.hits)


class Backend(Protocol):
    info: EngineInfo

    def render(self, messages: Sequence[Message], options: RequestOptions | None = None) -> list[int]:
        """The prompt token IDs for ``messages`` under the model's chat template (and the
        rendering ``options``: tools, template, a prefill to continue)."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def start_variant(self) -> None:
        """Make the next request start from an empty prefix cache."""
        ...

    def generate(
        self,
        messages: Sequence[Message],
        max_tokens: int = 1,
        cache_salt: str | None = None,
        read_cache: bool = True,
        options: RequestOptions | None = None,
    ) -> Reply:
        """Run one request; ``cache_salt`` (non-empty) keeps its cache apart from other salts.

        ``read_cache=False``: the request reuses nothing from the prefix cache and prefills
        every token, as on an engine without prefix caching. ``options``: see ``RequestOptions``.
        """
        ...

    def counters(self) -> PrefixCounters | None: ...

    def cache_model(self) -> CacheModel:
        """An empty model of this engine's cache: how the harness predicts its hits."""
        ...

    def close(self) -> None: ...


class ChatTokenizer:
    """The model's tokenizer and chat template, without an engine."""

    def __init__(self, model: str) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(model)
        except Exception as exc:
            raise UserError(f"could not load the tokenizer of {model}: {first_line(exc)}") from exc
        if not getattr(self._tok, "chat_template", None):
            raise UserError(f"model {model} has no chat template: use an instruct/chat model")

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        ids = self._tok.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        return [int(t) for t in ids]

    def render_conversation(self, messages: Sequence[Message]) -> list[int]:
        """The messages alone, without the assistant header a request ends with."""
        return self.render(messages, add_generation_prompt=False)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tok.encode(text, add_special_tokens=False)]

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(token_ids)))



WARMUP_PROMPT = "Warm-up. Count from one to ten in French: un, deux, trois"


def _vllm_collectors() -> list[Any]:
    """vLLM's metric objects registered in this process's Prometheus registry right now."""
    try:
        from prometheus_client import REGISTRY
    except ImportError:  # pragma: no cover - vLLM depends on it
        return []
    # The same test vLLM itself uses to find (and unregister) its collectors.
    return [c for c in list(REGISTRY._collector_to_names) if str(getattr(c, "_name", "")).startswith("vllm:")]


class OfflineBackend:
    """The embedded engine: ``vllm.LLM`` (on CPU in this very process, see engine.py)."""

    def __init__(self, opts: EngineOptions, display_name: str) -> None:
        self.opts = opts
        before = _vllm_collectors()
        self.llm = build_llm(opts)  # sets vLLM's environment before vLLM is first imported
        from vllm import SamplingParams

        self._sampling = SamplingParams
        # vLLM reports through the process-wide Prometheus registry, and every new engine
        # unregisters the collectors of the engines before it (get_metrics() then shows the
        # newest engine's numbers only). Keep this engine's own, so its counters stay right
        # when another engine starts in the same process (a test's second engine).
        self._collectors = [c for c in _vllm_collectors() if all(c is not b for b in before)]
        self.tokenizer = ChatTokenizer(opts.model)
        block_size = int(self.llm.llm_engine.vllm_config.cache_config.block_size)
        self.max_model_len = int(self.llm.llm_engine.vllm_config.model_config.max_model_len)
        self.info = EngineInfo("vllm", display_name, opts.resolved_device(), block_size, vllm_version())
        self._warm_up()

    def _params(self, max_tokens: int, read_cache: bool = True, options: RequestOptions | None = None) -> Any:
        fields = options.sampling_fields() if options is not None else {}
        if "structured_outputs" in fields:
            from vllm.sampling_params import StructuredOutputsParams

            fields["structured_outputs"] = StructuredOutputsParams(**fields["structured_outputs"])
        params = self._sampling(max_tokens=max_tokens, temperature=0.0, seed=self.opts.seed, **fields)
        if not read_cache:
            # vLLM's own per-request switch: the scheduler skips the prefix-cache lookup (and
            # does not count one), so the request computes all of its prompt.
            params.skip_reading_prefix_cache = True
        return params

    def _warm_up(self) -> None:
        # A raw (non-chat) prompt shares no prefix with any chat-templated lesson prompt.
        self.llm.generate([WARMUP_PROMPT], self._params(4), use_tqdm=False)

    def render(self, messages: Sequence[Message], options: RequestOptions | None = None) -> list[int]:
        if options is None or not options.changes_rendering():
            return self.tokenizer.render(messages)
        # Tools, a template or a prefill: vLLM's own chat rendering, the one LLM.chat uses and
        # the server's (tool-call arguments parsed into objects before the template sees them;
        # a plain tokenizer template call would print them as a quoted string). It may edit the
        # messages it is given, so it gets a copy.
        fields = options.chat_fields()
        engine_input = self.llm._preprocess_chat_one(
            copy.deepcopy(list(messages)),
            chat_template=fields.get("chat_template"),
            add_generation_prompt=fields.get("add_generation_prompt", True),
            continue_final_message=options.continue_final_message,
            tools=fields.get("tools"),
        )
        return [int(t) for t in engine_input["prompt_token_ids"]]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def start_variant(self) -> None:
        for _ in range(50):
            if self.llm.reset_prefix_cache():
                return
            time.sleep(0.1)  # blocks still held by a finishing request
        raise RuntimeError("vLLM refused to reset its prefix cache (blocks still in use)")

    def generate(
        self,
        messages: Sequence[Message],
        max_tokens: int = 1,
        cache_salt: str | None = None,
        read_cache: bool = True,
        options: RequestOptions | None = None,
    ) -> Reply:
        # Rendered here with the model's own chat template (as vLLM's chat entry point does),
        # so the prediction and the engine see the very same token IDs.
        prompt_ids = self.render(messages, options)
        return self.generate_tokens(prompt_ids, max_tokens, cache_salt, read_cache, options)

    def generate_tokens(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int = 1,
        cache_salt: str | None = None,
        read_cache: bool = True,
        options: RequestOptions | None = None,
    ) -> Reply:
        """Run one request given as token IDs (what the tests use to place divergences exactly)."""
        from vllm.inputs import TokensPrompt

        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise UserError(
                f"prompt of {len(prompt_ids)} tokens (+{max_tokens} to generate) is longer than "
                f"the model's context of {self.max_model_len} tokens"
            )
        prompt = TokensPrompt(prompt_token_ids=list(prompt_ids))
        if cache_salt:
            prompt["cache_salt"] = cache_salt
        from vllm.exceptions import VLLMClientError

        try:
            params = self._params(max_tokens, read_cache, options)
            out = self.llm.generate([prompt], params, use_tqdm=False)[0]
        except VLLMClientError as exc:  # the request's fault (a bad constraint, min_tokens > max_tokens)
            raise UserError(f"vLLM refused the request: {first_line(exc)}") from exc
        metrics = out.metrics
        ttft = float(getattr(metrics, "first_token_latency", 0.0) or 0.0) * 1000.0
        # The engine core's own clock: first and last generated token (decoding alone).
        first = float(getattr(metrics, "first_token_ts", 0.0) or 0.0)
        last = float(getattr(metrics, "last_token_ts", 0.0) or 0.0)
        completion = out.outputs[0]
        return Reply(
            prompt_tokens=len(out.prompt_token_ids),
            cached_tokens=int(out.num_cached_tokens or 0),
            ttft_ms=ttft,
            prompt_token_ids=list(out.prompt_token_ids),
            output_token_ids=list(completion.token_ids),
            text=completion.text,
            decode_ms=(last - first) * 1000.0 if first and last >= first else None,
            finish_reason=completion.finish_reason,
        )

    def cache_model(self) -> CacheModel:
        return PrefixCacheModel(self.info.block_size)

    def counters(self) -> PrefixCounters | None:
        queries = hits = 0
        if not self._collectors:  # none found at start-up: what vLLM's registry says
            for metric in self.llm.get_metrics():
                if metric.name == "vllm:prefix_cache_queries":
                    queries += int(metric.value)
                elif metric.name == "vllm:prefix_cache_hits":
                    hits += int(metric.value)
            return PrefixCounters(queries, hits)
        for collector in self._collectors:
            for metric in collector.collect():
                for sample in metric.samples:
                    if sample.name == "vllm:prefix_cache_queries_total":
                        queries += int(sample.value)
                    elif sample.name == "vllm:prefix_cache_hits_total":
                        hits += int(sample.value)
        return PrefixCounters(queries, hits)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        with contextlib.suppress(Exception):  # already down is fine
            llm.llm_engine.engine_core.shutdown()
        del llm
        import gc

        gc.collect()


def http_json(
    url: str, payload: dict[str, Any] | None = None, timeout: float = 30.0, api_key: ApiKey = NO_API_KEY
) -> Any:
    """GET (or POST ``payload`` to) a server's JSON endpoint, with ``api_key`` as a Bearer token.

    An HTTP error is one line naming the URL; a refused key names the server and where the key
    came from (``ApiKey.refused``)."""
    data = json.dumps(payload).encode() if payload is not None else None
    headers = {"Content-Type": "application/json", **api_key.headers()}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.loads(resp.read().decode())
    except urllib.error.HTTPError as exc:
        if exc.code in REFUSED_STATUSES:
            raise api_key.refused(server_of(url), exc.code) from None
        raise UserError(f"{url} answered HTTP {exc.code}: {_server_message(exc)}") from exc


def server_of(url: str) -> str:
    """The server a request URL went to: ``http://h:8000/v1/models`` -> ``http://h:8000``."""
    return url.split("/v1/", 1)[0] if "/v1/" in url else url.rsplit("/", 1)[0]


def _server_message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read().decode())
        message = body.get("error", {}).get("message") or body.get("message") or str(body)
    except Exception:
        message = exc.reason
    return first_line(str(message), str(exc.reason))


def streaming_chat_request(
    model: str, messages: Sequence[Message], max_tokens: int, cache_salt: str, **extra_body: Any
) -> dict[str, Any]:
    """The keyword arguments of one greedy, streamed chat completion whose last chunk carries
    the usage (with ``prompt_tokens_details.cached_tokens``): TTFT is the first chunk's arrival."""
    return {
        "model": model,
        "messages": list(messages),
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "extra_body": {"cache_salt": cache_salt, **extra_body},
    }


def request_fields(options: RequestOptions | None) -> dict[str, Any]:
    """A chat completion's body fields for ``options`` (vLLM's names). With tools, ``tool_choice``
    is ``"none"``: the reply comes back as text, which the lesson parses itself, and a server
    without a tool parser refuses the default ``"auto"``; the prompt is rendered the same."""
    if options is None:
        return {}
    fields = {**options.chat_fields(), **options.sampling_fields()}
    if options.tools:
        fields["tool_choice"] = "none"
    return fields


@dataclass
class StreamedReply:
    """A streamed chat completion, chunk by chunk, asked with ``return_token_ids``: TTFT is the
    first chunk's arrival, decoding the time from it to the last token's chunk; the prompt IDs
    come in the first chunk and every generated ID in the chunk that carries it."""

    start: float  # time.perf_counter() when the request was sent
    ttft_ms: float = 0.0
    last_token_ms: float = 0.0
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    usage: Any = None
    finish_reason: str | None = None

    def add(self, chunk: Any) -> None:
        now = (time.perf_counter() - self.start) * 1000.0
        extra = chunk.model_extra or {}
        if extra.get("prompt_token_ids") is not None:
            self.prompt_token_ids = [int(t) for t in extra["prompt_token_ids"]]
        if chunk.choices and not self.ttft_ms:
            self.ttft_ms = now
        for choice in chunk.choices:
            self.text += choice.delta.content or ""
            ids = (choice.model_extra or {}).get("token_ids")
            if ids:
                self.output_token_ids.extend(int(t) for t in ids)
                self.last_token_ms = now
            self.finish_reason = choice.finish_reason or self.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage

    def reply(self, server: str) -> Reply:
        """The finished request (``usage`` must have come: see ``cached_tokens_of``)."""
        return Reply(
            prompt_tokens=int(self.usage.prompt_tokens),
            cached_tokens=cached_tokens_of(self.usage, server),
            ttft_ms=self.ttft_ms,
            prompt_token_ids=self.prompt_token_ids,
            output_token_ids=self.output_token_ids,
            text=self.text,
            decode_ms=max(0.0, self.last_token_ms - self.ttft_ms) if self.output_token_ids else None,
            finish_reason=self.finish_reason,
        )


def cached_tokens_of(usage: Any, server: str) -> int:
    """``usage.prompt_tokens_details.cached_tokens``, or a one-line error naming the server flag."""
    details = usage.prompt_tokens_details
    if details is None or details.cached_tokens is None:
        raise UserError(f"{server} reports no cached tokens: start it with --enable-prompt-tokens-details")
    return int(details.cached_tokens)


class ServerBackend:
    """An OpenAI-compatible vLLM server, started with ``--enable-prefix-caching
    --enable-prompt-tokens-details``. Token IDs come from its ``/tokenize`` endpoint (its own
    chat template), cached tokens from ``usage.prompt_tokens_details``, TTFT from the first
    streamed chunk.

    ``api_key``: the server's key, sent with every request (``harness.api_key``). The first
    request, ``/v1/models``, is where vLLM checks it: a missing or wrong key is one line there,
    before anything else is sent."""

    def __init__(
        self,
        endpoint: str,
        model: str | None = None,
        block_size: int | None = None,
        api_key: ApiKey = NO_API_KEY,
    ) -> None:
        self.base = endpoint.rstrip("/").removesuffix("/v1")
        self.api_key = api_key
        try:
            models = http_json(self.base + "/v1/models", timeout=10, api_key=api_key)
        except UserError:
            raise
        except Exception as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"cannot reach a vLLM server at {endpoint}: {reason}") from exc
        served = [m["id"] for m in models.get("data", [])]
        if not served:
            raise UserError(f"the server at {endpoint} serves no model")
        if model and model not in served:
            raise UserError(f"the server at {endpoint} serves {', '.join(served)}, not {model}")
        self.model = model or served[0]
        metrics_text = self._metrics_text()
        found = metric_label(metrics_text, "vllm:cache_config_info", "block_size")
        if block_size is None and found is None:
            raise UserError(f"cannot read the block size from {endpoint}/metrics: pass --block-size")
        self.block_size = int(block_size or int(found or 0))
        caching = metric_label(metrics_text, "vllm:cache_config_info", "enable_prefix_caching")
        if caching == "False":
            raise UserError(f"the server at {endpoint} runs without --enable-prefix-caching")
        try:
            about = http_json(self.base + "/version", timeout=10, api_key=api_key)
            version = str(about.get("version", "unknown"))
        except Exception:
            version = "unknown"
        self.info = EngineInfo("vllm-server", self.model, "remote", self.block_size, version, self.base)
        from openai import OpenAI

        self.client = OpenAI(
            base_url=self.base + "/v1", api_key=api_key.client_key, timeout=600.0, max_retries=0
        )
        self._salt = secrets.token_hex(8)
        self.generate([{"role": "user", "content": WARMUP_PROMPT}], max_tokens=4)

    def _metrics_text(self) -> str:
        request = urllib.request.Request(self.base + "/metrics", headers=self.api_key.headers())
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return str(resp.read().decode())
        except urllib.error.HTTPError as exc:
            if exc.code in REFUSED_STATUSES:
                raise self.api_key.refused(self.base, exc.code) from None
            raise UserError(f"cannot read {self.base}/metrics: {exc}") from exc
        except Exception as exc:
            raise UserError(f"cannot read {self.base}/metrics: {exc}") from exc

    def render(self, messages: Sequence[Message], options: RequestOptions | None = None) -> list[int]:
        body = {"model": self.model, "messages": list(messages), "add_generation_prompt": True}
        body.update(options.chat_fields() if options is not None else {})
        return [int(t) for t in http_json(self.base + "/tokenize", body, api_key=self.api_key)["tokens"]]

    def decode(self, token_ids: Sequence[int]) -> str:
        body = {"model": self.model, "tokens": list(token_ids)}
        return str(http_json(self.base + "/detokenize", body, api_key=self.api_key)["prompt"])

    def start_variant(self) -> None:
        # A server's cache cannot be reset from outside (outside its dev mode); a new salt
        # starts an empty, private cache namespace instead.
        self._salt = secrets.token_hex(8)

    def generate(
        self,
        messages: Sequence[Message],
        max_tokens: int = 1,
        cache_salt: str | None = None,
        read_cache: bool = True,
        options: RequestOptions | None = None,
    ) -> Reply:
        import openai

        if not read_cache:  # the HTTP API has no such switch: a salt used once matches nothing
            cache_salt = f"no-reuse-{secrets.token_hex(8)}"

        # return_token_ids: the prompt IDs the server saw and every generated ID, so the cache
        # model records exactly what the engine computed (generated tokens are cached too).
        salt = cache_salt or self._salt
        fields = request_fields(options)
        body = streaming_chat_request(self.model, messages, max_tokens, salt, return_token_ids=True, **fields)
        streamed = StreamedReply(time.perf_counter())
        try:
            for chunk in self.client.chat.completions.create(**body):
                streamed.add(chunk)
        except openai.APIStatusError as exc:
            if exc.status_code in REFUSED_STATUSES:
                raise self.api_key.refused(self.base, exc.status_code) from None
            message = str(exc.message).strip().splitlines()[0]
            raise UserError(f"the server refused the request: {message}") from exc
        except openai.APIConnectionError as exc:
            raise UserError(f"lost the connection to {self.base}: {exc}") from exc
        if streamed.usage is None:
            raise UserError("the server sent no usage: is it a vLLM OpenAI-compatible server?")
        return streamed.reply("the server")

    def cache_model(self) -> CacheModel:
        return PrefixCacheModel(self.block_size)

    def counters(self) -> PrefixCounters | None:
        totals = parse_prometheus(self._metrics_text())
        return PrefixCounters(
            int(totals.get("vllm:prefix_cache_queries_total", 0)),
            int(totals.get("vllm:prefix_cache_hits_total", 0)),
        )

    def close(self) -> None:
        self.client.close()
