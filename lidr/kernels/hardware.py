"""MFU's two sides (the trainer's log, bench/gpu.py): the FLOPs a training step runs, over the GPU's datasheet peak.

    from lidr.kernels.hardware import datasheet_peak, training_flops
    props = torch.cuda.get_device_properties(device)
    sku, flops = datasheet_peak(props.name, props.total_memory, props.multi_processor_count)
    mfu = training_flops(model.cfg, [(prompt_len, response_len), ...]) / seconds / flops

The device name alone does not settle an H100: the SXM, PCIe and NVL boards differ by 30% in
peak and a bare "NVIDIA H100" names more than one of them, so the SM count (114 on PCIe, 132 on
SXM and NVL) and the memory size (80 GB SXM, 94 GB NVL) decide. An unknown GPU gets no peak (and
no MFU), never a guessed one.
"""

# NVIDIA datasheets, dense (not 2:4 sparse) bf16 tensor-core FLOP/s
DATASHEET_BF16 = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H200 NVL": 835e12,
                  "GH200": 989e12, "A100": 312e12, "L40S": 362e12}


def datasheet_peak(name: str, memory_bytes: int, sm_count: int) -> tuple[str | None, float | None]:
    """(SKU, dense bf16 FLOP/s) from the device name; the memory size and SM count settle the H100's three SKUs.
    (None, None) for a GPU not in DATASHEET_BF16."""
    upper = name.upper()
    if "GH200" in upper:
        sku = "GH200"
    elif "H200" in upper:
        sku = "H200 NVL" if "NVL" in upper else "H200"
    elif "H100" in upper:
        if "NVL" in upper or (sm_count == 132 and memory_bytes > 90e9):  # NVL: 94 GB; SXM: 80 GB, both 132 SMs
            sku = "H100 NVL"
        elif "PCIE" in upper or sm_count == 114:
            sku = "H100 PCIe"
        else:
            sku = "H100 SXM"
    elif "A100" in upper:
        sku = "A100"
    elif "L40S" in upper:
        sku = "L40S"
    else:
        return None, None
    return sku, DATASHEET_BF16[sku]


def training_flops(cfg, sequences: list[tuple[int, int]]) -> float:
    """FLOPs of forward + backward (3 × forward's) over packed sequences (prompt tokens, response tokens), counting
    only the matrix products that run; per sequence of T = prompt + response tokens, with
    P = n_layers · dim · (2·n_heads·head_dim + 2·n_kv_heads·head_dim + 3·ffn_dim), the blocks' weights:

        6·P·T                                  every token through every block's projections
      + 6·dim·vocab·response                   lm_head on response positions only (lidr.dpo.hidden_sequence_logps)
      + 6·n_layers·n_heads·head_dim·T·(T+1)    causal attention: query i scores and sums i + 1 keys of its own
                                               sequence (4·head_dim FLOPs per key and head, forward)

    The embedding (tied or not) is a lookup: no FLOPs. Norms, RoPE, softmax, SwiGLU's product, padding
    and activation checkpointing's recompute are not counted (MFU, not hardware utilisation)."""
    blocks = cfg.n_layers * cfg.dim * (2 * cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim
                                       + 3 * cfg.ffn_dim)
    attention = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim
    return float(sum(6 * blocks * (p + r) + 6 * cfg.dim * cfg.vocab_size * r + attention * (p + r) * (p + r + 1)
                     for p, r in sequences))
