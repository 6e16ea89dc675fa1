"""The trainer's method: M_t and its preference pairs -> M_{t+1} by DPO + NLL (LIDR), or by SFT (SDRRL).

    python train_dpo.py --model M0 --data pairs.jsonl --out runs/M1   # the commands: lidr/cli/train.py

Rows become token sequences (lidr/train_data.py), packed into rows (`pack`); the sharded policy (`build_model`)
scores every pair once as the reference (`reference_logps`); `steps` is the loop (`train_step`, `step_losses`,
lidr/dpo.py). The run folder around it: lidr/harness/training.py. Departures from the paper: docs/method.md §5.7.
"""

import inspect
import math
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lidr.checkpoint import load_model, read_config
from lidr.dpo import hidden_sequence_logps, preference_loss
from lidr.harness.cluster import init_group, launch
from lidr.harness.progress import Progress
from lidr.kernels.attention import Documents
from lidr.kernels.hardware import datasheet_peak, training_flops
from lidr.model import Llama, rope_inv_freq
from lidr.settings import Training, derived_seed
# the rows as tokens (lidr/train_data.py), also named here: lidr.train is the trainer's one door
from lidr.train_data import Example, load_examples, read_examples, split_held_out  # noqa: F401


def global_batch_size(options: Training, world: int) -> int:
    """Rows per optimizer step: --batch-size per rank per micro-batch × --grad-accum × ranks."""
    return options.batch_size * options.grad_accum * world


@dataclass
class Packed:
    """A micro-batch's sequences packed into rows, no attention across sequences, no prompt tokens in the loss."""
    tokens: torch.Tensor  # [R, W]
    positions: torch.Tensor  # [R, W], from 0 at each sequence's start
    # each row's sequence lengths, or the same as a dense [R, W, W] mask (same sequence, key not after query)
    attention_mask: Documents | torch.Tensor
    labels: torch.Tensor  # [R, W]: the next token
    sequence_ids: torch.Tensor  # [R, W]: the sequence whose response token the label is, −1 elsewhere
    n_sequences: int


def dense_mask_default(device) -> bool:
    """Whether packed rows attend through a dense [R, W, W] mask (CPU, where SDPA's masked kernel measured
    faster) or as `Documents` (CUDA: flex attention's document mask, else one SDPA call per sequence)."""
    return torch.device(device).type != "cuda"


def pack(examples: list[Example], pad_id: int, row_len: int, device, dense_mask: bool | None = None) -> Packed:
    """The sequences prompt + response of a micro-batch packed into rows of at most row_len tokens: sequence i
    is example i's chosen for i < n, example i − n's rejected for n ≤ i < 2n; longest first into the first
    row with room (first-fit decreasing), rows right-padded to the longest. dense_mask (default:
    `dense_mask_default(device)`) picks how the rows attend; both ways compute the same attention."""
    seqs = [(ex.prompt, ex.responses[k]) for k in range(len(examples[0].responses)) for ex in examples]
    rows, room = [], []
    for i in sorted(range(len(seqs)), key=lambda i: -sum(map(len, seqs[i]))):
        n = sum(map(len, seqs[i]))
        r = next((r for r in range(len(rows)) if room[r] >= n), len(rows))
        if r == len(rows):  # no row has room: a new one
            rows.append([])
            room.append(row_len)
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
    tokens, positions, labels, sequence_ids = (to_device(t, device) for t in (tokens, positions, labels, sequence_ids))
    return Packed(tokens, positions, attention_mask, labels, sequence_ids, len(seqs))


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """tensor on `device`; to CUDA through pinned memory without blocking (a pageable copy syncs the host)."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch))  # lidr/settings.py's seed rule
    return torch.randperm(n_examples, generator=generator).tolist()


def step_indices(step: int, n_examples: int, options: Training, world: int) -> list[int]:
    """Every rank's example indices of global step `step` (0-based): the step's slice of its epoch's order."""
    global_batch = global_batch_size(options, world)
    epoch, k = divmod(step, n_examples // global_batch)  # the epoch, and the step within it
    return epoch_order(n_examples, options.seed, epoch)[k * global_batch : (k + 1) * global_batch]


def micro_batches(step: int, n_examples: int, options: Training, world: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of global step `step`: its share of the step's slice (`step_indices`)."""
    indices, size = step_indices(step, n_examples, options, world), options.batch_size
    return [indices[(rank * options.grad_accum + micro) * size :][:size] for micro in range(options.grad_accum)]


def rank_slices(n_examples: int, batch_size: int, world: int, rank: int) -> list[list[int]]:
    """This rank's batches when each rank scores a slice (every world-th example): as many on every rank (so the
    collectives keep in step), the last ones empty where a rank has fewer examples."""
    mine, n_batches = list(range(rank, n_examples, world)), math.ceil(math.ceil(n_examples / world) / batch_size)
    return [mine[b * batch_size : (b + 1) * batch_size] for b in range(n_batches)]


class Ranks(NamedTuple):
    """This process in the group: its rank, how many ranks there are, its device."""
    rank: int
    world: int
    device: torch.device


# how long a collective waits: rank 0 alone reads an 8B model's 16 GB (build_model) and writes the export
# (lidr/harness/training.py) while the others wait; nccl's 10 min kills them. An hour: 16 GB at 5 MB/s or faster
RANK0_ALONE_TIMEOUT = timedelta(hours=1)


def setup_distributed() -> Ranks:
    """torchrun's group, or a one-rank group for a plain `python` launch; timeout RANK0_ALONE_TIMEOUT."""
    cuda, (_, _, local_rank) = torch.cuda.is_available(), launch()  # torchrun's variables, checked
    if cuda:
        torch.cuda.set_device(local_rank)
    init_group("nccl" if cuda else "gloo", RANK0_ALONE_TIMEOUT)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def shard_model(model: Llama, device, compute_dtype: torch.dtype, activation_checkpointing: bool) -> Llama:
    """A meta-device model fully_shard-ed per block then at the root, its (empty) fp32 shards on `device`: the
    master weights AdamW updates; each forward gathers them in compute_dtype, gradients reduce-scatter in fp32."""
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


def reference_batches(n_examples: int, held_out: list[int], options: Training, world: int, rank: int):
    """This rank's batches of the reference pass, packed as the run will pack them, so that where the policy is
    still the reference (step 1, the first held-out scoring) every margin is exactly 0, not float noise (a
    sequence's log-prob moves in its last bits with what it is packed beside): the first epoch's micro-batches,
    the training rows it leaves out, then the held-out rows (indices `held_out`) as `evaluate` slices them."""
    held = set(held_out)
    train = [i for i in range(n_examples) if i not in held]
    n_steps = len(train) // global_batch_size(options, world)  # the first epoch's
    batches = [micro for step in range(n_steps) for micro in micro_batches(step, len(train), options, world, rank)]
    left = sorted(epoch_order(len(train), options.seed, 0)[n_steps * global_batch_size(options, world):])
    batches += [[left[i] for i in idx] for idx in rank_slices(len(left), options.batch_size, world, rank)]
    return ([[train[i] for i in idx] for idx in batches]
            + [[held_out[i] for i in idx] for idx in rank_slices(len(held_out), options.batch_size, world, rank)])


def reference_logps(model, examples: list[Example], pad_id: int, options: Training, ranks: Ranks,
                    held_out: list[int] = ()) -> torch.Tensor:
    """[N, 2] (log π_ref(y_c|x), log π_ref(y_r|x)) of every pair: the policy, still M_t, scores each rank's
    share in the batches of `reference_batches` (held_out: the held-out rows' indices); summed over ranks."""
    rank, world, device = ranks
    batches = reference_batches(len(examples), list(held_out), options, world, rank)
    table = torch.zeros(len(examples), 2)
    progress = Progress(len(batches), "reference log-probs", enabled=rank == 0)
    model.eval()
    with torch.no_grad():
        for idx in batches:
            scored = idx or [0]  # a rank with nothing left still runs the forward (collectives in step), unrecorded
            logps, _ = forward_logps(model, pack([examples[i] for i in scored], pad_id, options.max_len, device))
            if idx:
                table[idx] = logps.view(2, len(idx)).T.cpu()
            progress.update(1)
    progress.close()
    model.reshard()  # the root stays unsharded after a forward with no backward
    model.train()
    table = table.to(device)
    dist.all_reduce(table)  # each pair was scored by exactly one rank; the other ranks hold zeros there
    return table.cpu()


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The learning rate of step `step` (0-based) over the peak: a linear warmup over warmup_steps, then a
    linear or half-cosine fall to 0 at total_steps (HF's schedules, but warmup step 1 is not at 0)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


def fused_adamw(device: torch.device) -> bool | None:
    """True on CUDA where this torch's AdamW takes `fused` (one kernel), else None (torch's default, foreach)."""
    return True if device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters else None


def step_losses(model, batch: list[Example], reference: torch.Tensor | None, options: Training, pad_id: int, device):
    """Per-example losses, metric terms and the number of real (unpadded) tokens of one micro-batch;
    reference: the batch's rows of the reference table, [B, 2] (DPO), or None (SFT)."""
    logps, n_tokens = forward_logps(model, pack(batch, pad_id, options.max_len, device))
    real_tokens = sum(len(ex.prompt) + len(r) for ex in batch for r in ex.responses)  # padding not counted
    if options.objective == "sft":
        nll = -logps / n_tokens  # −log π(y|x) / |y|, per sequence
        return nll, {"nll": nll.detach()}, real_tokens
    policy_chosen, policy_rejected = logps.split(len(batch))  # pack's order: every chosen, then every rejected
    chosen_lengths, rejected_lengths = n_tokens.split(len(batch))
    nll = -policy_chosen / chosen_lengths  # −log π(y_c|x) / |y_c|, per sequence
    ref_chosen, ref_rejected = to_device(reference, device).unbind(1)
    dpo, chosen_rewards, rejected_rewards = preference_loss(  # --loss: sigmoid DPO by default, the paper's
        options.loss, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths,
        options.beta, options.length_normalize, options.label_smoothing)
    metrics = {"dpo": dpo.detach(), "nll": nll.detach(), "chosen_reward": chosen_rewards,
               "rejected_reward": rejected_rewards, "margin": chosen_rewards - rejected_rewards,
               "reward_accuracy": (chosen_rewards > rejected_rewards).float(),  # a tie is no win, as TRL's
               "logps/chosen": policy_chosen.detach(), "logps/rejected": policy_rejected.detach(),  # TRL's names
               "ref_logps/chosen": ref_chosen, "ref_logps/rejected": ref_rejected}
    return dpo + options.alpha * nll, metrics, real_tokens


def train_step(model, scheduler, examples: list[Example], reference: torch.Tensor | None, step: int,
               options: Training, pad_id: int, ranks: Ranks) -> dict:
    """Forward and backward over one global batch (gradients accumulated, clipped), no optimizer step:
    {"loss", "dpo", "nll", ... averaged over the global batch, "grad_norm", "lr", "tokens" (real, every
    rank's)}. Sums stay on the device until one all_reduce and one read (inputs: `to_device`)."""
    rank, world, device = ranks
    sums, n_real_tokens = {}, 0
    for idx in micro_batches(step, len(examples), options, world, rank):
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


def steps(model, optimizer, scheduler, examples: list[Example], reference: torch.Tensor | None, options: Training,
          pad_id: int, ranks: Ranks, start: int, total_steps: int):
    """The training loop: (step, record) after each optimizer step, steps start + 1 .. total_steps; record:
    train_step's, with "step", "epoch" (fractional, as TRL's), "tokens_per_s", "seconds" and on CUDA "mfu" (the
    step's training_flops over every GPU's datasheet peak). A NaN/inf loss or gradient norm raises
    FloatingPointError before the optimizer step."""
    rank, world, device = ranks
    peak_flops = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        _, peak_flops = datasheet_peak(props.name, props.total_memory, props.multi_processor_count)
    model.train()
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        record = train_step(model, scheduler, examples, reference, step, options, pad_id, ranks)
        if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
            raise FloatingPointError(f"step {step + 1}: loss {record['loss']} / grad norm {record['grad_norm']} is not "
                                     f"finite; stopped before the optimizer step.")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        n_tokens = record.pop("tokens")
        record = {"step": step + 1, "epoch": (step + 1) / (len(examples) // global_batch_size(options, world)),
                  **record, "tokens_per_s": n_tokens / seconds, "seconds": seconds}
        if peak_flops is not None:  # every rank's sequences of the step (one epoch order, not one per micro-batch)
            lengths = [(len(examples[i].prompt), len(r)) for i in step_indices(step, len(examples), options, world)
                       for r in examples[i].responses]
            record["mfu"] = training_flops(model.cfg, lengths) / seconds / (peak_flops * world)
        yield step + 1, record


def evaluate(model, examples: list[Example], reference: torch.Tensor | None, options: Training, pad_id: int,
             ranks: Ranks) -> dict:
    """The held-out rows scored by the policy as it is now (DPO: against their reference log-probs [N, 2]):
    {"eval/loss" (dpo + α·nll; SFT: nll), "eval/dpo", "eval/nll", "eval/reward_accuracy", "eval/margin",
    "eval/logps/chosen", "eval/logps/rejected", "eval/pairs"}, and per "lang" as "eval/{lang}/...". Each rank
    scores a slice; sums all-reduced, read once."""
    rank, world, device = ranks
    columns = (("dpo", "nll", "reward_accuracy", "margin", "logps/chosen", "logps/rejected")
               if options.objective == "dpo" else ("nll",))
    langs = sorted({ex.lang for ex in examples if ex.lang is not None})
    sums = torch.zeros(1 + len(langs), len(columns) + 1, dtype=torch.float64, device=device)  # row 0: all
    model.eval()
    with torch.no_grad():
        for idx in rank_slices(len(examples), options.batch_size, world, rank):
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
