"""The stages of an iteration kept on disk: done-markers, the WORK lock, --redo-from, torchrun and several nodes.

    runner = Runner(model, prompts, folder, recipe, label, batch_size, nproc, train_nproc, nodes)
    if runner.begin("generate"):          # False: done earlier from the same inputs (skipped)
        runner.generate(prompts / "fr.jsonl", folder / "generate" / "fr.jsonl", recipe.answers, "fr")
        runner.done("generate")           # WORK/iter{t}/done/generate records what it was made from

lidr/iterate.py is the iteration as plain calls; this is what keeps it safe:
- A finished stage leaves WORK/iter{t}/done/{stage}, a record of what it was made from
  (`stage_identities`: M_t, the prompt files, the languages, the stage's settings, and the stage
  before it), and is skipped on a rerun that would make it from the same; an interrupted stage
  resumes (each stage picks up its own partial outputs). A marker made from anything else is
  refused, naming what changed, or with --redo-from STAGE that stage and every later one are made
  again (`plan`, `redo`: their outputs deleted only where their records prove lidr wrote them).
- WORK is locked (one iterate.py per work folder) and the inputs checked before the first stage.
- A stage runs in this process, or, when nproc > 1 or on several nodes, under torchrun
  (`python -m lidr.cli.generate`, `-m lidr.cli.translate`, `-m lidr.cli.train`: the same functions
  behind a command line, launched as modules so that an installed package needs no checkout).
  In this process M_t is loaded once (`Engine`) for all of an iteration's generation and
  translation, so its KV cache and compiled step are reused.
- On several nodes (`Nodes`) iterate.py runs once on each, with the same flags but --node-rank;
  every torchrun stage is launched on every node with the c10d rendezvous (an id per stage made
  from --rdzv-id and the stage's output); WORK must be one shared folder. Node 0 locks WORK,
  checks the markers, runs the single-process stages (pairs, SFT rows), decides when too few rows
  leave M_t unchanged and writes the markers; the other nodes write nothing: they take their part
  in each torchrun stage, then wait for node 0's marker.
"""

import json
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from lidr.cli import flags_argv
from lidr.harness.outputs import (
    RECORD_SUFFIX, check_output, file_identity, folder_identity, hold_lock, identity_changes, record_output,
    remove_own_output, write_json_atomic,
)
from lidr.harness.sampled import GENERATE, TRANSLATE, Engine, check_model, generate_file, translate_file
from lidr.harness.stage_files import PAIRS, SDRRL, read_translation_task_ids, stale_translations
from lidr.cli.train import options_argv
from lidr.harness.training import MADE_BY as TRAIN
from lidr.harness.training import RUN_CONTENTS
from lidr.harness.training import run as train_run
from lidr.harness.tracking import tracker_package
from lidr.languages import checked_languages
from lidr.settings import Decoding, Training, provenance
from lidr.train import global_batch_size, read_examples, split_held_out

ITERATE = "lidr.cli.iterate"  # the owner of what iterate.py writes itself (train/unchanged.json)
FOLLOWER_WAIT_S = 1800  # how long a node other than node 0 waits for node 0 to mark a stage done
JOINT_STAGES = ("generate", "translate", "train")  # run by every node (torchrun); the others by node 0 alone


@dataclass(frozen=True)
class Nodes:
    """The nodes a run spans; iterate.py runs on each, the same flags but `rank`."""

    count: int = 1  # --nnodes
    rank: int = 0  # --node-rank: 0 runs the single-process stages and writes the done markers
    endpoint: str | None = None  # --rdzv-endpoint HOST:PORT, the c10d rendezvous of every torchrun stage
    job: str = "lidr"  # --rdzv-id: each stage's rendezvous id is this, then the stage's output


def torchrun_argv(module: str, argv: list, nproc: int, nodes: Nodes, out) -> list[str]:
    """The command that runs one of lidr's command-line modules under torchrun, on this node and,
    with several nodes, on every node alike (the rendezvous id names the stage's output)."""
    if nodes.count == 1:
        where = ["--standalone"]
    else:
        rendezvous_id = "-".join([nodes.job, *Path(out).with_suffix("").parts[-3:]])
        where = [f"--nnodes={nodes.count}", "--rdzv-backend=c10d", f"--rdzv-endpoint={nodes.endpoint}",
                 f"--rdzv-id={rendezvous_id}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc}", "-m", module,
            *map(str, argv)]


def torchrun(module: str, argv: list, nproc: int, nodes: Nodes, out):
    """Run one of lidr's command-line modules under torchrun; a failure stops the iteration. Stopped itself
    (SIGTERM, Ctrl-C), iterate.py passes SIGTERM on: torchrun stops its workers, each in its sentence."""
    cmd = torchrun_argv(module, argv, nproc, nodes, out)
    print("  $ " + shlex.join(cmd), flush=True)
    with subprocess.Popen(cmd) as process:
        try:
            returncode = process.wait()
        except BaseException:
            process.terminate()  # not subprocess.run's SIGKILL, which would leave torchrun's workers running
            process.wait()
            raise
    if returncode != 0:
        raise SystemExit(f"{module} failed (exit {returncode}); rerun the same command to resume")


def train(model, data, out, options: Training, nproc: int = 1, nodes: Nodes = Nodes()) -> Path:
    """The trainer (lidr/harness/training.py) in this process, or under torchrun; OUT/model."""
    if nproc == 1 and nodes.count == 1:
        train_run(model, data, out, options)
    else:
        torchrun(TRAIN, ["--model", model, "--data", data, "--out", out, *options_argv(options)], nproc, nodes, out)
    return Path(out) / "model"


# -----------------------------------------------------------------------------
# what each stage is made from, recorded in its done-marker


def stage_names(recipe) -> tuple[str, ...]:
    return ("generate", "translate", "pairs" if recipe.method == "lidr" else "sdrrl", "train")


def training_options(recipe) -> Training:
    """The trainer's settings: the recipe's, with the SFT objective for SDRRL."""
    return replace(recipe.training, objective="sft") if recipe.method == "sdrrl" else recipe.training


def stage_identities(model, prompts, recipe, train_processes: int,
                     model_identity: dict | None = None) -> dict[str, dict]:
    """{stage: what it is made from}, known before any stage runs: M_t (folder_identity), the prompt
    files, the languages and each stage's settings (the trainer's global batch over train_processes,
    every node's: --train-nproc × --nnodes); each stage's identity holds the one before it, so a
    change anywhere shows in every stage after it."""
    en, langs = recipe.pairs.dominant, list(recipe.langs)
    generate = {"model": model_identity or folder_identity(model), "languages": [en, *langs],
                "answers": provenance(recipe.answers),
                "prompts": {lang: file_identity(Path(prompts) / f"{lang}.jsonl") for lang in (en, *langs)}}
    directions = [[en, lang] for lang in langs] + ([[lang, en] for lang in langs] if recipe.method == "lidr" else [])
    translate = {"generate": generate, "directions": directions, "translation": provenance(recipe.translation)}
    if recipe.method == "lidr":
        task_ids = recipe.translation_task_ids
        rows = {"translate": translate, "pairs": provenance(recipe.pairs), "swap_pairs": recipe.swap_pairs,
                "translation_task_ids": file_identity(task_ids) if task_ids else None}
    else:
        rows = {"translate": translate, "sdrrl": provenance(replace(recipe.sft_rows, dominant=en))}
    options = training_options(recipe)
    train = {"rows": rows, "training": provenance(options), "global_batch": global_batch_size(options, train_processes)}
    return dict(zip(stage_names(recipe), (generate, translate, rows, train)))


def read_marker(marker: Path) -> dict | None:
    """A done-marker's record ({stage, made_from, result}), {} for one that records nothing (an older
    lidr's, or not lidr's), None when the stage is not done."""
    if not marker.exists():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) and "made_from" in record else {}


def marker_changes(marker: Path, identity: dict) -> list[str]:
    """What differs between a done stage's record and `identity` (['...'] for a marker that records nothing)."""
    record = read_marker(marker)
    if record is None:
        return []
    if not record:
        return [f"{marker} records nothing of what the stage was made from"]
    return identity_changes(record["made_from"], json.loads(json.dumps(identity)))


def write_marker(folder: Path, name: str, identity: dict, **extra):
    """Stage `name` of the iteration folder is done, made from `identity` (`stage_identities`)."""
    write_json_atomic(folder / "done" / name, {"stage": name, "made_from": identity, **extra})


def wait_for_marker(marker: Path, name: str, label: str):
    """A node other than node 0: wait for node 0 to mark stage `name` done."""
    print(f"[{label}] {name}: waiting for node 0 to mark it done ({marker})", flush=True)
    deadline = time.time() + FOLLOWER_WAIT_S
    while not marker.exists():
        if time.time() > deadline:
            raise SystemExit(f"{marker}: node 0 has not marked {name} done in {FOLLOWER_WAIT_S} s; see its output, "
                             f"then rerun the same command on every node")
        time.sleep(2)


# -----------------------------------------------------------------------------
# one iteration's stages


class Runner:
    """One iteration's stages, for lidr/iterate.py: which run (`begin`), how (`generate`, `translate`,
    `train`: here on the Engine of M_t, loaded once, or under torchrun), and their markers (`done`)."""

    def __init__(self, model, prompts, folder, recipe, label: str, batch_size: int, nproc: int, train_nproc: int,
                 nodes: Nodes):
        self.model, self.folder, self.label, self.nodes = Path(model), Path(folder), label, nodes
        self.nproc, self.train_nproc, self.batch_size = nproc, train_nproc, batch_size
        self.local = nproc == 1 and nodes.count == 1  # generation and translation in this process
        self.engine = Engine(model, batch_size=batch_size)
        self.identities = stage_identities(model, prompts, recipe, train_nproc * nodes.count, self.engine.identity())
        self.started = 0.0

    def marker(self, name: str) -> Path:
        return self.folder / "done" / name

    def begin(self, name: str) -> bool:
        """Whether stage `name` runs now: False when it is done from the same inputs (a marker from
        others is refused, naming what changed); on a node other than node 0, False for a stage
        that node 0 alone runs, once node 0 has marked it done."""
        marker = self.marker(name)
        if marker.exists():
            changes = marker_changes(marker, self.identities[name]) if self.nodes.rank == 0 else []
            if changes:
                raise SystemExit(f"{marker}: this stage was done from other inputs or settings "
                                 f"({'; '.join(changes[:4])}); rerun with --redo-from {name} to redo it and what "
                                 f"follows, or use another --work")
            print(f"[{self.label}] {name}: done earlier, skipped", flush=True)
            return False
        if self.nodes.rank != 0 and name not in JOINT_STAGES:
            wait_for_marker(marker, name, self.label)
            return False
        print(f"[{self.label}] {name} ...", flush=True)
        self.started = time.time()
        return True

    def done(self, name: str, **result):
        """Node 0: mark stage `name` done, with what it was made from and `result` (what the next
        stage takes from it); the other nodes wait for that marker."""
        if self.nodes.rank != 0:
            wait_for_marker(self.marker(name), name, self.label)
            return
        seconds = time.time() - self.started
        write_marker(self.folder, name, self.identities[name], seconds=round(seconds),
                     **{k: str(v) for k, v in result.items()})
        print(f"[{self.label}] {name}: finished in {seconds:.0f}s", flush=True)

    def generate(self, prompts, out, decoding: Decoding, lang: str):
        if self.local:
            generate_file(self.engine, prompts, out, decoding, lang=lang)
        else:
            torchrun(GENERATE, ["--model", self.model, "--prompts", prompts, "--out", out, "--batch-size",
                                self.batch_size, "--lang", lang, *flags_argv(decoding)], self.nproc, self.nodes, out)

    def translate(self, source, out, to: str, decoding: Decoding, field: str):
        if self.local:
            translate_file(self.engine, source, out, to, decoding, field=field)
        else:  # translation asks in its own prompt: it has no --prompt-template
            torchrun(TRANSLATE, ["--model", self.model, "--in", source, "--to", to, "--out", out, "--field", field,
                                 "--batch-size", self.batch_size, *flags_argv(decoding, skip=("prompt_template",))],
                     self.nproc, self.nodes, out)

    def train(self, data: Path, out: Path, options: Training) -> Path:
        """M_{t+1} trained on `data` into OUT, or M_t itself when the usable rows do not fill one
        global batch (M_t and its own translations agree almost everywhere: nothing to learn;
        OUT/unchanged.json says so)."""
        _, examples, counts = read_examples(self.model, data, options)  # the rows the trainer would keep
        global_batch = global_batch_size(options, self.train_nproc * self.nodes.count)
        n_train = len(split_held_out(examples, options.eval_split, options.seed)[0])  # less --eval-split's
        if n_train < global_batch:
            print(f"[{self.label}] train: {len(examples)} usable rows of {counts['read']} in {data} do not fill one "
                  f"global batch of {global_batch}; M_t+1 is M_t ({self.model})", flush=True)
            made = {"rows": counts["read"], "usable_rows": len(examples), "global_batch": global_batch,
                    "model": str(self.model)}
            if self.nodes.rank == 0:
                unchanged = out / "unchanged.json"
                check_output(unchanged, ITERATE, made)
                record_output(unchanged, ITERATE, made)
                write_json_atomic(unchanged, made)
            return self.model
        self.engine.kept.clear()  # M_t's weights leave memory before training
        if self.train_nproc > 1 or self.nodes.count > 1:
            return train(self.model, data, out, options, self.train_nproc, self.nodes)
        train_run(self.model, data, out, options)  # called here, not through `train`: one frame less to the loss
        return out / "model"

    def next_model(self) -> Path:
        """M_{t+1}, as the train stage's marker records it."""
        return Path(read_marker(self.marker("train"))["result"])


# -----------------------------------------------------------------------------
# before the first stage: inputs, the markers of WORK, --redo-from


def check_inputs(model, prompt_dirs: list, recipe, redo_from: str | None = None):
    """Refuse, in one sentence and before the first stage, languages, a model folder, prompt folders
    or a translation-task file that cannot work."""
    try:
        checked_languages(recipe.langs, dominant=recipe.pairs.dominant)
        read_translation_task_ids(recipe.translation_task_ids)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    check_model(model, recipe.training.chat_format)
    tracker_package(recipe.training.report_to)  # the trainer's --report-to, before hours of generation
    if recipe.training.eval_data and not Path(recipe.training.eval_data).exists():
        raise SystemExit(f"{recipe.training.eval_data}: no such file or folder (the trainer's --eval-data)")
    for folder in prompt_dirs:
        for lang in (recipe.pairs.dominant, *recipe.langs):
            if not (Path(folder) / f"{lang}.jsonl").is_file():
                raise SystemExit(f"{Path(folder) / f'{lang}.jsonl'}: no such prompt file (--prompts names {folder}, "
                                 f"--langs and --dominant name {lang})")
    if redo_from is not None and redo_from not in stage_names(recipe):
        raise SystemExit(f"--redo-from {redo_from}: not a stage of --method {recipe.method} "
                         f"({', '.join(stage_names(recipe))})")


@contextmanager
def claim_work(model, prompt_dirs: list, work: Path, recipe, iterations: int, train_nproc: int, nodes: Nodes,
               redo_from: str | None):
    """WORK for the iterations of lidr.iterate.run: the inputs checked; on node 0 WORK locked (one
    iterate.py per work folder) and every done-marker compared with this command (`plan`)."""
    check_inputs(model, prompt_dirs[:iterations], recipe, redo_from)
    if nodes.rank != 0:  # node 0 alone writes in WORK
        yield
        return
    with hold_lock(work, ITERATE):
        plan(model, prompt_dirs, work, recipe, iterations, train_nproc * nodes.count, redo_from)
        yield


def remove_stage_outputs(folder: Path, name: str) -> list[Path]:
    """Delete what stage `name` of the iteration folder wrote and can prove it wrote (each output's
    made-from record names the stage's command; in the run folder, only what the trainer writes),
    and its done-marker; anything else is left, for the stage to refuse by name. Every removed
    path, in order."""
    removed = []
    if name == "train":
        removed += remove_own_output(folder / "train" / "unchanged.json", ITERATE)
        removed += remove_own_output(folder / "train", TRAIN, contents=RUN_CONTENTS)
    else:
        made_by, place = {"generate": (GENERATE, "generate"), "translate": (TRANSLATE, "translate"),
                          "pairs": (PAIRS, "."), "sdrrl": (SDRRL, ".")}[name]
        records = sorted(p for p in (folder / place).iterdir() if p.name.endswith(RECORD_SUFFIX)) \
            if (folder / place).is_dir() else []
        for record in records:
            out = record.with_name(record.name.removesuffix(RECORD_SUFFIX))
            reports = [out.with_name(out.stem + "_report.json")] if name in ("pairs", "sdrrl") else []
            removed += remove_own_output(out, made_by, companions=reports)
    marker = folder / "done" / name
    if marker.exists():
        marker.unlink()
        removed.append(marker)
    return removed


def plan(model, prompt_dirs: list, work: Path, recipe, iterations: int, train_processes: int,
         redo_from: str | None):
    """Before any work: compare every done-marker of WORK with what this command would make. Nothing
    differs: go on (done stages are skipped). Something differs: refuse, naming the first marker and
    what changed; or, with redo_from, delete that stage's outputs (and every later stage's, in
    this iteration and the next ones) that lidr can prove it wrote, so they are made again."""
    names = stage_names(recipe)
    for t in range(1, iterations + 1):
        folder = work / f"iter{t}"
        prompts = prompt_dirs[min(t, len(prompt_dirs)) - 1]
        present = [name for name in names if (folder / "done" / name).exists()]
        if not present:
            return
        identities = stage_identities(model, prompts, recipe, train_processes) if Path(model).is_dir() else None
        for i, name in enumerate(names):
            changes = (marker_changes(folder / "done" / name, identities[name]) if identities
                       else [f"M{t - 1} ({model}) is not there"] if name in present else [])
            if name == "translate" and name in present:  # answers made again after they were translated
                changes += stale_translations(folder)
            if not changes and name in present:
                continue
            if name not in present and not any(later in present for later in names[i:]):
                break  # the iteration stopped here: the rest resumes
            if not changes:
                changes = [f"{folder / 'done' / name} is missing while a later stage is done"]
            if redo_from is None:
                raise SystemExit(f"{folder / 'done' / name}: done from other inputs or settings than this command's "
                                 f"({'; '.join(changes[:4])}); rerun with --redo-from {name} to redo it and what "
                                 f"follows, or use another --work")
            if names.index(redo_from) > i:
                raise SystemExit(f"{folder / 'done' / name}: changed ({'; '.join(changes[:4])}), a stage before "
                                 f"--redo-from {redo_from}; redo from {name} or earlier")
            redo(work, folder, names[names.index(redo_from):], t, iterations, names)
            return
        model = Path(read_marker(folder / "done" / "train")["result"]) if "train" in present else None
        if model is None:
            return


def redo(work: Path, folder: Path, stages, t: int, iterations: int, names):
    """Delete the outputs lidr can prove it wrote of `stages` in `folder` and of every stage of the
    iterations after t, done-markers included."""
    todo = [(folder, name) for name in reversed(stages)]
    todo = [(work / f"iter{u}", name) for u in range(iterations, t, -1) for name in reversed(names)] + todo
    for place, name in todo:
        for path in remove_stage_outputs(place, name):
            print(f"--redo-from: removed {path}", flush=True)
        if name == "train" and (place / "train").is_dir() and any((place / "train").iterdir()):
            kept = ", ".join(sorted(p.name for p in (place / "train").iterdir()))
            print(f"--redo-from: left {place / 'train'} and what it holds ({kept}): lidr did not write it", flush=True)
