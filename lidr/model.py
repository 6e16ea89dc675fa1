"""The Llama model: one implementation for Llama 3, 3.1, 3.2 and any HF `LlamaForCausalLM` config.

    from lidr.checkpoint import load
    model, tokenizer = load("path/to/hf_folder", device="cpu", dtype=torch.float32)
    logits = model(tokens)                       # LongTensor [B, T] -> logits [B, T, vocab]

Grouped-query attention, RoPE with θ from the config and Llama 3.1's "llama3" rope scaling, tied
embeddings (Llama 3.2 1B/3B, SmolLM2), RMSNorm, SwiGLU. Parameter names are HF's without the
leading "model.", so a checkpoint maps onto the model with no renaming table. Which attention
kernel runs (packed rows, a KV cache, flash) is lidr/kernels/attention.py's choice; what the
sampler keeps beside the model (KV cache, packed CPU weights) is lidr/kernels/cache.py.
How it departs from transformers' LlamaForCausalLM: docs/method.md §5.1.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lidr.kernels.attention import attend, prepare_mask


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
            if not isinstance(scaling, dict):
                raise ValueError(f"{source}: rope_scaling is {scaling!r}; expected an object or null")
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.pop("type", None))
            if scaling["rope_type"] == "default":
                scaling = None
            elif scaling["rope_type"] != "llama3":
                raise ValueError(f"{source}: rope scaling {scaling['rope_type']!r} is not supported (only 'llama3')")
            needs = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if any(key not in scaling for key in needs):
                raise ValueError(f"{source}: rope_scaling lacks {', '.join(k for k in needs if k not in scaling)} "
                                 f"(llama3 scaling needs {', '.join(needs)})")
            for key in needs:
                number(source, f"rope_scaling.{key}", scaling[key], above=0)

        def whole(key, default=None):  # a count or a size: a JSON integer above 0 (null or absent: `default`)
            value = hf[key] if default is None else default if hf.get(key) is None else hf[key]
            return number(source, key, value, kind=int, above=0)

        n_heads = whole("num_attention_heads")
        n_kv_heads, dim = whole("num_key_value_heads", n_heads), whole("hidden_size")
        if n_heads % n_kv_heads or (hf.get("head_dim") is None and dim % n_heads):
            raise ValueError(f"{source}: {n_heads} attention heads do not split into {n_kv_heads} key-value heads "
                             f"or a hidden size of {dim}")
        eos = hf.get("eos_token_id")
        ids = [hf.get("bos_token_id"), *(eos if isinstance(eos, list) else [eos])]
        if any(i is not None and (isinstance(i, bool) or not isinstance(i, int)) for i in ids):
            raise ValueError(f"{source}: bos_token_id and eos_token_id must be token ids (whole numbers)")
        if not isinstance(hf.get("tie_word_embeddings", False), bool):
            raise ValueError(f"{source}: tie_word_embeddings is {hf['tie_word_embeddings']!r}; expected true or false")
        return cls(
            vocab_size=whole("vocab_size"),
            dim=dim,
            n_layers=whole("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            ffn_dim=whole("intermediate_size"),
            head_dim=whole("head_dim", dim // n_heads),
            norm_eps=number(source, "rms_norm_eps", hf.get("rms_norm_eps", 1e-5), above=0),
            rope_theta=number(source, "rope_theta", theta, above=0),
            rope_scaling=scaling,
            max_seq_len=whole("max_position_embeddings", 8192),
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


def number(source: str, key: str, value, kind=float, above=None):
    """A config value checked to be a JSON number (an integer for kind int) above `above`; a sentence naming it else."""
    types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, types) or (above is not None and not value > above):
        wanted = ("a whole number" if kind is int else "a number") + (f" above {above}" if above is not None else "")
        raise ValueError(f"{source}: {key} is {value!r}; expected {wanted}")
    return kind(value)


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
        y = attend(q, k, v, mask)
        o_proj = self.o_proj if cache is None or cache.o_proj is None else cache.o_proj
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

        cache: while generating (lidr.kernels.cache.KVCache), what the generation keeps beside the
        model. Layer i stores this call's keys and values with `cache.layers[i].update(k, v)` and
        attends over what that returns; where the layer cache holds projections (`qkv_proj`,
        `o_proj`, `gate_up_proj`, `down_proj`, and `cache.lm_head`: the CPU's fused, prepacked
        copies) they run instead of the model's own. With a cache only the last position is
        projected to the vocabulary: logits [B, vocab].
        """
        mask, positions = prepare_mask(attention_mask, positions, *tokens.shape, tokens.device)
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
