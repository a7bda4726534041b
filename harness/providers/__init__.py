"""What the same request log costs on each hosted provider, under that provider's prompt-caching rules.

The lessons show one rule on a self-hosted vLLM engine: the KV of a prompt's longest cached
prefix is reused, in whole blocks (``harness.prefix``). Hosted APIs sell the same mechanism with
their own rules and a discount on the cached tokens, so the way an agent writes its prompts sets
its bill as well as its latency. This package replays a log under each provider's rules, as
documented by the provider, and prices every request.

The rules, as implemented (sources, dates and what could not be verified: ``docs/providers.md``
and ``harness/data/providers.json``):

OpenAI, GPT-5.6 and later (``openai_breakpoints``)
    Automatic. A breakpoint at the end of the latest *eligible* message (a user message, the
    last tool response of a consecutive group, the last developer message of the initial group),
    plus explicit ``prompt_cache_breakpoint`` markers (here: a ``Segment.cache_control``); at most
    4 cache writes per request. A request reads the longest prefix ending at one of its lookup
    boundaries (its breakpoints, up to 20 earlier eligible message endings, the end of the
    initial developer block) that an earlier request wrote. Minimum 1,024 tokens. Writes cost
    1.25x the input price, reads 0.1x or less (per model); entries live 30 minutes after their
    last write or read. Requests with different ``prompt_cache_key`` never share a cache.
OpenAI, earlier models (``openai_prefix``)
    Automatic, from 1,024 prompt tokens, in 128-token increments (GPT-5.5: 2,048-token steps);
    writes are free, reads are the model's cached-input price. Lifetime about 30 minutes with
    24h retention (the default for organizations without Zero Data Retention), 5-10 minutes
    in memory; simulated as 30 minutes.
Anthropic (``anthropic``)
    Explicit. The prefix tools -> system -> messages up to a block marked ``cache_control`` (or,
    with a top-level ``cache_control``, the last block) is written; each breakpoint looks back at
    most 20 blocks, itself included, for an entry an *earlier request wrote* (never for stable
    content it did not write); at most 4 breakpoints (a 5th is a 400 error); a prefix below the
    model's minimum (512 to 4,096 tokens) is not cached. 5-minute writes cost 1.25x the input
    price, 1-hour writes 2x, reads 0.1x (0.05x on Opus 5.5 and Sonnet 5.5, 0.025x on Fable 5.1).
    Lifetime 5 minutes or 1 hour from the start of the last request that wrote or read the entry.
Google Gemini (``gemini_implicit``)
    Implicit caching: automatic, no write charge, from a per-model minimum (2,048 or 4,096
    tokens); the cached tokens are billed at the model's cached price. Granularity and lifetime
    are not documented: simulated token by token, never expiring.
The other providers reuse these families with their own numbers (``docs/providers.md`` has the
full table): Azure OpenAI the two OpenAI ones; Bedrock ``cachePoint`` checkpoints (Claude, Nova)
and Alibaba's explicit cache the Anthropic one (Nova without lookback or tool checkpoints, Alibaba
keeping the last 4 of more markers); Mistral (64-token blocks), xAI (whole leading messages),
Kimi (paid 5-minute writes) the automatic prefix; Alibaba's implicit cache and Z.ai the
token-granular one. Alibaba serves a request without a marker from its implicit cache
(``without_breakpoints``).
DeepSeek (``prefix_units``)
    Disk cache of persisted prefix units: the end of each request's input and output, a common
    prefix seen in two requests, fixed intervals (not stated, not simulated). A request reads only
    the longest unit it matches *in full*; writes are free.
vLLM, SGLang (``engine``)
    Self-hosted: the explainer simulates them exactly with the model's own tokenizer. The table
    carries them so a user's ``--prices`` can give them a price for ``price()``.

``--provider openai`` (no model) is the table's default model for that provider (its
``providers`` section; ``PriceTable.entry("openai")``).

Token counts: OpenAI's text tokens are exact (``bpe-openai``: o200k_base, cl100k_base for the
old models; Azure likewise), its chat framing follows OpenAI's cookbook (3 tokens per message
plus the role, 3 priming the reply) because the real framing is not public. The other providers
have no offline tokenizer: their prompts are counted in o200k_base and every result says
``approximate=True``.

A user's prices file (``--prices FILE``) has the shipped table's shape and is merged entry by
entry; an entry it names takes the user's fields over the shipped ones::

    {"models": {
        "vllm:*": {"price": {"input": 0.20, "cache_read": 0.02, "output": 0.80}},
        "anthropic:claude-sonnet-5-5": {"price": {"input": 2.0, "cache_write": 2.5,
                                                  "cache_write_1h": 4.0, "cache_read": 0.1,
                                                  "output": 10.0}},
        "openai:my-finetune": {"rules": "openai-gpt-5.6+", "encoding": "o200k_base",
                               "price": {"input": 3.0, "cache_read": 0.3, "cache_write": 3.75,
                                         "output": 12.0}}}}

Prices are USD per million tokens: ``input`` (uncached), ``output``, ``cache_read``,
``cache_write`` (Anthropic 5m, OpenAI 30m), ``cache_write_1h``; an optional ``long_context``
object (``above_tokens`` plus the same fields) prices the whole request above that prompt length.
"""

from __future__ import annotations

from harness.providers.requests import ProviderRequest, ProviderUsage, Segment
from harness.providers.simulate import Simulation, simulate
from harness.providers.table import (
    DEFAULT_TABLE_PATH,
    LongContext,
    ModelEntry,
    Prices,
    PriceTable,
    RuleSet,
    load_table,
    price,
)
from harness.providers.tokens import count_tokens

__all__ = [
    "DEFAULT_TABLE_PATH",
    "LongContext",
    "ModelEntry",
    "PriceTable",
    "Prices",
    "ProviderRequest",
    "ProviderUsage",
    "RuleSet",
    "Segment",
    "Simulation",
    "count_tokens",
    "load_table",
    "price",
    "simulate",
]
