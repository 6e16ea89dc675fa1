"""What the sampler keeps beside a model: the KV cache, on CPU the packed weights, and the compiled step's checks.

    cache = kv_cache(model, batch_size=16, max_len=2048)   # kept for the model's next generation
    session = Session(model, cache)
    logits = session.prefill(slot, prompt_ids)              # one prompt into an empty slot
    logits = session.decode(tokens, positions, length)      # one token for every slot

A cache is a module of non-persistent buffers [batch, kv_heads, length, head_dim] per layer (as
in gpt-fast), so a compiled decode step sees static addresses and CUDA graphs can capture it;
compaction moves rows inside the same buffers. On CPU (fp32, oneDNN) it also holds the layers'
projections fused and prepacked (`PackedLinear`, 1.5-2x faster decoding). The model itself is
never changed. docs/method.md §5.2 has the measurements and what has not run on a GPU yet.
"""

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from lidr.kernels.attention import FLEX_BLOCK, Filled, filled_block_mask
from lidr.model import Llama


# -----------------------------------------------------------------------------
# what a generation keeps beside the model: the KV cache and, on CPU, packed weights


def onednn_available() -> bool:
    """Whether this torch build has the oneDNN linear kernels (every x86 and ARM CPU wheel does)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@torch.library.custom_op("lidr::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, None, "none", [], "")


@packed_linear.register_fake
def _(x, packed_weight):
    return x.new_empty(*x.shape[:-1], packed_weight.shape[0])  # a packed weight keeps its [out, in] size


class PackedLinear(nn.Module):
    """Bias-free nn.Linear weights as one product for CPU inference, on a copy packed once for oneDNN.

    MKL's plain fp32 GEMM reaches a third of the machine's arithmetic rate on the 1- to 16-row
    products of decoding and half its memory bandwidth on one row; oneDNN's kernel over a weight
    prepacked for about `rows` rows is 1.2 to 3x faster on every projection of SmolLM2, and one
    wide product (q/k/v together, gate/up together) streams weights faster than several narrow
    ones (bench/RESULTS.md). The packed copy is an opaque oneDNN tensor held by this module alone.
    """

    def __init__(self, weights: list[torch.Tensor], rows: int):
        super().__init__()
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        # a plain attribute, not a buffer: never saved, moved or cast with the module
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)

    def forward(self, x):
        if torch.compiler.is_compiling():  # inductor cannot lower oneDNN's op itself; as a custom op it calls it
            return packed_linear(x, self.packed_weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, None, "none", [], "")


@dataclass
class CacheState:
    """What every layer's cache must know about the running forward; set by `Session.prefill` and `decode_logits`."""

    slot: int | None = None  # prefill: the slot that the prompt fills; None while decoding
    writes: torch.Tensor | None = None  # within a decode step: [rows * kv_heads] rows of a cache viewed as [-1, head_dim]
    rows: int = 0  # decode: how many slots (the first ones) take part
    length: int = 0  # decode: how many cache positions are attended


class LayerCache(nn.Module):
    """One layer's keys and values for every slot, [batch, kv_heads, length, head_dim], and on CPU
    the layer's projections packed (q/k/v fused, o, gate/up fused, down), read by `Llama.forward`.

    A module with (non-persistent) buffers, as in gpt-fast, so that a compiled decode step treats
    the cache as static addresses and can capture it in a CUDA graph; compaction moves rows inside
    the same buffers, so the addresses never change.
    """

    def __init__(self, state: CacheState, layer, batch_size: int, length: int, pack: bool):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        weight = attn.o_proj.weight
        self.state = state
        shape = (batch_size, attn.n_kv_heads, length, attn.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=weight.dtype, device=weight.device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=weight.dtype, device=weight.device), persistent=False)
        self.qkv_proj = self.o_proj = self.gate_up_proj = self.down_proj = None  # None: the model's own layers run
        if pack:
            self.qkv_proj = PackedLinear([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], batch_size)
            self.o_proj = PackedLinear([attn.o_proj.weight], batch_size)
            self.gate_up_proj = PackedLinear([mlp.gate_proj.weight, mlp.up_proj.weight], batch_size)
            self.down_proj = PackedLinear([mlp.down_proj.weight], batch_size)

    def update(self, k, v):
        """Store k, v [b, kv_heads, T, head_dim]; return the keys and values to attend over."""
        state = self.state
        if state.slot is not None:  # prefill into an empty slot: the prompt attends over itself
            T = k.shape[2]
            self.k[state.slot, :, :T] = k[0]
            self.v[state.slot, :, :T] = v[0]
            return k, v
        head_dim = k.shape[-1]
        self.k.view(-1, head_dim).index_copy_(0, state.writes, k.reshape(-1, head_dim))
        self.v.view(-1, head_dim).index_copy_(0, state.writes, v.reshape(-1, head_dim))
        return self.k[: state.rows, :, : state.length], self.v[: state.rows, :, : state.length]

    def keep(self, rows: torch.Tensor):
        """Compact the batch to `rows` (slot indices): they become slots 0 .. len(rows) - 1, in place."""
        self.k[: len(rows)] = self.k[rows]
        self.v[: len(rows)] = self.v[rows]


class KVCache(nn.Module):
    """Everything generating from a model keeps beside it, passed to `Llama.forward` as `cache`: a
    LayerCache per layer and, on CPU, the output projection packed. The model itself is never
    changed, so generations on any number of models can run in one process, one inside another.

    length: positions per slot, a multiple of FLEX_BLOCK. pack: whether the cache holds packed
    copies of the weights (then it serves only while the model's weights stay as they were).
    """

    def __init__(self, model: Llama, batch_size: int, length: int, pack: bool):
        super().__init__()
        self.batch_size, self.length, self.pack = batch_size, length, pack
        self.state = CacheState()
        self.layers = nn.ModuleList(LayerCache(self.state, layer, batch_size, length, pack) for layer in model.layers)
        self.lm_head = PackedLinear([model.lm_head.weight], batch_size) if pack else None
        self.weight_versions = weight_versions(model) if pack else None
        self.in_use = False  # a generation runs on it (another one, started while this one is suspended, gets its own)

    def serves(self, model: Llama, batch_size: int, length: int, pack: bool) -> bool:
        """Whether a generation of batch_size slots and length positions can run on this cache."""
        weight, k = model.embed_tokens.weight, self.layers[0].k
        return (not self.in_use and batch_size <= self.batch_size and length <= self.length and pack == self.pack
                and (weight.dtype, weight.device) == (k.dtype, k.device)  # a model moved or cast since
                and (not pack or weight_versions(model) == self.weight_versions))

    def keep(self, rows: torch.Tensor):
        for layer in self.layers:
            layer.keep(rows)


def weight_versions(model: Llama) -> list[int]:
    """Every parameter's version counter: it moves with each in-place change (an optimizer step, a load)."""
    return [p._version for p in model.parameters()]


def packs(model: Llama) -> bool:
    """Whether a KVCache for this model packs its weights: fp32 on CPU with oneDNN, the dtype measured and
    tested here (oneDNN's bf16 kernels depend on the CPU)."""
    weight = model.embed_tokens.weight
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_available()


CACHES: "weakref.WeakKeyDictionary[Llama, KVCache]" = weakref.WeakKeyDictionary()  # one per model, kept


def kv_cache(model: Llama, batch_size: int, max_len: int, pack: bool | None = None) -> KVCache:
    """The model's KVCache for batch_size slots of max_len positions: allocated once and kept (beside,
    not inside, the model) for the next generation, so that a compiled decode step finds the same
    buffers, and CUDA graphs captured once are replayed by every later call. A cache too small, or
    holding packed copies of weights that changed since, is replaced by one large enough for both
    the old and the new request. pack None: `packs(model)`."""
    pack = packs(model) if pack is None else pack
    length = -(-max_len // FLEX_BLOCK) * FLEX_BLOCK
    cache = CACHES.get(model)
    if cache is not None and cache.serves(model, batch_size, length, pack):
        return cache
    if cache is not None and cache.in_use:  # a generation inside another one, on the same model
        return KVCache(model, batch_size, length, pack)
    if cache is not None:  # the old buffers go before the new ones are allocated
        batch_size, length = max(batch_size, cache.batch_size), max(length, cache.length)
        del CACHES[model], cache
    CACHES[model] = cache = KVCache(model, batch_size, length, pack)
    return cache


def decode_logits(model: Llama, cache: KVCache, tokens, positions, length: int, flex: bool = False):
    """One token per slot: tokens, positions [rows] -> logits [rows, vocab]. Row b has filled its cache
    up to its position; flex: attend through flex attention's block mask over the whole cache
    (compiled, it reads only the filled blocks), else SDPA over the first `length` positions.

    The rows of the cache (viewed as [-1, head_dim]) that the step writes are computed here, from its
    arguments: a tensor kept on the cache would be a static input of the compiled step, and CUDA
    graphs re-record whenever a static input moves (the inputs held fixed are the weights and k, v).
    """
    rows, kv_heads = len(tokens), cache.layers[0].k.shape[1]
    starts = torch.arange(rows * kv_heads, device=tokens.device).view(rows, kv_heads) * cache.length
    state = cache.state
    state.writes, state.rows, state.length = (starts + positions[:, None]).flatten(), rows, length
    lengths = positions + 1
    filled = Filled(lengths, filled_block_mask(lengths, length) if flex else None)
    logits = model(tokens[:, None], positions[:, None], filled, cache=cache)
    state.writes = None  # not kept: compiled, it would be one more output of the graph
    return logits


class Session:
    """A model and a KVCache: prefill a slot, decode a step, compact the batch.

    On CPU (fp32, oneDNN) the cache holds packed copies of the weights (see PackedLinear): a
    process that generates on CPU holds the weights twice while the model lives (`CACHES`).
    """

    def __init__(self, model: Llama, cache: KVCache):
        self.model, self.cache = model, cache

    def prefill(self, slot: int, prompt: torch.Tensor) -> torch.Tensor:
        """Fill `slot` with a prompt [T]; logits [1, vocab] of its last token."""
        self.cache.state.slot = slot
        try:
            return self.model(prompt[None], cache=self.cache)
        finally:
            self.cache.state.slot = None

    def decode(self, tokens, positions, length: int, step_fn=decode_logits, flex: bool = False) -> torch.Tensor:
        """tokens, positions [rows] -> logits [rows, vocab] for slots 0 .. rows - 1; step_fn: decode_logits, or
        it compiled; length: the cache positions attended (the whole cache with flex)."""
        return step_fn(self.model, self.cache, tokens, positions, length, flex)

    def keep(self, rows: torch.Tensor):
        self.cache.keep(rows)


# -----------------------------------------------------------------------------
# the compiled decode step, and the check that CUDA graphs carry it


class CompiledStep:
    """`decode_logits` as generate(compile=True) runs it: compiled with static shapes and fullgraph, on
    CUDA as CUDA graphs (mode "reduce-overhead": one graph recorded per batch shape, then replayed).

    torch compiles a function for at most torch._dynamo.config.recompile_limit (8) shapes per
    process, and under fullgraph the next one raises FailOnRecompileLimitHit (256 slots compact
    through 9 batch shapes): that shape and the rest of the generation then run the eager step.
    """

    def __init__(self, cuda_graphs: bool):
        self.compiled = torch.compile(decode_logits, mode="reduce-overhead" if cuda_graphs else "default",
                                      dynamic=False, fullgraph=True)
        self.shapes: set[tuple[int, int]] = set()  # the (rows, cache length) run compiled
        self.eager = False  # past torch's recompile limit
        self.counts_before = cuda_graph_counts()

    def __call__(self, model: Llama, cache: KVCache, tokens, positions, length: int, flex: bool = False):
        if not self.eager:
            try:
                logits = self.compiled(model, cache, tokens, positions, length, flex)
                self.shapes.add((len(tokens), length))
                return logits
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                self.eager = True
        return decode_logits(model, cache, tokens, positions, length)  # SDPA over `length` positions

    def check(self):
        """`check_cuda_graphs` since this step was made: one graph per batch shape it has run compiled."""
        check_cuda_graphs(self.counts_before, graphs=len(self.shapes))


def cuda_graph_skips() -> int:
    """How many times inductor has run a compiled graph without CUDA graphs in this process (torch >= 2.4
    counts them; 0 where it does not)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def cuda_graph_partitions() -> int:
    """How many partitions inductor has split graphs into for CUDA graphs in this process: graph partition
    (torch >= 2.9's default) runs the ops CUDA graphs cannot capture outside them, between captured
    parts, instead of skipping the graph. Counted as it compiles (a graph read from inductor's cache is not)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_partitions"]


RECORDED = [0]  # CUDA graphs recorded, counted by `count_recording`


def count_recording(args):
    """A dynamo callback, run as a compilation or a CUDA-graph recording starts: counts the recordings."""
    if args.callback_trigger.name == "CUDAGRAPH_RECORDING":
        RECORDED[0] += 1


def cuda_graph_recordings() -> int:
    """How many CUDA graphs inductor's CUDA-graph trees have recorded in this process (0 on CPU), counted by
    the callback that they run as each recording starts (CallbackTrigger.CUDAGRAPH_RECORDING of
    torch._dynamo.callback), which this function registers: counted from its first call on (and from
    the next call on again after torch._dynamo.reset(), which drops callbacks)."""
    from torch._dynamo.callback import callback_handler

    if count_recording not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(count_recording)
    return RECORDED[0]


def cuda_graph_counts() -> tuple[int, int, int]:
    """(skips, partitions, recordings) so far in this process: what `check_cuda_graphs` counts from."""
    return cuda_graph_skips(), cuda_graph_partitions(), cuda_graph_recordings()


def check_cuda_graphs(before: tuple[int, int, int], graphs: int):
    """Fail loudly when CUDA graphs do not carry the compiled decode step (compile=True on CUDA), counting
    from `before` (`cuda_graph_counts()` when the step was made): inductor ran a graph without them, split one
    so that parts of it run outside them, or more graphs were recorded than `graphs` (one per batch
    shape: more means the step re-records, e.g. a static input moved). A step launched from the host
    loses the speed that compiling is meant to bring; re-recording every step loses more."""
    skips_before, partitions_before, recordings_before = before
    skipped = cuda_graph_skips() - skips_before
    if skipped > 0:
        raise RuntimeError(f"compile=True: inductor ran the decode step without CUDA graphs ({skipped} graph(s) "
                           "skipped); rerun with TORCH_LOGS=perf_hints to see why, or generate without compile")
    split = cuda_graph_partitions() - partitions_before
    if split > 0:
        raise RuntimeError(f"compile=True: inductor split the decode step into {split} partitions, and ops between "
                           "them run outside CUDA graphs; rerun with TORCH_LOGS=cudagraphs to see which, or "
                           "generate without compile")
    recorded = cuda_graph_recordings() - recordings_before
    if recorded > graphs:
        raise RuntimeError(f"compile=True: {recorded} CUDA graphs recorded for the decode step's {graphs} batch "
                           "shape(s), one each expected: the step re-records; rerun with TORCH_LOGS=cudagraphs "
                           "to see why, or generate without compile")
