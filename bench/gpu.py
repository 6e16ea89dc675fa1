"""GPU check and benchmark: is lidr right on CUDA, how fast, and against which limits.

    python bench/gpu.py --quick --total-seconds 560   # first: every section, decode at batch 1 only, in one 10-minute call
    python bench/gpu.py --sections decode --json OUT/decode.json   # then a section per call, with its full limit
    python bench/gpu.py --section-seconds decode=1200,train=900   # other limits (one number: every section)
    python bench/gpu.py --cpu-dry-run --quick     # no GPU: every section at tiny shapes on CPU (checks the script)

Each section runs in a worker process of its own (a session of its own, so the worker leads a
process group) under a time limit (SECTION_SECONDS, --section-seconds): an error is a FAIL row
with its text; at the limit the worker's whole process group is stopped (SIGTERM, then SIGKILL
after GRACE_SECONDS: inductor's compile workers and a torchrun agent go with it, and the agent
passes the SIGTERM on to its own workers), a TIMEOUT row follows the rows measured so far, and
the next section runs. A worker also ends, and passes a SIGTERM to its group, when the parent
dies. The limits are minutes (a cold Triton compile of a decode step or of flex attention's
backward takes one or more) and add up to about 50 minutes; a section usually ends well before
its limit. --total-seconds caps the whole run: each section's limit shrinks to what is left, and
a section with too little left is not started (a SKIP row). At the end a markdown table (for
bench/RESULTS.md) is printed; --json PATH writes every number there and the table to PATH with
the suffix .md, both rewritten after each section.

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
  (median of CUDA events). A kernel alone: not a generation.
- decode: a Llama-3-8B-shaped model with random bf16 weights, checked against transformers' on
  the same tensors; batch 1, 16 and 64 prompts of 512 tokens. The same work on both sides: lidr's
  full sampler (`lidr.sampler.generate`: eager step, and compile=True: flex attention under CUDA
  graphs) against transformers' full `generate()` (its default dynamic cache, and its static
  cache compiled), each given the same decoding settings, LIDR's answers' (lidr.settings.ANSWERS):
  greedy, repetition penalty 1.1 over prompt and output tokens, a stop token, no stop string, the
  same max_new_tokens. Each side does what it does for those settings and nothing is stripped:
  lidr samples on the device and reads the tokens every SYNC_EVERY (8) steps to check stops;
  transformers checks its stopping criteria with a host sync every step. Every row's label says
  "full generate()", and the JSON row records the settings read from the arguments each side was
  given ("decoding"). lidr / transformers ratios.
- train: a DPO run of a Llama-3.2-1B-shaped model as the trainer runs it (`lidr.train.steps`, the
  loop of train_dpo.py): FSDP2 on one rank (one rank, stated as one: no gradient communication is
  in the numbers), bf16 compute with fp32 master weights, Training's defaults (lidr/settings.py:
  AdamW β (0.9, 0.999), ε 1e-8, no weight decay, fused on CUDA; clipping 1.0; a linear schedule;
  sigmoid DPO β 0.1 + α 1.0 NLL; 4 pairs a step; rows of 2,048), activation checkpointing as the
  trainer's memory plan chooses it (lidr.harness.memory: on where the micro-batch would not fit
  without it; a 1B model on one 80 GB GPU fits without, an 8B model on 8 x 80 GB does not), and
  one more row with the other choice, so the cost of recomputation is seen. The pairs are ragged:
  prompt and responses of uneven lengths (prompts 1/128 to 1/8 of a row, responses 1/32 to 1/2,
  drawn apart), packed first-fit into rows that end in padding. Per packed-training path:
  tokens/s of real tokens, and apart counting the padding (the positions computed), MFU, peak memory.
- torchrun: `train_dpo.py` under torchrun over nccl on a tiny model, end to end with the export.

What the numbers count:
- Decode: each side's generate() is called once untimed (compiling, CUDA-graph capture: "first
  call", its extra time over the timed ones), then timed (host clock after a device sync, median
  of `decode_repeats`) with max_new_tokens = N = steps + 1 and with max_new_tokens = 1 (prefill and
  the first token, "prefill"); a decode step = (T(N) - T(1)) / (N - 1), everything the sampler
  does in those steps included. The random model's output row of the stop token is zero, so its
  logit (0) is never the greedy pick: no row stops early, every row of both sides generates N
  tokens (checked: a row that did not is a FAIL), and both sides still run their stop checks.
- Bytes per decode step = the weights streamed (every parameter but the embedding table, which a
  step reads one row of; a tied table counts once, as the output projection) + the KV cache of
  the positions filled at that step. A path that attends over more reads more than that and gets
  no credit for it: its row says how many positions it attends (lidr's eager step: the filled
  part rounded up to 64, LENGTH_BUCKET; its flex step: the filled blocks of 128, FLEX_BLOCK;
  transformers' static cache: the whole cache). GB/s is compared with the measured copy bandwidth.
- Training tokens/s: real tokens (prompt + response of every sequence, as the trainer's log
  counts them) over the timed steps' time; "counting the padding": every position of the packed
  rows (rows x width), whose share of padding is given. MFU = training FLOPs of the timed steps'
  real sequences (lidr.kernels.hardware.training_flops; recompute and padding not counted) over
  their time and the datasheet dense bf16 peak of this SKU (lidr.kernels.hardware.DATASHEET_BF16),
  and apart over the measured matmul rate.
- Correctness: relative error ||out - ref|| / ||ref|| against an fp32 reference on the same (bf16)
  inputs; tolerances beside each row (bf16 lands between 1e-3 and 1e-2).

How this departs from a user's run: random weights (and the stop token's zero output row); every
prompt of a batch has the same length (Setup.prompt_len); in the decode section each generate()
sizes its cache for prompt + max_new_tokens (577 positions at N = 65), not for LIDR's 2,400-token
answers (2,912), so transformers' static cache, which attends its whole length, reads less here
than in LIDR's runs (the attention section times the 2,912-position cache); training runs on one
rank, on random tokens, with a zero reference table (the DPO loss's value does not change the work).
The attention and decode paths come from small tables (train_attention_paths,
decode_attention_paths, prefill_attention_paths, DECODE_PATHS, TRANSFORMERS_PATHS,
TRAIN_PACKINGS): a new path is one more entry.

--cpu-dry-run runs every section on CPU at tiny shapes: torch.compile traces with the "eager"
backend there (lidr's generate(compile=True) included; dynamo runs, no code is generated), so it
checks the script, not the speed, and prints no verdict against a goal.

Exit status: 0 when no row failed, 1 when one did (a wrong result, an error, a worker that died),
2 without CUDA. On a GPU, the goals of issue 18 (batch-1 decode >= 75% of the copy bandwidth,
DPO MFU >= 40% of the datasheet peak, lidr ahead of transformers' best at every batch size) are
printed as verdicts ("goal: ...": "met" or "not met"), not failed; a dry run prints none.
"""

import argparse
import copy
import ctypes
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
from lidr.sampler import LENGTH_BUCKET, SYNC_EVERY  # noqa: E402
from lidr.settings import ANSWERS, TRAINING  # noqa: E402

LLAMA3_8B = LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                        head_dim=128, rope_theta=500000.0, max_seq_len=8192)
LLAMA32_1B = LlamaConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                         head_dim=64, rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True)
# correctness on the GPU: Llama-3-8B's attention (32 heads, 8 kv heads of 128), 2 layers, a small vocabulary
CHECK_8B_HEADS = replace(LLAMA3_8B, vocab_size=4096, n_layers=2, ffn_dim=1024)
TINY = LlamaConfig(vocab_size=1024, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, head_dim=32,
                   max_seq_len=512, bos_token_id=0, eos_token_id=1)

# default time limit of each section, seconds: minutes, for a cold Triton compile (lidr's compiled decode step and
# transformers' static-cache forward at every batch size, flex attention's forward and backward); --section-seconds
SECTION_SECONDS = {"preflight": 180, "machine": 120, "correctness": 480, "attention": 480, "decode": 900, "train": 600,
                   "torchrun": 300}
GRACE_SECONDS = 15  # after a worker's group gets SIGTERM, the seconds before SIGKILL
MIN_SECTION_SECONDS = 30  # under --total-seconds, a section with less time left is not started

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
    max_new_tokens: int  # LIDR's answers: the attention section's cache holds prompt_len + max_new_tokens positions
    steps: int  # decode steps timed: each generate() of the decode section asks for steps + 1 new tokens
    decode_repeats: int  # timed generate() calls of each length, the median taken
    batches: tuple[int, ...]  # decode batch sizes
    row_len: int  # packed training rows (the trainer's max_len)
    attention_rows: int  # rows of the attention section's training shape
    n_pairs: int  # DPO pairs per micro-batch (the trainer's batch_size)
    train_warm_steps: int  # optimizer steps before the timed ones (flex attention compiles a first and a second width)
    train_steps: int  # optimizer steps timed
    doc_counts: tuple[int, ...]  # sequences per row (attention section)
    repeats: int  # timed repeats of one attention call
    compile_options: dict = field(default_factory=dict)  # torch.compile of a decode step

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.max_new_tokens

    @property
    def decode_new_tokens(self) -> int:
        """max_new_tokens of the decode section's timed generate() calls: the prefill's token, then `steps`."""
        return self.steps + 1


GPU = Setup("cuda", CHECK_8B_HEADS, LLAMA3_8B, LLAMA32_1B, copy_bytes=2 * 2**30, matmul_n=8192, prompt_len=512,
            max_new_tokens=ANSWERS.max_new_tokens,  # 2,400: compiled decode attends over 2,912 (attention section)
            steps=64, decode_repeats=3, batches=(1, 16, 64), row_len=TRAINING.max_len, attention_rows=8,
            n_pairs=TRAINING.batch_size, train_warm_steps=3, train_steps=5, doc_counts=(2, 8), repeats=10,
            compile_options={"mode": "reduce-overhead", "dynamic": False, "fullgraph": True})
GPU_QUICK = replace(GPU, steps=32, decode_repeats=2, batches=(1,), train_steps=3, doc_counts=(2,), repeats=5)
CPU_DRY_RUN = Setup("cpu", TINY, TINY, TINY, copy_bytes=2**24, matmul_n=256, prompt_len=16, max_new_tokens=48,
                    steps=4, decode_repeats=1, batches=(1, 2), row_len=128, attention_rows=2, n_pairs=2,
                    train_warm_steps=1, train_steps=2, doc_counts=(2, 4), repeats=2,
                    compile_options={"backend": "eager", "dynamic": False, "fullgraph": True})
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


class Table:
    """Rows of (section, what, value, status); status "ok", "FAIL", "SKIP", "TIMEOUT" or "" (a measurement).

    In a section's worker, rows_path: each row is also appended there as a JSON line when it is added, so the
    parent keeps the rows measured before a worker is stopped."""

    def __init__(self, json_path: Path | None, command: list[str], rows_path: Path | None = None):
        self.rows, self.sections, self.environment = [], {}, {}
        self.json_path, self.command, self.rows_path = json_path, command, rows_path
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def add(self, section, what, value, status="", **numbers):
        """numbers: the row's raw values (floats, or a dict of settings), written to the JSON file only."""
        row = {"section": section, "what": what, "value": str(value), "status": status, **numbers}
        self.rows.append(row)
        if self.rows_path is not None:
            with open(self.rows_path, "a") as f:
                f.write(json.dumps(row) + "\n")
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

    def run(self, section, fn, *args):
        """fn(table, *args) in this process, no time limit (a worker's section, or a test's): an exception
        becomes a FAIL row and the caller goes on."""
        try:
            fn(self, *args)
        except Exception as e:  # noqa: BLE001 -- a broken section must not stop the others
            traceback.print_exc()
            self.add(section, "error", f"{type(e).__name__}: {str(e)[:300]}", "FAIL")
        free_memory()

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


# -----------------------------------------------------------------------------
# workers: a section in a process of its own, stopped with everything it started


@dataclass
class WorkerResult:
    returncode: int | None
    timed_out: bool
    stdout: str | None = None
    stderr: str | None = None
    left: list[int] = field(default_factory=list)  # pids of its group still alive after it was stopped (none, so far)


def living_members(pgid: int) -> list[int]:
    """The processes of process group pgid that have not ended (a zombie has: it only waits to be reaped), read
    from /proc; where there is no /proc, [pgid] while kill(-pgid, 0) finds the group, else []."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        state, _, group = stat[stat.rindex(")") + 2:].split()[:3]  # after "pid (name) ": state, ppid, pgrp
        if int(group) == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def signal_group(pgid: int, signum: int):
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):  # the group has ended (or only zombies are left)
        pass


def stop(proc: subprocess.Popen, own_group: bool, grace: float) -> list[int]:
    """End proc, and with own_group (proc leads a process group: start_new_session) every process of its group:
    SIGTERM first (a torchrun agent passes it on to its workers, which run in sessions of their own, and waits for
    them; a worker of this script passes it to its group), then SIGKILL to what is left after `grace` seconds;
    return once none of them is alive ([]), or the pids that outlived even SIGKILL by 10 s."""
    def alive():
        proc.poll()  # reaps proc once it ends: a zombie counts as ended
        return living_members(proc.pid) if own_group else ([proc.pid] if proc.returncode is None else [])

    send = (lambda signum: signal_group(proc.pid, signum)) if own_group else proc.send_signal
    for signum, seconds in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        if proc.returncode is None or own_group:
            send(signum)
        deadline = time.monotonic() + seconds
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not alive():
            break
    proc.wait()
    return alive()


def run_worker(cmd: list[str], seconds: float, *, own_group: bool = True, grace: float = GRACE_SECONDS,
               capture: bool = False, **popen) -> WorkerResult:
    """cmd under a time limit. own_group: in a session of its own, so that it leads a process group and, at the
    limit (or when this process is interrupted), `stop` ends the whole group: nothing it started is left (on
    the GPU or elsewhere). Without own_group, the command stays in this process's group (a parent that stops
    this group stops it too) and only it is signalled. capture: stdout and stderr as text."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True} if capture else {}
    proc = subprocess.Popen(cmd, start_new_session=own_group, **pipes, **popen)
    try:
        out, err = proc.communicate(timeout=seconds)
        return WorkerResult(proc.returncode, False, out, err)
    except subprocess.TimeoutExpired:
        left = stop(proc, own_group, grace)
        try:  # what the command printed before; a process outside the group may still hold the pipes
            out, err = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            out = err = None
        return WorkerResult(proc.returncode, True, out, err, left)
    except BaseException:  # interrupted (Ctrl-C): the worker goes too
        stop(proc, own_group, grace)
        raise


def pass_termination_to_group():
    """In a section's worker, which leads its process group: a SIGTERM (the parent stopping it, or the parent's
    death, below) goes to every process of the group (a torchrun agent, inductor's compile workers) before the
    worker ends as SIGTERM ends it."""
    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal_group(os.getpgrp(), signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, terminate)


def end_with_parent(parent_pid: int):
    """SIGTERM to this process when its parent dies (Linux's PR_SET_PDEATHSIG; elsewhere nothing): a worker in a
    session of its own is not reached by what stops its parent's group."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def read_state(work: Path) -> tuple[Machine, dict]:
    """(what the sections learned about the machine, the environment of the table) as the last worker left them."""
    state = json.loads((work / "state.json").read_text())
    return Machine(**state["machine"]), state["environment"]


def write_state(work: Path, machine: Machine, environment: dict):
    tmp = work / "state.json.tmp"
    tmp.write_text(json.dumps({"machine": dataclasses.asdict(machine), "environment": environment}))
    os.replace(tmp, work / "state.json")


def read_rows(path: Path) -> list[dict]:
    """The rows a worker appended to path (a last line cut short by a kill left out)."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def worker_command(section: str, flags: list[str], work: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *flags, "--worker", section, "--worker-dir", str(work)]


def run_section(table: Table, section: str, seconds: float, cmd: list[str], work: Path):
    """One section: cmd (a worker, which appends its rows to WORK/SECTION.jsonl and leaves the machine's state in
    WORK/state.json) under the time limit; its rows, then a TIMEOUT or FAIL row where it was stopped or died,
    then the section's time."""
    print(f"== {section} (limit {seconds:.0f} s, in a worker process)", flush=True)
    rows_path = work / f"{section}.jsonl"
    rows_path.unlink(missing_ok=True)
    start = time.perf_counter()
    result = run_worker(cmd, seconds, cwd=ROOT, env=dict(os.environ, LIDR_BENCH_PARENT=str(os.getpid())))
    seconds_taken = time.perf_counter() - start
    table.rows.extend(read_rows(rows_path))  # printed by the worker as it added them
    if (work / "state.json").exists():
        table.environment.update(read_state(work)[1])
    status = "ok"
    if result.timed_out:
        status = "TIMEOUT"
        ended = ("the worker and every process of its group ended" if not result.left else
                 f"{len(result.left)} process(es) of the worker's group still alive after SIGKILL (pids "
                 f"{', '.join(map(str, result.left))})")
        table.add(section, "time limit", f"stopped after {seconds:.0f} s (SIGTERM to the worker's process group, "
                  f"SIGKILL {GRACE_SECONDS} s later): {ended}; the rows above were measured before", status)
    elif result.returncode != 0:
        died = (f"killed by {signal.Signals(-result.returncode).name}" if result.returncode < 0
                else f"exited with status {result.returncode}")
        table.add(section, "worker", f"{died} (its output above says why)", "FAIL")
    if status == "ok" and any(r["status"] == "FAIL" for r in table.rows if r["section"] == section):
        status = "FAIL"
    table.sections[section] = {"status": status, "seconds": round(seconds_taken, 1), "limit_s": round(seconds)}
    table.add(section, "section time", f"{seconds_taken:.0f} s of {seconds:.0f}")
    table.save_json()


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
    "lidr generate(), eager step (grouped SDPA over the filled length)": DecodePath(compiles=False),
    "lidr generate(compile=True) (flex attention over the filled blocks, CUDA graphs)": DecodePath(compiles=True),
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
    "transformers generate(), dynamic cache (default)": TransformersPath(lambda setup: {},
                                                                         lambda filled, max_len: filled),
    "transformers generate(), static cache compiled": TransformersPath(  # the cache sized max_length - 1
        transformers_static_compiled, lambda filled, max_len: max_len - 1, compiles=True),
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
    """Token ids from 2 to vocab - 2: the last id is the decode section's stop token."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab - 1, (n, length), generator=generator).tolist()


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


class StopToken:
    """The tokenizer lidr's generate() gets in the decode section: one stop token (stop_ids), text never read."""

    def __init__(self, stop_id: int):
        self.stop_ids = frozenset({stop_id})

    def decode(self, ids, skip_special_tokens=False):
        return ""


def stop_token_id(cfg: LlamaConfig) -> int:
    """The decode section's stop token: the last of the vocabulary (random prompts leave it out)."""
    return cfg.vocab_size - 1


def silence(model: Llama, token: int):
    """Zero the output projection's row of `token`: its logit is 0 for every input and the greedy pick is the
    largest of a random vocabulary's logits, which is above 0, so no row ever stops at it (the repetition penalty
    keeps a 0 at 0). The model is untied: the embedding table is not touched."""
    assert not model.cfg.tie_embeddings, "a tied model would lose the token's embedding too"
    with torch.no_grad():
        model.lm_head.weight[token].zero_()


def decoding_settings(greedy: bool, repetition_penalty: float, max_new_tokens: int, stop_token_ids, stop_strings,
                      prompts: list[list[int]]) -> dict:
    """One side's decoding settings, as the decode rows record them ("decoding" in the JSON)."""
    return {"greedy": bool(greedy), "repetition_penalty": float(repetition_penalty),
            "max_new_tokens": int(max_new_tokens), "stop_token_ids": sorted(int(t) for t in stop_token_ids),
            "stop_strings": list(stop_strings), "rows": len(prompts),
            "prompt_tokens": sorted({len(p) for p in prompts})}


def lidr_generate_arguments(model: Llama, prompts: list[list[int]], new_tokens: int, compiles: bool) -> dict:
    """The keyword arguments of lidr.sampler.generate in the decode section: LIDR's answers' decoding (greedy,
    repetition penalty 1.1), `new_tokens` at most, the stop token, no stop string, every prompt in one batch."""
    from lidr.settings import Decoding

    return {"model": model, "tokenizer": StopToken(stop_token_id(model.cfg)), "prompts": prompts,
            "decoding": Decoding(max_new_tokens=new_tokens, repetition_penalty=ANSWERS.repetition_penalty,
                                 temperature=0.0),
            "stop_strings": (), "batch_size": len(prompts), "compile": compiles}


def lidr_settings(arguments: dict) -> dict:
    """The decoding settings that lidr.sampler.generate's arguments give."""
    decoding = arguments["decoding"]
    return decoding_settings(decoding.temperature == 0, decoding.repetition_penalty, decoding.max_new_tokens,
                             arguments["tokenizer"].stop_ids, arguments["stop_strings"], arguments["prompts"])


def transformers_generate_arguments(hf, prompts: list[list[int]], new_tokens: int, extra: dict) -> dict:
    """The keyword arguments of transformers' generate in the decode section: the same decoding as lidr's (greedy,
    repetition penalty 1.1, `new_tokens` at most, the stop token as eos, no stop string), the path's cache."""
    ids = torch.tensor(prompts, device=hf.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "do_sample": False, "num_beams": 1,
            "repetition_penalty": ANSWERS.repetition_penalty, "max_new_tokens": new_tokens,
            "eos_token_id": stop_token_id_of(hf), "pad_token_id": 0, **extra}


def stop_token_id_of(hf) -> int:
    return hf.config.vocab_size - 1  # stop_token_id of the lidr twin's config


def transformers_settings(kwargs: dict) -> dict:
    """The decoding settings that transformers' generate keyword arguments give."""
    eos = kwargs.get("eos_token_id")
    stops = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return decoding_settings(not kwargs.get("do_sample", False) and kwargs.get("num_beams", 1) == 1,
                             kwargs.get("repetition_penalty", 1.0), kwargs["max_new_tokens"], stops,
                             kwargs.get("stop_strings") or [], kwargs["input_ids"].tolist())


def lidr_generate_call(model: Llama, prompts: list[list[int]], compiles: bool, setup: Setup):
    """(run(new_tokens) -> the tokens each row generated, settings(new_tokens) -> its decoding settings): one full
    lidr.sampler.generate; a row's stop token counts as generated."""
    import lidr.sampler

    def run(new_tokens: int) -> list[list[int]]:
        with compiling_as(setup):
            outs = lidr.sampler.generate(**lidr_generate_arguments(model, prompts, new_tokens, compiles))
        stop = stop_token_id(model.cfg)
        return [c.tokens + ([stop] if c.finish_reason == "stop_token" else []) for c in outs]

    return run, lambda new_tokens: lidr_settings(lidr_generate_arguments(model, prompts, new_tokens, compiles))


def transformers_generate_call(hf, prompts: list[list[int]], extra: dict):
    """(run, settings) as lidr_generate_call, for one full transformers generate: a row ends at its first stop
    token (generate pads the rest)."""
    stop_id = stop_token_id_of(hf)

    def run(new_tokens: int) -> list[list[int]]:
        out = hf.generate(**transformers_generate_arguments(hf, prompts, new_tokens, extra))
        generated = out[:, len(prompts[0]):].tolist()
        return [row[: row.index(stop_id) + 1] if stop_id in row else row for row in generated]

    return run, lambda new_tokens: transformers_settings(transformers_generate_arguments(hf, prompts, new_tokens,
                                                                                         extra))


@contextmanager
def compiling_as(setup: Setup):
    """lidr's generate(compile=True) compiles its step with inductor; the dry run traces it with the eager
    backend instead (as setup.compile_options there): torch.compile patched meanwhile. On CUDA, as it is."""
    if setup.device == "cuda":
        yield
        return
    compile_ = torch.compile

    def eager(model=None, **options):
        options.update(backend="eager", mode=None)
        return compile_(**options) if model is None else compile_(model, **options)

    torch.compile = eager
    try:
        yield
    finally:
        torch.compile = compile_


@dataclass
class DecodeTiming:
    prefill_s: float  # generate with max_new_tokens = 1: the prefill and the first token (median)
    first_pass_extra_s: float  # the first call's time beyond the timed ones': compiling, capturing
    step_s: float  # (T(N) - T(1)) / (N - 1)
    filled: float  # positions filled, mean over the timed steps
    attended: float  # positions attended, mean over the timed steps
    graph_skips: int  # CUDA graphs inductor declined during the calls
    tokens: list[list[int]]  # what the rows generated in the last call of N tokens


def timed_generate(run, new_tokens: int) -> tuple[float, list[list[int]]]:
    """(seconds, tokens per row) of one run(new_tokens) (device synchronized around it); every row must generate
    new_tokens tokens: a row that stopped early would make the two sides' work differ."""
    synchronize()
    start = time.perf_counter()
    generated = run(new_tokens)
    synchronize()
    seconds = time.perf_counter() - start
    if any(len(t) != new_tokens for t in generated):
        raise RuntimeError(f"rows generated {sorted({len(t) for t in generated})} tokens, not {new_tokens}: a row "
                           f"stopped early, the sides did not do the same work")
    return seconds, generated


def time_decode(run, setup: Setup, attended: Callable[[int], int]) -> DecodeTiming:
    """A full generate timed as the module docstring says: once untimed, then `decode_repeats` times with
    max_new_tokens = N and with 1; attended(positions filled) -> positions a step reads."""
    n = setup.decode_new_tokens
    skips = cuda_graph_skips()
    first, _ = timed_generate(run, n)
    full = [timed_generate(run, n) for _ in range(setup.decode_repeats)]
    prefill = statistics.median(timed_generate(run, 1)[0] for _ in range(setup.decode_repeats))
    full_s = statistics.median(seconds for seconds, _ in full)
    filled = [setup.prompt_len + j + 1 for j in range(n - 1)]  # step j writes position prompt_len + j
    return DecodeTiming(prefill_s=prefill, first_pass_extra_s=first - full_s, step_s=(full_s - prefill) / (n - 1),
                        filled=statistics.mean(filled), attended=statistics.mean(attended(f) for f in filled),
                        graph_skips=cuda_graph_skips() - skips, tokens=full[-1][1])


# -----------------------------------------------------------------------------
# correctness on a model with the decode shape's attention


def lidr_generate_tokens(model, prompts, new_tokens: int, compile: bool) -> list[list[int]]:
    """lidr's generate, greedy, no penalty, no stops."""
    from lidr.sampler import generate
    from lidr.settings import Decoding

    decoding = Decoding(max_new_tokens=new_tokens, repetition_penalty=1.0, temperature=0.0)
    return [c.tokens for c in generate(model, NoStops(), prompts, decoding, batch_size=len(prompts), compile=compile)]


def training_pairs(n_pairs: int, max_len: int, vocab: int, seed: int = 0):
    """DPO pairs of uneven lengths, as LIDR's are: prompts of max_len/128 to max_len/8 tokens, chosen and rejected
    responses each of max_len/32 to max_len/2 (drawn apart), uniform; packed first-fit, rows hold different
    numbers of sequences and end in padding."""
    from lidr.train import Example

    generator = torch.Generator().manual_seed(seed)

    def length(low, high):
        return int(torch.randint(max(1, low), max(1, low) + max(1, high - low) + 1, (), generator=generator))

    def tokens(n):
        return torch.randint(2, vocab, (n,), generator=generator).tolist()

    return [Example(i, tokens(length(max_len // 128, max_len // 8)),
                    [tokens(length(max_len // 32, max_len // 2)) for _ in range(2)]) for i in range(n_pairs)]


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
    """Packed rows attend as the packing says, where the trainer packs them itself (lidr.train.pack with its
    default, dense_mask_default, switched meanwhile): Documents (flex attention where
    lidr.kernels.attention.flex_documents picks it, CUDA; the per-sequence loop where flex is False, flex_documents
    switched off meanwhile, so the loop is timed on CUDA too) or the dense mask."""
    import lidr.train

    saved = lidr.train.dense_mask_default, lidr.kernels.attention.flex_documents
    lidr.train.dense_mask_default = lambda device: packing.flex is None
    if packing.flex is False:
        lidr.kernels.attention.flex_documents = lambda device: False
    try:
        yield
    finally:
        lidr.train.dense_mask_default, lidr.kernels.attention.flex_documents = saved


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
    if not machine.can_compile:
        table.skip("correctness", what, machine.compile_skip)
    else:
        model = tiny_model(device, torch.float32, std=0.2)  # fp32 and spread logits: no argmax flipped by rounding
        prompts = random_prompts(3, 9, TINY.vocab_size)
        with compiling_as(setup):  # the dry run traces with the eager backend: the call is checked, not inductor
            eager, compiled = (lidr_generate_tokens(model, prompts, 24, compile) for compile in (False, True))
        same = sum(a == b for a, b in zip(eager, compiled))
        table.check("correctness", what, f"{same}/{len(eager)} rows" + (" (dry run: eager backend)"
                                                                        if device == "cpu" else ""),
                    same == len(eager))


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
             f"prefill + first token {timing.prefill_s:.2f} s, first call {timing.first_pass_extra_s:+.1f} s")
    return line, numbers


def section_decode(table, setup: Setup, machine: Machine):
    cfg, n = setup.decode_cfg, setup.decode_new_tokens
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
    stop_id = stop_token_id(cfg)
    silence(model, stop_id)  # the twins share the tensor: both models' row
    table.add("decode", "the work on both sides", f"full generate() on each side with the same settings: greedy, "
              f"repetition penalty {ANSWERS.repetition_penalty:g} (LIDR's answers), stop token {stop_id} (its output "
              f"row zeroed: never sampled, every row generates all its tokens), no stop string, {n} new tokens after "
              f"prompts of {setup.prompt_len}; lidr reads the sampled tokens every {SYNC_EVERY} steps to check stops, "
              f"transformers syncs with the host every step; a step = (T({n} tokens) - T(1 token)) / {n - 1}, medians "
              f"of {setup.decode_repeats} call(s) after an untimed one")
    if machine.copy_bandwidth is None:
        table.add("decode", "copy bandwidth", "not measured (the machine section did not run): no shares below")

    best, cache_len, max_len = {}, cache_length(setup.prompt_len + n), setup.prompt_len + n
    for batch in setup.batches:
        prompts = random_prompts(batch, setup.prompt_len, cfg.vocab_size, seed=batch)
        speeds, shares, outputs = {}, {}, {}
        sides = []
        for name, path in DECODE_PATHS.items():
            flex = path.compiles and setup.device == "cuda" and lidr.kernels.attention.flex_attention is not None
            sides.append((name, path, "lidr", *lidr_generate_call(model, prompts, path.compiles, setup),
                          lambda filled, p=path, f=flex: attended_positions(p.compiles, f, filled, cache_len)))
        for name, path in TRANSFORMERS_PATHS.items():
            sides.append((name, path, "transformers", *transformers_generate_call(hf, prompts,
                                                                                  path.generate_kwargs(setup)),
                          lambda filled, p=path: p.attended(filled, max_len)))
        for name, path, side, run, settings, attended in sides:
            what = f"batch {batch}, full generate(): {name}"
            if path.compiles and not machine.can_compile:
                table.skip("decode", what, machine.compile_skip)
                continue

            def measure(name=name, path=path, side=side, run=run, settings=settings, attended=attended, what=what):
                timing = time_decode(run, setup, attended)
                line, numbers = decode_row(timing, batch, weights, kv_per_position, machine)
                speeds[name], shares[name] = numbers["tokens_per_s"], numbers.get("share_of_copy")
                outputs[side] = outputs.get(side) or timing.tokens
                table.add("decode", what, line, side=side, decoding=settings(n), tokens_generated=n, **numbers)
                if path.compiles and setup.device == "cuda":
                    graphs = f"{timing.graph_skips} skipped"
                    if isinstance(path, DecodePath):  # lidr's own: a skipped graph is a defect
                        table.check("decode", f"{what}: CUDA graphs captured", graphs, timing.graph_skips == 0)
                    else:
                        table.add("decode", f"{what}: CUDA graphs", graphs)

            table.guarded("decode", what, measure)
            free_memory()
        if len(outputs) == 2:  # the first timed path of each side: the same tokens where the same decoding ran
            same = sum(a == b for a, b in zip(outputs["lidr"], outputs["transformers"]))
            table.add("decode", f"batch {batch}: greedy tokens, lidr vs transformers",
                      f"{same}/{batch} rows the same over {n} tokens (bf16 rounding can part them: the work per step "
                      f"stays the same)", rows_same=same)
        ours = {path: speed for path, speed in speeds.items() if path in DECODE_PATHS}
        theirs = {path: speed for path, speed in speeds.items() if path in TRANSFORMERS_PATHS}
        if ours:
            mine = max(ours, key=ours.get)
            for other, speed in theirs.items():
                table.add("decode", f"batch {batch}: lidr's best / {other} (full generate() on both sides)",
                          f"{ours[mine] / speed:.2f}x ({mine})", ratio=ours[mine] / speed)
        if ours and theirs:
            best[batch] = max(ours.values()) / max(theirs.values())
        if setup.device == "cuda" and batch == 1 and ours and machine.copy_bandwidth:  # verdicts on a GPU only
            share = shares[max(ours, key=ours.get)]
            table.add("decode", "goal: batch-1 decode >= 75% of copy bandwidth (lidr's full generate())",
                      "met" if share >= 0.75 else f"not met ({share:.0%})")
    if setup.device == "cuda" and best:
        behind = [b for b, ratio in best.items() if ratio < 1]
        table.add("decode", "goal: lidr ahead of transformers' best at every batch size (full generate() on both)",
                  "met" if not behind else f"not met (behind at batch {', '.join(map(str, behind))})")


# -----------------------------------------------------------------------------
# train: DPO steps of a Llama-3.2-1B-shaped model, as the trainer runs them


def trainer_options(setup: Setup):
    """Training's defaults (lidr/settings.py TRAINING) with this setup's micro-batch: n_pairs pairs a step, rows of
    row_len tokens (on the GPU, the defaults themselves: 4 pairs, 2,048 tokens)."""
    return replace(TRAINING, batch_size=setup.n_pairs, max_len=setup.row_len)


def make_optimizer(model, options, device):
    """The trainer's AdamW, as lidr/harness/training.py run() builds it from the Training settings (by default
    β (0.9, 0.999), ε 1e-8, no weight decay), fused on CUDA."""
    from lidr.train import fused_adamw

    return torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay,
                             betas=(options.adam_beta1, options.adam_beta2), eps=options.adam_eps,
                             fused=fused_adamw(torch.device(device)))


def planned_checkpointing(cfg: LlamaConfig, examples, options, dtype: torch.dtype, device, world: int):
    """(activation checkpointing on, why), as the trainer decides it when the setting is unset
    (lidr/harness/training.py checkpointing_where_needed): off away from CUDA; on CUDA, on where the memory plan
    (lidr.harness.memory) says the largest micro-batch does not fit without it."""
    from lidr.harness.memory import GB, fits, largest_micro_batch, plan, training_peak

    if torch.device(device).type != "cuda":
        return False, "off: the trainer turns it on only on CUDA"
    memory_gb = torch.cuda.get_device_properties(device).total_memory / GB
    tokens = largest_micro_batch(examples, options.batch_size, options.max_len)[0]
    on = not fits(training_peak(cfg, world, dtype.itemsize, tokens, False), memory_gb)
    verdict = plan(cfg, examples, options.batch_size, options.max_len, dtype.itemsize, world, memory_gb, None)[2]
    return on, f"{'on' if on else 'off'}, as the trainer's memory plan chooses ({verdict})"


def step_tokens(examples, options, step: int, world: int = 1) -> tuple[int, int, list[tuple[int, int]]]:
    """(real tokens, positions of the packed rows (padding included), (prompt, response) lengths of its sequences)
    of optimizer step `step` (0-based), as lidr.train.train_step draws and packs its micro-batches on every rank."""
    from lidr.train import pack, step_indices

    positions, lengths, indices = 0, [], step_indices(step, len(examples), options, world)
    for start in range(0, len(indices), options.batch_size):  # every rank's micro-batches, in train_step's slices
        batch = [examples[i] for i in indices[start : start + options.batch_size]]
        positions += pack(batch, 0, options.max_len, "cpu", dense_mask=False).tokens.numel()
        lengths += [(len(ex.prompt), len(r)) for ex in batch for r in ex.responses]
    return sum(p + r for p, r in lengths), positions, lengths


def section_train(table, setup: Setup, machine: Machine):
    import torch.distributed as dist

    from lidr.kernels.hardware import training_flops
    from lidr.train import setup_distributed, shard_model

    from lidr.checkpoint import default_dtype
    from lidr.train import lr_factor, steps

    ranks = setup_distributed()  # a one-rank group, as a plain `python train_dpo.py` makes
    _, world, device = ranks
    try:
        cfg, options, dtype = setup.train_cfg, trainer_options(setup), default_dtype(device)
        warm, timed = setup.train_warm_steps, setup.train_steps
        examples = training_pairs(options.batch_size * (warm + timed), options.max_len, cfg.vocab_size)
        reference = torch.zeros(len(examples), 2)  # the DPO loss's value does not change the work
        planned, why = planned_checkpointing(cfg, examples, options, dtype, device, world)
        counts = [step_tokens(examples, options, s, world) for s in range(warm, warm + timed)]
        real, positions = sum(c[0] for c in counts), sum(c[1] for c in counts)
        flops = sum(training_flops(cfg, c[2]) for c in counts)
        table.add("train", "how the trainer runs here",
                  f"{world} rank: FSDP2 over a one-rank group, so no gradient communication is in these numbers; "
                  f"{str(dtype).removeprefix('torch.')} compute, fp32 master weights; lidr.train.steps (the trainer's "
                  f"loop) with Training's defaults: AdamW β ({options.adam_beta1:g}, {options.adam_beta2:g}), "
                  f"ε {options.adam_eps:g}, weight decay {options.weight_decay:g}"
                  f"{', fused' if torch.device(device).type == 'cuda' else ''}, lr {options.lr:g} "
                  f"({options.lr_scheduler}), clipping {options.grad_clip:g}, {options.loss} DPO β {options.beta:g} "
                  f"+ α {options.alpha:g} NLL; {options.batch_size} pairs a step in rows of at most "
                  f"{options.max_len:,} tokens")
        prompt_lens = [len(ex.prompt) for ex in examples]
        response_lens = [len(r) for ex in examples for r in ex.responses]
        table.add("train", "pairs", f"{len(examples)} ragged pairs: prompts of {min(prompt_lens)}-{max(prompt_lens)} "
                  f"tokens, responses of {min(response_lens)}-{max(response_lens)}; {warm} steps untimed (compiling), "
                  f"{timed} timed: {real:,} real tokens in {positions:,} positions of packed rows "
                  f"({1 - real / positions:.0%} padding); {flops / real / 1e9:.3g} GFLOP per real token",
                  real_tokens=real, positions=positions, flops=flops)
        table.add("train", "activation checkpointing", why, activation_checkpointing=planned)

        def measure(what, packing, checkpointing: bool, lidr_way: bool):
            with torch.device("meta"):
                model = Llama(cfg)
            shard_model(model, device, dtype, activation_checkpointing=checkpointing)
            model.init_weights()
            optimizer = make_optimizer(model, options, device)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_factor(s, warm + timed, 0, options.lr_scheduler))
            seconds = 0.0
            try:
                with attending_as(packing):
                    for step, record in steps(model, optimizer, scheduler, examples, reference, options, 0, ranks, 0,
                                              warm + timed):
                        if step == warm and torch.cuda.is_available():
                            torch.cuda.reset_peak_memory_stats()
                        if step > warm:
                            seconds += record["seconds"]
            except torch.cuda.OutOfMemoryError:  # a measurement, not a failure
                table.add("train", what, "out of memory")
                return
            achieved = flops / seconds
            numbers = {"seconds_per_step": seconds / timed, "tokens_per_s": real / seconds,
                       "padded_tokens_per_s": positions / seconds, "padding_share": 1 - real / positions,
                       "flops_per_s": achieved, "activation_checkpointing": checkpointing, "ranks": world}
            line = (f"{real / seconds:,.0f} tok/s of real tokens ({positions / seconds:,.0f} counting the padding), "
                    f"{seconds / timed * 1e3:.0f} ms a step (mean of {timed})")
            if machine.datasheet_flops:
                numbers["mfu_datasheet"] = achieved / machine.datasheet_flops
                line += f", MFU {achieved / machine.datasheet_flops:.1%} of the datasheet peak"
            if machine.matmul_flops:
                numbers["mfu_measured"] = achieved / machine.matmul_flops
                line += f", {achieved / machine.matmul_flops:.1%} of the measured matmul rate"
            if torch.cuda.is_available():
                numbers["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
                line += f", peak memory {numbers['peak_memory_bytes'] / 2**30:.1f} GiB"
            table.add("train", what, line, **numbers)
            if setup.device == "cuda" and lidr_way and "mfu_datasheet" in numbers:  # verdicts on a GPU only
                mfu = numbers["mfu_datasheet"]
                table.add("train", f"goal: MFU >= 40% of the datasheet peak ({world} rank, {name_of_first})",
                          "met" if mfu >= 0.4 else f"not met ({mfu:.1%})")

        name_of_first = next(iter(TRAIN_PACKINGS))  # lidr's way on CUDA
        variants = [(name, packing, planned) for name, packing in TRAIN_PACKINGS.items()]
        runnable = [name for name, packing in TRAIN_PACKINGS.items() if not packing_skip(packing, setup, machine)]
        if runnable:  # the other choice once, on lidr's way where this machine runs it
            variants.append((runnable[0], TRAIN_PACKINGS[runnable[0]], not planned))
        for name, packing, checkpointing in variants:
            what = f"DPO step, {name}, activation checkpointing {'on' if checkpointing else 'off'}"
            if checkpointing != planned:
                what += (" (not the plan's choice here: an 8B run on 8 x 80 GB gets it)" if checkpointing
                         else " (not the plan's choice here)")
            reason = packing_skip(packing, setup, machine)
            if reason:
                table.skip("train", what, reason)
                continue
            table.guarded("train", what, lambda what=what, packing=packing, checkpointing=checkpointing, name=name:
                          measure(what, packing, checkpointing, name == name_of_first and checkpointing == planned))
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
    """train_dpo.py on the tiny folder: 8 pairs, 2 steps; (the finished process, OUT). It stays in this process's
    group (so that what stops a section's worker stops it too); past `timeout` it gets SIGTERM, which a torchrun
    agent passes on to its workers (in sessions of their own), then SIGKILL GRACE_SECONDS later, and the run
    is an error."""
    folder = write_tiny_folder(work / "tiny")
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_pairs(8)))
    out = work / "run"
    cmd = [*nproc_cmd, "train_dpo.py", "--model", str(folder), "--data", str(data), "--out", str(out),
           "--chat-format", "llama3", "--batch-size", "4", "--max-len", "64", "--lr", "1e-3", "--dtype", "bfloat16"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = run_worker(cmd, timeout, own_group=False, capture=True, cwd=ROOT, env=env)
    if result.timed_out:
        raise RuntimeError(f"train_dpo.py did not finish in {timeout} s: stopped (SIGTERM, then SIGKILL); its output "
                           f"ends: {((result.stdout or '') + (result.stderr or ''))[-400:]}")
    return subprocess.CompletedProcess(cmd, result.returncode, result.stdout, result.stderr), out


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
    """Seconds >= 1, a whole number (a fraction is cut off: "90.5" is 90)."""
    try:
        seconds = int(float(text))
    except (ValueError, OverflowError):
        seconds = 0
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"a number of seconds >= 1, got {text!r}")
    return seconds


def section_seconds(text: str) -> dict[str, int]:
    """--section-seconds: one number for every section, or SECTION=SECONDS pairs (the others keep their default)."""
    if "=" not in text:
        seconds = positive_seconds(text.strip())
        return {name: seconds for name in SECTIONS}
    limits = dict(SECTION_SECONDS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, seconds = part.partition("=")
        parse_sections(name)  # an unknown name is refused with the list
        limits[name.strip()] = positive_seconds(seconds.strip())
    return limits


def configure(args):
    if args.cpu_dry_run:  # measures nothing: one thread keeps it quick on a shared machine (workers, torchrun too)
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references in fp32
    torch.backends.cudnn.allow_tf32 = False


def worker_main(section: str, work: Path, setup: Setup):
    """--worker SECTION: run one section here, its rows appended to WORK/SECTION.jsonl, the machine's state read
    from and written back to WORK/state.json."""
    pass_termination_to_group()
    if "LIDR_BENCH_PARENT" in os.environ:
        end_with_parent(int(os.environ["LIDR_BENCH_PARENT"]))
    machine, environment = read_state(work)
    table = Table(None, [], rows_path=work / f"{section}.jsonl")
    table.environment = environment
    table.run(section, SECTIONS[section], setup, machine)
    write_state(work, machine, table.environment)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="decode at batch 1 only, fewer steps, fewer training "
                                                             "steps, fewer repeats: run it first")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="every section on CPU at tiny shapes, one thread: checks this script where there is no "
                             "GPU, measures nothing, gives no verdict")
    parser.add_argument("--sections", type=parse_sections, default=list(SECTIONS),
                        help=f"comma-separated, among {', '.join(SECTIONS)} (preflight always runs; default: all)")
    parser.add_argument("--section-seconds", type=section_seconds, default=dict(SECTION_SECONDS),
                        help="time limit of every section (one number), or of some (SECTION=SECONDS,...); default: "
                             + ", ".join(f"{k} {v}" for k, v in SECTION_SECONDS.items()))
    parser.add_argument("--total-seconds", type=positive_seconds,
                        help="the whole run's limit: each section's limit shrinks to what is left, a section with "
                             f"less than {MIN_SECTION_SECONDS} s left is not started")
    parser.add_argument("--json", type=Path, help="write every number here, and the table beside it with the suffix "
                                                  ".md (both rewritten after each section)")
    parser.add_argument("--worker", choices=list(SECTIONS), help=argparse.SUPPRESS)  # one section, in this process
    parser.add_argument("--worker-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu_dry_run:
        setup = CPU_DRY_RUN_QUICK if args.quick else CPU_DRY_RUN
    else:
        setup = GPU_QUICK if args.quick else GPU
    if setup.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
              "nothing was measured (--cpu-dry-run checks the script on CPU)", file=sys.stderr)
        raise SystemExit(2)
    configure(args)
    if args.worker:
        worker_main(args.worker, args.worker_dir, setup)
        return
    start = time.perf_counter()
    table = Table(args.json, ["python", "bench/gpu.py", *(sys.argv[1:] if argv is None else argv)])
    flags = [flag for flag, on in (("--cpu-dry-run", args.cpu_dry_run), ("--quick", args.quick)) if on]
    with tempfile.TemporaryDirectory(prefix="lidr-gpu-bench-") as work:
        work = Path(work)
        write_state(work, Machine(), {})
        for name in ["preflight"] + [s for s in SECTIONS if s in args.sections and s != "preflight"]:
            seconds = args.section_seconds[name]
            if args.total_seconds:
                left = args.total_seconds - (time.perf_counter() - start)
                if left < MIN_SECTION_SECONDS:
                    table.skip(name, "not started", f"{left:.0f} s left of --total-seconds {args.total_seconds}")
                    table.sections[name] = {"status": "SKIP", "seconds": 0, "limit_s": 0}
                    continue
                seconds = min(seconds, left)
            run_section(table, name, seconds, worker_command(name, flags, work), work)
    table.add("total", "wall time", f"{time.perf_counter() - start:.0f} s")
    table.save_json()
    print()
    print(table.markdown())
    if table.failed():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
