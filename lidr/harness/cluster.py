"""Many processes on many nodes: the process group, the shared-OUT probe, and decisions made once on rank 0.

Every command that runs under torchrun runs across nodes with torchrun's c10d rendezvous: the
same command on every node, HOST one of them (its address as the others reach it), JOB a name
for the run that every node gives alike:

    torchrun --standalone --nproc_per_node=8 -m lidr.cli.generate --model M --prompts IN.jsonl --out OUT.jsonl
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB \\
        -m lidr.cli.generate --model M --prompts IN.jsonl --out OUT.jsonl        # on each of the 2 nodes

and so for `-m lidr.cli.translate`, `-m eval.mgsm`, `-m eval.alpacaeval generate` and `-m lidr.cli.train`
(the top-level scripts generate.py, translate.py and train_dpo.py are the same commands).
iterate.py runs once per node and launches its stages so (--nnodes, --rdzv-endpoint, --rdzv-id).

OUT must be one folder that every node sees (a shared filesystem): each rank writes its share of
the rows, rank 0 merges them, checkpoints are written by every rank. A node that writes into its
own local copy would lose its rows without a word, so each multi-process command starts with
`check_shared`: rank 0 writes a probe file (a random name) in OUT's folder, or in the nearest
folder above it that exists, every rank looks for it where its own OUT path points, and every
rank also fingerprints the model folder (config, index and tokenizer files by sha256, weight files
by size). Unless every rank saw the probe and the same model, every rank stops with one sentence
before anything is written. The probe is removed before the verdict; it is the only file the
check writes.

Then what a rerun may do (OUT's record of what it was made from, a run's settings, checkpoints
to resume from) is decided by rank 0 alone and broadcast (`on_rank0`): a model folder copied to
each node has other resolved paths and file times on every node, and must not make only some
nodes refuse.

Processes of one group: the trainer's (nccl on GPU, gloo on CPU, lidr/train.py), or, for the
sampling commands, a gloo group made by `join` on first use and kept until the process exits.
Both are made by `init_group`, after `launch` has checked torchrun's variables (all of RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, consistent, or none: some left in a shell stop
with one sentence naming which); the other processes must come within RENDEZVOUS_TIMEOUT (a
launch nobody else joined stops in a sentence, instead of waiting out the group's day-long timeout).
"""

import atexit
import hashlib
import json
import os
import secrets
import socket
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from lidr.harness.outputs import folder_identity

PROBE_PREFIX = ".lidr-shared-probe-"
# what torchrun sets for each process: all of them, or none (a plain launch)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
RENDEZVOUS_TIMEOUT = timedelta(minutes=10)  # torchrun starts every process of a launch at once


def launch() -> tuple[int, int, int]:
    """(rank, world, local rank) as torchrun set them, (0, 1, 0) for a plain launch. Some of
    TORCHRUN_VARIABLES without the others (left in a shell), or values that cannot be one
    launch's, stop with one sentence naming what is set and what is missing."""
    present = [name for name in TORCHRUN_VARIABLES if os.environ.get(name, "") != ""]
    if not present:
        return 0, 1, 0
    shown = ", ".join(f"{name}={os.environ[name]}" for name in present)
    missing = [name for name in TORCHRUN_VARIABLES if name not in present]
    if missing:
        raise SystemExit(f"torchrun's variables are set only in part ({shown}; {', '.join(missing)} not set): "
                         f"launch with torchrun, or unset {', '.join(present)} for a one-process run")
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "LOCAL_WORLD_SIZE"):  # the last: 0 when unset
        try:
            values[name] = int(os.environ.get(name, "0"))
        except ValueError:
            values[name] = -1  # not a whole number
    rank, world, local_rank, port, local_world = values.values()
    checks = [(min(values.values()) < 0, "each of them a whole number"), (world < 1, "WORLD_SIZE at least 1"),
              (rank >= world, "RANK below WORLD_SIZE"),
              (local_rank >= world or 0 < local_world <= local_rank, "LOCAL_RANK below its node's processes"),
              (not 0 < port < 2**16, "MASTER_PORT a port (1 .. 65535)")]
    problem = next((why for bad, why in checks if bad), None)
    if problem is not None:
        raise SystemExit(f"torchrun's variables do not describe one launch ({shown}); torchrun sets {problem}: "
                         f"launch with torchrun, or unset them for a one-process run")
    return rank, world, local_rank


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes): torchrun's, or (0, 1) for a plain launch."""
    return launch()[:2]


def init_group(backend: str, timeout: timedelta):
    """Make this process's group: torchrun's, met within RENDEZVOUS_TIMEOUT (a launch whose other
    processes never come, e.g. torchrun's variables copied into a plain shell, stops with one
    sentence instead of waiting `timeout`), then waiting up to `timeout` in every collective; a
    one-rank group for a plain launch or a WORLD_SIZE of 1."""
    rank, world, _ = launch()
    if world == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:  # what init_process_group does with env://, but for the wait for the other processes
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=RENDEZVOUS_TIMEOUT))
    except (RuntimeError, ValueError, OSError) as e:  # torch's DistStoreError is a RuntimeError
        raise SystemExit(f"rank {rank} of {world} found no process group at {where} within "
                         f"{RENDEZVOUS_TIMEOUT.total_seconds():.0f} s ({str(e).splitlines()[0][:160]}): were all "
                         f"{world} processes launched (torchrun)? For a one-process run unset "
                         f"{', '.join(TORCHRUN_VARIABLES)}") from None
    store.set_timeout(timeout)
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world,
                            timeout=timeout)


def join() -> tuple[int, int]:
    """(rank, world), once this process is in torchrun's group: a gloo group (only small objects
    and barriers travel), made on first use and destroyed at exit, unless one exists already."""
    rank, world = rank_and_world()
    if world > 1 and not dist.is_initialized():
        init_group("gloo", timedelta(days=1))
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return rank, world


def on_rank0(decide):
    """decide() run on rank 0 alone; every rank returns its result, or stops with the sentence it stopped with."""
    rank, world = join()
    if world == 1:
        return decide()
    outcome = [None]
    if rank == 0:
        try:
            outcome = [("value", decide())]
        except SystemExit as e:
            outcome = [("exit", e.code)]
        except Exception as e:
            dist.broadcast_object_list([("exit", f"rank 0 failed: {e!r}")], src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "exit":
        raise SystemExit(value)
    return value


def checkpoint_fingerprint(folder) -> str | None:
    """sha256 over what lidr.harness.outputs.folder_identity records of a model folder, less what differs
    between copies (its path, the weight files' times): a copy on each node has the same fingerprint.
    None when there is no config.json, the error when a file cannot be read."""
    if not (Path(folder) / "config.json").is_file():
        return None
    try:
        files = folder_identity(folder)["files"]
    except (OSError, SystemExit) as e:
        return f"unreadable ({e})"
    same_on_every_copy = {name: {k: v for k, v in file.items() if k != "mtime_ns"} for name, file in files.items()}
    return hashlib.sha256(json.dumps(same_on_every_copy, sort_keys=True).encode()).hexdigest()


def probe_folder(out: Path) -> tuple[Path, int]:
    """(the folder the probe goes in, how many levels above OUT it is): OUT when it is a folder
    that exists, else the nearest existing folder above it."""
    folder, levels = out, 0
    while not folder.is_dir():
        folder, levels = folder.parent, levels + 1
    return folder, levels


def check_shared(out, model=None):
    """Every rank stops, with one sentence, unless every rank sees what rank 0 writes where OUT goes
    (OUT: a file or a folder, resolved by each rank from its own working folder) and, when `model`
    is given, the same model folder. Nothing is left behind; a plain launch checks nothing."""
    rank, world = join()
    if world == 1:
        return
    given, out = out, Path(os.path.abspath(out))
    probe, levels = None, None
    if rank == 0:
        folder, levels = probe_folder(out)
        probe = folder / (PROBE_PREFIX + secrets.token_hex(8))
        try:
            with open(probe, "x") as f:
                f.write(probe.name)
        except OSError as e:
            probe, levels = None, f"{folder}: cannot write there ({e.strerror})"
    try:
        shared = [(probe and probe.name, levels)]
        dist.broadcast_object_list(shared, src=0)
        name, levels = shared[0]
        if name is None:
            raise SystemExit(levels)
        ancestors = [out, *out.parents]
        mine = ancestors[min(levels, len(ancestors) - 1)]  # where this rank's OUT puts rank 0's folder
        try:
            seen = (mine / name).read_text() == name
        except OSError:
            seen = False
        views = [None] * world
        dist.all_gather_object(views, (seen, str(mine), checkpoint_fingerprint(model) if model else None,
                                       socket.gethostname()))  # returns once every rank has looked
    finally:
        if probe is not None:
            probe.unlink()
    blind = next((r for r, view in enumerate(views) if not view[0]), None)
    if blind is not None:
        _, folder, _, host = views[blind]
        raise SystemExit(f"{given} is not shared across nodes: rank {blind} (on {host}) does not see the file rank 0 "
                         f"wrote in {views[0][1]} (it looked in {folder}); give every node one OUT on a shared "
                         f"filesystem")
    other = next((r for r, view in enumerate(views) if view[2] != views[0][2]), None)
    if other is not None:

        def sees(r):
            return "no checkpoint" if views[r][2] is None else f"checkpoint {views[r][2][:24]}"

        raise SystemExit(f"the model folder {model} is not shared across nodes: rank {other} (on {views[other][3]}) "
                         f"sees {sees(other)} there, rank 0 {sees(0)}; share it, or copy it whole to every node")
