"""The trainer: M_t and its preference pairs -> M_{t+1} with DPO + NLL (LIDR), or SFT (SDRRL).

    python train_dpo.py --model M0 --data pairs.jsonl --out runs/M1                  # one process
    torchrun --standalone --nproc_per_node=8 train_dpo.py --model M0 --data pairs.jsonl --out runs/M1
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-endpoint=HOST:29500 train_dpo.py ...  # OUT shared
    python train_dpo.py --objective sft --model M0 --data sft.jsonl --out runs/M0-sft  # SDRRL rows
    python train_dpo.py --dtype bfloat16 ...   # bf16 compute, fp32 master weights (the GPU default, on CPU)
    train("M0", "pairs.jsonl", "runs/M1", Training(lr=1e-6))        # the same, from Python (lidr/settings.py)

Rows: {"prompt", "chosen", "rejected"} (DPO) or {"prompt", "response"} (SFT), optional "system",
"id", "lang". The prompt becomes the checkpoint's chat format up to the assistant header; a
response is its text followed by the end-of-turn token (`<|eot_id|>` for Llama 3, `<|im_end|>`
for ChatML, the token a chat turn ends with and generation stops on), and only response tokens
enter the loss. Chosen and rejected of a micro-batch go through one forward, packed into rows of
at most --max-len tokens, no attention across sequences (`pack`), not padded one per row.

One run, in order:
1. Inputs are checked before anything is written: the model folder (config, weights, tokenizer)
   and the data. Rows are read and tokenized; bad rows are dropped and counted per reason
   (unreadable, missing or empty fields, chosen == rejected, too long; printed and written to
   OUT/data_report.json). A prompt that does not fit beside its longer response in --max-len
   keeps its last tokens (the end of the question and the assistant header the reply follows);
   a row whose response does not fit beside the assistant header alone is dropped. Responses
   are never cut: a cut response would lose its end-of-turn token. Then rank 0 locks OUT (OUT.lock:
   one process per run folder) and claims it: OUT.made-from.json (beside it, as every lidr output
   has) and OUT/run.json record the settings and the inputs' identity (resolved paths, the data's
   sha256, the model folder's config hash and weight file sizes and times). An existing
   non-empty folder without that record (a user's) is refused, naming what is in it; a rerun on
   other inputs or settings is refused, naming what changed, before anything in OUT is touched
   (a run that never logged a step may take other training settings on the same inputs).
2. The policy is built on the meta device, `fully_shard`-ed per block and then at the root, and
   filled from the HF folder read once on rank 0 and broadcast. The shards are fp32 master
   weights (AdamW's state is fp32 too); --dtype is the compute dtype that each forward gathers
   them in (bfloat16 by default on GPU, float32 on CPU), gradients are reduce-scattered in fp32
   (FSDP2's MixedPrecisionPolicy; nccl on GPU, gloo on CPU). A plain `python` launch makes a
   one-rank process group, so every launch runs the same code.
3. Reference log-probs (DPO): the policy, still M_t, scores every pair once, each rank a slice;
   the table is gathered and saved as OUT/reference_logps.pt and reused on resume. During
   training only the policy is in memory.
4. Training: AdamW, linear warmup then cosine decay to 0, gradient clipping, gradient
   accumulation. loss per pair = −log σ(β·Δ) + α·(−log π(y_c|x)/|y_c|) (lidr/dpo.py), averaged
   over the global batch (--batch-size pairs per rank per micro-batch × --grad-accum × ranks).
   Each step appends a JSON line to OUT/log.jsonl (and prints it).
5. Every --save-every steps before the last: OUT/checkpoint (sharded model and optimizer state
   through torch.distributed.checkpoint, scheduler, step, per-rank RNG) built in
   OUT/checkpoint.tmp and renamed into place, so a crash leaves the previous checkpoint whole.
   Rerunning the same command resumes from it. A NaN/inf loss or gradient norm stops the run
   before the optimizer step and before any save.
6. Export, in place of a last checkpoint: OUT/model, an HF folder (lidr.checkpoint.save,
   gathered on rank 0, built beside its place and renamed into it) in the compute dtype, and
   OUT/curves.png; then OUT/model.made-from.json, and the temporaries of interrupted saves go.
   Once OUT/model and its record exist, a rerun has nothing to do; a crash before it resumes
   from the last checkpoint; an OUT/model without its record is refused, never replaced.

How this departs from the paper / the reference (LLaMA-Factory DPO with pref_ftx):
- The paper's learning rate, epochs, batch and length are unpublished; the defaults here are
  choices (lr 5e-7, 1 epoch, warmup 10%), beside its β 0.1 and α 1: lidr/settings.py TRAINING.
- The last incomplete global batch of an epoch is dropped (every step has the same batch).
- The SFT objective averages each sequence's token NLL, then the sequences (the same per-sequence
  mean as the NLL term of DPO), rather than averaging over all tokens of the batch.
- The reference is the policy before training in the same precision; no separate reference model.
- Packed rows attend sequence by sequence on CUDA (one causal SDPA call per sequence, flash
  kernels, no [rows, W, W] mask) and through a dense block-diagonal mask on CPU, where SDPA's
  masked kernel measured faster; both compute the same attention (tests/test_attention.py).
  Neither flex_attention (no backward on CPU, so its gradients cannot be tested there;
  bench/gpu.py times it beside lidr's) nor a varlen kernel (flash-attn, torch.nn.attention.varlen:
  CUDA only) is used.
- OUT must be one filesystem seen by every node. The nccl/MFU/per-sequence attention paths have
  not been run on a GPU yet (bench/gpu.py runs them); the tests cover gloo in fp32 and bf16.
"""

import argparse
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lidr.checkpoint import check, default_dtype, folder_identity, load_model, read_config, save
from lidr.cli import add_flags, command, flags_argv, from_flags
from lidr.dpo import dpo_loss, hidden_sequence_logps
from lidr.jsonl import (
    OutputLock, check_folder, file_identity, hold_lock, read_records, record_output, record_path,
    remove_stale_temporaries, write_json_atomic,
)
from lidr.model import Documents, Llama, rope_inv_freq
from lidr.settings import TRAINING, Training, provenance
from lidr.tokenizer import Tokenizer, chat_messages

MADE_BY = "lidr.train"  # the owner named in OUT.made-from.json
REFERENCE_KEYS = ("model", "data", "max_len", "dtype")  # what the reference log-probs are computed from
END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}
# dense bf16 peak of the GPUs MFU is reported for (matched against torch.cuda.get_device_name)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


# -----------------------------------------------------------------------------
# data


@dataclass
class Example:
    line: int  # line of the row in the data file
    prompt: list[int]
    responses: list[list[int]]  # [chosen, rejected] for DPO, [response] for SFT


def load_examples(path, tokenizer: Tokenizer, objective: str, max_len: int):
    """(examples, counts): the usable rows tokenized, and how many rows went where."""
    fields = ("chosen", "rejected") if objective == "dpo" else ("response",)
    end_of_turn = tokenizer.tok.token_to_id(END_OF_TURN[tokenizer.chat_format])
    header_len = len(tokenizer.encode_chat([])) - len(tokenizer.encode_chat([], add_generation_prompt=False))
    rows, bad = read_records(path)
    counts = Counter({"read": len(rows) + len(bad), "unreadable": len(bad)})
    examples = []
    for line, row in rows:
        texts = [row.get(k) for k in ("prompt", *fields)]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            counts["missing or empty field"] += 1
            continue
        if objective == "dpo" and row["chosen"].strip() == row["rejected"].strip():
            counts["chosen == rejected"] += 1
            continue
        system = row.get("system")
        prompt = tokenizer.encode_chat(chat_messages(row["prompt"], system if isinstance(system, str) else None))
        responses = [tokenizer.encode(row[k]) + [end_of_turn] for k in fields]
        room = max_len - max(map(len, responses))  # prompt tokens that fit
        if room < header_len:
            counts["too long"] += 1
            continue
        if len(prompt) > room:
            prompt = prompt[-room:]
            counts["prompt truncated"] += 1
        examples.append(Example(line, prompt, responses))
    counts["kept"] = len(examples)
    return examples, counts


@dataclass
class Packed:
    """A micro-batch's sequences packed into rows, no attention across sequences, no prompt tokens in the loss."""

    tokens: torch.Tensor  # [R, W]
    positions: torch.Tensor  # [R, W], from 0 at each sequence's start
    # each row's sequence lengths (attention sequence by sequence), or the same as a dense
    # [R, W, W] mask: query and key in the same sequence, key not after query
    attention_mask: Documents | torch.Tensor
    labels: torch.Tensor  # [R, W]: the next token
    sequence_ids: torch.Tensor  # [R, W]: the sequence whose response token the label is, −1 elsewhere
    n_sequences: int


def dense_mask_default(device) -> bool:
    """Whether packed rows attend through a dense mask (CPU) or sequence by sequence (`Documents`, CUDA).

    On CUDA the per-sequence calls run flash kernels and no [R, W, W] mask exists. On CPU the
    dense masked kernel is faster: 0.13 s against 0.65 s for attention forward + backward over
    two 512-token rows of three sequences (SmolLM2's 9 heads, 3 kv heads; 2 cores).
    """
    return torch.device(device).type != "cuda"


def pack(examples: list[Example], pad_id: int, row_len: int, device, dense_mask: bool | None = None) -> Packed:
    """Pack the sequences prompt + response of a micro-batch into rows of at most row_len tokens.

    Sequence i is example i's first response (chosen) for i < n, example i − n's second
    (rejected) for n ≤ i < 2n. Sequences go longest first into the first row with room (first-fit
    decreasing); rows are right-padded to the longest row. Packing instead of padding every
    sequence to the longest: chosen and rejected often differ in length (a French translation
    runs ~1.7× the tokens of its English original for SmolLM2), and padding would waste half the
    positions. dense_mask (default: `dense_mask_default(device)`) picks how the rows attend; both
    ways compute the same attention.
    """
    seqs = [(ex.prompt, ex.responses[k]) for k in range(len(examples[0].responses)) for ex in examples]
    rows, room = [], []
    for i in sorted(range(len(seqs)), key=lambda i: -sum(map(len, seqs[i]))):
        n = sum(map(len, seqs[i]))
        r = next((r for r in range(len(rows)) if room[r] >= n), None)
        if r is None:
            rows.append([])
            room.append(row_len)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    width = row_len - min(room)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)  # padding: one segment of its own
    sequence_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            prompt, response = seqs[i]
            n = len(prompt) + len(response)
            tokens[r, start : start + n] = torch.tensor(prompt + response)
            positions[r, start : start + n] = torch.arange(n)
            segments[r, start : start + n] = i
            sequence_ids[r, start + len(prompt) - 1 : start + n - 1] = i  # positions that predict the response
            start += n
    labels = torch.cat([tokens[:, 1:], torch.full((len(rows), 1), pad_id, dtype=torch.long)], dim=1)
    if dense_mask is None:
        dense_mask = dense_mask_default(device)
    if dense_mask:
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        attention_mask = ((segments[:, :, None] == segments[:, None, :]) & causal).to(device)  # the diagonal is always in
    else:
        attention_mask = Documents(tuple(tuple(sum(map(len, seqs[i])) for i in members) for members in rows))
    tokens, positions, labels, sequence_ids = (t.to(device) for t in (tokens, positions, labels, sequence_ids))
    return Packed(tokens, positions, attention_mask, labels, sequence_ids, len(seqs))


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


def micro_batch(step: int, micro: int, n_examples: int, options: Training, rank: int, world: int) -> list[int]:
    """Example indices for one rank's micro-batch: global step `step` (0-based) fixes the data position."""
    global_batch = global_batch_size(options, world)
    steps_per_epoch = n_examples // global_batch
    epoch, k = divmod(step, steps_per_epoch)
    order = epoch_order(n_examples, options.seed, epoch)
    start = k * global_batch + (rank * options.grad_accum + micro) * options.batch_size
    return order[start : start + options.batch_size]


# -----------------------------------------------------------------------------
# process group and model


class Ranks(NamedTuple):
    """This process in the group: its rank, how many ranks there are, its device."""

    rank: int
    world: int
    device: torch.device


def setup_distributed() -> Ranks:
    """torchrun's group, or a one-rank group for a plain `python` launch."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    else:
        local_rank = 0
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def shard_model(model: Llama, device, compute_dtype: torch.dtype, activation_checkpointing: bool) -> Llama:
    """A meta-device model fully_shard-ed per block then at the root, its (empty) fp32 shards on `device`.

    The shards are the fp32 master weights that AdamW updates (its state is fp32 too); each
    forward gathers them in compute_dtype, and gradients are reduce-scattered in fp32.
    """
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        if activation_checkpointing:
            activation_checkpoint(block)  # keeps only the block's input, recomputes the rest in backward
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.to_empty(device=device)
    model.inv_freq = rope_inv_freq(model.cfg).to(device)
    return model


def build_model(folder, device, compute_dtype: torch.dtype, activation_checkpointing: bool) -> Llama:
    """The policy, sharded (`shard_model`), filled from the HF folder read on rank 0 and broadcast."""
    with torch.device("meta"):
        model = Llama(read_config(folder))
    shard_model(model, device, compute_dtype, activation_checkpointing)
    full = load_model(folder, "cpu", torch.float32).state_dict() if dist.get_rank() == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if model.cfg.tie_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight, "sharding untied the output embedding"
    return model


def forward_logps(model: Llama, batch: Packed):
    """(Σ log π over each sequence's response tokens, response lengths), [n_sequences] each, fp32."""
    hidden = model(batch.tokens, batch.positions, batch.attention_mask, return_hidden=True)
    return hidden_sequence_logps(hidden, model.lm_head.weight, batch.labels, batch.sequence_ids, batch.n_sequences)


# -----------------------------------------------------------------------------
# reference log-probs: one pass before training


def reference_logps(model, examples: list[Example], pad_id: int, options: Training, ranks: Ranks) -> torch.Tensor:
    """[N, 2] (log π_ref(y_c|x), log π_ref(y_r|x)) of every pair: the policy, still M_t, scores
    each rank's slice in micro-batches; the table is summed over ranks."""
    rank, world, device = ranks
    mine = list(range(rank, len(examples), world))
    n_batches = math.ceil(math.ceil(len(examples) / world) / options.batch_size)  # equal on every rank
    table = torch.zeros(len(examples), 2)
    model.eval()
    with torch.no_grad():
        for b in range(n_batches):
            idx = mine[b * options.batch_size : (b + 1) * options.batch_size] or mine[-1:]  # keep collectives in step
            logps, _ = forward_logps(model, pack([examples[i] for i in idx], pad_id, options.max_len, device))
            table[idx] = logps.view(2, len(idx)).T.cpu()
    model.reshard()  # the root stays unsharded after a forward with no backward
    model.train()
    table = table.to(device)
    dist.all_reduce(table)  # each pair was scored by exactly one rank; the other ranks hold zeros there
    return table.cpu()


def saved_reference_logps(path: Path, fingerprint: dict, compute, rank: int) -> torch.Tensor:
    """The table saved at `path` for these inputs, or compute() once and save it there (rank 0)."""
    if path.exists():
        saved = torch.load(path)
        if saved["fingerprint"] != fingerprint:
            raise SystemExit(f"{path} was computed for other data or another model; use a fresh --out")
        return saved["logps"]
    table = compute()
    if rank == 0:
        torch.save({"fingerprint": fingerprint, "logps": table}, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    return table


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(model, optimizer, scheduler, step: int, out: Path, rank: int):
    """OUT/checkpoint, replaced atomically: built in checkpoint.tmp, renamed once complete."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=tmp)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        torch.save({"step": step, "scheduler": scheduler.state_dict()}, tmp / "trainer.pt")  # written last
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def latest_checkpoint(out: Path) -> Path | None:
    """OUT/checkpoint, or checkpoint.old when a crash came between the two renames of a save."""
    for folder in (out / "checkpoint", out / "checkpoint.old"):
        if (folder / "trainer.pt").is_file():
            return folder
    return None


def load_checkpoint(folder: Path, model, optimizer, scheduler, rank: int) -> int:
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    trainer = torch.load(folder / "trainer.pt")
    scheduler.load_state_dict(trainer["scheduler"])
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.is_file():  # absent when resuming with more ranks than saved
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return trainer["step"]


# -----------------------------------------------------------------------------
# training


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup from 0 over warmup_steps, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_losses(model, batch: list[Example], reference: torch.Tensor | None, options: Training, pad_id: int, device):
    """Per-example losses, metric terms and the number of real (unpadded) tokens of one micro-batch.

    reference: the batch's rows of the reference table, [B, 2] (DPO), or None (SFT).
    """
    logps, n_tokens = forward_logps(model, pack(batch, pad_id, options.max_len, device))
    real_tokens = sum(len(ex.prompt) + len(r) for ex in batch for r in ex.responses)  # padding not counted
    if options.objective == "sft":
        nll = -logps / n_tokens  # −log π(y|x) / |y|, per sequence
        return nll, {"nll": nll.detach()}, real_tokens
    policy_chosen, policy_rejected = logps.split(len(batch))  # pack's order: every chosen, then every rejected
    chosen_lengths, _ = n_tokens.split(len(batch))
    nll = -policy_chosen / chosen_lengths  # −log π(y_c|x) / |y_c|, per sequence
    ref_chosen, ref_rejected = reference.to(device).unbind(1)
    dpo, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                     options.beta)
    metrics = {
        "dpo": dpo.detach(), "nll": nll.detach(), "chosen_reward": chosen_rewards,
        "rejected_reward": rejected_rewards, "margin": chosen_rewards - rejected_rewards,
        "reward_accuracy": (chosen_rewards > rejected_rewards).float(),
    }
    return dpo + options.alpha * nll, metrics, real_tokens


def flops_per_token(model: Llama, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward (nanoGPT / PaLM estimate; recompute not counted)."""
    cfg = model.cfg
    return 6 * model.num_params() + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def plot_curves(log_path: Path, png_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    panels = [("loss", ["loss", "dpo", "nll"]), ("rewards", ["chosen_reward", "rejected_reward", "margin"]),
              ("reward accuracy", ["reward_accuracy"]), ("grad norm", ["grad_norm"]), ("learning rate", ["lr"])]
    panels = [(title, [k for k in keys if k in rows[0]]) for title, keys in panels]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            ax.plot([r["step"] for r in rows], [r[k] for r in rows], label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def train(model_dir, data, out, options: Training = TRAINING):
    """M_t (the HF folder model_dir) trained on the rows of `data` into OUT; OUT/model is M_{t+1}.

    Run by every rank under torchrun, or in one process (a one-rank group).
    """
    ranks = setup_distributed()
    if options.dtype is None:
        options = replace(options, dtype=str(default_dtype(ranks.device)).removeprefix("torch."))
    try:
        run(Path(model_dir), Path(data), Path(out), options, ranks)
    finally:
        dist.destroy_process_group()


def global_batch_size(options: Training, world: int) -> int:
    """Rows per optimizer step: --batch-size per rank per micro-batch × --grad-accum × ranks."""
    return options.batch_size * options.grad_accum * world


def read_examples(model_dir: Path, data: Path, options: Training):
    """(tokenizer, usable examples, counts): what a run trains on, or one sentence and exit. The
    model folder is checked (config, tokenizer, every weight file's header) without reading weights."""
    try:
        _, tokenizer = check(model_dir, options.chat_format)
        examples, counts = load_examples(data, tokenizer, options.objective, options.max_len)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    return tokenizer, examples, counts


def read_inputs(model_dir: Path, data: Path, options: Training, world: int):
    """(tokenizer, examples, counts, identity): the model folder and data checked and read, or one sentence and exit.

    identity names what the run is made from: the settings, the data file (resolved path, size,
    sha256) and the model folder (resolved path, config and tokenizer hashes, weight file sizes
    and modification times). Nothing is written here.
    """
    model_identity = folder_identity(model_dir)  # a missing folder or config.json: one sentence
    tokenizer, examples, counts = read_examples(model_dir, data, options)
    global_batch = global_batch_size(options, world)
    if len(examples) < global_batch:
        raise SystemExit(f"{data}: {len(examples)} usable rows of {counts['read']} ({format_counts(counts)}) "
                         f"do not fill one global batch of {global_batch}")
    identity = {**provenance(options), "model": model_identity, "data": file_identity(data)}
    return tokenizer, examples, counts, identity


def format_counts(counts: Counter) -> str:
    dropped = ", ".join(f"{v} {k}" for k, v in counts.items() if v and k not in ("read", "kept", "prompt truncated"))
    return f"dropped: {dropped or 'none'}; {counts['prompt truncated']} prompts truncated"


def claim_run_folder(out: Path, identity: dict) -> OutputLock:
    """Rank 0's hold on OUT: its lock (one process per run folder), then OUT claimed as this run's
    (OUT.made-from.json beside it: the marker that lets a rerun resume and write in it), checked
    once more under the lock. A killed export's leftovers (OUT/model.tmp<pid>) go."""
    lock = hold_lock(out, MADE_BY)
    check_run_folder(out, identity)
    out.mkdir(parents=True, exist_ok=True)
    record_output(out, MADE_BY, identity)
    remove_stale_temporaries(out / "model")
    return lock


def check_run_folder(out: Path, identity: dict):
    """lidr.jsonl.check_folder, except that a run of this trainer that never logged a step may start
    again with other training settings on the same model, data, length and dtype (what its
    reference table is bound to): a learning rate that stopped it with a NaN at the first step is
    corrected, not refused."""
    try:
        recorded = json.loads(record_path(out).read_text(encoding="utf-8"))
        same_inputs = recorded["made_by"] == MADE_BY and all(
            recorded["identity"].get(k) == json.loads(json.dumps(identity[k])) for k in REFERENCE_KEYS)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        same_inputs = False
    log = out / "log.jsonl"
    logged = log.is_file() and log.stat().st_size > 0
    started = logged or latest_checkpoint(out) is not None or (out / "model").exists()
    if not (same_inputs and not started):
        check_folder(out, MADE_BY, identity)


def exported(out: Path) -> bool:
    """Whether this run exported OUT/model: its record OUT/model.made-from.json, written after the
    export's rename, and the folder. An OUT/model without that record is not this run's: refused,
    never replaced."""
    model = out / "model"
    recorded = record_path(model).is_file()
    if not recorded and (model.exists() or model.is_symlink()):
        raise SystemExit(f"{model}: exists, but this run never recorded exporting it (no {record_path(model).name}); "
                         f"it is left as it is: move it away and rerun the same command to export again")
    return recorded and (model / "config.json").is_file()


def remove_temporaries(out: Path):
    """What an interrupted save or export left in OUT, once the run has succeeded."""
    for folder in (out / "checkpoint.tmp", out / "checkpoint.old"):
        shutil.rmtree(folder, ignore_errors=True)
    (out / "reference_logps.tmp").unlink(missing_ok=True)
    remove_stale_temporaries(out / "model")


def run(model_dir: Path, data: Path, out: Path, options: Training, ranks: Ranks):
    """The run in order (the module docstring's steps 1-6), on one rank of the group."""
    from tqdm import tqdm

    rank, world, device = ranks
    torch.manual_seed(options.seed)
    tokenizer, examples, counts, identity = read_inputs(model_dir, data, options, world)
    run_file = out / "run.json"
    check_run_folder(out, identity)  # a folder of the user's, or a run on other inputs: refused untouched
    global_batch = global_batch_size(options, world)
    total_steps = len(examples) // global_batch * options.epochs
    dist.barrier()
    lock = claim_run_folder(out, identity) if rank == 0 else None
    if rank == 0:
        write_json_atomic(run_file, identity)
        write_json_atomic(out / "data_report.json", dict(counts))
        print(f"{data}: {counts['read']} rows read, {counts['kept']} kept ({format_counts(counts)}); "
              f"counts in {out / 'data_report.json'}")
        attention = "through a dense mask" if dense_mask_default(device) else "sequence by sequence"
        print(f"{world} rank(s) on {device.type}, {identity['dtype']} compute, packed rows attending {attention}; "
              f"global batch {global_batch} = {options.batch_size} × {options.grad_accum} accumulation × {world}; "
              f"{total_steps} steps")
    dist.barrier()
    if exported(out):
        if rank == 0:
            print(f"{out / 'model'} exists: this run finished earlier, nothing to do")
            lock.release()
        return

    compute_dtype = getattr(torch, identity["dtype"])
    model = build_model(model_dir, device, compute_dtype, options.activation_checkpointing)
    fingerprint = {k: identity[k] for k in REFERENCE_KEYS}
    reference = None
    if options.objective == "dpo":
        reference = saved_reference_logps(out / "reference_logps.pt", fingerprint, rank=rank, compute=lambda: (
            reference_logps(model, examples, tokenizer.pad_id, options, ranks)))

    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay,
                                  betas=(0.9, 0.95))
    warmup_steps = max(1, round(options.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps))
    start = 0
    checkpoint_dir = latest_checkpoint(out)
    if checkpoint_dir is not None:
        start = load_checkpoint(checkpoint_dir, model, optimizer, scheduler, rank)
        if rank == 0:
            print(f"resuming from {checkpoint_dir} at step {start}")
    log_path = out / "log.jsonl"
    if rank == 0:  # the steps after the checkpoint are redone: forget their lines
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= start]
        log_path.write_text("".join(line + "\n" for line in kept))

    peak_flops = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    bar = tqdm(total=total_steps, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True)
    model.train()
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        sums = Counter()
        n_real_tokens = 0
        for micro in range(options.grad_accum):
            idx = micro_batch(step, micro, len(examples), options, rank, world)
            reference_rows = None if reference is None else reference[idx]
            losses, metrics, n_tokens = step_losses(model, [examples[i] for i in idx], reference_rows, options,
                                                    tokenizer.pad_id, device)
            (losses.sum() / (options.batch_size * options.grad_accum)).backward()  # FSDP averages over ranks
            sums["loss"] += float(losses.detach().sum())
            for k, v in metrics.items():
                sums[k] += float(v.sum())
            n_real_tokens += n_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        keys = sorted(sums)
        totals = torch.tensor([sums[k] for k in keys] + [n_real_tokens], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        record = {k: float(v) / global_batch for k, v in zip(keys, totals[:-1].tolist())}
        if not (math.isfinite(record["loss"]) and math.isfinite(grad_norm)):
            raise SystemExit(
                f"step {step + 1}: loss {record['loss']} / grad norm {grad_norm} is not finite; stopped before "
                f"the optimizer step. The last good checkpoint ({latest_checkpoint(out)}) is untouched."
            )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        record = {"step": step + 1, **record, "grad_norm": grad_norm, "lr": lr,
                  "tokens_per_s": float(totals[-1]) / seconds, "seconds": seconds}
        if peak_flops is not None:
            seq_len = float(totals[-1]) / (2 * global_batch if options.objective == "dpo" else global_batch)
            record["mfu"] = flops_per_token(model, seq_len) * float(totals[-1]) / seconds / (peak_flops * world)
        if rank == 0:
            line = json.dumps(record)
            with open(log_path, "a") as f:
                f.write(line + "\n")
            bar.write(line)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        if (step + 1) % options.save_every == 0 and step + 1 < total_steps:  # the end is saved by the export
            save_checkpoint(model, optimizer, scheduler, step + 1, out, rank)
    bar.close()

    del optimizer, scheduler  # free AdamW's state (twice the weights) before gathering the full weights
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plot_curves(log_path, out / "curves.png")  # before the export: once OUT/model exists a rerun stops
        save(out / "model", model.cfg, {k: v.to(compute_dtype) for k, v in full.items()}, tokenizer_from=model_dir)
        record_output(out / "model", MADE_BY, {"run": str(out.resolve()), "steps": total_steps})
        remove_temporaries(out)
        print(f"wrote {out / 'model'} and {out / 'curves.png'}")
        lock.release()
    dist.barrier()


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder of M_t (policy and reference)")
    p.add_argument("--data", required=True, help="JSONL of {prompt, chosen, rejected} (dpo) or {prompt, response} (sft)")
    p.add_argument("--out", required=True, help="run folder: checkpoint, reference log-probs, log, exported model")
    add_training_flags(p)
    return p.parse_args(argv)


def add_training_flags(p: argparse.ArgumentParser):
    """One flag per field of Training (lidr/settings.py: its default, source and range)."""
    add_flags(p, TRAINING, title="training (lidr/settings.py TRAINING: the paper's β and α, lidr's choices for the rest)")


def options_from(args) -> Training:
    """The Training the flags give."""
    return from_flags(args, TRAINING)


def options_argv(options: Training) -> list[str]:
    """The flags that give `options` back (the inverse of parse_args and options_from), for torchrun launches."""
    return flags_argv(options)


@command()
def main(argv=None):
    args = parse_args(argv)
    train(args.model, args.data, args.out, options_from(args))
