"""The sampler: batched, KV-cached generation from a `Llama`, the engine behind every lidr stage.

    from lidr.sampler import generate
    from lidr.settings import Decoding
    decoding = Decoding(max_new_tokens=2400, repetition_penalty=1.1)
    outs = generate(model, tokenizer, [tokenizer.encode_chat(chat) for chat in chats], decoding, ("</translated>",))
    outs[0].text, outs[0].tokens, outs[0].finish_reason    # "stop_token" | "stop_string" | "length"

    python generate.py --model DIR --prompts IN.jsonl --out OUT.jsonl       # the command line over it

How it works. The batch is a fixed number of slots, each owning one row of a KV cache
preallocated per layer as [batch, kv_heads, length, head_dim]. A waiting prompt is prefilled
alone into a free slot (no padding: positions 0..T-1, plain causal attention). Then each step
decodes one token for every slot at once: a slot writes its k, v at its own position and attends
over the positions it has filled. A finished row (stop token, stop string, max_new_tokens) hands
its slot to the next waiting prompt; once no prompt waits and half the slots are idle, the batch
is compacted to the live rows (moved to the first slots, inside the same buffers). Both forwards
are the model's own (`Llama.forward` with `cache=`): the cache, and on CPU the packed weights,
live in a KVCache beside the model, so the caller's model is never changed, even by a generation
that fails, and any number of generations (of one model or several) can share a process. Sampled
tokens stay on the device; the host reads them every SYNC_EVERY steps, or when a row reaches
max_new_tokens, to find stops, so a finished row wastes at most SYNC_EVERY - 1 steps of its slot.
Stop strings are found incrementally: each read decodes only the new tokens and searches only the
text a new match could lie in, linear in the output (`stop_string_end`). On CPU the weights are
repacked for the generation (see PackedLinear): q/k/v and gate/up become one product each, run
by oneDNN on a prepacked copy, which is what makes decoding on CPU 1.5 to 2x faster than with the
model's own nn.Linear layers.

One KV cache per model, kept. `kv_cache` allocates a model's cache once, for batch_size slots and
a length rounded up to FLEX_BLOCK, and keeps it beside the model (a weak reference: it goes with
the model) for the next `generate` call, which reuses it when it fits (else it is replaced by one
large enough for both). A compiled decode step thus finds the same buffers at every call, and on
CUDA the graphs it captured once are replayed by every later generation.

Which attention runs where (lidr.model.decode_attention). Eager (the default, CPU and CUDA): a
step attends over the filled part of the cache rounded up to LENGTH_BUCKET, through one masked
SDPA call with the query heads that share a kv head as that head's query rows (GQA without
copying k and v; a plain masked call, which CUDA can run with its memory-efficient kernel, where
a mask with `enable_gqa` gets the math kernel; not yet measured on a GPU). Compiled (`compile=True`, `fullgraph=True`), every shape of the decode
step is static: the batch is batch_size slots, or the smallest power of two that holds every
prompt if that is fewer; compaction keeps a power of two of slots (idle ones fill it up). On CUDA
the step attends through flex attention with a block mask built from the rows' lengths: it
reads only each row's filled blocks, and the mask is tensors, not shapes, so one graph per batch
size serves every length and CUDA graphs (mode "reduce-overhead") capture it; if inductor skips
CUDA graphs, the generation stops with an error (`check_cuda_graphs`). On CPU the compiled step
runs the grouped SDPA over the whole cache. A generation compiles at most 1 + log2(batch) graphs,
each once per process (torch stops compiling a function after 8 graphs, and the step then runs
eager). Length buckets were the other way to read less than the whole cache; compiled, each
bucket is another graph (and another CUDA graph), which the recompile limit does not allow.

Sampling follows vLLM's order and meaning: repetition penalty over the prompt and the generated
tokens (a seen token's logit l becomes l / r if l > 0 else l * r), temperature (0 = greedy
argmax), top-k, top-p (keep the smallest set of most likely tokens whose probability reaches p),
then a draw from the row's own generator (seeded per request: `seed + i` for prompt i unless
`seeds` says otherwise), so a request samples the same tokens alone or in any batch. The settings
are a `lidr.settings.Decoding` (its `system` belongs to the prompt, and the sampler ignores it).

How this departs from the reference (transformers' `generate`, vLLM):
- Prompts are prefilled one at a time, unpadded, instead of as a padded batch: padding cannot
  change an output, at the price of less parallel prefill (a small share of LIDR's long outputs).
- A stop string ends the row at the token that completes it: `tokens` keeps that token, `text`
  is cut before the stop string. A stop token is dropped from both. Prefilled assistant text is
  part of the prompt and not of the completion.
- The compiled path (`compile=True`) has not been measured on a GPU in this repository yet. On
  CPU it runs the packed products as a custom op and fuses the small ops around them: ~10%
  faster than eager for SmolLM2 once compiled (about as fast at batch 16), after 10-60 s of
  compilation per batch size (cached on disk by inductor for later processes), and slower than
  eager for long outputs, since it attends over the whole cache: off by default.
"""

import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from lidr.model import FLEX_BLOCK, Filled, Llama, filled_block_mask, flex_attention
from lidr.progress import Progress
from lidr.settings import Decoding

SYNC_EVERY = 8  # decode steps between two reads of the sampled tokens by the host
LENGTH_BUCKET = 64  # eager decode attends over the cache in multiples of this many positions
STOP_CONTEXT = 4  # tokens decoded before the new ones, so that a decoder's rules at a text's start do not apply
FINISH_REASONS = ("stop_token", "stop_string", "length")


def check_stop_strings(stop_strings):
    """Refuse, in a sentence, stop strings the sampler cannot follow (a Decoding checks its own values)."""
    if isinstance(stop_strings, str) or not all(isinstance(s, str) and s for s in stop_strings):
        raise ValueError(f"stop_strings must be a sequence of non-empty strings, got {stop_strings!r}")


@dataclass
class Completion:
    tokens: list[int]  # generated ids, without the stop token
    text: str  # decoded, cut before the stop string
    finish_reason: str  # "stop_token" | "stop_string" | "length"

    def __post_init__(self):
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")


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
    """What every layer's cache must know about the running forward; set by the Session."""

    slot: int | None = None  # prefill: the slot that the prompt fills; None while decoding
    writes: torch.Tensor | None = None  # decode: [rows * kv_heads] rows of a cache viewed as [-1, head_dim]
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
        self.in_use = False  # a generation runs on it (another one, started from on_finish, gets its own)

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
    (compiled, it reads only the filled blocks), else SDPA over the first `length` positions."""
    lengths = positions + 1
    filled = Filled(lengths, filled_block_mask(lengths, length) if flex else None)
    return model(tokens[:, None], positions[:, None], filled, cache=cache)


class Session:
    """A model and a KVCache: prefill a slot, decode a step, compact the batch.

    On CPU (fp32, oneDNN) the cache holds packed copies of the weights (see PackedLinear): a
    process that generates on CPU holds the weights twice while the model lives (`CACHES`).
    """

    def __init__(self, model: Llama, cache: KVCache):
        self.model, self.cache = model, cache
        # the row of a cache viewed as [-1, head_dim] where slot s, kv head h starts: (s * kv_heads + h) * length
        # (compaction keeps slots 0..n-1, so the first n rows stay right)
        n_kv_heads = model.cfg.n_kv_heads
        device = model.embed_tokens.weight.device
        slots = torch.arange(cache.batch_size * n_kv_heads, device=device).view(cache.batch_size, -1)
        self.row_starts = slots * cache.length

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
        state = self.cache.state
        state.writes = (self.row_starts[: len(tokens)] + positions[:, None]).flatten()  # for every layer
        state.rows, state.length = len(tokens), length
        return step_fn(self.model, self.cache, tokens, positions, length, flex)

    def keep(self, rows: torch.Tensor):
        self.cache.keep(rows)


def cuda_graph_skips() -> int:
    """How many times inductor has run a compiled graph without CUDA graphs in this process (torch >= 2.4
    counts them; 0 where it does not)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def check_cuda_graphs(skips_before: int):
    """Fail loudly when inductor skipped CUDA graphs for the decode step (compile=True on CUDA): a step
    would then launch every kernel from the host, the slowdown that compiling is meant to remove."""
    skipped = cuda_graph_skips() - skips_before
    if skipped > 0:
        raise RuntimeError(f"compile=True: inductor ran the decode step without CUDA graphs ({skipped} graph(s) "
                           "skipped); rerun with TORCH_LOGS=perf_hints to see why, or generate without compile")


# -----------------------------------------------------------------------------
# sampling: repetition penalty, temperature, top-k, top-p, a per-row draw


def apply_repetition_penalty(logits, seen, penalty: float):
    """vLLM/transformers: a seen token's logit l becomes l / penalty if l > 0, else l * penalty."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k_top_p(logits, top_k: int, top_p: float):
    """Set to -inf every logit outside the top k, then outside the smallest set reaching probability top_p."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
        drop = mass_before >= top_p
        drop[:, 0] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits, seen, decoding: Decoding, generators: list):
    """Next tokens [b] from logits [b, vocab] (fp32 arithmetic); seen [b, vocab] marks prompt and output tokens."""
    logits = logits.float()
    if decoding.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, decoding.repetition_penalty)
    if decoding.temperature == 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / decoding.temperature, decoding.top_k, decoding.top_p)
    probs = logits.softmax(-1)
    # the exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i;
    # each row draws from its own generator so its tokens do not depend on the batch
    noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=g) for g in generators])
    return (probs / noise).argmax(-1)


# -----------------------------------------------------------------------------
# the generation loop


def power_of_two_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


def find_stop_string(text: str, stop_strings) -> int:
    """Index of the earliest stop string in text, or -1."""
    found = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(found, default=-1)


class Row:
    """One request in a slot: its host-side tokens and counters."""

    def __init__(self, index: int, prompt_len: int):
        self.index, self.prompt_len = index, prompt_len
        self.tokens: list[int] = []
        self.count = 1  # tokens sampled so far, including those the host has not read yet
        self.pending: list[int] = []  # sampled on the device, read at the last sync, not yet checked
        # stop strings: tokens[:complete] decode to whole characters, of which `recent` holds the last few
        self.complete = 0
        self.recent = ""

    @property
    def position(self) -> int:  # where the latest sampled token is written by the next decode step
        return self.prompt_len + self.count - 1


def stop_string_end(row: Row, tokenizer, stop_strings, start: int) -> int | None:
    """The smallest end > start such that row.tokens[:end] decodes to a text holding a stop string, or
    None; every shorter prefix is known to hold none.

    Linear in the output: each new token decodes only the tokens after the last complete character
    (and STOP_CONTEXT before them), and the search covers only the text that could hold a new
    match: the last len(longest stop) - 1 complete characters and what follows them. (A run of
    bytes that never form a UTF-8 character keeps the tokens after it from counting as complete.)
    """
    longest = max(map(len, stop_strings))
    for end in range(start + 1, len(row.tokens) + 1):
        context = max(0, row.complete - STOP_CONTEXT)
        before = tokenizer.decode(row.tokens[context : row.complete])
        text = tokenizer.decode(row.tokens[context:end])
        if text.startswith(before):
            new = text[len(before):]
            window = row.recent + new
        else:  # a decoder whose rules rewrote the context: the whole text, as it decodes
            window = new = tokenizer.decode(row.tokens[:end])
        if find_stop_string(window, stop_strings) >= 0:
            return end
        if not new.endswith("\ufffd"):  # a character split across tokens decodes as U+FFFD until it is whole
            row.complete, row.recent = end, window[-(longest - 1):] if longest > 1 else ""
    return None


def finished_completion(row: Row, tokenizer, decoding: Decoding, stop_strings, stop_ids) -> Completion | None:
    """Consume row.pending: the row's Completion if it has finished, else None."""
    new, stopped = [], False
    for token in row.pending:
        if token in stop_ids:
            stopped = True
            break
        new.append(token)
    row.pending = []
    start = len(row.tokens)
    row.tokens.extend(new)
    if stop_strings and new:
        end = stop_string_end(row, tokenizer, stop_strings, start)
        if end is not None:  # the tokens end with the one that completed the stop string
            tokens = row.tokens[:end]
            text = tokenizer.decode(tokens)
            return Completion(tokens, text[: find_stop_string(text, stop_strings)], "stop_string")
    if stopped:
        return Completion(row.tokens, tokenizer.decode(row.tokens), "stop_token")
    if len(row.tokens) >= decoding.max_new_tokens:
        return Completion(row.tokens, tokenizer.decode(row.tokens), "length")
    return None


@torch.inference_mode()
def generate(
    model: Llama,
    tokenizer,
    prompts: list[list[int]],
    decoding: Decoding,
    stop_strings=(),
    batch_size: int = 16,
    progress: bool = False,
    seeds: list[int] | None = None,
    on_finish=None,
    compile: bool = False,
) -> list[Completion]:
    """One Completion per prompt (token ids), in input order.

    decoding: max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed (its `system` is
    the prompt's business, not the sampler's). stop_strings: a row ends at the token that completes
    one. seeds: one per prompt (default decoding.seed + i). on_finish(i, completion) is called as
    each row finishes (rows finish out of order). compile: torch.compile the decode step (see the
    module docstring). progress: rows done and tokens/s on stderr (`lidr.progress.Progress`: a bar
    on a terminal, a plain line now and then in a log file).
    """
    check_stop_strings(stop_strings)
    vocab = model.cfg.vocab_size
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
        if not 0 <= min(prompt) <= max(prompt) < vocab:
            raise ValueError(f"prompt {i} holds token id {min(prompt) if min(prompt) < 0 else max(prompt)}, "
                             f"outside the model's vocabulary of {vocab}")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    if not prompts:
        return []
    stop_strings = tuple(stop_strings)
    seeds = [decoding.seed + i for i in range(len(prompts))] if seeds is None else seeds
    device = model.embed_tokens.weight.device
    stop_ids = frozenset(tokenizer.stop_ids)
    # compiled: static shapes, a power of two of slots unless batch_size says fewer (see the docstring)
    batch_size = max(1, min(batch_size, power_of_two_at_least(len(prompts)) if compile else len(prompts)))
    step_fn, flex, cuda_graphs = decode_logits, False, compile and device.type == "cuda"
    if compile:
        flex = device.type == "cuda" and flex_attention is not None
        step_fn = torch.compile(decode_logits, mode="reduce-overhead" if cuda_graphs else "default",
                                dynamic=False, fullgraph=True)
    skips_before = cuda_graph_skips() if cuda_graphs else 0
    max_len = max(map(len, prompts)) + decoding.max_new_tokens

    results: list[Completion | None] = [None] * len(prompts)
    waiting = list(range(len(prompts)))[::-1]  # popped from the end: input order
    rows: list[Row | None] = [None] * batch_size  # the request in each slot
    generators = [torch.Generator(device) for _ in range(batch_size)]
    tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # the latest sampled token per slot
    positions = torch.zeros(batch_size, dtype=torch.long, device=device)
    live = torch.zeros(batch_size, dtype=torch.long, device=device)  # 1 for slots holding a running row
    seen = torch.zeros(batch_size, vocab, dtype=torch.bool, device=device)  # for the repetition penalty
    recent = torch.zeros(batch_size, SYNC_EVERY, dtype=torch.long, device=device)
    bar = Progress(len(prompts), "generate", enabled=progress)  # a bar on a terminal, plain lines in a log
    start, n_generated = time.perf_counter(), 0

    def finish(slot: int, completion: Completion):
        nonlocal n_generated
        row = rows[slot]
        results[row.index] = completion
        rows[slot] = None
        n_generated += row.count
        if on_finish is not None:
            on_finish(row.index, completion)
        bar.update(1, **{"tok/s": n_generated / (time.perf_counter() - start)})

    def fill(session: Session, slot: int):
        """Prefill waiting prompts into an empty slot until one is still running (or none waits)."""
        while rows[slot] is None and waiting:
            index = waiting.pop()
            prompt = torch.tensor(prompts[index], dtype=torch.long, device=device)
            rows[slot] = Row(index, len(prompt))
            generators[slot].manual_seed(seeds[index])
            seen[slot] = False
            seen[slot, prompt] = True
            logits = session.prefill(slot, prompt)
            first = sample(logits, seen[slot : slot + 1], decoding, generators[slot : slot + 1])
            tokens[slot] = first[0]
            seen[slot, first[0]] = True
            positions[slot] = len(prompt)
            rows[slot].pending = [int(first[0])]
            done = finished_completion(rows[slot], tokenizer, decoding, stop_strings, stop_ids)
            if done is not None:
                finish(slot, done)
        live[slot] = rows[slot] is not None

    cache = kv_cache(model, batch_size, max_len)  # kept for the next generation; nothing in `model` changes
    cache.in_use = True
    try:
        session = Session(model, cache)
        for slot in range(batch_size):
            fill(session, slot)
        step = 0
        while any(rows):
            running = [row for row in rows if row is not None]
            length = cache.length
            if not compile:  # attend over the filled part of the cache, rounded up to a bucket
                filled = max(row.position for row in running) + 1
                length = min(cache.length, -(-filled // LENGTH_BUCKET) * LENGTH_BUCKET)
            logits = session.decode(tokens, positions, length, step_fn, flex)
            tokens = sample(logits, seen, decoding, generators)
            seen.scatter_(1, tokens[:, None], True)
            recent[:, step] = tokens
            positions = positions + live  # an idle slot rewrites its last position
            for row in running:
                row.count += 1
            step += 1
            if step < SYNC_EVERY and all(r.count < decoding.max_new_tokens for r in running):
                continue
            # the host reads the sampled tokens: stops, refills, compaction
            sampled = recent[:, :step].tolist()
            step = 0
            if cuda_graphs:
                check_cuda_graphs(skips_before)
            for slot, row in enumerate(rows):
                if row is None:
                    continue
                row.pending = sampled[slot]
                done = finished_completion(row, tokenizer, decoding, stop_strings, stop_ids)
                if done is not None:
                    finish(slot, done)
                    fill(session, slot)
            running_slots = [slot for slot, row in enumerate(rows) if row is not None]
            # compiled: keep a power of two of slots (idle ones fill it up), so that few shapes are compiled
            n_keep = power_of_two_at_least(len(running_slots)) if compile else len(running_slots)
            if not waiting and running_slots and n_keep <= len(rows) // 2:
                idle_slots = [slot for slot, row in enumerate(rows) if row is None]
                keep = running_slots + idle_slots[: n_keep - len(running_slots)]
                index = torch.tensor(keep, device=device)
                session.keep(index)
                rows = [rows[slot] for slot in keep]
                generators = [generators[slot] for slot in keep]
                tokens, positions, live, seen = tokens[index], positions[index], live[index], seen[index]
                recent = recent[index]
    finally:
        cache.in_use = False
    bar.close()
    return results
