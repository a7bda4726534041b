"""A small inference engine with an explicit cache breakpoint (lesson 3's custom engine).

Automatic prefix caching (vLLM's APC, SGLang's radix tree) finds shared prefixes on its own:
it hashes every block of every prompt and reuses whatever matches. Many engines have no such
thing: vLLM with ``enable_prefix_caching=False``, older servers, a home-built loop around
``model.forward``. There, every request recomputes its whole prompt, even when 95 % of it is the
same system prompt and tool schemas as last time.

An *explicit cache breakpoint* is the prompt author's promise: "everything before this point is
identical on every request; keep its KV and reuse it". Here the breakpoint is a marker in the
text, ``// __CACHE_END__``. The engine renders the chat, cuts the text at the marker, removes the
marker (the model never sees it), looks the stable part up by a hash of its token IDs, computes
its KV once on a miss, and for every request runs only the dynamic part on a copy of that KV.

The same idea in provider APIs:

* Anthropic: ``"cache_control": {"type": "ephemeral"}`` on a content block (tools, system or a
  message) is the marker. The prefix up to and including that block is cached (a few minutes,
  refreshed on use); up to four breakpoints per request; prefixes below a model-specific minimum
  length are not cached. ``usage.cache_creation_input_tokens`` / ``cache_read_input_tokens``
  play the roles of this engine's miss / ``cached_tokens``.
* OpenAI: prompt caching is automatic for long prompts (1,024 tokens and up, reused in 128-token
  steps) with no marker in the request: the layout is the breakpoint, so static content goes
  first. ``prompt_cache_key`` steers requests that share a prefix to the same machine;
  ``usage.prompt_tokens_details.cached_tokens`` reports the hit, the same field vLLM's server uses.
* vLLM with automatic prefix caching needs no marker, but the marker still says what to
  pre-warm, and only whole blocks before it can be reused (see ``harness.prefix``).

The token sequence this engine runs (and why the comparison is exact): the conversation is
rendered with the model's chat template (as text), the text is split at the marker, and the
stable and the dynamic text are tokenized *separately* and concatenated. Tokenizing the joined
text could merge characters across the join into one token, and then the stored prefix would
no longer be a token prefix of the prompt. No special tokens are added on top of the template:
the template owns BOS (ChatML's first ``<|im_start|>`` is SmolLM2's BOS), exactly as
``apply_chat_template(tokenize=True)`` and vLLM's chat path do. ``generate_uncached`` runs the
very same IDs with a full prefill, so "identical output with and without the stored KV"
compares like with like.

How the harness measures it: ``BreakpointBackend`` puts the engine behind the same ``Backend``
protocol as vLLM, so one measuring step (``harness.measure.run_variant``) predicts, sends and
records its requests. Its cache model, ``BreakpointCacheModel``, is this engine's rule, beside
APC's (``harness.prefix.PrefixCacheModel``):

* APC: whole blocks, chained. A prompt sharing its first ``P`` of ``L`` tokens with something
  cached gets ``B * floor(min(P, L - 1) / B)`` tokens served: some of a changed prompt survives.
* The breakpoint: all or nothing at the marker. A prompt whose ``S`` tokens before the marker
  were stored by an earlier request gets all ``S`` served; otherwise 0, however many of them match.

``check_exactness`` runs requests again with a full prefill (``generate_uncached``): the greedy
output must be identical, and the two timings of the very same requests on the very same engine
are what the stored prefix alone is worth. ``ManualCacheEngine.kv_memory`` checks the bytes the
config says one token costs against the tensors actually stored.

Not handled, on purpose: batching, sampling (greedy only), sliding-window or hybrid caches
(``kv_bytes_per_token`` assumes every layer keeps full K and V).
"""

from __future__ import annotations

import copy
import hashlib
import statistics
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from harness.backend import WARMUP_PROMPT, EngineInfo, Message, PrefixCounters, Reply, RequestOptions
from harness.engine import cpu_threads
from harness.errors import UserError, first_line
from harness.measure import RequestRecord
from harness.prefix import CacheModel, Divergence, Prediction, common_prefix_len, explain_divergence

CACHE_MARKER = "// __CACHE_END__"
DEFAULT_MAX_CACHED_TOKENS = 16_384  # ~755 MB of float32 KV for SmolLM2-135M (46,080 B/token)
DEFAULT_STREAM = "default"


# --------------------------------------------------------------------------- the marker


@dataclass(frozen=True)
class MarkerSplit:
    """A prompt text cut at the cache marker."""

    stable: str | None  # text before the (last) marker, markers removed; None: no marker at all
    dynamic: str  # text after it (the whole text when there is no marker)
    warnings: list[str] = field(default_factory=list)


def split_at_marker(text: str, marker: str = CACHE_MARKER) -> MarkerSplit:
    """Cut ``text`` at ``marker`` and remove every copy of the marker.

    * No marker: the whole prompt is dynamic (nothing can be cached), with a warning.
    * The marker more than once: the LAST one ends the stable part, with a warning. A marker
      means "everything before me is the same on every request"; the last one makes that
      promise for the most text, and a cache wants the longest reusable prefix (with several
      breakpoints, Anthropic too reads the longest matching cached prefix). Taking the first
      would silently recompute text the author declared stable. The price: a marker inside
      dynamic content (a tool result quoting this very comment) moves the cut into text that
      changes; the engine then reports that the stable part changed, and at which token
      (see ``ManualCacheEngine.generate``).

    Only the marker's own characters are removed; whitespace around it stays, so write it where
    the break belongs (``system_prompt + CACHE_MARKER``).
    """
    if not marker:
        raise ValueError("the cache marker must be a non-empty string")
    count = text.count(marker)
    if count == 0:
        return MarkerSplit(
            None,
            text,
            [
                f"no cache marker {marker!r} in the prompt: the whole prompt is dynamic, "
                "nothing is cached"
            ],
        )
    before, _, after = text.rpartition(marker)
    warnings: list[str] = []
    if count > 1:
        warnings.append(
            f"cache marker {marker!r} found {count} times: the last one ends the stable part, "
            "the others were removed"
        )
        before = before.replace(marker, "")
    return MarkerSplit(before, after, warnings)


def strip_marker(messages: Sequence[Message], marker: str = CACHE_MARKER) -> list[Message]:
    """The messages with every marker removed: what an engine without markers should be sent
    (e.g. vLLM with automatic prefix caching) to see the same text as this engine."""
    return [{**m, "content": m["content"].replace(marker, "")} for m in messages]


@dataclass(frozen=True)
class PreparedPrompt:
    """The token IDs the engine runs: ``token_ids[:prefix_len]`` is the stable part."""

    token_ids: list[int]
    prefix_len: int  # 0: nothing to cache
    warnings: list[str]

    @property
    def prefix_ids(self) -> list[int]:
        return self.token_ids[: self.prefix_len]

    @property
    def suffix_ids(self) -> list[int]:
        return self.token_ids[self.prefix_len :]


def prepare_prompt(
    tokenizer: Any, messages: Sequence[Message], marker: str = CACHE_MARKER
) -> PreparedPrompt:
    """Render ``messages`` with the chat template, cut at the marker, tokenize both sides apart."""
    text = str(
        tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    )
    split = split_at_marker(text, marker)
    warnings = list(split.warnings)

    def encode(part: str) -> list[int]:
        return [int(t) for t in tokenizer.encode(part, add_special_tokens=False)] if part else []

    stable_ids = encode(split.stable or "")
    dynamic_ids = encode(split.dynamic)
    if split.stable is not None and not stable_ids:
        warnings.append(f"cache marker {marker!r} is at the very start: nothing before it to cache")
    if stable_ids and not dynamic_ids:
        # The first new token needs the logits of the last prompt token, which a stored KV does
        # not hold; vLLM recomputes the last prompt token for the same reason.
        warnings.append(
            f"nothing follows the cache marker {marker!r}: its last stable token is recomputed"
        )
        stable_ids, dynamic_ids = stable_ids[:-1], stable_ids[-1:]
    return PreparedPrompt(stable_ids + dynamic_ids, len(stable_ids), warnings)


# --------------------------------------------------------------------------- the store


def prefix_key(token_ids: Sequence[int]) -> str:
    """The store key of a prefix: SHA-256 of its token IDs as 64-bit integers."""
    return hashlib.sha256(array("q", token_ids).tobytes()).hexdigest()


def kv_tensor_bytes(kv: Any) -> int:
    """Bytes held by the K and V tensors of a transformers cache (measured, not computed)."""
    total = 0
    for layer in kv.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class StoredPrefix:
    key: str
    token_ids: tuple[int, ...]
    kv: Any  # transformers DynamicCache; never run a request on it, only on a deep copy

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def nbytes(self) -> int:
        return kv_tensor_bytes(self.kv)


class PrefixKVStore:
    """Prefix KV caches by the hash of their token IDs, bounded in tokens, evicted LRU.

    A prefix longer than ``max_tokens`` is never stored (``put`` returns False and counts it in
    ``rejected``): evicting everything for one entry that still would not fit helps nobody.
    """

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        self.max_tokens = max_tokens
        self._entries: OrderedDict[str, StoredPrefix] = OrderedDict()  # oldest use first
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.rejected = 0
        self.evicted_keys: list[str] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def total_tokens(self) -> int:
        return sum(e.num_tokens for e in self._entries.values())

    def entries(self) -> list[StoredPrefix]:
        """Stored prefixes, least recently used first."""
        return list(self._entries.values())

    def peek(self, token_ids: Sequence[int]) -> StoredPrefix | None:
        """The entry for exactly ``token_ids``, without counting a lookup or touching its age."""
        entry = self._entries.get(prefix_key(token_ids))
        return entry if entry is not None and entry.token_ids == tuple(token_ids) else None

    def lookup(self, token_ids: Sequence[int]) -> StoredPrefix | None:
        entry = self._entries.get(prefix_key(token_ids))
        # The IDs are compared too: a hash collision must never serve a wrong KV.
        if entry is None or entry.token_ids != tuple(token_ids):
            self.misses += 1
            return None
        self._entries.move_to_end(entry.key)
        self.hits += 1
        return entry

    def put(self, token_ids: Sequence[int], kv: Any) -> bool:
        """Store ``kv`` as the KV of ``token_ids``; False when it is larger than the store."""
        ids = tuple(int(t) for t in token_ids)
        if len(ids) > self.max_tokens:
            self.rejected += 1
            return False
        key = prefix_key(ids)
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        while self._entries and self.total_tokens + len(ids) > self.max_tokens:
            old_key, _ = self._entries.popitem(last=False)
            self.evictions += 1
            self.evicted_keys.append(old_key)
        self._entries[key] = StoredPrefix(key, ids, kv)
        return True

    def bytes_stored(self) -> int:
        return sum(e.nbytes() for e in self._entries.values())

    def clear(self) -> None:
        """Drop every entry and zero the counters (a cold start)."""
        self._entries.clear()
        self.hits = self.misses = self.evictions = self.rejected = 0
        self.evicted_keys.clear()


# --------------------------------------------------------------------------- KV size


def language_config(config: Any) -> Any:
    """The language model's part of a config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_bytes_per_token(config: Any, dtype_bytes: int = 4) -> int:
    """KV bytes one token costs: K and V, for every layer and KV head.

    SmolLM2-135M: 2 x 30 layers x 3 KV heads x 64 dims x 4 bytes = 46,080 bytes in float32.
    """
    text_config = language_config(config)
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    return 2 * int(text_config.num_hidden_layers) * kv_heads * head_dim * dtype_bytes


@dataclass(frozen=True)
class KVSizeCheck:
    tokens: int
    measured_bytes: int  # from the stored tensors
    formula_bytes_per_token: int  # from the config

    @property
    def measured_bytes_per_token(self) -> float:
        return self.measured_bytes / self.tokens if self.tokens else 0.0

    @property
    def ok(self) -> bool:
        return self.measured_bytes == self.formula_bytes_per_token * self.tokens


def check_kv_size(config: Any, entry: StoredPrefix, dtype_bytes: int = 4) -> KVSizeCheck:
    """Compare the config formula with the bytes an actual stored prefix holds."""
    return KVSizeCheck(entry.num_tokens, entry.nbytes(), kv_bytes_per_token(config, dtype_bytes))


@dataclass(frozen=True)
class StoreStats:
    """The store's counters (lookups, not tokens) and what it holds."""

    hits: int
    misses: int
    evictions: int
    rejected: int
    stable_changes: int  # requests whose stable part differed from their stream's previous one
    entries: int
    tokens_stored: int
    bytes_stored: int

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class KVMemory:
    """What one stored prefix costs: the config's formula, checked against the stored tensors."""

    size: KVSizeCheck
    layers: int
    dtype: str
    store: StoreStats

    def to_json(self) -> dict[str, Any]:
        return {
            "bytes_per_token": self.size.formula_bytes_per_token,
            "bytes_per_token_measured": self.size.measured_bytes_per_token,
            "formula_matches_tensors": self.size.ok,
            "layers": self.layers,
            "dtype": self.dtype,
            "stable_prefix_tokens": self.size.tokens,
            "stable_prefix_bytes": self.size.measured_bytes,
            "store": self.store.to_json(),
        }


# --------------------------------------------------------------------------- the engine


@dataclass(frozen=True)
class ManualReply:
    prompt_tokens: int
    cached_tokens: int  # the stable part's length on a hit, 0 otherwise
    ttft_ms: float  # request start (before rendering) to the first token's argmax
    output_ids: list[int]  # greedy; ends with the stop token when one was produced
    text: str
    prefix_hit: bool
    warnings: list[str]
    prompt_ids: list[int]  # exactly what the model ran
    prefix_tokens: int  # where the marker cut (0: no stable part)
    stable_divergence: Divergence | None = None  # set when the stable part changed

    def to_reply(self) -> Reply:
        """The same numbers in the shape the vLLM backends report."""
        return Reply(
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            ttft_ms=self.ttft_ms,
            prompt_token_ids=list(self.prompt_ids),
            output_token_ids=list(self.output_ids),
            text=self.text,
        )


class ManualCacheEngine:
    """Greedy decoding on transformers (float32, CPU) with a marker-controlled prefix KV store.

    ``generate`` and ``generate_uncached`` share one code path for the prompt IDs and the decode
    loop and start their clocks at the same point; the only difference is where the KV of the
    stable part comes from.
    """

    def __init__(
        self,
        model_path: str,
        marker: str = CACHE_MARKER,
        max_cached_tokens: int = DEFAULT_MAX_CACHED_TOKENS,
        threads: int | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if not marker:
            raise ValueError("the cache marker must be a non-empty string")
        torch.manual_seed(0)
        # Process-wide; torch's default can be lower than the cores we may use.
        torch.set_num_threads(threads or cpu_threads())
        hf_logging.disable_progress_bar()  # the lesson shows its own status line while loading
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        except Exception as exc:
            raise UserError(f"could not load {model_path} with transformers: {first_line(exc)}") from exc
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"model {model_path} has no chat template: use an instruct/chat model")
        self.model = model.to("cpu").eval()
        self.config = self.model.config
        self.marker = marker
        self.store = PrefixKVStore(max_cached_tokens)
        self.stop_ids = self._stop_ids()
        self.stable_changes = 0
        self._last_stable: dict[str, list[int]] = {}
        self.warm_up()

    # -- prompt

    def prepare(self, messages: Sequence[Message]) -> PreparedPrompt:
        return prepare_prompt(self.tokenizer, messages, self.marker)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids)))

    def _stop_ids(self) -> set[int]:
        stop: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.config, self.tokenizer):
            ids = getattr(source, "eos_token_id", None)
            if isinstance(ids, int):
                stop.add(ids)
            elif ids:
                stop.update(int(i) for i in ids)
        return stop

    # -- running the model

    def _forward(self, token_ids: Sequence[int], kv: Any | None) -> tuple[torch.Tensor, Any]:
        """Run ``token_ids`` after whatever ``kv`` holds; the last position's logits and the KV."""
        out = self.model(
            input_ids=torch.tensor([list(token_ids)], dtype=torch.long),
            past_key_values=kv,
            use_cache=True,
            logits_to_keep=1,  # only the last position is ever sampled
        )
        return out.logits[0, -1], out.past_key_values

    def _decode_greedy(self, first_logits: torch.Tensor, kv: Any, max_new_tokens: int) -> list[int]:
        token = int(first_logits.argmax())
        output = [token]
        while len(output) < max_new_tokens and token not in self.stop_ids:
            logits, kv = self._forward([token], kv)
            token = int(logits.argmax())
            output.append(token)
        return output

    def warm_up(self) -> None:
        """One tiny request off the record (first-call allocations), sharing no prefix with a
        chat prompt and leaving the store untouched."""
        ids = [int(t) for t in self.tokenizer.encode(WARMUP_PROMPT, add_special_tokens=False)]
        with torch.inference_mode():
            logits, kv = self._forward(ids, None)
            self._decode_greedy(logits, kv, 4)

    # -- requests

    def generate(
        self, messages: Sequence[Message], max_new_tokens: int = 16, stream: str = DEFAULT_STREAM
    ) -> ManualReply:
        """Run one request, reusing the stored KV of the part before the marker.

        ``stream`` names a sequence of requests that should share one stable part (a session,
        an agent): when the stable part differs from that stream's previous one, the reply
        warns with the first differing token. That is the misuse the marker exists to prevent
        (a timestamp slipped into the "stable" text); such a prefix is new, so the lookup misses.
        """
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        start = time.perf_counter()
        prompt = self.prepare(messages)
        warnings = list(prompt.warnings)
        divergence = self._check_stable_part(stream, prompt.prefix_ids, warnings)
        hit = False
        with torch.inference_mode():
            if prompt.prefix_len == 0:
                logits, kv = self._forward(prompt.token_ids, None)
            else:
                entry = self.store.lookup(prompt.prefix_ids)
                hit = entry is not None
                if entry is not None:
                    kv = copy.deepcopy(entry.kv)
                else:
                    _, prefix_kv = self._forward(prompt.prefix_ids, None)
                    if self.store.put(prompt.prefix_ids, prefix_kv):
                        kv = copy.deepcopy(prefix_kv)  # the stored one stays as computed
                    else:
                        kv = prefix_kv
                        warnings.append(
                            f"stable part of {prompt.prefix_len} tokens is larger than the store "
                            f"({self.store.max_tokens} tokens): not stored, recomputed every time"
                        )
                logits, kv = self._forward(prompt.suffix_ids, kv)
            first_token_at = time.perf_counter()
            output = self._decode_greedy(logits, kv, max_new_tokens)
        return ManualReply(
            prompt_tokens=len(prompt.token_ids),
            cached_tokens=prompt.prefix_len if hit else 0,
            ttft_ms=(first_token_at - start) * 1000.0,
            output_ids=output,
            text=str(self.tokenizer.decode(output, skip_special_tokens=True)),
            prefix_hit=hit,
            warnings=warnings,
            prompt_ids=prompt.token_ids,
            prefix_tokens=prompt.prefix_len,
            stable_divergence=divergence,
        )

    def generate_uncached(
        self, messages: Sequence[Message], max_new_tokens: int = 16
    ) -> ManualReply:
        """The same token IDs as ``generate``, full prefill, no store: the exactness baseline and
        the "no caching" reference. Touches neither the store nor the stream history."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        start = time.perf_counter()
        prompt = self.prepare(messages)
        with torch.inference_mode():
            logits, kv = self._forward(prompt.token_ids, None)
            first_token_at = time.perf_counter()
            output = self._decode_greedy(logits, kv, max_new_tokens)
        return ManualReply(
            prompt_tokens=len(prompt.token_ids),
            cached_tokens=0,
            ttft_ms=(first_token_at - start) * 1000.0,
            output_ids=output,
            text=str(self.tokenizer.decode(output, skip_special_tokens=True)),
            prefix_hit=False,
            warnings=list(prompt.warnings),
            prompt_ids=prompt.token_ids,
            prefix_tokens=prompt.prefix_len,
        )

    def _check_stable_part(
        self, stream: str, prefix_ids: list[int], warnings: list[str]
    ) -> Divergence | None:
        previous = self._last_stable.get(stream)
        if prefix_ids:
            self._last_stable[stream] = prefix_ids
        if not previous or not prefix_ids or previous == prefix_ids:
            return None
        self.stable_changes += 1
        div = explain_divergence(prefix_ids, previous, self.decode)
        warnings.append(
            f"stable part changed since the previous request of stream {stream!r}: first "
            f"divergence at token {div.index} of {len(prefix_ids)} "
            f"(...{div.before!r} then {div.token!r}, was {div.previous_token!r}); "
            "the previous prefix KV cannot be reused for it"
        )
        return div

    # -- bookkeeping

    def reset(self) -> None:
        """Cold start: empty store, zero counters, forget every stream's stable part."""
        self.store.clear()
        self._last_stable.clear()
        self.stable_changes = 0

    def kv_size_check(self, entry: StoredPrefix | None = None) -> KVSizeCheck:
        """Formula vs tensors for ``entry`` (default: the most recently used stored prefix)."""
        if entry is None:
            entries = self.store.entries()
            if not entries:
                raise ValueError("the store is empty: run a request with a cache marker first")
            entry = entries[-1]
        dtype_bytes = torch.finfo(self.model.dtype).bits // 8
        return check_kv_size(self.config, entry, dtype_bytes)

    def kv_memory(self, prefix_ids: Sequence[int]) -> KVMemory:
        """The KV bytes of the stored prefix ``prefix_ids``: formula vs tensors, and the store."""
        entry = self.store.peek(prefix_ids)
        if entry is None:
            raise ValueError(f"no stored prefix of these {len(prefix_ids)} tokens: run a request with it")
        return KVMemory(
            self.kv_size_check(entry),
            int(language_config(self.config).num_hidden_layers),
            str(self.model.dtype).removeprefix("torch."),
            self.stats(),
        )

    def stats(self) -> StoreStats:
        return StoreStats(
            hits=self.store.hits,
            misses=self.store.misses,
            evictions=self.store.evictions,
            rejected=self.store.rejected,
            stable_changes=self.stable_changes,
            entries=len(self.store),
            tokens_stored=self.store.total_tokens,
            bytes_stored=self.store.bytes_stored(),
        )


# --------------------------------------------------------------------------- its cache rule


class BreakpointCacheModel:
    """The breakpoint engine's store, as the harness predicts it: all or nothing at the marker.

    A prompt's stable part (its tokens before the marker) is served whole when an earlier
    request stored the very same stable part, and not at all otherwise: a stable part that
    differs from a stored one in its last token gets nothing, where APC
    (``harness.prefix.PrefixCacheModel``) would still serve the whole blocks before the change.
    Like that model it assumes nothing was evicted; the engine's own count shows when that fails.

    Token IDs alone do not say where the marker was (it is stripped before tokenizing), so the
    model asks ``stable_tokens``, the backend that rendered the prompt.
    """

    def __init__(self, stable_tokens: Callable[[Sequence[int]], int]) -> None:
        self._stable_tokens = stable_tokens
        self._stored: list[tuple[int, ...]] = []  # stable parts, in the order stored
        self._keys: set[tuple[int, ...]] = set()

    def __len__(self) -> int:
        return len(self._stored)

    def sequence(self, index: int) -> tuple[int, ...]:
        """The ``index``-th stored stable part (-1: the latest)."""
        return self._stored[index]

    def predict(self, prompt: Sequence[int]) -> Prediction:
        """``common_prefix``/``source``: the stored stable part sharing the longest prefix with
        ``prompt`` (the most recent on a tie), which says where a miss left the cache."""
        stable = self._stable_tokens(prompt)
        common, source = 0, None
        for index, stored in enumerate(self._stored):
            shared = common_prefix_len(prompt, stored)
            if source is None or shared >= common:
                common, source = shared, index
        cached = stable if stable and tuple(prompt[:stable]) in self._keys else 0
        return Prediction(len(prompt), common, cached, source)

    def record(self, prompt: Sequence[int], output: Sequence[int] = ()) -> None:
        """Remember the stable part the engine stored for ``prompt`` (never the question or the
        output: the engine keeps only the KV before the marker)."""
        stable = tuple(prompt[: self._stable_tokens(prompt)])
        if stable and stable not in self._keys:
            self._keys.add(stable)
            self._stored.append(stable)


# --------------------------------------------------------------------------- as a Backend


def _plain(options: RequestOptions | None) -> None:
    if options is not None:
        raise ValueError("the breakpoint engine renders plain chats: no tools, prefill or constraint")


class BreakpointBackend:
    """The breakpoint engine behind the harness's ``Backend`` protocol, so the one measuring step
    (``harness.measure.run_variant``) predicts, sends and records its requests exactly as it does
    vLLM's, with ``BreakpointCacheModel`` as the prediction.

    Requests keep their marker (this engine needs it). ``replies`` holds the current variant's
    full replies, in order: what the common ``Reply`` has no room for (warnings, where the marker
    cut, the changed stable part), and what ``check_exactness`` compares.
    """

    def __init__(self, engine: ManualCacheEngine, display_name: str) -> None:
        self.engine = engine
        # No blocks (block_size 0) and no vLLM: the fields say what the engine is not.
        self.info = EngineInfo("transformers", display_name, "cpu", 0, "none")
        self.replies: list[ManualReply] = []
        self._stable: dict[tuple[int, ...], int] = {}  # prompt IDs -> where its marker cut

    def render(self, messages: Sequence[Message], options: RequestOptions | None = None) -> list[int]:
        _plain(options)
        prompt = self.engine.prepare(messages)
        self._stable[tuple(prompt.token_ids)] = prompt.prefix_len
        return list(prompt.token_ids)

    def stable_tokens(self, prompt_ids: Sequence[int]) -> int:
        """Where the marker cut a prompt this backend rendered (0: no stable part)."""
        try:
            return self._stable[tuple(prompt_ids)]
        except KeyError:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens this backend never rendered") from None

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.engine.decode(token_ids)

    def annotate(self, records: Sequence[RequestRecord]) -> None:
        """Add to this variant's records (the JSON's per-request fields) where each prompt's
        marker cut and the engine's warnings."""
        for record, reply in zip(records, self.replies, strict=True):
            record.extra["stable_tokens"] = reply.prefix_tokens
            if reply.warnings:
                record.extra["warnings"] = list(reply.warnings)

    def start_variant(self) -> None:
        self.engine.reset()
        self.replies = []
        self._stable.clear()

    def generate(
        self,
        messages: Sequence[Message],
        max_tokens: int = 1,
        cache_salt: str | None = None,
        read_cache: bool = True,
        options: RequestOptions | None = None,
    ) -> Reply:
        """One request; ``read_cache=False`` is the full recompute (``generate_uncached``)."""
        _plain(options)
        if cache_salt:
            raise ValueError("the breakpoint engine has one store: cache_salt is not supported")
        if read_cache:
            reply = self.engine.generate(messages, max_new_tokens=max_tokens)
        else:
            reply = self.engine.generate_uncached(messages, max_new_tokens=max_tokens)
        self._stable[tuple(reply.prompt_ids)] = reply.prefix_tokens
        self.replies.append(reply)
        return reply.to_reply()

    def cache_model(self) -> CacheModel:
        return BreakpointCacheModel(self.stable_tokens)

    def counters(self) -> PrefixCounters | None:
        return None  # the store counts lookups, not tokens: nothing comparable to vLLM's counters

    def close(self) -> None:
        pass  # the engine belongs to whoever loaded it (tests share one)


# --------------------------------------------------------------------------- exactness


def exactness_sample(cached_tokens: Sequence[int], checks: int) -> list[int]:
    """Which requests to recompute, given each request's cached tokens: ``checks`` of the warm
    ones (those the store served), evenly spread from the first to the last; every request when
    ``checks`` is 0 or nothing was warm, every warm one when ``checks`` covers them.

    A full recompute on transformers costs what a request without caching costs; a few warm
    requests spread over the run show the output does not change."""
    warm = [index for index, cached in enumerate(cached_tokens) if cached > 0]
    if checks == 0 or not warm:
        return list(range(len(cached_tokens)))
    if checks >= len(warm):
        return warm
    if checks == 1:
        return [warm[-1]]
    step = (len(warm) - 1) / (checks - 1)
    return [warm[round(k * step)] for k in range(checks)]


@dataclass(frozen=True)
class Recompute:
    """One request run twice on this engine: with the stored prefix, and with a full prefill."""

    index: int
    identical: bool  # same prompt IDs and same greedy output
    stored_prefix_ttft_ms: float
    full_recompute_ttft_ms: float


@dataclass(frozen=True)
class ExactnessCheck:
    checks: list[Recompute]
    of_requests: int
    new_tokens: int

    @property
    def requests(self) -> int:
        return len(self.checks)

    @property
    def checked(self) -> list[int]:
        return [c.index for c in self.checks]

    @property
    def identical(self) -> int:
        return sum(c.identical for c in self.checks)

    @property
    def all_identical(self) -> bool:
        return self.identical == len(self.checks)

    @property
    def full_recompute_ttft_ms_median(self) -> float:
        return statistics.median(c.full_recompute_ttft_ms for c in self.checks)

    @property
    def stored_prefix_ttft_ms_median(self) -> float:
        return statistics.median(c.stored_prefix_ttft_ms for c in self.checks)

    @property
    def same_engine_speedup(self) -> float:
        """What the stored prefix alone is worth: the same requests, the same engine, with and
        without it (comparing with another engine would mix in how fast each engine is)."""
        stored = self.stored_prefix_ttft_ms_median
        return self.full_recompute_ttft_ms_median / stored if stored else 0.0

    def annotate(self, records: Sequence[RequestRecord]) -> None:
        """Add each check to its request's record (the JSON's per-request fields)."""
        for check in self.checks:
            records[check.index].extra.update(
                identical_to_full_recompute=check.identical,
                full_recompute_ttft_ms=round(check.full_recompute_ttft_ms, 3),
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "checked": self.checked,
            "of_requests": self.of_requests,
            "identical": self.identical,
            "all_identical": self.all_identical,
            "new_tokens": self.new_tokens,
        }

    def same_engine_json(self) -> dict[str, Any]:
        return {
            "engine": "transformers",
            "requests": self.checked,
            "full_recompute_ttft_ms_median": round(self.full_recompute_ttft_ms_median, 3),
            "stored_prefix_ttft_ms_median": round(self.stored_prefix_ttft_ms_median, 3),
            "speedup": round(self.same_engine_speedup, 3),
        }


def check_exactness(
    engine: ManualCacheEngine,
    requests: Sequence[Sequence[Message]],
    replies: Sequence[ManualReply],
    new_tokens: int,
    checks: int,
) -> ExactnessCheck:
    """Run the sampled requests again with a full prefill and no store (``checks`` as in
    ``exactness_sample``); each output must equal the one generated on the stored prefix KV.

    ``replies`` are ``requests``' replies from ``generate``, with ``new_tokens`` new tokens each.
    """
    done: list[Recompute] = []
    for index in exactness_sample([r.cached_tokens for r in replies], checks):
        reply = replies[index]
        baseline = engine.generate_uncached(requests[index], max_new_tokens=new_tokens)
        identical = baseline.prompt_ids == reply.prompt_ids and baseline.output_ids == reply.output_ids
        done.append(Recompute(index, identical, reply.ttft_ms, baseline.ttft_ms))
    return ExactnessCheck(done, len(replies), new_tokens)
