"""A worker's KV cache of bounded size, evicted the way vLLM v1 evicts it: a simulation.

``prefix.PrefixCacheModel`` assumes a worker keeps everything it ever computed. A real worker
has a fixed number of KV blocks (``num_gpu_blocks``; on CPU ``VLLM_CPU_KVCACHE_SPACE`` decides
it), and once they have all been used, every new block it computes evicts a cached one. This
module replays that, following ``vllm/v1/core/block_pool.py`` and
``single_type_kv_cache_manager.py``:

* a full block is cached under a hash of its tokens chained to every block before it (the
  cache salt mixed into the first), so a block is found only through its whole prefix, and the
  walk stops at the first block that is gone, even if later ones are still there;
* the free queue holds every block no running request uses, in eviction order. Blocks that
  carry no cached content (never used, or a request's last, partial block) are reused first;
  then cached blocks, least recently used first;
* a request first takes its cache hits out of the free queue (at most ``len(prompt) - 1``
  tokens: the last prompt token is always recomputed), then takes the blocks it still needs
  from the head of the queue, evicting whatever those held;
* when it finishes, its blocks go back in reverse order, the chain's tail first: of two blocks
  used by the same request, the one deeper in the prompt is evicted first.

What it assumes: one request at a time per worker (lesson 4's rule, which makes its
predictions exact), so no two requests hold blocks at once; a full-attention model with one
block size (no sliding window, no partial-block cache entries: vLLM adds those only when its
hash block size differs from the block size); no preemption, no KV offloading. A request that
needs more blocks than the worker has cannot run at all, and raises ``CacheTooSmall``.

``BlockPool.namespace(salt)`` is a ``prefix.CacheModel``: the measuring loop
(``measure.Recorder``) drives it the way it drives the unbounded model. With more blocks than a
run ever allocates it predicts exactly what ``PrefixCacheModel`` predicts.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence

from harness.prefix import Prediction, cached_tokens_for

Node = int  # one cached block's content: its tokens, chained to the blocks before it and the salt


class CacheTooSmall(ValueError):
    """A request needs more KV blocks than the whole worker has."""


class BlockPool:
    """``num_blocks`` KV blocks of ``block_size`` tokens, shared by every cache namespace (salt)
    a worker serves. ``num_blocks`` counts usable blocks: vLLM's ``num_gpu_blocks`` minus the
    one it reserves as its null block."""

    def __init__(self, block_size: int, num_blocks: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.evicted_blocks = 0
        self._nodes: dict[tuple[int | str, tuple[int, ...]], Node] = {}  # (parent or salt, tokens) -> node
        # Cached blocks by content: several blocks can hold one content (vLLM recomputes the last
        # full block of a prompt that is cached whole), and a lookup takes the oldest.
        self._holding: dict[Node, list[int]] = {}
        # The free queue is [blocks without content][cached blocks, least recently used first];
        # the first part is interchangeable, so a count stands for it.
        self._empty_free = num_blocks
        self._lru: OrderedDict[int, Node] = OrderedDict()  # free cached block id -> its content
        self._next_block_id = 0
        self._views: dict[str, PoolNamespace] = {}

    def namespace(self, salt: str) -> PoolNamespace:
        """The cache as requests with this ``cache_salt`` see it (a ``prefix.CacheModel``)."""
        if salt not in self._views:
            self._views[salt] = PoolNamespace(self, salt)
        return self._views[salt]

    @property
    def cached_blocks(self) -> int:
        return sum(len(blocks) for blocks in self._holding.values())

    def _chain(self, salt: str, tokens: Sequence[int], create: bool) -> list[Node]:
        """The nodes of the full blocks of ``tokens``, as far as they exist (all, with ``create``)."""
        b, parent = self.block_size, f"salt:{salt}"
        nodes: list[Node] = []
        for start in range(0, len(tokens) - len(tokens) % b, b):
            key = (parent, tuple(tokens[start : start + b]))
            node = self._nodes.get(key)
            if node is None:
                if not create:
                    break
                node = self._nodes[key] = len(self._nodes)
            nodes.append(node)
            parent = node
        return nodes

    def hit_blocks(self, salt: str, prompt: Sequence[int]) -> int:
        """How many leading full blocks of ``prompt`` the worker would serve from its cache."""
        limit = (len(prompt) - 1) // self.block_size if prompt else 0
        hits = 0
        for node in self._chain(salt, prompt[: limit * self.block_size], create=False):
            if not self._holding.get(node):
                break
            hits += 1
        return hits

    def serve(self, salt: str, computed: Sequence[int], prompt_len: int) -> None:
        """Run one request: ``computed`` is every token whose KV it computes or reuses (the prompt
        and the generated tokens but the last), of which the first ``prompt_len`` are the prompt."""
        b = self.block_size
        nodes = self._chain(salt, computed, create=True)
        hits = self.hit_blocks(salt, computed[:prompt_len])
        hit_ids = [self._holding[node][0] for node in nodes[:hits]]
        for block in hit_ids:  # touched: in use now, out of the free queue
            self._lru.pop(block, None)
        needed = -(-len(computed) // b) - hits
        if needed > self._empty_free + len(self._lru):
            raise CacheTooSmall(
                f"a request of {prompt_len} tokens needs {needed + hits} blocks of {b}; "
                f"the worker has {self.num_blocks}"
            )
        taken_empty = min(needed, self._empty_free)
        self._empty_free -= taken_empty
        for _ in range(needed - taken_empty):
            block, node = self._lru.popitem(last=False)
            self._holding[node].remove(block)
            self.evicted_blocks += 1
        new_ids: list[int] = []
        for node in nodes[hits:]:  # every new full block is cached as soon as it is computed
            block = self._next_block_id
            self._next_block_id += 1
            self._holding.setdefault(node, []).append(block)
            new_ids.append(block)
        # Freed tail first: the partial last block (no content) goes to the front of the queue,
        # the cached ones to the back, deepest first.
        self._empty_free += needed - len(new_ids)
        for block, node in reversed(list(zip(hit_ids + new_ids, nodes, strict=True))):
            self._lru[block] = node


class PoolNamespace:
    """One cache namespace of a ``BlockPool``, as a ``prefix.CacheModel``."""

    def __init__(self, pool: BlockPool, salt: str) -> None:
        self.pool = pool
        self.salt = salt
        self._seen: list[array[int]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def sequence(self, index: int) -> array[int]:
        return self._seen[index]

    def predict(self, prompt: Sequence[int]) -> Prediction:
        """Block-granular: ``common_prefix`` is where the cached chain ends, not the exact token
        (the bounded model is for counting hits, not for showing divergences)."""
        hits = self.pool.hit_blocks(self.salt, prompt)
        common = hits * self.pool.block_size
        return Prediction(
            len(prompt), common, cached_tokens_for(len(prompt), common, self.pool.block_size), None
        )

    def record(self, prompt: Sequence[int], output: Sequence[int] = ()) -> None:
        computed = array("q", prompt)
        computed.extend(output[:-1])  # the last sampled token's KV is never computed
        self.pool.serve(self.salt, computed, len(prompt))
        self._seen.append(computed)
