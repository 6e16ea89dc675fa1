"""GPU check and benchmark in one call: is lidr right on CUDA, how fast, and against which limits.

    python bench/gpu.py --quick                 # first: every section, decode at batch 1 only, fewer steps
    python bench/gpu.py --json OUT/gpu.json     # then the full run, inside a 10-minute window
    python bench/gpu.py --sections decode,train --section-seconds 300   # some sections, longer limits
    python bench/gpu.py --cpu-dry-run --quick   # no GPU: every section at tiny shapes on CPU (checks the script)

Each section runs on its own under a time limit (SECTION_SECONDS, or --section-seconds): an error
is a FAIL row with its text, the limit a TIMEOUT row after the rows measured so far, and the next
section runs. The default limits add up to 560 s (decode 230 s: compiling lidr's step and
transformers' forward for each batch size may not all fit, the rows measured before stay; give
`--sections decode --section-seconds 540` a call of its own for every batch size). At the end a markdown table (for
bench/RESULTS.md) is printed; --json PATH writes every number there and the table to PATH with the
suffix .md, both rewritten after each section.

Sections (preflight always runs first; --sections picks among the others):
- preflight: torch, CUDA, cuDNN, transformers and Triton versions; the GPU, its SKU and datasheet
  dense bf16 peak; a C compiler for Triton (without one every compiled row is a SKIP with the
  reason); flash_attn; which SDPA backend each of lidr's attention call sites gets (prefill,
  the grouped decode call, packed training per sequence, the dense training mask), and which
  backends would accept it.
- machine: the two ceilings, measured: device-to-device copy bandwidth (bytes read + written) and
  the bf16 matmul rate on random data.
- correctness: on a model with the decode shape's attention (Llama-3-8B heads, 2 layers): bf16
  against fp32 for the forward, for every decode path (prefill, then teacher-forced steps; rows
  of different lengths) and every packed-training path (log-probs and gradients); lidr's
  generate(compile=True) gives the eager greedy tokens.
- attention: every attention path alone at the real shapes (prefill; decode: lidr's grouped SDPA
  over the length bucket and over the whole cache, its flex attention over the filled blocks, and
  SDPA with enable_gqa for comparison; training forward + backward: lidr's flex document mask, its
  per-sequence loop, the dense mask), each checked in bf16 against an fp32 reference and timed
  (median of CUDA events).
- decode: a Llama-3-8B-shaped model with random bf16 weights, checked against transformers' on
  the same tensors; prompts of 512 tokens in a cache of 2,912 positions (+ LIDR's 2,400 new
  tokens; lidr's KVCache rounds it up to 2,944, 23 blocks of 128), batch 1, 16 and 64; lidr's
  decode paths (generate's eager step; its compiled step, flex attention under CUDA graphs) and
  transformers' `generate` with its default
  dynamic cache and with its static cache compiled; lidr / transformers ratios. A CUDA graph that
  inductor declines to capture in lidr's compiled step is a FAIL.
- train: a DPO step of a Llama-3.2-1B-shaped model (FSDP2, one rank, bf16 compute, fp32 master
  weights) per packed-training path: tokens/s, MFU against the datasheet peak and, apart, against
  the measured matmul rate; peak memory.
- torchrun: `train_dpo.py` under torchrun over nccl on a tiny model, end to end with the export.

What the numbers count:
- Decode is steady-state steps: prefill and the first pass (compiling, CUDA-graph capture) are
  timed apart; each path runs twice and the second pass's steps after `warm_steps` are timed.
- Bytes per decode step = the weights streamed (every parameter but the embedding table, which a
  step reads one row of; a tied table counts once, as the output projection) + the KV cache of
  the positions filled at that step. A path that attends over more reads more than that and gets
  no credit for it: its row says how many positions it attends (lidr's eager step: the filled
  part rounded up to 64, LENGTH_BUCKET; its flex step: the filled blocks of 128, FLEX_BLOCK;
  transformers' static cache: the whole cache). GB/s is compared with the measured copy bandwidth.
- MFU = training FLOPs per token (lidr.train.flops_per_token) x tokens/s over the datasheet dense
  bf16 peak of this SKU (lidr.kernels.hardware.DATASHEET_BF16), and apart over the measured matmul rate.
- Correctness: relative error ||out - ref|| / ||ref|| against an fp32 reference on the same (bf16)
  inputs; tolerances beside each row (bf16 lands between 1e-3 and 1e-2).

How this departs from a user's run: random weights; every prompt of a batch has the same length
(Setup.prompt_len); lidr's decode rows drive its Session on the model's kept KV cache (prefill one
prompt at a time, then the sampler's greedy step) without generate()'s host reads every 8 steps;
transformers' rows time `generate` itself, whose step syncs with the host (a StoppingCriteria takes the times). The
attention and decode paths come from small tables (train_attention_paths, decode_attention_paths,
prefill_attention_paths, DECODE_PATHS, TRANSFORMERS_PATHS, TRAIN_PACKINGS): a new path is one more entry.

--cpu-dry-run runs every section on CPU at tiny shapes: torch.compile traces with the "eager"
backend there (dynamo runs, no code is generated), so it checks the script, not the speed.

Exit status: 0 when no row failed, 1 when one did (a wrong result or an error), 2 without CUDA.
The goals of issue 18 (batch-1 decode >= 75% of the copy bandwidth, DPO MFU >= 40% of the
datasheet peak, lidr ahead of transformers' best at every batch size) are printed, not failed.
"""

import argparse
import copy
import dataclasses
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lidr.kernels.hardware import datasheet_peak  # noqa: E402
import lidr.kernels.attention  # noqa: E402
from lidr.kernels.attention import (FLEX_BLOCK, Documents, Filled, decode_attention,  # noqa: E402
                                    document_attention, document_block_mask, filled_block_mask)
from lidr.kernels.cache import Session, cuda_graph_skips, decode_logits, kv_cache  # noqa: E402
from lidr.model import Llama, LlamaConfig, rope_inv_freq  # noqa: E402
from lidr.sampler import LENGTH_BUCKET  # noqa: E402

LLAMA3_8B = LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                        head_dim=128, rope_theta=500000.0, max_seq_len=8192)
LLAMA32_1B = LlamaConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                         head_dim=64, rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True)
# correctness on the GPU: Llama-3-8B's attention (32 heads, 8 kv heads of 128), 2 layers, a small vocabulary
CHECK_8B_HEADS = replace(LLAMA3_8B, vocab_size=4096, n_layers=2, ffn_dim=1024)
TINY = LlamaConfig(vocab_size=1024, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, head_dim=32,
                   max_seq_len=512, bos_token_id=0, eos_token_id=1)

# default time limit of each section, seconds (9 minutes in all: the full run fits a 10-minute window)
SECTION_SECONDS = {"preflight": 40, "machine": 20, "correctness": 90, "attention": 80, "decode": 230, "train": 50,
                   "torchrun": 50}

# tolerances of the bf16 checks, on ||out - ref|| / ||ref|| against fp32
BF16_FORWARD = 1e-2  # one attention or one forward's output
BF16_MODEL = 3e-2  # logits and log-probs through a whole model (each layer rounds to bf16)
BF16_GRADIENTS = 5e-2  # parameter or input gradients (bf16 products in backward too)


@dataclass(frozen=True)
class Setup:
    """Where the sections run and on what shapes: a CUDA GPU and the real shapes, or (--cpu-dry-run) tiny ones."""

    device: str
    check_cfg: LlamaConfig  # correctness
    decode_cfg: LlamaConfig
    train_cfg: LlamaConfig
    copy_bytes: int
    matmul_n: int
    prompt_len: int  # every decode prompt is this long
    max_new_tokens: int  # the cache holds prompt_len + max_new_tokens positions, as generate() sizes it
    warm_steps: int  # decode steps run before the timed ones
    steps: int  # decode steps timed
    batches: tuple[int, ...]  # decode batch sizes
    row_len: int  # packed training rows
    attention_rows: int  # rows of the attention section's training shape
    n_pairs: int  # DPO pairs per micro-batch (train)
    doc_counts: tuple[int, ...]  # sequences per row (attention section)
    repeats: int  # timed repeats of one attention call
    compile_options: dict = field(default_factory=dict)  # torch.compile of a decode step

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.max_new_tokens


GPU = Setup("cuda", CHECK_8B_HEADS, LLAMA3_8B, LLAMA32_1B, copy_bytes=2 * 2**30, matmul_n=8192, prompt_len=512,
            max_new_tokens=2400,  # LIDR's answers (lidr/settings.py ANSWERS): compiled decode attends over 2,912
            warm_steps=4, steps=64, batches=(1, 16, 64), row_len=2048, attention_rows=8, n_pairs=8, doc_counts=(2, 8),
            repeats=10, compile_options={"mode": "reduce-overhead", "dynamic": False, "fullgraph": True})
GPU_QUICK = replace(GPU, steps=32, batches=(1,), n_pairs=4, doc_counts=(2,), repeats=5)
CPU_DRY_RUN = Setup("cpu", TINY, TINY, TINY, copy_bytes=2**24, matmul_n=256, prompt_len=16, max_new_tokens=48,
                    warm_steps=2, steps=4, batches=(1, 2), row_len=128, attention_rows=2, n_pairs=2, doc_counts=(2, 4),
                    repeats=2, compile_options={"backend": "eager", "dynamic": False, "fullgraph": True})
CPU_DRY_RUN_QUICK = replace(CPU_DRY_RUN, batches=(1,), doc_counts=(2,))


@dataclass
class Machine:
    """What the sections learn about the machine and pass on."""

    can_compile: bool = True  # torch.compile can build kernels here (a C compiler for Triton)
    compile_skip: str = ""  # why not, one sentence
    datasheet_flops: float | None = None  # dense bf16 peak of this SKU
    copy_bandwidth: float | None = None  # bytes/s, read + written
    matmul_flops: float | None = None


# -----------------------------------------------------------------------------
# the table


class SectionTimeout(BaseException):
    """Raised by SIGALRM when a section's time is up (a BaseException: `except Exception` does not catch it)."""


class Table:
    """Rows of (section, what, value, status); status "ok", "FAIL", "SKIP", "TIMEOUT" or "" (a measurement)."""

    def __init__(self, json_path: Path | None, command: list[str]):
        self.rows, self.sections, self.environment = [], {}, {}
        self.json_path, self.command = json_path, command
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def add(self, section, what, value, status="", **numbers):
        """numbers: the row's raw values (floats), written to the JSON file only."""
        self.rows.append({"section": section, "what": what, "value": str(value), "status": status, **numbers})
        print(f"  {section} | {what}: {value} {status}", flush=True)

    def check(self, section, what, value, passed: bool, **numbers):
        self.add(section, what, value, "ok" if passed else "FAIL", **numbers)

    def skip(self, section, what, reason: str):
        self.add(section, what, reason, "SKIP")

    def guarded(self, section, what, measure):
        """measure() (which adds its own rows); an error becomes a FAIL row for `what` and the section goes on."""
        try:
            measure()
        except Exception as e:  # noqa: BLE001 -- one path failing (a compile error, out of memory) leaves the others
            traceback.print_exc()
            self.add(section, what, f"{type(e).__name__}: {str(e)[:200]}", "FAIL")
            free_memory()

    def run(self, section, seconds: int, fn, *args):
        """fn(table, *args) under a guard: an exception becomes a FAIL row, the time limit a TIMEOUT row."""
        print(f"== {section} (limit {seconds} s)", flush=True)
        start, status = time.perf_counter(), "ok"

        def time_up(signum, frame):
            raise SectionTimeout()

        previous = signal.signal(signal.SIGALRM, time_up)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            try:
                fn(self, *args)
            finally:  # the alarm off before any handler below runs: it cannot fire in them
                signal.setitimer(signal.ITIMER_REAL, 0)
        except SectionTimeout:
            status = "TIMEOUT"
            self.add(section, "time limit", f"stopped after {seconds} s; the rows above were measured before", status)
        except Exception as e:  # noqa: BLE001 -- a broken section must not stop the others
            traceback.print_exc()
            self.add(section, "error", f"{type(e).__name__}: {str(e)[:300]}", "FAIL")
        finally:
            signal.signal(signal.SIGALRM, previous)
        seconds_taken = time.perf_counter() - start
        if status == "ok" and any(r["status"] == "FAIL" for r in self.rows if r["section"] == section):
            status = "FAIL"
        self.sections[section] = {"status": status, "seconds": round(seconds_taken, 1), "limit_s": seconds}
        self.add(section, "section time", f"{seconds_taken:.0f} s of {seconds}")
        free_memory()
        self.save_json()

    def failed(self) -> bool:
        return any(r["status"] == "FAIL" for r in self.rows)

    def save_json(self):
        """The whole record so far, and the markdown table beside it (PATH with .md), each written atomically:
        a run killed later keeps what it measured."""
        if self.json_path is None:
            return
        record = {"command": self.command, "started": self.started, "environment": self.environment,
                  "sections": self.sections, "rows": self.rows}
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        for path, text in ((self.json_path, json.dumps(record, indent=1)),
                           (self.json_path.with_suffix(".md"), self.markdown())):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, path)

    def markdown(self) -> str:
        env = self.environment
        lines = [f"`{' '.join(self.command)}`, {self.started}: {env.get('device', '?')}, "
                 f"torch {env.get('torch', '?')}, CUDA {env.get('cuda', '-')}, cuDNN {env.get('cudnn', '-')}, "
                 f"transformers {env.get('transformers', '?')}",
                 "", "| section | what | value | status |", "| --- | --- | --- | --- |"]
        for r in self.rows:
            cells = (r["section"], r["what"], r["value"], r["status"])
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines)


def free_memory():
    torch._dynamo.reset()  # compiled steps hold CUDA graph memory pools, and their guards hold the models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# -----------------------------------------------------------------------------
# measuring


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, warm_up: int = 1) -> float:
    """Median time of fn() over `repeats` runs after `warm_up` untimed ones: CUDA events on a GPU, else the host
    clock."""
    for _ in range(warm_up):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere gives NaN (which passes no tolerance)."""
    out, reference = out.double(), reference.double()
    return ((out - reference).norm() / reference.norm()).item()


def within(error: float, tolerance: float) -> bool:
    return error < tolerance  # False for NaN


# -----------------------------------------------------------------------------
# preflight: versions, SKU, compiler, which SDPA backend each call site gets


def c_compiler() -> str | None:
    """The C compiler Triton builds its launchers with: $CC, else cc, gcc or clang on PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def sdpa_call_sites(setup: Setup) -> dict:
    """lidr's SDPA calls at this setup's shapes, bf16: name -> (q, k, v, attn_mask, is_causal, needs grad, enable_gqa).
    The decode step's is the grouped call of lidr.kernels.attention.decode_attention: q [B, KV, H / KV, D], no enable_gqa."""
    dev, dc, tc = setup.device, setup.decode_cfg, setup.train_cfg

    def qkv(cfg, batch, q_len, kv_len, grad):
        q = torch.randn(batch, cfg.n_heads, q_len, cfg.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=grad)
        k, v = (torch.randn(batch, cfg.n_kv_heads, kv_len, cfg.head_dim, device=dev, dtype=torch.bfloat16,
                            requires_grad=grad) for _ in range(2))
        return q, k, v

    batch, half = max(setup.batches), setup.row_len // 2
    length = eager_decode_length(setup.prompt_len + 1, cache_length(setup.max_len))  # the eager step's first bucket
    # the masks as lidr builds them: decode_attention's [B, 1, 1, L] and pack's [R, T, T] (a head axis from forward)
    positions = torch.full((batch,), setup.prompt_len, device=dev)
    decode_mask = (torch.arange(length, device=dev) <= positions[:, None])[:, None, None]
    q, k, v = qkv(dc, batch, 1, length, False)
    grouped_q = q.view(batch, dc.n_kv_heads, dc.n_heads // dc.n_kv_heads, dc.head_dim)
    segments = (torch.arange(setup.row_len, device=dev) // half).repeat(2, 1)
    causal = torch.ones(setup.row_len, setup.row_len, dtype=torch.bool, device=dev).tril()
    dense = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]
    return {
        "prefill (causal, no mask)": (*qkv(dc, 1, setup.prompt_len, setup.prompt_len, False), None, True, False,
                                      True),
        f"decode step, grouped (bool mask over {length} positions)": (grouped_q, k, v, decode_mask, False, False,
                                                                      False),
        "packed training, one call per sequence (causal, backward)": (*qkv(tc, 1, half, half, True), None, True, True,
                                                                      True),
        "packed training, dense mask (backward)": (*qkv(tc, 2, setup.row_len, setup.row_len, True), dense, False, True,
                                                   True),
    }


def sdpa_backends(q, k, v, mask, causal: bool, grad: bool, gqa: bool) -> tuple[str, list[str], str]:
    """(the backend SDPA picks, the backends that accept the call when forced alone, why flash refused it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {SDPBackend.FLASH_ATTENTION: "flash", SDPBackend.EFFICIENT_ATTENTION: "efficient",
             SDPBackend.CUDNN_ATTENTION: "cudnn", SDPBackend.MATH: "math"}
    try:  # private, but it is the dispatcher's own choice; guarded for other torch versions
        chosen = names.get(SDPBackend(torch._fused_sdp_choice(q, k, v, mask, 0.0, causal, enable_gqa=gqa)), "?")
    except (AttributeError, TypeError, ValueError, RuntimeError) as e:
        chosen = f"unknown ({type(e).__name__})"
    accepted, flash_refusal = [], ""
    for backend, name in names.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
                    if grad:
                        out.backward(torch.ones_like(out))
                accepted.append(name)
            except RuntimeError:
                if backend == SDPBackend.FLASH_ATTENTION:
                    reasons = [str(w.message).split(" (Triggered internally")[0] for w in caught]
                    flash_refusal = "; ".join(r for r in reasons if "not used because" not in r)[:160]
    return chosen, accepted, flash_refusal


def section_preflight(table, setup: Setup, machine: Machine):
    import transformers

    env = table.environment
    env.update(torch=torch.__version__, transformers=transformers.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    table.add("preflight", "torch / CUDA / cuDNN / transformers / Triton",
              f"{env['torch']} / {env['cuda']} / {env['cudnn']} / {env['transformers']} / {env['triton']}")
    if setup.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["device"] = props.name
        table.add("preflight", "device", f"{props.name}, {props.multi_processor_count} SMs, "
                  f"{props.total_memory / 1e9:.0f} GB, compute capability {props.major}.{props.minor}")
        sku, flops = datasheet_peak(props.name, props.total_memory, props.multi_processor_count)
    else:
        env["device"] = "CPU (dry run)"
        table.add("preflight", "device", env["device"])
        sku, flops = None, None
    machine.datasheet_flops = flops
    env["sku"], env["datasheet_bf16_flops"] = sku, flops
    table.add("preflight", "datasheet dense bf16 peak", f"{flops / 1e12:.0f} TFLOP/s ({sku})" if flops
              else "none known for this device: MFU against the measured matmul rate only", datasheet_flops=flops)

    compiler = c_compiler()
    env["c_compiler"] = compiler
    if setup.device == "cpu":  # the dry run compiles with the eager backend: no code is built
        table.add("preflight", "C compiler for Triton", f"{compiler or 'none'} (dry run: compiles trace only)")
    elif compiler is None or env["triton"] is None:
        machine.can_compile = False
        machine.compile_skip = ("no C compiler ($CC, cc, gcc or clang) on PATH" if compiler is None
                                else "Triton is not installed") + ": torch.compile cannot build CUDA kernels here"
        table.skip("preflight", "C compiler for Triton", machine.compile_skip + "; every compiled row is skipped")
    else:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
        table.add("preflight", "C compiler for Triton", f"{compiler} ({version.splitlines()[0] if version else '?'})")
    try:
        import flash_attn
        table.add("preflight", "flash_attn",
                  f"{flash_attn.__version__}: lidr's unmasked bf16 prefill uses flash_attn_func")
    except ImportError:
        table.add("preflight", "flash_attn", "not installed: lidr's prefill runs SDPA")

    env["sdpa"] = {}
    for site, (q, k, v, mask, causal, grad, gqa) in sdpa_call_sites(setup).items():
        chosen, accepted, flash_refusal = sdpa_backends(q, k, v, mask, causal, grad, gqa)
        env["sdpa"][site] = {"chosen": chosen, "accepted": accepted, "flash_refusal": flash_refusal}
        line = f"{chosen} (accepted alone: {', '.join(accepted) or 'none'})"
        if flash_refusal and chosen != "flash":
            line += f"; flash: {flash_refusal}"
        table.add("preflight", f"SDPA backend: {site}", line)


# -----------------------------------------------------------------------------
# machine: the two ceilings


def copy_bandwidth(device, nbytes: int, repeats: int) -> float:
    """Bytes/s of a device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), repeats)


def matmul_rate(device, n: int, repeats: int) -> float:
    """FLOP/s of a bf16 [n, n] @ [n, n] product (2n³ FLOPs) on random data (zeros run faster)."""
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats, warm_up=3)


def section_machine(table, setup: Setup, machine: Machine):
    machine.copy_bandwidth = copy_bandwidth(setup.device, setup.copy_bytes, repeats=20)
    table.add("machine", f"copy bandwidth, read + write ({setup.copy_bytes / 2**30:.2g} GiB copied)",
              f"{machine.copy_bandwidth / 1e9:,.0f} GB/s", copy_bytes_per_s=machine.copy_bandwidth)
    machine.matmul_flops = matmul_rate(setup.device, setup.matmul_n, repeats=20)
    line = f"{machine.matmul_flops / 1e12:.1f} TFLOP/s"
    if machine.datasheet_flops:
        line += f" = {machine.matmul_flops / machine.datasheet_flops:.0%} of the datasheet peak"
    table.add("machine", f"bf16 matmul rate ({setup.matmul_n}³, random data)", line, matmul_flops=machine.matmul_flops)


# -----------------------------------------------------------------------------
# attention paths, each timed on its own row: a new path is one more entry in a table


@dataclass(frozen=True)
class AttentionPath:
    attend: Callable | None  # (inputs) -> output [B, H, Tq, D]; None when this torch cannot run it
    compiles: bool = False  # built by torch.compile (skipped without a C compiler)
    in_lidr: bool = True  # False: a candidate lidr does not run today
    unavailable: str = ""  # why attend is None
    reads: Callable | None = None  # decode: (DecodeBatch) -> cache positions read, all rows together


@dataclass
class PackedRows:
    """Training attention inputs: rows of sequences packed side by side."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    documents: Documents
    dense_mask: torch.Tensor  # [rows, 1, T, T]: same sequence and key not after query


@dataclass
class DecodeBatch:
    """Decode attention inputs: one query per row over a cache of which each row fills its own length."""

    q: torch.Tensor  # [B, H, 1, D]
    k: torch.Tensor  # [B, KV, cache_len, D]: cache_len = max_len rounded up to FLEX_BLOCK, as lidr's KVCache
    v: torch.Tensor
    lengths: torch.Tensor  # [B] positions filled per row
    mask: torch.Tensor  # [B, 1, 1, cache_len]


def flex_documents_attention(setup: Setup) -> AttentionPath:
    """lidr's packed training on CUDA: Documents -> document_block_mask, built once per micro-batch (outside the
    timed calls), then compiled_flex_attention in every layer."""
    if lidr.kernels.attention.flex_attention is None:
        return AttentionPath(None, unavailable="this torch has no flex_attention")
    if setup.device == "cpu":  # torch raises NotImplementedError for it
        return AttentionPath(None, unavailable="flex_attention has no backward on CPU")
    block_masks = {}

    def attend(rows: PackedRows):
        if id(rows) not in block_masks:
            block_masks[id(rows)] = document_block_mask(rows.documents, rows.q.shape[2], rows.q.device)
        return lidr.kernels.attention.compiled_flex_attention(rows.q, rows.k, rows.v, block_mask=block_masks[id(rows)],
                                                  enable_gqa=True)

    return AttentionPath(attend, compiles=True)


def flex_filled_attention(setup: Setup) -> AttentionPath:
    """lidr's compiled decode step on CUDA: decode_attention through filled_block_mask (built once per step for every
    layer, so outside the timed calls), compiled as generate(compile=True) compiles its step."""
    if lidr.kernels.attention.flex_attention is None:
        return AttentionPath(None, unavailable="this torch has no flex_attention")

    def filled_flex(q, k, v, lengths, block_mask):
        return decode_attention(q, k, v, Filled(lengths, block_mask))

    if setup.device == "cuda":  # uncompiled, flex attention computes every score
        filled_flex = torch.compile(filled_flex, fullgraph=True, dynamic=False)
    block_masks = {}

    def attend(batch: DecodeBatch):
        if id(batch) not in block_masks:
            block_masks[id(batch)] = filled_block_mask(batch.lengths, batch.k.shape[2])
        return filled_flex(batch.q, batch.k, batch.v, batch.lengths, block_masks[id(batch)])

    return AttentionPath(attend, compiles=True, reads=lambda b: sum(flex_read_length(int(n), b.k.shape[2])
                                                                    for n in b.lengths))


def cache_length(max_len: int) -> int:
    """Positions per row of the KVCache generate() allocates for max_len: rounded up to FLEX_BLOCK (lidr.sampler)."""
    return -(-max_len // FLEX_BLOCK) * FLEX_BLOCK


def eager_decode_length(filled: int, cache_len: int) -> int:
    """Cache positions lidr's eager decode step attends: the filled part rounded up to LENGTH_BUCKET."""
    return min(cache_len, -(-filled // LENGTH_BUCKET) * LENGTH_BUCKET)


def flex_read_length(filled: int, cache_len: int) -> int:
    """Cache positions lidr's flex decode reads: the filled blocks of FLEX_BLOCK positions."""
    return min(cache_len, -(-filled // FLEX_BLOCK) * FLEX_BLOCK)


def sdpa(q, k, v, mask=None, causal=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)


def grouped_decode_sdpa(batch: DecodeBatch, n: int):
    """lidr's decode_attention without a block mask (grouped SDPA) over the first n cache positions."""
    return decode_attention(batch.q, batch.k[:, :, :n], batch.v[:, :, :n], Filled(batch.lengths))


def bucket(batch: DecodeBatch) -> int:
    return eager_decode_length(int(batch.lengths.max()), batch.k.shape[2])


def flash_attn_prefill(q, k, v):
    from flash_attn import flash_attn_func

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)


def train_attention_paths(setup: Setup) -> dict[str, AttentionPath]:
    return {
        "Documents: flex attention's document mask (lidr on CUDA)": flex_documents_attention(setup),
        "Documents: one causal SDPA call per sequence (lidr on CUDA without flex attention)":
            AttentionPath(lambda r: document_attention(r.q, r.k, r.v, r.documents, True)),
        "dense mask SDPA (lidr on CPU, pack(dense_mask=True))":
            AttentionPath(lambda r: sdpa(r.q, r.k, r.v, r.dense_mask)),
    }


def decode_attention_paths(setup: Setup) -> dict[str, AttentionPath]:
    return {
        "grouped SDPA over the filled length, 64-bucket (lidr eager step)":
            AttentionPath(lambda b: grouped_decode_sdpa(b, bucket(b)), reads=lambda b: len(b.lengths) * bucket(b)),
        "flex attention over the filled 128-blocks (lidr compiled step on CUDA)": flex_filled_attention(setup),
        "grouped SDPA over the whole cache (lidr compiled step on CPU)":
            AttentionPath(lambda b: grouped_decode_sdpa(b, b.k.shape[2]), reads=lambda b: b.k.shape[0] * b.k.shape[2]),
        "SDPA with enable_gqa and a mask over the filled length, 64-bucket": AttentionPath(
            lambda b: sdpa(b.q, b.k[:, :, :bucket(b)], b.v[:, :, :bucket(b)], b.mask[..., :bucket(b)]), in_lidr=False,
            reads=lambda b: len(b.lengths) * bucket(b)),
    }


def prefill_attention_paths(setup: Setup) -> dict[str, AttentionPath]:
    paths = {"causal SDPA (lidr prefill without flash_attn)": AttentionPath(lambda p: sdpa(*p, causal=True))}
    try:
        import flash_attn  # noqa: F401
        paths["flash_attn_func (lidr prefill with flash_attn)"] = AttentionPath(lambda p: flash_attn_prefill(*p))
    except ImportError:
        pass
    return paths


def reference_attention(q, k, v, mask=None, causal=False, grad_out=None):
    """fp32 SDPA through the math backend on the same (bf16) inputs upcast: the reference of every path.
    With grad_out: (output, fp32 gradients of q, k, v)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.detach().float().requires_grad_(grad_out is not None) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out = sdpa(q, k, v, mask, causal)
    if grad_out is None:
        return out.detach()
    return out.detach(), torch.autograd.grad(out, (q, k, v), grad_out.float())


def packed_rows(setup: Setup, n_docs: int) -> PackedRows:
    cfg, device, rows, T = setup.train_cfg, setup.device, setup.attention_rows, setup.row_len
    documents = Documents(((T // n_docs,) * n_docs,) * rows)
    segments = (torch.arange(T, device=device) // (T // n_docs)).expand(rows, -1)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    dense_mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]
    q = torch.randn(rows, cfg.n_heads, T, cfg.head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(rows, cfg.n_kv_heads, T, cfg.head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    return PackedRows(q, k, v, documents, dense_mask)


def decode_batch(setup: Setup, batch: int) -> DecodeBatch:
    """Rows filled to lengths spread from the prompt to twice that (within the cache)."""
    cfg, device, max_len = setup.decode_cfg, setup.device, cache_length(setup.max_len)
    lengths = torch.linspace(setup.prompt_len, min(2 * setup.prompt_len, setup.max_len), batch).long().to(device)
    mask = (torch.arange(max_len, device=device) < lengths[:, None])[:, None, None]
    q = torch.randn(batch, cfg.n_heads, 1, cfg.head_dim, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, cfg.n_kv_heads, max_len, cfg.head_dim, device=device, dtype=torch.bfloat16)
            for _ in range(2))
    return DecodeBatch(q, k, v, lengths, mask)


def skip_reason(path: AttentionPath, machine: Machine) -> str | None:
    if path.attend is None:
        return path.unavailable
    if path.compiles and not machine.can_compile:
        return machine.compile_skip
    return None


def measure_each_path(table, machine: Machine, shape: str, paths: dict[str, "AttentionPath"], measure: Callable):
    """One row per path, "SHAPE: NAME": skipped with its reason where this machine or torch cannot run it,
    else measure(path, what), guarded (a path that fails is a failed row, not a failed section)."""
    for name, path in paths.items():
        what = f"{shape}: {name}" + ("" if path.in_lidr else " (not in lidr)")
        reason = skip_reason(path, machine)
        if reason:
            table.skip("attention", what, reason)
        else:
            table.guarded("attention", what, lambda path=path, what=what: measure(path, what))


def section_attention(table, setup: Setup, machine: Machine):
    """Every attention path alone at the real shapes (prefill, decode, then training, whose flex backward compiles
    longest), checked in bf16 against fp32, then timed."""
    tc, dc = setup.train_cfg, setup.decode_cfg
    q = torch.randn(1, dc.n_heads, setup.prompt_len, dc.head_dim, device=setup.device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, dc.n_kv_heads, setup.prompt_len, dc.head_dim, device=setup.device, dtype=torch.bfloat16)
            for _ in range(2))
    reference = reference_attention(q, k, v, causal=True)
    def measure_prefill(path, what):
        error = relative_error(path.attend((q, k, v)), reference)
        seconds = median_seconds(lambda: path.attend((q, k, v)), setup.repeats)
        table.check("attention", what, f"{seconds * 1e6:.0f} us; bf16 vs fp32 {error:.1e} (< {BF16_FORWARD:g})",
                    within(error, BF16_FORWARD), seconds=seconds, error=error)

    measure_each_path(table, machine, f"prefill {setup.prompt_len} tokens", prefill_attention_paths(setup),
                      measure_prefill)

    batch = decode_batch(setup, max(setup.batches))
    reference = reference_attention(batch.q, batch.k, batch.v, batch.mask)
    per_position = 2 * dc.n_kv_heads * dc.head_dim * 2  # k and v, bf16
    filled = int(batch.lengths.sum())
    useful_bytes = filled * per_position
    shape = (f"decode batch {len(batch.lengths)}, filled {int(batch.lengths.min())}-{int(batch.lengths.max())} "
             f"of {cache_length(setup.max_len)}")

    def measure_decode(path, what):
        error = relative_error(path.attend(batch), reference)
        seconds = median_seconds(lambda: path.attend(batch), setup.repeats)
        read = path.reads(batch)
        table.check("attention", what, f"{seconds * 1e6:.0f} us, {useful_bytes / seconds / 1e9:,.0f} GB/s of "
                    f"filled KV (attends {read:,} of {filled:,} filled positions); bf16 vs fp32 {error:.1e} "
                    f"(< {BF16_FORWARD:g})", within(error, BF16_FORWARD), seconds=seconds, error=error,
                    kv_bytes_per_s=useful_bytes / seconds, positions_attended=read, positions_filled=filled)

    measure_each_path(table, machine, shape, decode_attention_paths(setup), measure_decode)
    del batch, reference

    for n_docs in setup.doc_counts:
        rows = packed_rows(setup, n_docs)
        grad_out = torch.randn_like(rows.q)
        reference, ref_grads = reference_attention(rows.q, rows.k, rows.v, rows.dense_mask, grad_out=grad_out)
        shape = (f"train {setup.attention_rows} rows x {n_docs} seqs of {setup.row_len // n_docs}, "
                 f"{tc.n_heads}/{tc.n_kv_heads} heads of {tc.head_dim}")

        def measure_training(path, what):
            def forward_backward():
                out = path.attend(rows)
                return out, torch.autograd.grad(out, (rows.q, rows.k, rows.v), grad_out)

            out, grads = forward_backward()
            error = relative_error(out, reference)
            grad_error = max(relative_error(g, r) for g, r in zip(grads, ref_grads))
            seconds = median_seconds(forward_backward, setup.repeats)
            table.check("attention", what, f"{seconds * 1e3:.2f} ms fwd+bwd; bf16 vs fp32: out {error:.1e} "
                        f"(< {BF16_FORWARD:g}), grads {grad_error:.1e} (< {BF16_GRADIENTS:g})",
                        within(error, BF16_FORWARD) and within(grad_error, BF16_GRADIENTS),
                        seconds=seconds, error=error, grad_error=grad_error)

        measure_each_path(table, machine, shape, train_attention_paths(setup), measure_training)
        del rows, reference, ref_grads


# -----------------------------------------------------------------------------
# lidr's decode paths and transformers' generate settings: a new path is one more entry


@dataclass(frozen=True)
class DecodePath:
    """One of generate()'s decode steps: eager (grouped SDPA over the length bucket) or compiled with generate's
    settings (flex attention over the filled blocks on CUDA, under CUDA graphs; grouped SDPA over the whole cache
    on CPU)."""

    compiles: bool


def decode_step(path: DecodePath, setup: Setup) -> tuple[Callable, bool]:
    """(the step function Session.decode takes, whether it attends through flex attention), as generate() picks."""
    if not path.compiles:
        return decode_logits, False
    flex = setup.device == "cuda" and lidr.kernels.attention.flex_attention is not None
    return torch.compile(decode_logits, **setup.compile_options), flex  # generate(compile=True)'s settings


def step_length(compiles: bool, filled: int, cache_len: int) -> int:
    """The `length` generate() passes to Session.decode: the whole cache compiled (with flex too), else the bucket."""
    return cache_len if compiles else eager_decode_length(filled, cache_len)


def attended_positions(compiles: bool, flex: bool, filled: int, cache_len: int) -> int:
    """Cache positions a step reads: the filled 128-blocks (flex), the whole cache (compiled SDPA), the bucket."""
    if flex:
        return flex_read_length(filled, cache_len)
    return step_length(compiles, filled, cache_len)


DECODE_PATHS = {
    "lidr eager (grouped SDPA over the filled length)": DecodePath(compiles=False),
    "lidr compiled (flex attention over the filled blocks, CUDA graphs)": DecodePath(compiles=True),
}


def transformers_static_compiled(setup: Setup) -> dict:
    """generate's static cache, its forward compiled by generate itself (CompileConfig: CUDA graphs,
    "reduce-overhead"), with static shapes (dynamic=False, one graph per batch size)."""
    from transformers import CompileConfig

    if setup.device == "cuda":
        config = CompileConfig(dynamic=False)
    else:  # dry run: trace only, and ask generate to compile on CPU too
        config = CompileConfig(backend="eager", mode=None, dynamic=False)
        config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


@dataclass(frozen=True)
class TransformersPath:
    generate_kwargs: Callable  # (setup) -> extra keyword arguments of generate
    attended: Callable  # (positions filled, cache length) -> positions a step attends
    compiles: bool = False


TRANSFORMERS_PATHS = {
    "transformers, dynamic cache (default)": TransformersPath(lambda setup: {}, lambda filled, max_len: filled),
    "transformers, static cache compiled": TransformersPath(transformers_static_compiled,  # sized max_length - 1
                                                            lambda filled, max_len: max_len - 1, compiles=True),
}


# -----------------------------------------------------------------------------
# random models


class NoStops:
    """The tokenizer generate() needs for random weights: no stop tokens, text never read."""

    stop_ids = frozenset()

    def decode(self, ids, skip_special_tokens=False):
        return ""


def random_model(cfg: LlamaConfig, device, dtype, std: float = 0.02, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(cfg)
    model.init_weights(std=std)
    model = model.to(device=device, dtype=dtype).eval()
    model.inv_freq = rope_inv_freq(cfg).to(device)  # .to(dtype) rounded the rope buffer: fp32 again
    return model


def tiny_model(device, dtype, std: float = 0.02, seed: int = 0) -> Llama:
    return random_model(TINY, device, dtype, std, seed)


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, length), generator=generator).tolist()


def shared_weight_models(cfg: LlamaConfig, device, dtype):
    """(lidr Llama, transformers LlamaForCausalLM) holding the same random weights, not a copy of them.

    The transformers twin has no special tokens: random weights must not stop its generate early.
    """
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf_config = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                         rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
                         tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
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


def streamed_weight_bytes(model: Llama) -> int:
    """Bytes a decode step reads of the weights: all but the embedding table (one row per token),
    which a tied model reads whole as its output projection (counted once by parameters())."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.cfg.tie_embeddings:
        return total
    table = model.embed_tokens.weight
    return total - table.numel() * table.element_size()


def kv_bytes_per_position(cfg: LlamaConfig, dtype=torch.bfloat16) -> int:
    """Bytes of keys and values one cache position holds for one row, every layer."""
    return cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8


# -----------------------------------------------------------------------------
# driving lidr's Session (lidr.sampler: kv_cache, Session, decode_logits; generate + Decoding)


def lidr_step_logits(model, prompts, forced: torch.Tensor, max_len: int, path: DecodePath, setup: Setup):
    """Prefill each prompt, then decode forced[:, j] at step j: logits [B, 1 + steps, vocab] (prefill first), fp32."""
    device = model.embed_tokens.weight.device
    step_fn, flex = decode_step(path, setup)
    with torch.inference_mode():
        session = Session(model, kv_cache(model, len(prompts), max_len))  # the model's kept cache, as generate's
        out = [torch.cat([session.prefill(slot, torch.tensor(p, device=device)).float()
                          for slot, p in enumerate(prompts)])]
        positions = torch.tensor([len(p) for p in prompts], device=device)
        for j in range(forced.shape[1]):
            filled = max(map(len, prompts)) + j + 1
            length = step_length(path.compiles, filled, session.cache.length)
            logits = session.decode(forced[:, j].to(device), positions, length, step_fn, flex)
            out.append(logits.float().clone())  # a CUDA-graph output is overwritten by the next replay
            positions = positions + 1
    return torch.stack(out, 1)


@dataclass
class DecodePass:
    prefill_s: float
    warm_s: float  # the first warm_steps decode steps
    steps_s: float  # the timed steps


def lidr_decode_pass(model, prompts, max_len: int, warm_steps: int, steps: int, compiles: bool, step_fn,
                     flex: bool) -> DecodePass:
    """One generation as lidr's sampler runs it (prefill one prompt at a time, then greedy steps), timed in parts.
    The model's kept KV cache, as generate() takes it: a compiled step replays the CUDA graphs of the first pass."""
    device = model.embed_tokens.weight.device
    prompt_len = len(prompts[0])
    with torch.inference_mode():
        synchronize()
        start = time.perf_counter()
        session = Session(model, kv_cache(model, len(prompts), max_len))
        tokens = torch.cat([session.prefill(slot, torch.tensor(p, device=device)).float().argmax(-1)
                            for slot, p in enumerate(prompts)])
        positions = torch.full((len(prompts),), prompt_len, device=device)
        synchronize()
        marks = [start, time.perf_counter()]
        for j in range(warm_steps + steps):
            if j == warm_steps:
                synchronize()
                marks.append(time.perf_counter())
            length = step_length(compiles, prompt_len + j + 1, session.cache.length)
            logits = session.decode(tokens, positions, length, step_fn, flex)
            tokens = logits.float().argmax(-1)  # the sampler's greedy step
            positions = positions + 1
        synchronize()
        marks.append(time.perf_counter())
    return DecodePass(marks[1] - marks[0], marks[2] - marks[1], marks[3] - marks[2])


def transformers_decode_pass(hf, prompts, setup: Setup, generate_kwargs: dict) -> DecodePass:
    """One transformers `generate`, greedy, max_new_tokens = setup.max_new_tokens (the cache size), stopped
    after warm_steps + steps decode steps by a StoppingCriteria that takes the time after each token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    n_tokens = 1 + setup.warm_steps + setup.steps  # the prefill's token, then one per step

    class StepClock(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            synchronize()  # generate's own stop check syncs here every step too
            self.times.append(time.perf_counter())
            return torch.full((input_ids.shape[0],), len(self.times) >= n_tokens, dtype=torch.bool,
                              device=input_ids.device)

    ids = torch.tensor(prompts, device=hf.device)
    clock = StepClock()
    synchronize()
    start = time.perf_counter()
    hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=setup.max_new_tokens,
                pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]), **generate_kwargs)
    t = clock.times
    if len(t) < n_tokens:
        raise RuntimeError(f"transformers' generate stopped after {len(t)} tokens, {n_tokens} were asked for")
    return DecodePass(t[0] - start, t[setup.warm_steps] - t[0], t[setup.warm_steps + setup.steps] - t[setup.warm_steps])


@dataclass
class DecodeTiming:
    prefill_s: float  # the second pass's
    first_pass_extra_s: float  # the first pass's decode time beyond the second's: compiling, capturing
    step_s: float  # steady state, the second pass's timed steps
    filled: float  # positions filled, mean over the timed steps
    attended: float  # positions attended, mean over the timed steps
    graph_skips: int  # CUDA graphs inductor declined during the two passes


def timed_twice(run_pass, setup: Setup, attended: Callable[[int], int]) -> DecodeTiming:
    """attended(positions filled) -> positions a step reads."""
    skips = cuda_graph_skips()
    first, second = run_pass(), run_pass()
    steps = range(setup.warm_steps, setup.warm_steps + setup.steps)
    filled = [setup.prompt_len + j + 1 for j in steps]
    return DecodeTiming(prefill_s=second.prefill_s,
                        first_pass_extra_s=(first.warm_s + first.steps_s) - (second.warm_s + second.steps_s),
                        step_s=second.steps_s / setup.steps, filled=statistics.mean(filled),
                        attended=statistics.mean(attended(n) for n in filled),
                        graph_skips=cuda_graph_skips() - skips)


# -----------------------------------------------------------------------------
# correctness on a model with the decode shape's attention


def lidr_generate_tokens(model, prompts, new_tokens: int, compile: bool) -> list[list[int]]:
    """lidr's generate, greedy, no stops."""
    from lidr.sampler import generate
    from lidr.settings import Decoding

    decoding = Decoding(max_new_tokens=new_tokens, temperature=0.0)
    return [c.tokens for c in generate(model, NoStops(), prompts, decoding, batch_size=len(prompts), compile=compile)]


def synthetic_pairs(n_pairs: int, row_len: int, vocab: int, seed: int = 0):
    """Pairs whose prompt + response is half a row: two sequences fill a row exactly."""
    from lidr.train import Example

    generator = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(2, vocab, (n,), generator=generator).tolist()

    return [Example(i, tokens(row_len // 8), [tokens(3 * row_len // 8), tokens(3 * row_len // 8)])
            for i in range(n_pairs)]


def ragged_pairs(vocab: int):
    """Pairs of uneven lengths (rows hold different numbers of sequences, and padding)."""
    from lidr.train import Example

    generator = torch.Generator().manual_seed(1)
    lengths = [(5, 40), (30, 7), (12, 12), (3, 50), (25, 20)]

    def tokens(n):
        return torch.randint(2, vocab, (n,), generator=generator).tolist()

    return [Example(i, tokens(p), [tokens(r), tokens(r // 2 + 1)]) for i, (p, r) in enumerate(lengths)]


def pack_documents(examples, row_len, device):
    from lidr.train import pack

    return pack(examples, 0, row_len, device, dense_mask=False)


def pack_dense(examples, row_len, device):
    from lidr.train import pack

    return pack(examples, 0, row_len, device, dense_mask=True)


@dataclass(frozen=True)
class TrainPacking:
    """How packed rows attend in training."""

    pack: Callable  # (examples, row_len, device) -> lidr.train.Packed
    flex: bool | None = None  # Documents through flex attention (True) or the per-sequence loop (False); None: dense


TRAIN_PACKINGS = {
    "Documents, flex attention's document mask (lidr on CUDA)": TrainPacking(pack_documents, flex=True),
    "Documents, one SDPA call per sequence (lidr on CUDA without flex attention)": TrainPacking(pack_documents,
                                                                                                flex=False),
    "dense mask (lidr on CPU)": TrainPacking(pack_dense),
}


def packing_skip(packing: TrainPacking, setup: Setup, machine: Machine) -> str | None:
    """Why this machine cannot run a packing (forward and backward), or None."""
    if not packing.flex:
        return None
    if lidr.kernels.attention.flex_attention is None:
        return "this torch has no flex_attention"
    if setup.device != "cuda":
        return "flex_attention has no backward on CPU (lidr runs Documents through it on CUDA only)"
    if not machine.can_compile:
        return machine.compile_skip
    return None


@contextmanager
def attending_as(packing: TrainPacking):
    """Documents attend as the packing says: flex attention where lidr.kernels.attention.flex_documents picks it (CUDA), the
    per-sequence loop where flex is False (flex_documents switched off meanwhile, so the loop is timed on CUDA too)."""
    if packing.flex is not False:
        yield
        return
    flex_documents = lidr.kernels.attention.flex_documents
    lidr.kernels.attention.flex_documents = lambda device: False
    try:
        yield
    finally:
        lidr.kernels.attention.flex_documents = flex_documents


def logps_and_grads(model, batch):
    """(per-sequence log-probs, {name: gradient}) of Σ log-probs, as the trainer computes them."""
    from lidr.train import forward_logps

    model.zero_grad(set_to_none=True)
    logps, _ = forward_logps(model, batch)
    logps.sum().backward()
    return logps.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


def section_correctness(table, setup: Setup, machine: Machine):
    cfg, device = setup.check_cfg, setup.device
    bf16 = random_model(cfg, device, torch.bfloat16)
    reference = copy.deepcopy(bf16).float()  # the same (bf16-rounded) weights: the check is of the arithmetic
    label = f"{cfg.n_heads}/{cfg.n_kv_heads} heads of {cfg.head_dim}, {cfg.n_layers} layers"
    tokens = torch.tensor(random_prompts(2, 64, cfg.vocab_size), device=device)
    with torch.no_grad():
        error = relative_error(bf16(tokens), reference(tokens))
    table.check("correctness", f"forward logits, bf16 vs fp32 ({label})", f"{error:.1e} (< {BF16_MODEL:g})",
                within(error, BF16_MODEL), error=error)

    # decode paths: two rows of different lengths, prefill then teacher-forced steps
    prompts = [random_prompts(1, 20, cfg.vocab_size, seed=2)[0], random_prompts(1, 13, cfg.vocab_size, seed=3)[0]]
    forced = torch.tensor(random_prompts(2, 6, cfg.vocab_size, seed=4))
    max_len = 20 + 6 + 40  # the cache longer than the filled part: the mask matters
    with torch.no_grad():
        expected = []
        for p, f in zip(prompts, forced.tolist()):
            logits = reference(torch.tensor([p + f], device=device))[0]
            expected.append(logits[len(p) - 1 : len(p) + len(f)])
        expected = torch.stack(expected)
    for name, path in DECODE_PATHS.items():
        what = f"decode path {name}: prefill + 6 steps, bf16 vs fp32"
        if path.compiles and not machine.can_compile:
            table.skip("correctness", what, machine.compile_skip)
            continue

        def measure(name=name, path=path, what=what):
            skips = cuda_graph_skips()
            got = lidr_step_logits(bf16, prompts, forced, max_len, path, setup)
            error = relative_error(got, expected)
            table.check("correctness", what, f"{error:.1e} (< {BF16_MODEL:g})", within(error, BF16_MODEL), error=error)
            if path.compiles and device == "cuda":
                skipped = cuda_graph_skips() - skips
                table.check("correctness", f"decode path {name}: CUDA graphs captured", f"{skipped} skipped",
                            skipped == 0)

        table.guarded("correctness", what, measure)
        free_memory()

    # packed training paths: log-probs and gradients against the fp32 dense mask
    examples = ragged_pairs(cfg.vocab_size)
    for model in (reference, bf16):
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
    ref_logps, ref_grads = logps_and_grads(reference, pack_dense(examples, 120, device))
    for name, packing in TRAIN_PACKINGS.items():
        reason = packing_skip(packing, setup, machine)
        if reason:
            table.skip("correctness", f"training path {name}", reason)
            continue

        def measure(name=name, packing=packing):
            with attending_as(packing):
                logps, grads = logps_and_grads(bf16, packing.pack(examples, 120, device))
            error = relative_error(logps, ref_logps)
            grad_error = max(relative_error(grads[n], ref_grads[n]) for n in grads)
            table.check("correctness", f"training path {name}: log-probs, bf16 vs fp32 dense", f"{error:.1e} "
                        f"(< {BF16_MODEL:g})", within(error, BF16_MODEL), error=error)
            table.check("correctness", f"training path {name}: gradients (worst tensor), bf16 vs fp32 dense",
                        f"{grad_error:.1e} (< {BF16_GRADIENTS:g})", within(grad_error, BF16_GRADIENTS),
                        error=grad_error)

        table.guarded("correctness", f"training path {name}", measure)
    del reference, bf16

    what = "generate(compile=True) gives the eager greedy tokens (fp32, tiny model)"
    if device == "cpu":
        table.skip("correctness", what, "CPU dry run: inductor would build C++ for ~20 s; tests/test_sampler.py "
                                        "checks generate(compile=True) on CPU")
    elif not machine.can_compile:
        table.skip("correctness", what, machine.compile_skip)
    else:
        model = tiny_model(device, torch.float32, std=0.2)  # fp32 and spread logits: no argmax flipped by rounding
        prompts = random_prompts(3, 9, TINY.vocab_size)
        eager, compiled = (lidr_generate_tokens(model, prompts, 24, compile) for compile in (False, True))
        same = sum(a == b for a, b in zip(eager, compiled))
        table.check("correctness", what, f"{same}/{len(eager)} rows", same == len(eager))


# -----------------------------------------------------------------------------
# decode: a Llama-3-8B-shaped model against transformers


def decode_row(timing: DecodeTiming, batch: int, weights: int, kv_per_position: int, machine: Machine):
    """(the row's text, its numbers) of one timed decode path."""
    useful_bytes = weights + batch * kv_per_position * timing.filled
    bandwidth = useful_bytes / timing.step_s
    numbers = {"batch": batch, "step_s": timing.step_s, "tokens_per_s": batch / timing.step_s,
               "bytes_per_step": useful_bytes, "bytes_per_s": bandwidth, "prefill_s": timing.prefill_s,
               "first_pass_extra_s": timing.first_pass_extra_s, "positions_filled": timing.filled,
               "positions_attended": timing.attended, "cuda_graph_skips": timing.graph_skips}
    line = f"{timing.step_s * 1e3:.2f} ms/step, {batch / timing.step_s:,.0f} tok/s, {bandwidth / 1e9:,.0f} GB/s"
    if machine.copy_bandwidth:
        numbers["share_of_copy"] = bandwidth / machine.copy_bandwidth
        line += f" = {bandwidth / machine.copy_bandwidth:.0%} of copy"
    line += (f"; attends {timing.attended:,.0f} of {timing.filled:,.0f} filled positions; "
             f"prefill {timing.prefill_s:.2f} s, first pass {timing.first_pass_extra_s:+.1f} s")
    return line, numbers


def section_decode(table, setup: Setup, machine: Machine):
    cfg = setup.decode_cfg
    model, hf = shared_weight_models(cfg, setup.device, torch.bfloat16)
    weights, kv_per_position = streamed_weight_bytes(model), kv_bytes_per_position(cfg)
    table.add("decode", "bytes per step", f"{weights / 1e9:.2f} GB of weights (embedding table not counted) + "
              f"{kv_per_position / 1e3:.0f} kB of KV per filled position per row", weight_bytes=weights,
              kv_bytes_per_position=kv_per_position)
    tokens = torch.tensor(random_prompts(1, 32, cfg.vocab_size), device=setup.device)
    with torch.no_grad():
        error = relative_error(model(tokens), hf(tokens).logits)
    table.check("decode", "logits lidr vs transformers, both bf16, same weights", f"{error:.1e} (< {BF16_MODEL:g})",
                within(error, BF16_MODEL), error=error)
    if machine.copy_bandwidth is None:
        table.add("decode", "copy bandwidth", "not measured (the machine section did not run): no shares below")

    best = {}
    for batch in setup.batches:
        prompts = random_prompts(batch, setup.prompt_len, cfg.vocab_size, seed=batch)
        speeds, shares = {}, {}
        sides = []
        for name, path in DECODE_PATHS.items():
            step_fn, flex = decode_step(path, setup)
            sides.append((name, path, lambda p=path, s=step_fn, f=flex: lidr_decode_pass(
                model, prompts, setup.max_len, setup.warm_steps, setup.steps, p.compiles, s, f),
                lambda n, p=path, f=flex: attended_positions(p.compiles, f, n, cache_length(setup.max_len))))
        for name, path in TRANSFORMERS_PATHS.items():
            sides.append((name, path,
                          lambda p=path: transformers_decode_pass(hf, prompts, setup, p.generate_kwargs(setup)),
                          lambda n, p=path: p.attended(n, setup.max_len)))
        for name, path, run_pass, attended in sides:
            what = f"batch {batch}: {name}"
            if path.compiles and not machine.can_compile:
                table.skip("decode", what, machine.compile_skip)
                continue

            def measure(name=name, path=path, run_pass=run_pass, attended=attended, what=what):
                timing = timed_twice(run_pass, setup, attended)
                line, numbers = decode_row(timing, batch, weights, kv_per_position, machine)
                speeds[name], shares[name] = numbers["tokens_per_s"], numbers.get("share_of_copy")
                table.add("decode", what, line, **numbers)
                if path.compiles and setup.device == "cuda":
                    graphs = f"{timing.graph_skips} skipped"
                    if isinstance(path, DecodePath):  # lidr's own: a skipped graph is a defect
                        table.check("decode", f"{what}: CUDA graphs captured", graphs, timing.graph_skips == 0)
                    else:
                        table.add("decode", f"{what}: CUDA graphs", graphs)

            table.guarded("decode", what, measure)
            free_memory()
        ours = {n: s for n, s in speeds.items() if n in DECODE_PATHS}
        theirs = {n: s for n, s in speeds.items() if n in TRANSFORMERS_PATHS}
        if ours:
            mine = max(ours, key=ours.get)
            for other, speed in theirs.items():
                table.add("decode", f"batch {batch}: lidr best / {other}", f"{ours[mine] / speed:.2f}x ({mine})",
                          ratio=ours[mine] / speed)
        if ours and theirs:
            best[batch] = max(ours.values()) / max(theirs.values())
        if batch == 1 and ours and machine.copy_bandwidth:
            share = shares[max(ours, key=ours.get)]
            table.add("decode", "goal: batch-1 decode >= 75% of copy bandwidth",
                      "met" if share >= 0.75 else f"not met ({share:.0%})")
    if best:
        behind = [b for b, ratio in best.items() if ratio < 1]
        table.add("decode", "goal: lidr ahead of transformers' best at every batch size",
                  "met" if not behind else f"not met (behind at batch {', '.join(map(str, behind))})")


# -----------------------------------------------------------------------------
# train: a DPO step of a Llama-3.2-1B-shaped model


def make_optimizer(model):
    """The trainer's AdamW, with its default settings (lidr/harness/training.py run())."""
    from lidr.settings import TRAINING

    return torch.optim.AdamW(model.parameters(), lr=TRAINING.lr, weight_decay=TRAINING.weight_decay,
                             betas=(0.9, 0.95))


def section_train(table, setup: Setup, machine: Machine):
    import torch.distributed as dist

    from lidr.dpo import dpo_loss
    from lidr.train import flops_per_token, forward_logps, setup_distributed, shard_model

    _, _, device = setup_distributed()  # a one-rank group, as a plain `python train_dpo.py` makes
    try:
        with torch.device("meta"):
            model = Llama(setup.train_cfg)
        shard_model(model, device, torch.bfloat16, activation_checkpointing=False)
        model.init_weights()
        optimizer = make_optimizer(model)
        n_pairs = setup.n_pairs
        examples = synthetic_pairs(n_pairs, setup.row_len, setup.train_cfg.vocab_size)
        reference = torch.zeros(n_pairs, 2, device=device)
        n_tokens = sum(len(ex.prompt) + len(r) for ex in examples for r in ex.responses)
        seq_len = setup.row_len // 2
        table.add("train", "micro-batch", f"{n_pairs} pairs = {2 * n_pairs} sequences of {seq_len:,} tokens in rows of "
                  f"{setup.row_len:,}; {flops_per_token(model, seq_len) / 1e9:.3g} GFLOP per token")
        for name, packing in TRAIN_PACKINGS.items():
            reason = packing_skip(packing, setup, machine)
            if reason:
                table.skip("train", f"DPO step, {name}", reason)
                continue

            def measure(name=name, packing=packing):
                batch = packing.pack(examples, setup.row_len, device)

                def step():
                    with attending_as(packing):
                        logps, lengths = forward_logps(model, batch)
                    losses, _, _ = dpo_loss(logps[:n_pairs], logps[n_pairs:], reference[:, 0], reference[:, 1], 0.1)
                    (losses - logps[:n_pairs] / lengths[:n_pairs]).mean().backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                try:
                    step()  # AdamW's state allocated
                except torch.cuda.OutOfMemoryError:  # a measurement, not a failure: what Documents avoids
                    optimizer.zero_grad(set_to_none=True)
                    table.add("train", f"DPO step, {name}", "out of memory")
                    return
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                seconds = median_seconds(step, repeats=3, warm_up=1)
                tokens_per_s = n_tokens / seconds
                achieved = flops_per_token(model, seq_len) * tokens_per_s
                numbers = {"seconds": seconds, "tokens_per_s": tokens_per_s, "flops_per_s": achieved}
                line = f"{tokens_per_s:,.0f} tok/s, {seconds * 1e3:.0f} ms"
                if machine.datasheet_flops:
                    numbers["mfu_datasheet"] = achieved / machine.datasheet_flops
                    line += f", MFU {achieved / machine.datasheet_flops:.1%} of the datasheet peak"
                if machine.matmul_flops:
                    numbers["mfu_measured"] = achieved / machine.matmul_flops
                    line += f", {achieved / machine.matmul_flops:.1%} of the measured matmul rate"
                if torch.cuda.is_available():
                    numbers["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
                    line += f", peak memory {numbers['peak_memory_bytes'] / 2**30:.1f} GiB"
                table.add("train", f"DPO step, {name}", line, **numbers)
                if "mfu_datasheet" in numbers and name == next(iter(TRAIN_PACKINGS)):  # lidr's way on CUDA
                    mfu = numbers["mfu_datasheet"]
                    table.add("train", "goal: MFU >= 40% of the datasheet peak",
                              "met" if mfu >= 0.4 else f"not met ({mfu:.1%})")

            table.guarded("train", f"DPO step, {name}", measure)
            optimizer.zero_grad(set_to_none=True)
            free_memory()
    finally:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# torchrun train_dpo.py over nccl, end to end


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
    # the config's bos/eos are the tokenizer's special tokens (lidr.checkpoint checks that they belong together)
    cfg = dataclasses.replace(TINY, bos_token_id=tokenizer.token_to_id("<|begin_of_text|>"),
                              eos_token_id=tokenizer.token_to_id("<|eot_id|>"))
    save(folder, cfg, model.state_dict())
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


def section_torchrun(table, setup: Setup, machine: Machine):
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
        table.check("torchrun", "exported folder: dtype, loads in lidr, finite", exported,
                    exported == "bfloat16" and finite)


# -----------------------------------------------------------------------------

SECTIONS = {"preflight": section_preflight, "machine": section_machine, "correctness": section_correctness,
            "attention": section_attention, "decode": section_decode, "train": section_train,
            "torchrun": section_torchrun}


def parse_sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section {', '.join(map(repr, unknown)) or '(none given)'}; "
                                         f"choose among {', '.join(SECTIONS)}")
    return names


def positive_seconds(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of seconds >= 1, got {text!r}")
    return int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="decode at batch 1 only, fewer steps, a smaller training "
                                                             "micro-batch, fewer repeats: run it first")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="every section on CPU at tiny shapes, one thread: checks this script where there is no "
                             "GPU, measures nothing")
    parser.add_argument("--sections", type=parse_sections, default=list(SECTIONS),
                        help=f"comma-separated, among {', '.join(SECTIONS)} (preflight always runs; default: all)")
    parser.add_argument("--section-seconds", type=positive_seconds,
                        help="time limit of every section (default: each its own, "
                             + ", ".join(f"{k} {v}" for k, v in SECTION_SECONDS.items()) + ")")
    parser.add_argument("--json", type=Path, help="write every number here, and the table beside it with the suffix "
                                                  ".md (both rewritten after each section)")
    args = parser.parse_args(argv)
    if args.cpu_dry_run:
        setup = CPU_DRY_RUN_QUICK if args.quick else CPU_DRY_RUN
    else:
        setup = GPU_QUICK if args.quick else GPU
    if setup.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
              "nothing was measured (--cpu-dry-run checks the script on CPU)", file=sys.stderr)
        raise SystemExit(2)
    if args.cpu_dry_run:  # measures nothing: one thread keeps it quick on a shared machine (torchrun's child too)
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references in fp32
    torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    table, machine = Table(args.json, ["python", "bench/gpu.py", *(sys.argv[1:] if argv is None else argv)]), Machine()
    for name in ["preflight"] + [s for s in SECTIONS if s in args.sections and s != "preflight"]:
        table.run(name, args.section_seconds or SECTION_SECONDS[name], SECTIONS[name], setup, machine)
    table.add("total", "wall time", f"{time.perf_counter() - start:.0f} s")
    table.save_json()
    print()
    print(table.markdown())
    if table.failed():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
