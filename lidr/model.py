"""The Llama model: one implementation for Llama 3, 3.1, 3.2 and any HF `LlamaForCausalLM` config.

    from lidr.checkpoint import load
    model, tokenizer = load("path/to/hf_folder", device="cpu", dtype=torch.float32)
    logits = model(tokens)                       # LongTensor [B, T] -> logits [B, T, vocab]

Covers: grouped-query attention (n_kv_heads < n_heads), RoPE with θ from the config, Llama 3.1's
`rope_scaling` of type "llama3", tied input/output embeddings (Llama 3.2 1B/3B, SmolLM2), RMSNorm,
SwiGLU. Parameter names are HF's without the leading "model." (`layers.3.self_attn.q_proj.weight`),
so a checkpoint maps onto the model with no renaming table.

How this departs from the reference (transformers' LlamaForCausalLM):
- RoPE uses HF's rotate-half layout directly (no q/k permutation when loading), and cos/sin are
  computed from the positions in fp32 at every call instead of from a cached table: exact for any
  position, and no 128k-row buffer for Llama 3.1.
- Without explicit positions, a padded batch gets positions counted from each row's first real
  token (left padding works as in `generate`); HF's plain forward counts from the first column.
- Padding queries attend to themselves so that a fully padded row never turns into NaN; their
  outputs are meaningless and must be ignored by the caller (the loss masks them).
- Packed rows (the trainer) can attend through `Documents` instead of a dense [B, T, T] mask: on
  CUDA with flex attention (torch >= 2.5) one compiled flex_attention call per layer under a
  document block mask built once per forward (GQA native, masked blocks skipped); elsewhere one
  causal SDPA call per packed sequence (flash kernels on CUDA). Both compute what the dense
  block-diagonal mask does (tests/test_attention.py: flex's forward on CPU, where torch has no flex
  backward; the per-sequence loop's forward and gradients).
- Decoding one token per row over a KV cache (`Filled`, from lidr.sampler) attends over each row's
  filled positions only and keeps GQA native: the query heads sharing a kv head become one masked
  SDPA call's query rows (a plain masked call, which CUDA can run with its memory-efficient kernel;
  SDPA with `enable_gqa` and a mask gets the math kernel, which upcasts to fp32 and repeats k and
  v), or, in the compiled CUDA step, flex attention reads only the blocks a row has filled
  (`filled_block_mask`). Neither has run on a GPU in this repository yet; on CPU the grouped call
  is 1.2-1.6x faster than the `enable_gqa` one.
- No dropout, no attention/MLP biases, no `pretraining_tp`: configs that ask for them are refused.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional: used on CUDA for unpadded bf16/fp16 batches when the package is importable
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

try:  # torch >= 2.5: block-sparse attention, fused by torch.compile (the GPU machines have 2.11)
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:
    BlockMask = create_block_mask = flex_attention = None


# -----------------------------------------------------------------------------
# config


@dataclass
class LlamaConfig:
    vocab_size: int
    dim: int  # hidden_size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int  # intermediate_size
    head_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # Llama 3.1: {"rope_type": "llama3", "factor": 8.0, ...}
    max_seq_len: int = 8192  # max_position_embeddings
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "LlamaConfig":
        """Read an HF LlamaForCausalLM config dict (transformers 4 or 5 layout)."""
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"{source}: model_type is {hf['model_type']!r}; lidr runs Llama models only")
        for key, allowed in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if hf.get(key, allowed) != allowed:
                raise ValueError(f"{source}: {key}={hf[key]!r} is not supported (lidr expects {allowed!r})")
        if hf.get("pretraining_tp", 1) != 1:
            raise ValueError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported")
        # transformers 5 folds rope_theta and rope_scaling into one `rope_parameters` dict
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", "default") != "default" else hf.get("rope_scaling")
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.pop("type", None))
            if scaling["rope_type"] == "default":
                scaling = None
            elif scaling["rope_type"] != "llama3":
                raise ValueError(f"{source}: rope scaling {scaling['rope_type']!r} is not supported (only 'llama3')")
        n_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_dim=hf["intermediate_size"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", 8192),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    def to_hf(self, dtype: torch.dtype) -> dict:
        """The config.json that transformers' LlamaForCausalLM (v4 and v5) reads."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.ffn_dim,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }


# -----------------------------------------------------------------------------
# rotary position embedding


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """θ^(-2i/d) for i < d/2 in fp32 (as the reference computes it), with Llama 3.1's frequency-dependent rescaling when configured."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low frequencies) are slowed down by `factor`, short ones kept,
    # and the band in between interpolated smoothly
    smooth = (old_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, interpolated, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [B, T, head_dim] for integer positions [B, T], computed in fp32."""
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, T, heads, D]: pairs (i, i + D/2) rotate together (HF's layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


# -----------------------------------------------------------------------------
# attention over packed rows (training)


@dataclass(frozen=True)
class Documents:
    """Sequences packed side by side in each row: row b holds sequences of lengths[b][0], lengths[b][1], ...
    tokens from column 0 on, then padding up to the row's width.

    Attention stays inside a sequence (causal) and never crosses into another; the padding after
    the last sequence attends causally among itself, as one more sequence (its outputs are
    ignored). The same attention as the dense mask `same sequence & key not after query`.
    """

    lengths: tuple[tuple[int, ...], ...]


def document_attention(q, k, v, documents: Documents, enable_gqa: bool) -> torch.Tensor:
    """Causal attention within each packed sequence: q [B, H, T, D], k, v [B, KV, T, D] -> [B, H, T, D].

    One SDPA call per sequence on views of the row (no mask, `is_causal`), so CUDA runs flash
    kernels and nothing of size T² exists: what a variable-length kernel does, written with SDPA
    so that it runs, with gradients, on every device and torch version. The fallback of
    `document_block_mask` (a torch without flex attention).
    """
    T = q.shape[2]
    rows = []
    for b, lengths in enumerate(documents.lengths):
        sizes = [n for n in (*lengths, T - sum(lengths)) if n > 0]
        pieces = zip(*(t[b : b + 1].split(sizes, dim=2) for t in (q, k, v)))
        rows.append(torch.cat([
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=enable_gqa) for qs, ks, vs in pieces
        ], dim=2))
    return torch.cat(rows)


def flex_documents(device: torch.device) -> bool:
    """Whether packed rows attend through flex attention's document mask: on CUDA, where torch has it
    (one fused kernel per layer, GQA native, fully masked blocks skipped, no Python loop over sequences)."""
    return flex_attention is not None and device.type == "cuda"


def document_block_mask(documents: Documents, T: int, device) -> "BlockMask":
    """flex attention's block mask for packed rows of width T: a key is seen by the queries of its
    own sequence at or after it; the padding after a row's last sequence is one more sequence."""
    document_ids = torch.full((len(documents.lengths), T), -1, dtype=torch.long)
    for b, lengths in enumerate(documents.lengths):
        document_ids[b, : sum(lengths)] = torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths))
    document_ids = document_ids.to(device)

    def same_document_causal(b, h, q_idx, kv_idx):
        return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & (kv_idx <= q_idx)

    return create_block_mask(same_document_causal, len(documents.lengths), None, T, T, device=device)


if flex_attention is not None:
    # fused only when compiled (eager flex attention computes every score). The packed width changes
    # from one micro-batch to the next: torch's automatic dynamic shapes compile the first width
    # static and the second one dynamic, once, instead of one graph per width
    compiled_flex_attention = torch.compile(flex_attention)


# -----------------------------------------------------------------------------
# attention over a KV cache (decoding one token per row)


@dataclass(frozen=True)
class Filled:
    """Decoding one token per row over a KV cache whose row b holds keys and values at its first
    lengths[b] positions (the new token's included); block_mask: the same as flex attention's
    mask (`filled_block_mask`), given when the compiled step reads only the filled blocks."""

    lengths: torch.Tensor  # [B] int64
    block_mask: "BlockMask | None" = None


FLEX_BLOCK = 128  # positions per block of flex attention's decode mask; a cache's length is a multiple of it


def filled_block_mask(lengths: torch.Tensor, cache_len: int) -> "BlockMask":
    """The block mask of `Filled` for flex attention over a cache of cache_len positions: row b reads
    blocks 0 .. ceil(lengths[b] / FLEX_BLOCK) - 1 and masks the positions past its length inside
    the last one. Built from tensors only (no shape depends on a length), so a compiled step
    holding it is one static graph that CUDA graphs can capture."""
    n_blocks = cache_len // FLEX_BLOCK
    B = lengths.shape[0]
    kv_num_blocks = ((lengths + FLEX_BLOCK - 1) // FLEX_BLOCK).to(torch.int32).view(B, 1, 1)
    kv_indices = torch.arange(n_blocks, dtype=torch.int32, device=lengths.device).repeat(B, 1, 1, 1)

    def filled(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=FLEX_BLOCK, mask_mod=filled,
                                    seq_lengths=(1, cache_len))


def decode_attention(q, k, v, filled: Filled) -> torch.Tensor:
    """One query per row over its filled cache positions: q [B, H, 1, D], k, v [B, KV, L, D] -> [B, H, 1, D].

    With a block mask: flex attention (GQA native; compiled, it reads only each row's filled
    blocks). Without: the queries that share a kv head become that head's query rows, q viewed as
    [B, KV, H / KV, D], and one masked SDPA call attends over the L positions given: GQA without
    copying k and v, and a plain masked call that CUDA runs with its memory-efficient kernel (SDPA
    with `enable_gqa` and a mask gets the math kernel: an fp32 upcast and a repeat of k and v).
    """
    if filled.block_mask is not None:
        return flex_attention(q, k, v, block_mask=filled.block_mask, enable_gqa=q.shape[1] != k.shape[1])
    B, H, _, D = q.shape
    KV, L = k.shape[1], k.shape[2]
    visible = torch.arange(L, device=q.device) < filled.lengths[:, None]  # [B, L]
    y = F.scaled_dot_product_attention(q.view(B, KV, H // KV, D), k, v, attn_mask=visible[:, None, None, :])
    return y.view(B, H, 1, D)


# -----------------------------------------------------------------------------
# blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 and scale after rounding back, as the reference does for bf16 models
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        if cache is not None and cache.qkv_proj is not None:  # one product, and q and k rotated together
            qkv = cache.qkv_proj(x).view(B, T, H + 2 * KV, D)
            q, k = apply_rope(qkv[:, :, : H + KV], cos, sin).split((H, KV), dim=2)
            v = qkv[:, :, H + KV :]
        else:
            q = apply_rope(self.q_proj(x).view(B, T, H, D), cos, sin)
            k = apply_rope(self.k_proj(x).view(B, T, KV, D), cos, sin)
            v = self.v_proj(x).view(B, T, KV, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if cache is not None:  # store this step's k, v; get back the keys and values to attend over
            k, v = cache.update(k, v)
        o_proj = self.o_proj if cache is None or cache.o_proj is None else cache.o_proj
        gqa = self.n_kv_heads != self.n_heads
        if mask is None and flash_attn_func is not None and x.is_cuda and x.dtype != torch.float32:
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return o_proj(y.reshape(B, T, -1))
        if isinstance(mask, Filled):
            y = decode_attention(q, k, v, mask)
        elif isinstance(mask, Documents):
            y = document_attention(q, k, v, mask, gqa)
        elif BlockMask is not None and isinstance(mask, BlockMask):  # packed rows: `document_block_mask`
            y = compiled_flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x, cache=None):
        if cache is None or cache.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU
        gate, up = cache.gate_up_proj(x).chunk(2, dim=-1)  # one product for both
        return cache.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x), cache)


# -----------------------------------------------------------------------------
# the model


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def init_weights(self, std: float = 0.02):
        """Random weights (tests, benchmarks) and the rope buffer after building on the meta device."""
        self.inv_freq = rope_inv_freq(self.cfg).to(self.embed_tokens.weight.device)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=std)

    def forward(self, tokens, positions=None, attention_mask=None, return_hidden=False, cache=None):
        """tokens [B, T] -> logits [B, T, vocab] (or the final normed hidden states [B, T, dim]).

        attention_mask: optional [B, T], 1/True for real tokens and 0/False for padding (left or
        right). positions: optional [B, T]; by default counted from each row's first real token.
        Packed sequences (the trainer), with explicit positions: attention_mask a `Documents` (the
        sequence lengths of each row), or [B, T(query), T(key)], True where a query may attend a
        key, used as given. Decoding over a cache: a `Filled` (each row's filled cache length).

        cache: while generating (lidr.sampler.KVCache), what the generation keeps beside the
        model. Layer i stores this call's keys and values with `cache.layers[i].update(k, v)` and
        attends over what that returns; where the layer cache holds projections (`qkv_proj`,
        `o_proj`, `gate_up_proj`, `down_proj`, and `cache.lm_head`: the CPU's fused, prepacked
        copies) they run instead of the model's own. With a cache only the last position is
        projected to the vocabulary: logits [B, vocab].
        """
        B, T = tokens.shape
        mask = None
        if isinstance(attention_mask, Documents) and flex_documents(tokens.device):
            mask = document_block_mask(attention_mask, T, tokens.device)  # once for every layer
        elif isinstance(attention_mask, (Documents, Filled)):
            mask = attention_mask
        elif attention_mask is not None and attention_mask.dim() == 3:
            mask = attention_mask.bool()[:, None]  # broadcast over heads
        elif attention_mask is not None:
            real = attention_mask.bool()
            if positions is None:
                positions = (real.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=tokens.device)
            mask = (causal & real[:, None, :]) | eye  # [B, T(query), T(key)]
            mask = mask[:, None]  # broadcast over heads
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        layer_caches = [None] * len(self.layers) if cache is None else cache.layers
        for layer, layer_cache in zip(self.layers, layer_caches):
            x = layer(x, cos, sin, mask, layer_cache)
        if cache is not None:  # generating: the next token's logits only
            x = x[:, -1]
        x = self.norm(x)
        if return_hidden:
            return x
        return self.lm_head(x) if cache is None or cache.lm_head is None else cache.lm_head(x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied weight counts once
