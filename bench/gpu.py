"""GPU check and benchmark in one call (meant to fit in 10 minutes on one H100; --quick in about 3): is lidr right on CUDA, and how fast.

    python bench/gpu.py              # on a machine with a CUDA GPU; prints one table
    python bench/gpu.py --quick      # fewer tokens, batch 1 only, a smaller training micro-batch
    python bench/gpu.py --cpu-dry-run --quick   # no GPU: every section at tiny shapes on CPU (checks the script)

Sections, each run on its own: an error is recorded as FAIL with its text and the next section runs.
1. machine: device-to-device copy bandwidth (bytes read + written per second, a 2 GiB copy) and
   the bf16 matmul peak (8192³ products), the two limits the speeds below are compared against.
2. correctness, on a tiny random Llama: CUDA bf16 logits against CPU fp32 (relative error);
   packed rows attending sequence by sequence (`Documents`) against the dense mask on CUDA, fp32
   log-probs and gradients; greedy tokens equal between the eager sampler, its compiled decode
   step without CUDA graphs and with them (`generate(compile=True)` on CUDA).
3. decoding a Llama-3-8B-shaped model with random bf16 weights (its logits checked against
   transformers' on the same weights): batch 1 in tok/s and in GB/s of weights read, as a share
   of the copy bandwidth (each token reads every weight once); batch 16 and 64 throughput;
   transformers' `generate` on the same weights, side by side; eager and compiled decoding.
4. a DPO training step of a Llama-3.2-1B-shaped model in bf16 (FSDP2, one rank, fp32 master
   weights), micro-batch packed into rows of 2,048 tokens: tokens/s, MFU against the measured
   matmul peak, peak memory; attention sequence by sequence and through the dense mask.
5. attention alone (forward + backward) in that shape: lidr's per-sequence calls, the dense
   mask, and flex_attention with a block mask (which lidr does not use), side by side.
6. `torchrun --nproc_per_node=1 train_dpo.py` over nccl on a tiny model, end to end with export.

Exit status: 0 when no section failed, 1 when one did (a wrong result or an error), 2 without CUDA.
Speeds against the goals of issue 14 (batch-1 decode ≥ 75% of the copy bandwidth, training MFU
≥ 40%, lidr ahead of transformers) are printed, not failed.
"""

import argparse
import copy
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lidr.model import Llama, LlamaConfig, rope_inv_freq  # noqa: E402

LLAMA3_8B = LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                        head_dim=128, rope_theta=500000.0, max_seq_len=8192)
LLAMA32_1B = LlamaConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                         head_dim=64, rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True)
TINY = LlamaConfig(vocab_size=1024, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, head_dim=32,
                   max_seq_len=512, bos_token_id=0, eos_token_id=1)
ROW_LEN = 2048


@dataclass
class Setup:
    """Where the sections run and on what shapes: a CUDA GPU and the real shapes, or (--cpu-dry-run) tiny ones."""

    device: str
    decode_cfg: LlamaConfig
    train_cfg: LlamaConfig
    copy_bytes: int
    matmul_n: int


GPU = Setup("cuda", LLAMA3_8B, LLAMA32_1B, copy_bytes=2 * 2**30, matmul_n=8192)
CPU_DRY_RUN = Setup("cpu", TINY, TINY, copy_bytes=2**26, matmul_n=512)


# -----------------------------------------------------------------------------
# the table


class Table:
    """Rows of (section, what, value, status); status "ok", "FAIL" or "" (a measurement)."""

    def __init__(self):
        self.rows = []

    def add(self, section, what, value, status=""):
        self.rows.append((section, what, value, status))
        print(f"  {section} | {what}: {value} {status}", flush=True)

    def check(self, section, what, value, passed: bool):
        self.add(section, what, value, "ok" if passed else "FAIL")

    def run(self, section, fn, *args):
        """fn(table, *args) under a guard: an exception becomes a FAIL row with its text."""
        start = time.perf_counter()
        print(f"== {section}", flush=True)
        try:
            fn(self, *args)
        except Exception as e:  # noqa: BLE001 -- a broken section must not stop the others
            traceback.print_exc()
            self.add(section, "error", f"{type(e).__name__}: {str(e)[:300]}", "FAIL")
        self.add(section, "section time", f"{time.perf_counter() - start:.0f} s")
        free_memory()

    def failed(self) -> bool:
        return any(status == "FAIL" for *_, status in self.rows)

    def print(self):
        widths = [max(len(str(row[i])) for row in self.rows) for i in range(3)]
        print()
        for section, what, value, status in self.rows:
            print(f"{section:<{widths[0]}}  {what:<{widths[1]}}  {str(value):<{widths[2]}}  {status}")


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch._dynamo.reset()  # compiled steps hold CUDA graph memory pools
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def best_seconds(fn, repeats: int, warm_up: bool = True) -> float:
    """Best wall time of fn() over `repeats` runs (after one untimed run unless warm_up is False), synchronised."""
    if warm_up:
        fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# 1. the machine's limits


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), repeats=10)
    return 2 * nbytes / seconds


def matmul_peak(device, n: int) -> float:
    """FLOP/s of a bf16 [n, n] @ [n, n] product (2n³ FLOPs)."""
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    seconds = best_seconds(lambda: a @ b, repeats=20)
    return 2 * n**3 / seconds


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    return flops_per_token * tokens_per_s / peak


def section_machine(table, setup: Setup, limits: dict):
    import transformers

    name = torch.cuda.get_device_name() if setup.device == "cuda" else "CPU (dry run)"
    table.add("machine", "device", f"{name}, torch {torch.__version__}, transformers {transformers.__version__}")
    limits["copy"] = copy_bandwidth(setup.device, setup.copy_bytes)
    table.add("machine", "copy bandwidth (read + write)", f"{limits['copy'] / 1e9:.0f} GB/s")
    limits["matmul"] = matmul_peak(setup.device, setup.matmul_n)
    table.add("machine", f"bf16 matmul peak ({setup.matmul_n}³)", f"{limits['matmul'] / 1e12:.1f} TFLOP/s")


# -----------------------------------------------------------------------------
# 2. correctness on a tiny random Llama


class NoStops:
    """The tokenizer generate() needs for random weights: no stop tokens, text never read."""

    stop_ids = frozenset()

    def decode(self, ids, skip_special_tokens=False):
        return ""


def tiny_model(device, dtype, std: float = 0.02, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(TINY)
    model.init_weights(std=std)
    model = model.to(device=device, dtype=dtype).eval()
    model.inv_freq = rope_inv_freq(TINY).to(device)  # .to(dtype) rounded the rope buffer: fp32 again
    return model


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, length), generator=generator).tolist()


def greedy_session_tokens(model, prompts, new_tokens: int, step_fn) -> list[list[int]]:
    """Greedy decoding over lidr's Session with a given decode step (the sampler's loop without stops)."""
    from lidr.sampler import Session

    device = model.embed_tokens.weight.device
    max_len = max(map(len, prompts)) + new_tokens
    tokens = torch.zeros(len(prompts), dtype=torch.long, device=device)
    positions = torch.tensor([len(p) for p in prompts], device=device)
    with torch.inference_mode():
        session = Session(model, len(prompts), max_len)
        for slot, prompt in enumerate(prompts):
            tokens[slot] = session.prefill(slot, torch.tensor(prompt, device=device)).float().argmax(-1)[0]
        out = [tokens]
        for _ in range(new_tokens - 1):
            tokens = session.decode(tokens, positions, max_len, step_fn).float().argmax(-1)
            positions = positions + 1
            out.append(tokens)
    return torch.stack(out, 1).tolist()


def greedy_tokens_agree(device, new_tokens: int = 24) -> dict:
    """Greedy tokens of the eager sampler, its compiled step, and generate(compile=True), fp32.

    fp32 so that an argmax is not flipped by rounding; std 0.2 spreads the random logits apart.
    On CUDA generate(compile=True) captures CUDA graphs (mode "reduce-overhead").
    """
    from lidr.sampler import SamplingParams, decode_logits, generate

    model = tiny_model(device, torch.float32, std=0.2)
    prompts = random_prompts(3, 9, TINY.vocab_size)
    params = SamplingParams(max_new_tokens=new_tokens)
    eager = [c.tokens for c in generate(model, NoStops(), prompts, params, batch_size=len(prompts))]
    compiled = greedy_session_tokens(model, prompts, new_tokens, torch.compile(decode_logits, mode="default"))
    graphs = [c.tokens for c in generate(model, NoStops(), prompts, params, batch_size=len(prompts), compile=True)]
    return {"eager": eager, "compiled": compiled, "compiled (generate)": graphs}


def documents_agree_with_dense(device) -> tuple[float, float]:
    """(log-prob error, worst gradient error relative to its tensor's scale): Documents against the dense mask, fp32."""
    from lidr.dpo import hidden_sequence_logps
    from lidr.train import Example, pack

    model = tiny_model(device, torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)
    lengths = [(5, 40), (30, 7), (12, 12), (3, 50), (25, 20)]
    generator = torch.Generator().manual_seed(1)
    examples = [Example(i, torch.randint(2, 1000, (p,), generator=generator).tolist(),
                        [torch.randint(2, 1000, (r,), generator=generator).tolist(),
                         torch.randint(2, 1000, (r // 2 + 1,), generator=generator).tolist()])
                for i, (p, r) in enumerate(lengths)]
    results = []
    for dense in (True, False):
        batch = pack(examples, 0, 120, device, dense_mask=dense)
        model.zero_grad(set_to_none=True)
        hidden = model(batch.tokens, batch.positions, batch.attention_mask, return_hidden=True)
        logps, _ = hidden_sequence_logps(hidden, model.lm_head.weight, batch.labels, batch.sequence_ids, batch.n_sequences)
        logps.sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (dense_logps, dense_grads), (logps, grads) = results
    grad_error = max(((grads[n] - dense_grads[n]).abs().max() / dense_grads[n].abs().max()).item() for n in grads)
    return (logps - dense_logps).abs().max().item(), grad_error


def section_correctness(table, setup: Setup):
    device = setup.device
    cpu = tiny_model("cpu", torch.float32)
    bf16 = copy.deepcopy(cpu).to(device, torch.bfloat16)
    bf16.inv_freq = rope_inv_freq(TINY).to(device)
    tokens = torch.tensor(random_prompts(2, 64, TINY.vocab_size))
    with torch.no_grad():
        reference, ours = cpu(tokens), bf16(tokens.to(device)).float().cpu()
    error = ((ours - reference).abs().max() / reference.abs().max()).item()
    table.check("correctness", f"logits {device} bf16 vs CPU fp32 (max rel. error < 2e-2)", f"{error:.2e}", error < 2e-2)

    logp_error, grad_error = documents_agree_with_dense(device)
    table.check("correctness", f"Documents vs dense mask, {device} fp32: log-probs (< 1e-4)", f"{logp_error:.2e}",
                logp_error < 1e-4)
    table.check("correctness", f"Documents vs dense mask, {device} fp32: gradients (rel. < 1e-4)", f"{grad_error:.2e}",
                grad_error < 1e-4)

    runs = greedy_tokens_agree(device)
    for name in ("compiled", "compiled (generate)"):
        same = sum(a == b for a, b in zip(runs["eager"], runs[name]))
        label = "compiled decode step" if name == "compiled" else "CUDA-graph decode (generate compile=True)"
        table.check("correctness", f"greedy tokens, eager = {label}", f"{same}/{len(runs['eager'])} rows", same == len(runs["eager"]))


# -----------------------------------------------------------------------------
# 3. decoding a Llama-3-8B-shaped model


def shared_weight_models(cfg: LlamaConfig, device, dtype):
    """(lidr Llama, transformers LlamaForCausalLM) holding the same random weights, not a copy of them."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf_config = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
                         max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype on the device: 16 GB for 8B in bf16, no fp32 copy first
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.device("meta"):
        model = Llama(cfg)
    # lidr's names are HF's without "model."
    model.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()}, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval(), hf


def section_decode(table, setup: Setup, limits: dict, quick: bool):
    from lidr.sampler import SamplingParams, generate

    cfg = setup.decode_cfg
    model, hf = shared_weight_models(cfg, setup.device, torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    table.add("decode 8B", "weights (random bf16)", f"{weight_bytes / 1e9:.1f} GB")
    tokens = torch.tensor(random_prompts(1, 32, cfg.vocab_size), device=setup.device)
    with torch.no_grad():
        ours, theirs = model(tokens).float(), hf(tokens).logits.float()
    error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    table.check("decode 8B", "logits lidr vs transformers, bf16 (max rel. error < 2e-2)", f"{error:.2e}", error < 2e-2)

    new_tokens = 32 if quick else 128
    batch_sizes = (1,) if quick else (1, 16, 64)
    params = SamplingParams(max_new_tokens=new_tokens)
    for batch in batch_sizes:
        prompts = random_prompts(batch, 32, cfg.vocab_size)

        def lidr(compile: bool):
            generate(model, NoStops(), prompts, params, batch_size=batch, compile=compile)

        def transformers_generate():
            ids = torch.tensor(prompts, device=setup.device)
            hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, pad_token_id=0)

        speeds = {}
        for side, fn in (("lidr eager", lambda: lidr(False)), ("lidr compiled", lambda: lidr(True)),
                         ("transformers", transformers_generate)):
            try:  # one side failing (a compile error, say) leaves the others measured
                start = time.perf_counter()
                fn()  # warm-up (compiles the decode step for this batch)
                warm = time.perf_counter() - start
                seconds = best_seconds(fn, repeats=1 if quick else 2, warm_up=False)
            except Exception as e:  # noqa: BLE001
                table.add("decode 8B", f"batch {batch}: {side}", f"{type(e).__name__}: {str(e)[:200]}", "FAIL")
                continue
            speeds[side] = batch * new_tokens / seconds
            line = f"{speeds[side]:.1f} tok/s (first run {warm:.0f} s)"
            if batch == 1:
                bandwidth = speeds[side] * weight_bytes
                line += f", {bandwidth / 1e9:.0f} GB/s of weights = {100 * bandwidth / limits['copy']:.0f}% of copy"
            table.add("decode 8B", f"batch {batch}: {side}", line)
        ours = max(speeds.get("lidr eager", 0), speeds.get("lidr compiled", 0))
        if ours and "transformers" in speeds:
            table.add("decode 8B", f"batch {batch}: lidr (best) / transformers", f"{ours / speeds['transformers']:.2f}x")
        if batch == 1 and ours:
            share = ours * weight_bytes / limits["copy"]
            table.add("decode 8B", "goal: batch 1 >= 75% of copy bandwidth", "met" if share >= 0.75 else f"not met ({100 * share:.0f}%)")


# -----------------------------------------------------------------------------
# 4. a DPO training step, Llama-3.2-1B shape


def synthetic_pairs(n_pairs: int, vocab: int):
    """Pairs whose prompt + response is 1,024 tokens: two sequences fill a 2,048-token row exactly."""
    from lidr.train import Example

    generator = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(2, vocab, (n,), generator=generator).tolist()

    return [Example(i, tokens(256), [tokens(768), tokens(768)]) for i in range(n_pairs)]


def section_train_step(table, setup: Setup, limits: dict, quick: bool):
    import torch.distributed as dist

    from lidr.dpo import dpo_loss
    from lidr.train import flops_per_token, forward_logps, pack, setup_distributed, shard_model

    _, _, device = setup_distributed()  # a one-rank nccl group, as a plain `python train_dpo.py` makes
    try:
        with torch.device("meta"):
            model = Llama(setup.train_cfg)
        shard_model(model, device, torch.bfloat16, activation_checkpointing=False)
        model.init_weights()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95))
        n_pairs = 4 if quick else 8
        examples = synthetic_pairs(n_pairs, setup.train_cfg.vocab_size)
        reference = torch.zeros(n_pairs, 2, device=device)
        n_tokens = sum(len(ex.prompt) + len(r) for ex in examples for r in ex.responses)
        table.add("train 1B", "micro-batch", f"{n_pairs} pairs = {2 * n_pairs} sequences of 1,024 tokens in rows of {ROW_LEN}")
        for dense in (False, True):
            batch = pack(examples, 0, ROW_LEN, device, dense_mask=dense)

            def step():
                logps, lengths = forward_logps(model, batch)
                losses, _, _ = dpo_loss(logps[:n_pairs], logps[n_pairs:], reference[:, 0], reference[:, 1], 0.1)
                (losses - logps[:n_pairs] / lengths[:n_pairs]).mean().backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            name = "dense mask" if dense else "sequence by sequence"
            try:
                step()  # AdamW's state allocated
            except torch.cuda.OutOfMemoryError:  # a measurement, not a failure: what Documents avoids
                optimizer.zero_grad(set_to_none=True)
                table.add("train 1B", f"DPO step, {name}", "out of memory")
                continue
            free_memory()
            seconds = best_seconds(step, repeats=2 if quick else 4)
            tokens_per_s = n_tokens / seconds
            utilisation = mfu(flops_per_token(model, 1024), tokens_per_s, limits["matmul"])
            peak = torch.cuda.max_memory_allocated() / 2**30 if setup.device == "cuda" else math.nan
            table.add("train 1B", f"DPO step, {name}", f"{tokens_per_s:,.0f} tok/s, MFU {100 * utilisation:.1f}%, "
                                                      f"peak memory {peak:.1f} GiB, {seconds * 1000:.0f} ms")
            if not dense:
                table.add("train 1B", "goal: MFU >= 40%", "met" if utilisation >= 0.4 else f"not met ({100 * utilisation:.1f}%)")
            if quick:
                break
    finally:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# 5. attention alone


def section_attention(table, setup: Setup, quick: bool):
    """Attention alone, forward + backward, over rows of 2,048 tokens in the training shape's heads, three ways.

    lidr's `document_attention` (one SDPA call per sequence), SDPA over the dense block-diagonal
    mask (the reference), and flex_attention compiled with a block mask (not used by lidr; here to
    say whether it would be faster), for rows of 2 sequences of 1,024 tokens and of 8 of 256.
    """
    from lidr.model import Documents, document_attention

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        flex_attention = None
    cfg, device, rows = setup.train_cfg, setup.device, 8
    flex = torch.compile(flex_attention) if flex_attention is not None and device == "cuda" else None
    for n_docs in (2,) if quick else (2, 8):
        documents = Documents(((ROW_LEN // n_docs,) * n_docs,) * rows)
        segments = torch.arange(ROW_LEN, device=device).div(ROW_LEN // n_docs, rounding_mode="floor").expand(rows, -1)
        causal = torch.ones(ROW_LEN, ROW_LEN, dtype=torch.bool, device=device).tril()
        dense_mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]
        q = torch.randn(rows, cfg.n_heads, ROW_LEN, cfg.head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(rows, cfg.n_kv_heads, ROW_LEN, cfg.head_dim, device=device, dtype=torch.bfloat16,
                            requires_grad=True) for _ in range(2))
        ways = {"sequence by sequence (lidr)": lambda: document_attention(q, k, v, documents, True),
                "dense mask (SDPA)": lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=dense_mask, enable_gqa=True)}
        if flex is not None:
            def same_document(b, h, q_idx, kv_idx):
                return (segments[b, q_idx] == segments[b, kv_idx]) & (q_idx >= kv_idx)

            block_mask = create_block_mask(same_document, rows, None, ROW_LEN, ROW_LEN, device=device)
            ways["flex_attention, compiled"] = lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)
        with torch.no_grad():
            reference = ways["dense mask (SDPA)"]().float()
        for name, attend in ways.items():
            try:
                with torch.no_grad():
                    error = (attend().float() - reference).abs().max().item()
                seconds = best_seconds(lambda: attend().sum().backward(), repeats=3)
                table.add("attention", f"{rows} rows of {n_docs} sequences: {name}",
                          f"{seconds * 1000:.1f} ms forward + backward, max difference to the dense mask {error:.1e}")
            except torch.cuda.OutOfMemoryError:
                table.add("attention", f"{rows} rows of {n_docs} sequences: {name}", "out of memory")


# -----------------------------------------------------------------------------
# 6. torchrun train_dpo.py over nccl, end to end


def write_tiny_folder(folder: Path) -> Path:
    """A random tiny Llama HF folder with a word-level Llama 3-format tokenizer (no download needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lidr.checkpoint import save

    words = "what is plus the answer it I think maybe yes no question please explain done".split()
    words += [str(i) for i in range(100)] + ["?", ".", ":", ",", "user", "assistant", "system"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                  "<|end_header_id|>", "<|eot_id|>"])
    model = tiny_model("cpu", torch.float32)
    save(folder, TINY, model.state_dict())
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def tiny_pairs(n: int) -> list[dict]:
    return [{"prompt": f"what is {i} plus {i}?", "chosen": f"the answer is {2 * i}.", "rejected": f"maybe {2 * i + 1}."}
            for i in range(n)]


def run_torchrun(work: Path, nproc_cmd: list[str], timeout: int) -> tuple[subprocess.CompletedProcess, Path]:
    """train_dpo.py on the tiny folder: 8 pairs, 2 steps; (the finished process, OUT)."""
    folder = write_tiny_folder(work / "tiny")
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_pairs(8)))
    out = work / "run"
    cmd = [*nproc_cmd, "train_dpo.py", "--model", str(folder), "--data", str(data), "--out", str(out),
           "--chat-format", "llama3", "--batch-size", "4", "--max-len", "64", "--lr", "1e-3", "--dtype", "bfloat16"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    return proc, out


def section_torchrun(table, setup: Setup):
    from lidr.checkpoint import load

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    with tempfile.TemporaryDirectory() as tmp:
        proc, out = run_torchrun(Path(tmp), torchrun, timeout=240)
        passed = proc.returncode == 0 and f"1 rank(s) on {setup.device}, bfloat16 compute" in proc.stdout
        backend = "nccl" if setup.device == "cuda" else "gloo"
        table.check("torchrun", f"train_dpo.py, 1 rank, {backend}, bf16: exit status", proc.returncode, passed)
        if not passed:
            raise RuntimeError((proc.stdout + proc.stderr)[-600:])
        steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        table.add("torchrun", "steps logged (loss, tokens/s)", f"{len(steps)}: " + ", ".join(
            f"{s['loss']:.3f} @ {s['tokens_per_s']:.0f}" for s in steps))
        model, _ = load(out / "model", device=setup.device, dtype=torch.bfloat16)
        exported = json.loads((out / "model" / "config.json").read_text())["torch_dtype"]
        finite = all(torch.isfinite(p).all() for p in model.parameters())
        table.check("torchrun", "exported folder: dtype, loads in lidr, finite", exported, exported == "bfloat16" and finite)


# -----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens, batch 1 only, a smaller training step")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="every section on CPU at tiny shapes: checks this script where there is no GPU, measures nothing")
    args = parser.parse_args()
    setup = CPU_DRY_RUN if args.cpu_dry_run else GPU
    if setup.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
              "nothing was measured (--cpu-dry-run checks the script on CPU)", file=sys.stderr)
        raise SystemExit(2)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks in fp32
    start = time.perf_counter()
    table, limits = Table(), {}
    table.run("machine", section_machine, setup, limits)
    table.run("correctness", section_correctness, setup)
    if limits:
        table.run("decode 8B", section_decode, setup, limits, args.quick)
        table.run("train 1B", section_train_step, setup, limits, args.quick)
    table.run("attention", section_attention, setup, args.quick)
    table.run("torchrun", section_torchrun, setup)
    table.add("total", "wall time", f"{time.perf_counter() - start:.0f} s")
    table.print()
    if table.failed():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
