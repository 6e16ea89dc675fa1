"""The trainer: M_t and its preference pairs -> M_{t+1} with DPO + NLL (LIDR), or SFT (SDRRL).

    python train_dpo.py --model M0 --data pairs.jsonl --out runs/M1                  # one process
    torchrun --standalone --nproc_per_node=8 train_dpo.py --model M0 --data pairs.jsonl --out runs/M1
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB \\
        -m lidr.train --model M0 --data pairs.jsonl --out runs/M1   # on each node; OUT shared (lidr/cluster.py)
    python train_dpo.py --objective sft --model M0 --data sft.jsonl --out runs/M0-sft  # SDRRL rows
    python train_dpo.py --dtype bfloat16 ...   # bf16 compute, fp32 master weights (the GPU default, on CPU)
    python train_dpo.py ... --plan --gpus 8 --gpu-memory 80   # will it fit? the per-GPU peak (lidr/memory.py)
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
   (FSDP2's MixedPrecisionPolicy; nccl on GPU, gloo on CPU). On CUDA, unless
   --[no-]activation-checkpointing says otherwise, each block is recomputed in backward when the
   memory plan (lidr/memory.py) says the largest micro-batch does not fit without it (printed).
   A plain `python` launch makes a one-rank process group, so every launch runs the same code.
3. Reference log-probs (DPO): the policy, still M_t, scores every pair once (the held-out ones
   too), each rank a slice; the table is gathered and saved as OUT/reference_logps.pt and reused
   on resume. During training only the policy is in memory.
4. Training: AdamW (fused on CUDA), a linear warmup (none by default) then a linear (or cosine)
   fall to 0, gradient clipping, gradient accumulation (LLaMA-Factory's defaults, lidr/settings.py
   Training). loss per pair = −log σ(β·Δ) + α·(−log π(y_c|x)/|y_c|) (lidr/dpo.py; --loss picks a
   variant of the first term), averaged over the global batch (--batch-size pairs per rank per
   micro-batch × --grad-accum × ranks). The step's numbers stay on the device until one
   all_reduce and one read per step. Each step appends a JSON line to OUT/log.jsonl (mirrored to
   TensorBoard or wandb with --report-to); the console shows one progress bar (plain lines every
   30 s or 10% when it is not a terminal, lidr/progress.py). --eval-split F holds out a share F of
   the prompt ids (every row of an id, drawn with --seed) and scores them before training, every
   --eval-every steps and at the end: loss, reward accuracy and margin, overall and per "lang",
   as "eval/..." lines in OUT/log.jsonl, on the console and in the curves.
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
  choices (lr 5e-7, 1 epoch), beside its β 0.1 and α 1 and LLaMA-Factory's optimizer and schedule
  (AdamW β 0.9/0.999, ε 1e-8, no warmup, linear decay): lidr/settings.py TRAINING.
- The last incomplete global batch of an epoch is dropped (every step has the same batch).
- The SFT objective averages each sequence's token NLL, then the sequences (the same per-sequence
  mean as the NLL term of DPO), rather than averaging over all tokens of the batch.
- The reference is the policy before training in the same precision; no separate reference model.
- Packed rows attend as `Documents` on CUDA (flex attention's document mask, compiled, where
  `lidr.model.flex_documents` says torch has it; else one causal SDPA call per sequence; no
  [rows, W, W] mask either way) and through a dense block-diagonal mask on CPU, where SDPA's
  masked kernel measured faster; all compute the same attention (tests/test_attention.py; flex's
  forward only, as torch has no flex backward on CPU). No varlen kernel (flash-attn,
  torch.nn.attention.varlen: CUDA only) is used.
- OUT must be one folder seen by every node: every rank checks that it is (and that it sees the same
  model) before anything is written, and rank 0 alone decides what a rerun resumes (lidr/cluster.py).
  The nccl/MFU/flex attention paths have not been run on a GPU yet (bench/gpu.py runs them); the
  tests cover gloo in fp32 and bf16.
"""

import argparse
import inspect
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

from lidr import cluster
from lidr.checkpoint import check, default_dtype, folder_identity, load_model, read_config, save
from lidr.cli import add_flags, command, flags_argv, from_flags, positive_int, setting_type
from lidr.dpo import hidden_sequence_logps, preference_loss
from lidr.hardware import datasheet_peak
from lidr.jsonl import (
    OutputLock, check_folder, file_identity, hold_lock, read_records, record_output, record_path,
    remove_stale_temporaries, write_json_atomic,
)
from lidr.memory import GB, fits, largest_micro_batch, plan, training_peak
from lidr.model import Documents, Llama, flex_documents, rope_inv_freq
from lidr.progress import Progress
from lidr.settings import TRAINING, Training, derived_seed, provenance
from lidr.tokenizer import Tokenizer, chat_messages
from lidr.tracking import Tracker

MADE_BY = "lidr.train"  # the owner named in OUT.made-from.json
REFERENCE_KEYS = ("model", "data", "max_len", "dtype")  # what the reference log-probs are computed from
END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}


# -----------------------------------------------------------------------------
# data


@dataclass
class Example:
    line: int  # line of the row in the data file
    prompt: list[int]
    responses: list[list[int]]  # [chosen, rejected] for DPO, [response] for SFT
    group: str = ""  # the row's prompt "id" (every pair of one prompt shares it), else its line
    lang: str | None = None  # the row's "lang", for the held-out scores per language


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
        row_id, lang = row.get("id"), row.get("lang")
        group = str(row_id) if isinstance(row_id, (str, int)) else f"line {line}"
        examples.append(Example(line, prompt, responses, group, lang if isinstance(lang, str) else None))
    counts["kept"] = len(examples)
    return examples, counts


def split_held_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of `examples`: round(fraction × prompt ids) ids (at least one
    when fraction > 0) drawn with `seed` are held out with every pair they have (both directions, every
    language), so no held-out prompt is trained on. Both lists keep the file's order."""
    groups = sorted({ex.group for ex in examples})
    n_held_out = max(1, round(fraction * len(groups))) if fraction > 0 else 0
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = {groups[i] for i in order[:n_held_out]}
    train = [i for i, ex in enumerate(examples) if ex.group not in held_out]
    return train, [i for i, ex in enumerate(examples) if ex.group in held_out]


@dataclass
class Packed:
    """A micro-batch's sequences packed into rows, no attention across sequences, no prompt tokens in the loss."""

    tokens: torch.Tensor  # [R, W]
    positions: torch.Tensor  # [R, W], from 0 at each sequence's start
    # each row's sequence lengths (flex document mask or sequence by sequence), or the same as a dense
    # [R, W, W] mask: query and key in the same sequence, key not after query
    attention_mask: Documents | torch.Tensor
    labels: torch.Tensor  # [R, W]: the next token
    sequence_ids: torch.Tensor  # [R, W]: the sequence whose response token the label is, −1 elsewhere
    n_sequences: int


def dense_mask_default(device) -> bool:
    """Whether packed rows attend through a dense mask (CPU) or as `Documents` (CUDA).

    On CUDA `Documents` runs flex attention's document mask where `lidr.model.flex_documents` says
    torch has it (else one flash SDPA call per sequence), and no [R, W, W] mask exists. On CPU the
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
    tokens, positions, labels, sequence_ids = (to_device(t, device)
                                               for t in (tokens, positions, labels, sequence_ids))
    return Packed(tokens, positions, attention_mask, labels, sequence_ids, len(seqs))


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """tensor on `device`; to CUDA through pinned memory without blocking, so the host does not wait for the
    work already queued (a pageable copy would: a host sync per micro-batch)."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch))  # lidr/settings.py's seed rule
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
    progress = Progress(n_batches, "reference log-probs", enabled=rank == 0)
    model.eval()
    with torch.no_grad():
        for b in range(n_batches):
            idx = mine[b * options.batch_size : (b + 1) * options.batch_size] or mine[-1:]  # keep collectives in step
            logps, _ = forward_logps(model, pack([examples[i] for i in idx], pad_id, options.max_len, device))
            table[idx] = logps.view(2, len(idx)).T.cpu()
            progress.update(1)
    progress.close()
    model.reshard()  # the root stays unsharded after a forward with no backward
    model.train()
    table = table.to(device)
    dist.all_reduce(table)  # each pair was scored by exactly one rank; the other ranks hold zeros there
    return table.cpu()


def saved_reference_logps(path: Path, fingerprint: dict, compute, rank: int) -> torch.Tensor:
    """The table saved at `path` for these inputs, or compute() once and save it there (rank 0)."""

    def saved():  # decided on rank 0
        if path.exists() and torch.load(path)["fingerprint"] != fingerprint:
            raise SystemExit(f"{path} was computed for other data or another model; use a fresh --out")
        return path.exists()

    if cluster.on_rank0(saved):
        return torch.load(path)["logps"]
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


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The learning rate of step `step` (0-based) over the peak: a linear warmup over warmup_steps,
    then a linear or half-cosine fall to 0 at total_steps (HF's get_linear / get_cosine_schedule_with_warmup,
    except that the first warmup step trains at 1/warmup_steps of the peak where HF's trains at 0)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


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
    chosen_lengths, rejected_lengths = n_tokens.split(len(batch))
    nll = -policy_chosen / chosen_lengths  # −log π(y_c|x) / |y_c|, per sequence
    ref_chosen, ref_rejected = to_device(reference, device).unbind(1)
    # "dpo": the preference term, --loss (sigmoid DPO by default, the paper's)
    dpo, chosen_rewards, rejected_rewards = preference_loss(
        options.loss, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths,
        options.beta, options.length_normalize, options.label_smoothing)
    metrics = {
        "dpo": dpo.detach(), "nll": nll.detach(), "chosen_reward": chosen_rewards,
        "rejected_reward": rejected_rewards, "margin": chosen_rewards - rejected_rewards,
        "reward_accuracy": (chosen_rewards > rejected_rewards).float(),
    }
    return dpo + options.alpha * nll, metrics, real_tokens


def evaluate(model, examples: list[Example], reference: torch.Tensor | None, options: Training, pad_id: int,
             ranks: Ranks) -> dict:
    """The held-out rows scored by the policy as it is now (DPO: against their reference log-probs [N, 2]).

    {"eval/loss", "eval/dpo", "eval/nll", "eval/reward_accuracy", "eval/margin", "eval/pairs"} over every
    pair (loss = dpo + α·nll; SFT: loss = nll, no rewards), and the same per language as "eval/{lang}/..."
    (the rows' "lang"). Each rank scores a slice in micro-batches of --batch-size; the sums are
    all-reduced and read once.
    """
    rank, world, device = ranks
    columns = ("dpo", "nll", "reward_accuracy", "margin") if options.objective == "dpo" else ("nll",)
    langs = sorted({ex.lang for ex in examples if ex.lang is not None})
    sums = torch.zeros(1 + len(langs), len(columns) + 1, dtype=torch.float64, device=device)  # row 0: all
    mine = list(range(rank, len(examples), world))
    n_batches = math.ceil(math.ceil(len(examples) / world) / options.batch_size)  # equal on every rank
    model.eval()
    with torch.no_grad():
        for b in range(n_batches):
            idx = mine[b * options.batch_size : (b + 1) * options.batch_size]
            scored = idx or [0]  # a rank with nothing left still runs the forward (collectives in step), uncounted
            _, metrics, _ = step_losses(model, [examples[i] for i in scored],
                                        None if reference is None else reference[scored], options, pad_id, device)
            if not idx:
                continue
            values = torch.stack([metrics[k].double() for k in columns]
                                 + [torch.ones(len(idx), dtype=torch.float64, device=device)], dim=1)
            sums[0] += values.sum(0)
            in_lang = [(j, 1 + langs.index(examples[i].lang)) for j, i in enumerate(idx) if examples[i].lang]
            if in_lang:
                js, targets = zip(*in_lang)
                sums.index_add_(0, to_device(torch.tensor(targets), device), values[list(js)])
    model.reshard()  # the root stays unsharded after a forward with no backward
    model.train()
    dist.all_reduce(sums)
    record = {}
    for name, row in zip(["eval"] + [f"eval/{lang}" for lang in langs], sums.tolist()):
        pairs = row[-1]
        means = {k: v / pairs for k, v in zip(columns, row)}
        if name == "eval":
            record["eval/loss"] = means["dpo"] + options.alpha * means["nll"] if "dpo" in means else means["nll"]
        record.update({f"{name}/{k}": v for k, v in means.items()})
        record[f"{name}/pairs"] = int(pairs)
    return record


def eval_summary(step: int, record: dict) -> str:
    """One console line for an evaluation record: the overall scores, then accuracy and margin per language."""
    if "eval/dpo" not in record:
        return f"held-out rows at step {step}: nll {record['eval/nll']:.4f} ({record['eval/pairs']} rows)"
    langs = [k.split("/")[1] for k in record if k.count("/") == 2 and k.endswith("/pairs")]
    per_lang = ", ".join(f"{lang} {record[f'eval/{lang}/reward_accuracy']:.2f}/{record[f'eval/{lang}/margin']:+.3f}"
                         for lang in langs)
    return (f"held-out pairs at step {step}: loss {record['eval/loss']:.4f}, dpo {record['eval/dpo']:.4f}, reward "
            f"accuracy {record['eval/reward_accuracy']:.3f}, margin {record['eval/margin']:+.4f} "
            f"({record['eval/pairs']} pairs)" + (f"; accuracy/margin per language: {per_lang}" if langs else ""))


def fused_adamw(device: torch.device) -> bool | None:
    """True on CUDA where this torch's AdamW takes `fused` (one kernel updates every parameter), else None
    (torch's default: the foreach implementation)."""
    return True if device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters else None


def flops_per_token(model: Llama, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward (nanoGPT / PaLM estimate; recompute not counted)."""
    cfg = model.cfg
    return 6 * model.num_params() + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def plot_curves(log_path: Path, png_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train_rows = [r for r in records if "loss" in r]
    eval_rows = [r for r in records if "eval/loss" in r]
    panels = [("loss", ["loss", "dpo", "nll"]), ("rewards", ["chosen_reward", "rejected_reward", "margin"]),
              ("reward accuracy", ["reward_accuracy"]), ("grad norm", ["grad_norm"]), ("learning rate", ["lr"])]
    panels = [(title, train_rows, keys) for title, keys in panels]
    if eval_rows:  # the held-out pairs: overall, and accuracy and margin per language
        langs = [k.split("/")[1] for k in eval_rows[0] if k.count("/") == 2 and k.endswith("/pairs")]
        panels += [("held-out loss", eval_rows, ["eval/loss", "eval/dpo", "eval/nll"]),
                   ("held-out reward accuracy", eval_rows,
                    ["eval/reward_accuracy"] + [f"eval/{lang}/reward_accuracy" for lang in langs]),
                   ("held-out margin", eval_rows, ["eval/margin"] + [f"eval/{lang}/margin" for lang in langs])]
    panels = [(title, rows, [k for k in keys if k in rows[0]]) for title, rows, keys in panels]
    panels = [(title, rows, keys) for title, rows, keys in panels if keys]
    n_cols = min(5, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 3.2 * n_rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, rows, keys) in zip(axes.flat, panels):
        for k in keys:
            ax.plot([r["step"] for r in rows], [r[k] for r in rows], label=k, marker="." if rows is eval_rows else None)
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
        cluster.check_shared(out, model_dir)  # under torchrun: every node sees OUT and the same model
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
    n_train = len(split_held_out(examples, options.eval_split, options.seed)[0])
    if n_train < global_batch:
        held_out = f", {len(examples) - n_train} of them held out," if n_train < len(examples) else ""
        raise SystemExit(f"{data}: {len(examples)} usable rows of {counts['read']} ({format_counts(counts)}){held_out} "
                         f"do not fill one global batch of {global_batch}")
    identity = {**provenance(options), "model": model_identity, "data": file_identity(data)}
    return tokenizer, examples, counts, identity


def checkpointing_where_needed(model_dir: Path, examples: list[Example], options: Training, world: int, device):
    """(options with activation_checkpointing decided, why, or None) where it is unset: on CUDA, on
    when the plan (lidr/memory.py) says the largest micro-batch does not fit without it; else off."""
    if options.activation_checkpointing is not None:
        return options, None
    if torch.device(device).type != "cuda":
        return replace(options, activation_checkpointing=False), None
    memory_gb = torch.cuda.get_device_properties(device).total_memory / GB
    tokens, _, _ = largest_micro_batch(examples, options.batch_size, options.max_len)
    peak = training_peak(read_config(model_dir), world, getattr(torch, options.dtype).itemsize, tokens, False)
    if fits(peak, memory_gb):
        return replace(options, activation_checkpointing=False), None
    return replace(options, activation_checkpointing=True), (
        f"activation checkpointing on: without it the plan estimates {sum(peak.values()) / GB:.1f} GB per GPU, more "
        f"than this {memory_gb:.0f} GB GPU holds (lidr/memory.py; --no-activation-checkpointing to turn it off)")


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
    rank, world, device = ranks
    torch.manual_seed(options.seed)
    tokenizer, examples, counts, identity = read_inputs(model_dir, data, options, world)
    run_file = out / "run.json"

    def same_run():  # a folder of the user's, or a run on other inputs: refused untouched
        check_run_folder(out, identity)
        return identity

    identity = cluster.on_rank0(same_run)  # rank 0's view: resolved paths and file times differ across nodes
    options, why = cluster.on_rank0(lambda: checkpointing_where_needed(model_dir, examples, options, world, device))
    global_batch = global_batch_size(options, world)
    train_indices, held_out_indices = split_held_out(examples, options.eval_split, options.seed)
    total_steps = len(train_indices) // global_batch * options.epochs
    dist.barrier()
    locks = []  # rank 0's hold on OUT
    cluster.on_rank0(lambda: locks.append(claim_run_folder(out, identity)))  # every rank refuses alike
    if rank == 0:
        write_json_atomic(run_file, identity)
        write_json_atomic(out / "data_report.json", dict(counts))
        print(f"{data}: {counts['read']} rows read, {counts['kept']} kept ({format_counts(counts)}); "
              f"counts in {out / 'data_report.json'}")
        attention = "through a dense mask"
        if not dense_mask_default(device):
            attention = "through flex attention's document mask" if flex_documents(device) else "sequence by sequence"
        print(f"{world} rank(s) on {device.type}, {identity['dtype']} compute, packed rows attending {attention}; "
              f"global batch {global_batch} = {options.batch_size} × {options.grad_accum} accumulation × {world}; "
              f"{total_steps} steps")
        if why:
            print(why)
    dist.barrier()
    if cluster.on_rank0(lambda: exported(out)):  # the run is complete
        if rank == 0:
            print(f"{out / 'model'} exists: this run finished earlier, nothing to do")
            for lock in locks:
                lock.release()
        return

    compute_dtype = getattr(torch, identity["dtype"])
    model = build_model(model_dir, device, compute_dtype, options.activation_checkpointing)
    fingerprint = {k: identity[k] for k in REFERENCE_KEYS}
    reference = None
    if options.objective == "dpo":  # every usable pair, held-out ones included, in one pass
        reference = saved_reference_logps(out / "reference_logps.pt", fingerprint, rank=rank, compute=lambda: (
            reference_logps(model, examples, tokenizer.pad_id, options, ranks)))
    held_out = [examples[i] for i in held_out_indices]
    held_out_reference = None if reference is None else reference[held_out_indices]
    examples = [examples[i] for i in train_indices]
    reference = None if reference is None else reference[train_indices]
    if rank == 0 and held_out:
        every = f"every {options.eval_every} steps, " if options.eval_every else ""
        print(f"{len(held_out)} pairs of {len({ex.group for ex in held_out})} prompt ids held out (--eval-split "
              f"{options.eval_split}), scored before training, {every}and at the end")

    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay,
                                  betas=(options.adam_beta1, options.adam_beta2), eps=options.adam_eps,
                                  fused=fused_adamw(device))
    warmup_steps = round(options.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, options.lr_scheduler))
    start = 0
    checkpoint_dir = cluster.on_rank0(lambda: latest_checkpoint(out))
    if checkpoint_dir is not None:
        start = load_checkpoint(checkpoint_dir, model, optimizer, scheduler, rank)
        if rank == 0:
            print(f"resuming from {checkpoint_dir} at step {start}")
    log_path = out / "log.jsonl"
    if rank == 0:  # the steps after the checkpoint are redone: forget their lines
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= start]
        log_path.write_text("".join(line + "\n" for line in kept))
    tracker = Tracker(options.report_to, out, provenance(options), first_step=start + 1) if rank == 0 else None
    progress = Progress(total_steps, "train", initial=start, enabled=rank == 0)

    def log(record: dict):  # rank 0: one line of OUT/log.jsonl, mirrored to the tracker
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            tracker.log({k: v for k, v in record.items() if k != "step"}, record["step"])

    def score_held_out(step: int):
        record = evaluate(model, held_out, held_out_reference, options, tokenizer.pad_id, ranks)
        log({"step": step, **record})
        progress.write(eval_summary(step, record))

    if held_out and start == 0:
        score_held_out(0)
    peak_flops = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        _, peak_flops = datasheet_peak(props.name, props.total_memory, props.multi_processor_count)
    model.train()
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        record = train_step(model, scheduler, examples, reference, step, options, tokenizer.pad_id, ranks)
        if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
            raise SystemExit(
                f"step {step + 1}: loss {record['loss']} / grad norm {record['grad_norm']} is not finite; stopped "
                f"before the optimizer step. The last good checkpoint ({latest_checkpoint(out)}) is untouched."
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        n_tokens = record.pop("tokens")
        record = {"step": step + 1, **record, "tokens_per_s": n_tokens / seconds, "seconds": seconds}
        if peak_flops is not None:
            seq_len = n_tokens / (2 * global_batch if options.objective == "dpo" else global_batch)
            record["mfu"] = flops_per_token(model, seq_len) * n_tokens / seconds / (peak_flops * world)
        log(record)
        progress.update(1, loss=record["loss"], **{name: record[k] for name, k in
                                                   (("acc", "reward_accuracy"), ("margin", "margin")) if k in record})
        if held_out and ((options.eval_every and (step + 1) % options.eval_every == 0) or step + 1 == total_steps):
            score_held_out(step + 1)
        if (step + 1) % options.save_every == 0 and step + 1 < total_steps:  # the end is saved by the export
            save_checkpoint(model, optimizer, scheduler, step + 1, out, rank)
    progress.close()
    if tracker is not None:
        tracker.close()

    del optimizer, scheduler  # free AdamW's state (twice the weights) before gathering the full weights
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plot_curves(log_path, out / "curves.png")  # before the export: once OUT/model exists a rerun stops
        save(out / "model", model.cfg, {k: v.to(compute_dtype) for k, v in full.items()}, tokenizer_from=model_dir)
        record_output(out / "model", MADE_BY, {"run": str(out.resolve()), "steps": total_steps})
        remove_temporaries(out)
        print(f"wrote {out / 'model'} and {out / 'curves.png'}")
        for lock in locks:
            lock.release()
    dist.barrier()


def train_step(model, scheduler, examples: list[Example], reference: torch.Tensor | None, step: int,
               options: Training, pad_id: int, ranks: Ranks) -> dict:
    """Forward and backward over one global batch (gradients accumulated, clipped), without the optimizer step.

    The metric sums stay on the device across micro-batches and the inputs reach it without blocking
    (`to_device`), so nothing waits for the device until the one all_reduce and the one read at the end.
    Returns {"loss", "dpo", "nll", ... averaged over the global batch, "grad_norm", "lr", "tokens" (real
    tokens over every rank)}.
    """
    rank, world, device = ranks
    sums = {}
    n_real_tokens = 0
    for micro in range(options.grad_accum):
        idx = micro_batch(step, micro, len(examples), options, rank, world)
        reference_rows = None if reference is None else reference[idx]
        losses, metrics, n_tokens = step_losses(model, [examples[i] for i in idx], reference_rows, options, pad_id,
                                                device)
        (losses.sum() / (options.batch_size * options.grad_accum)).backward()  # FSDP averages over ranks
        for k, v in {"loss": losses.detach(), **metrics}.items():
            sums[k] = sums.get(k, 0) + v.double().sum()
        n_real_tokens += n_tokens
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # the same on every rank
    keys = sorted(sums)
    totals = torch.stack([sums[k] for k in keys] + [torch.zeros((), dtype=torch.float64, device=device)])
    totals[-1] += n_real_tokens  # a scalar argument of a kernel, not a copy from the host
    dist.all_reduce(totals)
    values = torch.cat([totals, grad_norm.detach().double().reshape(1)]).tolist()  # the step's one host sync
    global_batch = global_batch_size(options, world)
    record = {k: v / global_batch for k, v in zip(keys, values)}
    return {**record, "grad_norm": values[-1], "lr": scheduler.get_last_lr()[0], "tokens": values[-2]}


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder of M_t (policy and reference)")
    p.add_argument("--data", required=True, help="JSONL of {prompt, chosen, rejected} (dpo) or {prompt, response} (sft)")
    p.add_argument("--out", help="run folder: checkpoint, reference log-probs, log, exported model (required but "
                                 "with --plan)")
    add_training_flags(p)
    fit = p.add_argument_group("plan: will it fit? (lidr/memory.py; no weights are read, nothing is written)")
    fit.add_argument("--plan", action="store_true", help="print the per-GPU peak estimate and exit: 0 if it fits, "
                                                         "1 with the settings that would make it fit")
    fit.add_argument("--gpus", type=positive_int, help="GPUs the run spans, every node's (default: this machine's)")
    fit.add_argument("--gpu-memory", type=setting_type(float, {"above": 0}),
                     help="GB of memory per GPU (default: this machine's GPU, else 80)")
    args = p.parse_args(argv)
    if not args.plan and args.out is None:
        p.error("the following arguments are required: --out")
    return args


def add_training_flags(p: argparse.ArgumentParser):
    """One flag per field of Training (lidr/settings.py: its default, source and range)."""
    add_flags(p, TRAINING, title="training (lidr/settings.py TRAINING: the paper's β and α, lidr's choices for the rest)")


def options_from(args) -> Training:
    """The Training the flags give."""
    return from_flags(args, TRAINING)


def options_argv(options: Training) -> list[str]:
    """The flags that give `options` back (the inverse of parse_args and options_from), for torchrun launches."""
    return flags_argv(options)


def plan_run(model_dir, data, options: Training, gpus: int | None, gpu_memory_gb: float | None):
    """--plan: the per-GPU peak estimate printed, from config.json, the tokenizer and the data (no
    weights); exits 0 when the run fits, else with the sentence naming what would make it fit.
    gpus, gpu_memory_gb None: this machine's GPUs (80 GB where it has none)."""
    cuda = torch.cuda.is_available()
    gpus = gpus or max(1, torch.cuda.device_count())
    gpu_memory_gb = gpu_memory_gb or (torch.cuda.get_device_properties(0).total_memory / GB if cuda else 80.0)
    try:
        cfg = read_config(model_dir)
        tokenizer = Tokenizer.from_folder(model_dir, chat_format=options.chat_format)
        examples, counts = load_examples(data, tokenizer, options.objective, options.max_len)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    if not examples:
        raise SystemExit(f"{data}: no usable row of {counts['read']} ({format_counts(counts)})")
    dtype_bytes = getattr(torch, options.dtype or "bfloat16").itemsize  # the GPU default
    ok, breakdown, verdict = plan(cfg, examples, options.batch_size, options.max_len, dtype_bytes, gpus,
                                  gpu_memory_gb, options.activation_checkpointing)
    print(breakdown)
    if not ok:
        raise SystemExit(verdict)
    print(verdict)


@command()
def main(argv=None):
    args = parse_args(argv)
    if args.plan:
        plan_run(args.model, args.data, options_from(args), args.gpus, args.gpu_memory)
    else:
        train(args.model, args.data, args.out, options_from(args))


if __name__ == "__main__":
    main()
