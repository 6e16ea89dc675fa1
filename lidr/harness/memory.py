"""Will a training run fit? The per-GPU peak of lidr/train.py, estimated from config.json and the data.

    python train_dpo.py --model Meta-Llama-3-8B-Instruct --data pairs.jsonl --plan --gpus 8 --gpu-memory 80
    peak = training_peak(cfg, gpus=8, dtype_bytes=2, tokens=8192, activation_checkpointing=True)  # {part: bytes}

The trainer keeps fp32 master weights, fp32 gradients and AdamW's fp32 state sharded over every
GPU (FSDP2), gathers each block in the compute dtype when it runs, and saves activations for the
backward pass. With P parameters (P_block in one decoder block, P_root in the rest: embeddings,
output matrix, final norm, one FSDP2 group at the root), N GPUs, b bytes per compute-dtype element
(2 for bf16), T tokens in the largest micro-batch (its packed rows × their width, padding
included), L layers, d the hidden size, d_q = heads × head_dim, d_kv = kv heads × head_dim, f the
MLP's hidden size, V the vocabulary and C = 256 positions per logits chunk (lidr/dpo.py), the
peak per GPU is the sum of:

    sharded weights, fp32            4·P / N
    sharded gradients, fp32          4·P / N
    AdamW state (two moments)        8·P / N
    gathered weights                 (2·P_block + P_root)·b      the root's, and FSDP2's current and prefetched block
    unsharded gradients              P_root·b + P_block·(b + 4)  the root's until the end of backward; a block's, and
                                                                 its fp32 copy for the reduce-scatter
    activations, no checkpointing    T·L·A,  A = 8·d + b·(4·d + 3·d_q + 2·d_kv + 4·f)
    activations, checkpointing       T·L·b·d + T·A               each block's input, and one block recomputed
    logits                           T·d·(b + 4) + C·V·(2·b + 12)
                                                                 the final norm's saved input and output, and one chunk
                                                                 of logits with its fp32 log-softmax, forward and back

A is what one block saves per token for its backward: each RMSNorm's fp32 input (4·d) and its
rounded and scaled outputs (2·b·d); q and k after RoPE and v (d_q + 2·d_kv), attention's output
and its reshaped copy (2·d_q); the MLP's gate and up projections, silu(gate) and their product
(4·f). The reference table (two fp32 log-probs per pair) stays in host memory and is not counted.
A run fits when the sum is at most USABLE_SHARE of the GPU's memory: the rest is left to the CUDA
context, the allocator's fragmentation and NCCL's buffers.

How this departs from a measurement: it is an estimate, which errs on the large side. tests/test_memory.py
checks it against the peak of tensor memory that torch's profiler measures in an fp32 training step of
small models on CPU: 1.05 to 1.35 times the measured peak (the most where the weights and optimizer
state dominate: it counts every part at its largest at once).
"""

import torch

from lidr.dpo import CHUNK_POSITIONS
from lidr.model import Llama, LlamaConfig

GB = 1e9
USABLE_SHARE = 0.9  # of a GPU's memory, for the estimate
PARTS = ("sharded weights (fp32)", "sharded gradients (fp32)", "AdamW state (fp32)", "gathered weights",
         "unsharded gradients", "activations", "logits")


def parameter_counts(cfg: LlamaConfig) -> tuple[int, int, int]:
    """(P, P_block, P_root) of the model a config describes, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = Llama(cfg)
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.layers[0].parameters())
    return total, block, total - cfg.n_layers * block


def block_activation_bytes(cfg: LlamaConfig, dtype_bytes: int) -> int:
    """A: the bytes one decoder block saves per token for its backward pass."""
    d, d_q, d_kv = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return 8 * d + dtype_bytes * (4 * d + 3 * d_q + 2 * d_kv + 4 * cfg.ffn_dim)


def training_peak(cfg: LlamaConfig, gpus: int, dtype_bytes: int, tokens: int, activation_checkpointing: bool) -> dict:
    """{part: bytes} of the per-GPU peak (the module docstring's sum) for micro-batches of `tokens` tokens."""
    total, block, root = parameter_counts(cfg)
    b, per_block = dtype_bytes, block_activation_bytes(cfg, dtype_bytes)
    if activation_checkpointing:
        activations = tokens * cfg.n_layers * b * cfg.dim + tokens * per_block
    else:
        activations = tokens * cfg.n_layers * per_block
    return {
        "sharded weights (fp32)": 4 * total / gpus,
        "sharded gradients (fp32)": 4 * total / gpus,
        "AdamW state (fp32)": 8 * total / gpus,
        "gathered weights": (2 * block + root) * b,
        "unsharded gradients": root * b + block * (b + 4),
        "activations": activations,
        "logits": tokens * cfg.dim * (b + 4) + CHUNK_POSITIONS * cfg.vocab_size * (2 * b + 12),
    }


def fits(peak: dict, gpu_memory_gb: float) -> bool:
    return sum(peak.values()) <= USABLE_SHARE * gpu_memory_gb * GB


def largest_micro_batch(examples: list, batch_size: int, max_len: int) -> tuple[int, int, int]:
    """(tokens, rows, width) of the largest micro-batch: the sequences of the batch_size longest rows packed
    into rows of at most max_len tokens as lidr/train.py `pack` packs them (longest first, into the first row
    with room; tests/test_memory.py checks that the two agree)."""
    longest = sorted(examples, key=lambda ex: -sum(len(ex.prompt) + len(r) for r in ex.responses))[:batch_size]
    room = []  # what each packed row has left
    for n in sorted((len(ex.prompt) + len(r) for ex in longest for r in ex.responses), reverse=True):
        r = next((r for r in range(len(room)) if room[r] >= n), len(room))
        if r == len(room):
            room.append(max_len)
        room[r] -= n
    width = max_len - min(room)
    return len(room) * width, len(room), width


def plan(cfg: LlamaConfig, examples: list, batch_size: int, max_len: int, dtype_bytes: int, gpus: int,
         gpu_memory_gb: float, activation_checkpointing: bool | None) -> tuple[bool, str, str]:
    """(fits, the breakdown with and without activation checkpointing, the verdict): the verdict for
    `activation_checkpointing` (None: on where it is needed) is one sentence, which, when the run does
    not fit, names the settings that would make it fit."""
    tokens, rows, width = largest_micro_batch(examples, batch_size, max_len)
    without = training_peak(cfg, gpus, dtype_bytes, tokens, False)
    with_ac = training_peak(cfg, gpus, dtype_bytes, tokens, True)
    use_ac = (not fits(without, gpu_memory_gb)) if activation_checkpointing is None else activation_checkpointing
    chosen = with_ac if use_ac else without
    usable = USABLE_SHARE * gpu_memory_gb
    lines = [f"plan: {gpus} GPU(s) of {gpu_memory_gb:g} GB, {parameter_counts(cfg)[0] / 1e9:.2f}B parameters, "
             f"{dtype_bytes}-byte compute dtype; the largest micro-batch is {tokens:,} tokens (the "
             f"{batch_size * len(examples[0].responses)} sequences of its {batch_size} longest rows packed into "
             f"{rows} rows of {width})",
             f"  {'per GPU, GB':<28}{'no checkpointing':>18}{'checkpointing':>16}"]
    lines += [f"  {part:<28}{without[part] / GB:>18.2f}{with_ac[part] / GB:>16.2f}" for part in PARTS]
    lines.append(f"  {'total':<28}{sum(without.values()) / GB:>18.2f}{sum(with_ac.values()) / GB:>16.2f}"
                 f"   (usable: {usable:.1f} GB, {USABLE_SHARE:.0%} of {gpu_memory_gb:g})")
    setting = ("activation checkpointing " + ("on" if use_ac else "off")
               + (" (on because it is needed)" if activation_checkpointing is None and use_ac else ""))
    if fits(chosen, gpu_memory_gb):
        return True, "\n".join(lines), f"fits: {sum(chosen.values()) / GB:.1f} GB per GPU with {setting}"
    remedies = []
    if not use_ac and fits(with_ac, gpu_memory_gb):
        remedies.append("--activation-checkpointing")
    smaller = next((n for n in range(batch_size - 1, 0, -1) if fits(training_peak(
        cfg, gpus, dtype_bytes, largest_micro_batch(examples, n, max_len)[0], use_ac), gpu_memory_gb)), None)
    if smaller:
        remedies.append(f"--batch-size {smaller} (and --grad-accum to keep the global batch)")
    more = next((n for n in range(gpus + 1, 4097) if fits(training_peak(cfg, n, dtype_bytes, tokens, use_ac),
                                                          gpu_memory_gb)), None)
    if more:
        remedies.append(f"{more} GPUs")
    remedy = "; it would fit with " + " or ".join(remedies) if remedies else "; no batch size or GPU count makes it fit"
    return False, "\n".join(lines), (f"does not fit: {sum(chosen.values()) / GB:.1f} GB per GPU with {setting}, "
                                     f"above the {usable:.1f} GB usable of {gpu_memory_gb:g} GB{remedy}")
