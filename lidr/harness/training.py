"""A training run's folder: claimed, checkpointed, resumed, logged and exported around the trainer's loop.

    python train_dpo.py --model M0 --data pairs.jsonl --out runs/M1          # lidr/cli/train.py: every command
    run("M0", "pairs.jsonl", "runs/M1", Training(lr=1e-6))                   # the same, from Python

The method (packing, sharding, the reference pass, the loss, the step, the loop `steps`) is
lidr/train.py; this module is what keeps a run safe around it, on every rank of the group.

One run, in order:
1. Inputs are checked before anything is written: the model folder (config, weights, tokenizer)
   and the data. Rows are read (JSONL, Parquet, a save_to_disk folder; lidr's or TRL's formats:
   lidr/harness/pair_data.py) and tokenized (lidr/train_data.py); bad rows are dropped and counted per reason
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
   memory plan (lidr/harness/memory.py) says the largest micro-batch does not fit without it (printed).
   A plain `python` launch makes a one-rank process group, so every launch runs the same code.
3. Reference log-probs (DPO): the policy, still M_t, scores every pair once (the held-out ones
   too), each rank its share, packed as training and evaluation will pack them (so the margins
   are exactly 0 until the first update); the table is gathered and saved as OUT/reference_logps.pt
   and reused on resume. During training only the policy is in memory.
4. Training: AdamW (fused on CUDA), a linear warmup (none by default) then a linear (or cosine)
   fall to 0, gradient clipping, gradient accumulation (LLaMA-Factory's defaults, lidr/settings.py
   Training). loss per pair = −log σ(β·Δ) + α·(−log π(y_c|x)/|y_c|) (lidr/dpo.py; --loss picks a
   variant of the first term), averaged over the global batch (--batch-size pairs per rank per
   micro-batch × --grad-accum × ranks). The step's numbers stay on the device until one
   all_reduce and one read per step. Each step appends a JSON line to OUT/log.jsonl (mirrored to
   TensorBoard or wandb with --report-to); the console shows one progress bar (plain lines every
   30 s or 10% when it is not a terminal, lidr/harness/progress.py). --eval-split F holds out a share F of
   the prompt ids (every row of an id, drawn with --seed), --eval-data FILE the rows of another
   file, and scores them before training, every
   --eval-every steps and at the end: loss, reward accuracy and margin, overall and per "lang",
   as "eval/..." lines in OUT/log.jsonl, on the console and in the curves.
5. Every --save-every steps before the last: OUT/checkpoint (sharded model and optimizer state
   through torch.distributed.checkpoint, scheduler, step, per-rank RNG) built in
   OUT/checkpoint.tmp and renamed into place, so a crash leaves the previous checkpoint whole;
   a save stopped between any two of its steps is recovered by the next (`complete_checkpoint`).
   Rerunning the same command resumes from it (a torn last line of OUT/log.jsonl cut, and said).
   A NaN/inf loss or gradient norm stops the run before the optimizer step and before any save.
6. Export, in place of a last checkpoint: OUT/model, an HF folder (lidr.checkpoint.save,
   gathered on rank 0, built beside its place and renamed into it) in the compute dtype, and
   OUT/curves.png (the other ranks wait at a barrier, as they wait for rank 0's read in step 2:
   the group's timeout, lidr.train.RANK0_ALONE_TIMEOUT, is an hour, not nccl's 10 minutes); then
   OUT/model.made-from.json, and the temporaries of interrupted saves go.
   Once OUT/model and its record exist, a rerun has nothing to do; a crash before it resumes
   from the last checkpoint; an OUT/model without its record is refused, never replaced.
"""

import importlib.util
import json
import math
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lidr.checkpoint import default_dtype, read_config, save
from lidr.harness import cluster
from lidr.harness.memory import GB, fits, largest_micro_batch, plan, training_peak
from lidr.harness.outputs import (
    OutputLock, check_folder, cut_torn_tail, folder_identity, hold_lock, owner, read_output_rows,
    record_output, record_path, remove_path, remove_stale_temporaries, write_json_atomic, write_text_atomic,
)
from lidr.harness.pair_data import data_identity
from lidr.harness.progress import Progress
from lidr.harness.tracking import Tracker, tracker_package
from lidr.kernels.attention import flex_documents
from lidr.settings import TRAINING, Training, provenance
from lidr.tokenizer import Tokenizer
from lidr.train import (
    Example, build_model, dense_mask_default, evaluate, fused_adamw, global_batch_size, load_examples, lr_factor,
    read_examples, reference_logps, setup_distributed, split_held_out, steps,
)

MADE_BY = "lidr.cli.train"  # the owner named in OUT.made-from.json: the command's module
# what the trainer writes in OUT: what --redo-from may delete there (lidr/harness/stages.py), and nothing else
RUN_CONTENTS = ("run.json", "data_report.json", "reference_logps.pt", "reference_logps.tmp", "log.jsonl", "checkpoint",
                "checkpoint.tmp", "checkpoint.old", "curves.png", "model", "model.made-from.json", "tensorboard", "wandb")
# what the reference log-probs are computed from
REFERENCE_KEYS = ("model", "data", "eval_data", "max_len", "dtype", "chat_format", "plain_text")


def run(model_dir, data, out, options: Training = TRAINING):
    """M_t (the HF folder model_dir) trained on the rows of `data` into OUT; OUT/model is M_{t+1}.

    The module docstring's steps 1-6, run by every rank under torchrun, or in one process (a one-rank group).
    """
    tracker_package(options.report_to)  # --report-to's package, before any work
    ranks = setup_distributed()
    if options.dtype is None:
        options = replace(options, dtype=str(default_dtype(ranks.device)).removeprefix("torch."))
    try:
        cluster.check_shared(out, model_dir)  # under torchrun: every node sees OUT and the same model
        model_dir, data, out = Path(model_dir), Path(data), Path(out)
        rank, world, device = ranks
        torch.manual_seed(options.seed)
        tokenizer, examples, counts, eval_counts, (train_indices, held_out_indices), identity = read_inputs(
            model_dir, data, options, world)

        def same_run():  # a folder of the user's, or a run on other inputs: refused untouched
            check_run_folder(out, identity)
            return identity

        identity = cluster.on_rank0(same_run)  # rank 0's view: resolved paths and file times differ across nodes
        options, why = cluster.on_rank0(lambda: checkpointing_where_needed(model_dir, examples, options, world, device))
        global_batch = global_batch_size(options, world)
        total_steps = len(train_indices) // global_batch * options.epochs
        dist.barrier()
        locks = []  # rank 0's hold on OUT
        # the curves are a report, not the run's result: without matplotlib (the extra `plot`) it trains and says so
        can_plot = importlib.util.find_spec("matplotlib") is not None
        cluster.on_rank0(lambda: locks.append(claim_run_folder(out, identity)))  # every rank refuses alike
        if rank == 0:
            write_json_atomic(out / "run.json", identity)
            report = {**counts, "eval_data": eval_counts} if eval_counts else counts  # --eval-data's rows beside
            write_json_atomic(out / "data_report.json", dict(report))
            print(f"{data}: {counts['read']} rows read, {counts['kept']} kept ({format_counts(counts)}); "
                  f"counts in {out / 'data_report.json'}")
            if eval_counts:
                print(f"{options.eval_data}: {eval_counts['read']} rows read, {eval_counts['kept']} kept and held out "
                      f"({format_counts(eval_counts)})")
            attention = "through a dense mask"
            if not dense_mask_default(device):
                attention = ("through flex attention's document mask" if flex_documents(device)
                             else "sequence by sequence")
            print(f"{world} rank(s) on {device.type}, {identity['dtype']} compute, packed rows attending {attention}; "
                  f"global batch {global_batch} = {options.batch_size} × {options.grad_accum} accumulation × "
                  f"{world}; {total_steps} steps")
            if why:
                print(why)
            if not can_plot:
                print(f"{out / 'curves.png'} will not be drawn: matplotlib is not installed (pip install 'lidr[plot]'); "
                      f"the numbers are in {out / 'log.jsonl'}")
        dist.barrier()
        if cluster.on_rank0(lambda: exported(out)):  # the run is complete
            if rank == 0:
                print(f"{out / 'model'} exists: this run finished earlier, nothing to do")
                for lock in locks:
                    lock.release()
            return

        compute_dtype = getattr(torch, identity["dtype"])
        model = build_model(model_dir, device, compute_dtype, options.activation_checkpointing)
        reference = None
        if options.objective == "dpo":  # every usable pair, held-out ones included, in one pass
            reference_path = out / "reference_logps.pt"
            fingerprint = {k: identity[k] for k in REFERENCE_KEYS}
            reference = saved_reference_logps(reference_path, fingerprint)
            if reference is None:
                reference = reference_logps(model, examples, tokenizer.pad_id, options, ranks, held_out_indices)
                if rank == 0:
                    save_reference_logps(reference_path, fingerprint, reference)
        held_out = [examples[i] for i in held_out_indices]
        held_out_reference = None if reference is None else reference[held_out_indices]
        examples = [examples[i] for i in train_indices]
        reference = None if reference is None else reference[train_indices]
        if rank == 0 and held_out:
            every = f"every {options.eval_every} steps, " if options.eval_every else ""
            given = [f"--eval-split {options.eval_split}"] * bool(options.eval_split) + [
                f"--eval-data {options.eval_data}"] * bool(options.eval_data)
            print(f"{len(held_out)} pairs of {len({ex.group for ex in held_out})} prompt ids held out "
                  f"({' and '.join(given)}), scored before training, {every}and at the end")

        optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay,
                                      betas=(options.adam_beta1, options.adam_beta2), eps=options.adam_eps,
                                      fused=fused_adamw(device))
        warmup_steps = round(options.warmup_ratio * total_steps)
        # LambdaLR takes a function; a function (not a callable object) keeps the saved scheduler state as it was
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
            forget_steps_after(log_path, start)
        tracker = Tracker(options.report_to, out, provenance(options), first_step=start + 1) if rank == 0 else None
        progress = Progress(total_steps, "train", initial=start, enabled=rank == 0)
        if held_out and start == 0:
            scores = evaluate(model, held_out, held_out_reference, options, tokenizer.pad_id, ranks)
            log_line(log_path, tracker, {"step": 0, **scores})
            progress.write(eval_summary(0, scores))
        try:
            for step, record in steps(model, optimizer, scheduler, examples, reference, options, tokenizer.pad_id,
                                      ranks, start, total_steps):
                log_line(log_path, tracker, record)
                progress.update(1, loss=record["loss"], **{name: record[k] for name, k in  # dpo: the term alone
                                                           (("dpo", "dpo"), ("acc", "reward_accuracy"),
                                                            ("margin", "margin")) if k in record})
                if held_out and ((options.eval_every and step % options.eval_every == 0) or step == total_steps):
                    scores = evaluate(model, held_out, held_out_reference, options, tokenizer.pad_id, ranks)
                    log_line(log_path, tracker, {"step": step, **scores})
                    progress.write(eval_summary(step, scores))
                if step % options.save_every == 0 and step < total_steps:  # the end is saved by the export
                    save_checkpoint(model, optimizer, scheduler, step, out, rank)
        except FloatingPointError as e:  # a NaN/inf loss or gradient norm, before its optimizer step
            raise SystemExit(f"{e} The last good checkpoint ({latest_checkpoint(out)}) is untouched.") from None
        progress.close()
        if tracker is not None:
            tracker.close()

        del optimizer, scheduler  # free AdamW's state (twice the weights) before gathering the full weights
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            if can_plot:
                plot_curves(log_path, out / "curves.png")  # before the export: once OUT/model exists a rerun stops
            save(out / "model", model.cfg, {k: v.to(compute_dtype) for k, v in full.items()}, tokenizer_from=model_dir)
            record_output(out / "model", MADE_BY, {"run": str(out.resolve()), "steps": total_steps})
            remove_temporaries(out)
            print(f"wrote {out / 'model'}" + (f" and {out / 'curves.png'}" if can_plot else ""))
            for lock in locks:
                lock.release()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def forget_steps_after(log_path: Path, start: int):
    """OUT/log.jsonl without the lines of the steps after `start` (a resumed run redoes them), replaced
    in one rename. A torn last line (a run stopped mid-write) is cut, saying so; a line before it
    that does not parse, or a line without a step, is refused, naming the line."""
    rows, torn_at = read_output_rows(log_path)
    cut_torn_tail(log_path, torn_at)
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get("step"), int) or isinstance(row["step"], bool):
            raise SystemExit(f"{log_path}: record {n} has no whole-number 'step'; this is not a log of lidr's "
                             f"trainer: move it away to resume")
    text = "".join(json.dumps(row) + "\n" for row in rows if row["step"] <= start)
    if log_path.exists() and log_path.read_text(encoding="utf-8") != text:  # a line of a later step, or one without its newline
        write_text_atomic(log_path, text)


def log_line(log_path: Path, tracker: Tracker | None, record: dict):
    """On rank 0 (the rank with a tracker): one line of OUT/log.jsonl, mirrored to the tracker."""
    if tracker is None:
        return
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    tracker.log({k: v for k, v in record.items() if k != "step"}, record["step"])


# -----------------------------------------------------------------------------
# inputs and the run folder


def read_inputs(model_dir: Path, data: Path, options: Training, world: int):
    """(tokenizer, examples, counts, eval counts, (training indices, held-out indices), identity): the model
    folder and data checked and read, or one sentence and exit.

    examples are --data's usable rows, then --eval-data's (eval counts: None without it); held out are
    --eval-split's share of --data's prompts and every row of --eval-data. identity names what the run
    is made from: the settings, the data (resolved path, size, sha256; `data_identity`) and the model
    folder (resolved path, config and tokenizer hashes, weight file sizes and modification times).
    Nothing is written here.
    """
    model_identity = folder_identity(model_dir)  # a missing folder or config.json: one sentence
    tokenizer, examples, counts = read_examples(model_dir, data, options)
    train, held_out = split_held_out(examples, options.eval_split, options.seed)
    eval_counts, eval_identity = None, None
    if options.eval_data:
        _, eval_examples, eval_counts = read_examples(model_dir, Path(options.eval_data), options)
        if not eval_examples:
            raise SystemExit(f"{options.eval_data}: no usable row of {eval_counts['read']} "
                             f"({format_counts(eval_counts)}) to hold out (--eval-data)")
        held_out += range(len(examples), len(examples) + len(eval_examples))
        examples, eval_identity = examples + eval_examples, data_identity(options.eval_data)
    global_batch = global_batch_size(options, world)
    if len(train) < global_batch:
        n_data = counts["kept"]
        held = f", {n_data - len(train)} of them held out," if len(train) < n_data else ""
        raise SystemExit(f"{data}: {n_data} usable rows of {counts['read']} ({format_counts(counts)}){held} "
                         f"do not fill one global batch of {global_batch}")
    identity = {**provenance(options), "model": model_identity, "data": data_identity(data), "eval_data": eval_identity}
    return tokenizer, examples, counts, eval_counts, (train, held_out), identity


def checkpointing_where_needed(model_dir: Path, examples: list[Example], options: Training, world: int, device):
    """(options with activation_checkpointing decided, why, or None) where it is unset: on CUDA, on
    when the plan (lidr/harness/memory.py) says the largest micro-batch does not fit without it; else off."""
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
        f"than this {memory_gb:.0f} GB GPU holds (lidr/harness/memory.py; --no-activation-checkpointing to turn it off)")


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
    """lidr.harness.outputs.check_folder, except that a run of this trainer that never logged a step may start
    again with other training settings on the same model, data, length and dtype (what its
    reference table is bound to): a learning rate that stopped it with a NaN at the first step is
    corrected, not refused."""
    try:
        recorded = json.loads(record_path(out).read_text(encoding="utf-8"))
        same_inputs = owner(recorded["made_by"]) == MADE_BY and all(
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
    """What an interrupted save or export left in OUT, once the run has succeeded, each named."""
    for path in (out / "checkpoint.tmp", out / "checkpoint.old", out / "reference_logps.tmp"):
        if path.exists():
            remove_checkpoint(path) if path.is_dir() else path.unlink()
            print(f"removed {path}, left by an interrupted save")
    remove_stale_temporaries(out / "model")


# -----------------------------------------------------------------------------
# reference log-probs and checkpoints


def saved_reference_logps(path: Path, fingerprint: dict) -> torch.Tensor | None:
    """The table saved at `path` for these inputs, or None where none is (decided on rank 0)."""

    def saved():  # decided on rank 0
        if path.exists() and torch.load(path)["fingerprint"] != fingerprint:
            raise SystemExit(f"{path} was computed for other data or another model; use a fresh --out")
        return path.exists()

    return torch.load(path)["logps"] if cluster.on_rank0(saved) else None


def save_reference_logps(path: Path, fingerprint: dict, table: torch.Tensor):
    """Rank 0: the table saved at `path` with what it was computed from, written whole or not at all."""
    torch.save({"fingerprint": fingerprint, "logps": table}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def save_checkpoint(model, optimizer, scheduler, step: int, out: Path, rank: int):
    """OUT/checkpoint, replaced atomically: built in checkpoint.tmp, complete once its trainer.pt
    is in place, then rotated in (`complete_checkpoint`)."""
    tmp = out / "checkpoint.tmp"
    if rank == 0:
        remove_checkpoint(tmp)  # an interrupted save's
        tmp.mkdir(parents=True)
    dist.barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=tmp)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        complete_checkpoint(out, {"step": step, "scheduler": scheduler.state_dict()})
    dist.barrier()


def complete_checkpoint(out: Path, trainer_state: dict):
    """Rank 0, once every rank has saved into OUT/checkpoint.tmp: its trainer.pt (last, in one rename:
    the folder is whole once it is there), then the rotation: checkpoint.tmp in the place of
    OUT/checkpoint, which stays whole until then (as checkpoint.old once moved aside). Killed
    between any two steps, it leaves a state where `latest_checkpoint` finds a whole checkpoint and
    the next save goes through (a leftover checkpoint.old, whole or half removed, is removed first)."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    torch.save(trainer_state, tmp / "trainer.pt.tmp")
    os.replace(tmp / "trainer.pt.tmp", tmp / "trainer.pt")
    if (final / "trainer.pt").is_file():
        remove_checkpoint(old)
        final.rename(old)
    else:  # absent, or half removed: the whole previous checkpoint, if any, is checkpoint.old
        remove_checkpoint(final)
    tmp.rename(final)
    remove_checkpoint(old)


def remove_checkpoint(folder: Path):
    """A checkpoint folder removed, its trainer.pt first: one half removed is never taken for whole."""
    if folder.is_dir() and not folder.is_symlink():
        (folder / "trainer.pt").unlink(missing_ok=True)
    if folder.exists() or folder.is_symlink():
        remove_path(folder)


def latest_checkpoint(out: Path) -> Path | None:
    """OUT/checkpoint, or checkpoint.old when a save was stopped in the middle of its rotation; a
    checkpoint is whole when its trainer.pt (written last, in one rename) is there."""
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
# what the console and OUT show


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


def plot_curves(log_path: Path, png_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train_rows = [r for r in records if "loss" in r]
    eval_rows = [r for r in records if "eval/loss" in r]
    panels = [("loss", ["loss", "dpo", "nll"]), ("rewards", ["chosen_reward", "rejected_reward", "margin"]),
              ("log-probs", ["logps/chosen", "logps/rejected", "ref_logps/chosen", "ref_logps/rejected"]),
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


# -----------------------------------------------------------------------------
# --plan: will it fit?


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
        examples, counts = load_examples(data, tokenizer, options.objective, options.max_len, options.plain_text)
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
