"""The attention paths behind `lidr.model.Attention`, chosen in one place (`attend`) from the mask it is given.

    y = attend(q, k, v, mask)      # q [B, H, T, D], k, v [B, KV, T or L, D] -> [B, H, T, D]

- None: causal self-attention (flash-attn's kernel on CUDA for bf16/fp16 when it is installed, else SDPA).
- `Documents` (training, packed rows): on CUDA flex attention's document block mask (compiled),
  elsewhere one causal SDPA call per packed sequence; a dense [B, 1, T, T] bool tensor works too.
- `Filled` (decoding one token per row over a KV cache): each row's filled positions only, GQA
  without copying k and v; with a block mask, flex attention over the filled blocks.
`prepare_mask` turns what `Llama.forward` was given into one of these, once per forward.
docs/method.md §5.1 says how each compares with the reference and what has run on a GPU.
"""

import torch
import torch.nn.functional as F

try:  # optional: used on CUDA for unpadded bf16/fp16 batches when the package is importable
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

try:  # torch >= 2.5: block-sparse attention, fused by torch.compile (the GPU machines have 2.11)
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:
    BlockMask = create_block_mask = flex_attention = None

from dataclasses import dataclass


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
    # fused only when compiled (eager flex attention computes every score). Packed rows change shape
    # from one micro-batch to the next: torch's automatic dynamic shapes compile the first (rows, width)
    # static, then once a graph dynamic in the width, once one dynamic in the rows, and once one for a
    # single row (dynamic shapes specialize a size of 1): at most four graphs, not one per shape
    # (tests/test_cuda_paths_cpu.py: on CPU, aot_eager forward + backward and inductor forward)
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
# the one place a path is chosen


def prepare_mask(attention_mask, positions, B: int, T: int, device):
    """(mask for `attend`, positions [B, T]) from what `Llama.forward` was given: None, a padding mask
    [B, T], a dense [B, T, T] mask, `Documents` (a flex block mask on CUDA) or `Filled`."""
    mask = attention_mask
    if isinstance(attention_mask, Documents) and flex_documents(device):
        mask = document_block_mask(attention_mask, T, device)  # once for every layer
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 3:
        mask = attention_mask.bool()[:, None]  # broadcast over heads
    elif isinstance(attention_mask, torch.Tensor):  # padding: 1/True for real tokens, left or right
        real = attention_mask.bool()
        if positions is None:
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=device)  # a padding query attends to itself: never NaN
        mask = ((causal & real[:, None, :]) | eye)[:, None]
    if positions is None:
        positions = torch.arange(T, device=device).expand(B, T)
    return mask, positions


def attend(q, k, v, mask) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, KV, S, D] through the path `mask` names -> [B, H, T, D]."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None and flash_attn_func is not None and q.is_cuda and q.dtype != torch.float32:
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    if isinstance(mask, Filled):
        return decode_attention(q, k, v, mask)
    if isinstance(mask, Documents):
        return document_attention(q, k, v, mask, gqa)
    if BlockMask is not None and isinstance(mask, BlockMask):  # packed rows: `document_block_mask`
        return compiled_flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
