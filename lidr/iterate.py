"""LIDR, one iteration after another: M_t -> M_{t+1} as a sequence of stage calls, every stage kept on disk.

    from lidr.iterate import Recipe, run
    models = run("Meta-Llama-3-8B-Instruct", ["prompts/id_0_1000", "prompts/id_1000_2000"], "runs/lidr",
                 Recipe(langs=("es", "ru", "de", "fr"), translation_task_ids="prompts/translation_task_ids.jsonl"),
                 nproc=8)          # [M1, M2]
    python iterate.py --model ... --work runs/lidr --langs es,ru,de,fr --prompts ... \
        --translation-task-ids ../shared/data/alpagasus/translation_task_ids.jsonl --iterations 2   # the command

Iteration t runs these stages in WORK/iter{t}/, with M_t as the model and, in training, as the
reference (docs/method.md §1):
1. generate    generate/{lang}.jsonl      M_t answers the prompts in every language (lidr.generation)
2. translate   translate/en-{l}.jsonl     y_en into each l, and translate/{l}-en.jsonl, y_l into English
                                          (lidr.translation)
3. pairs       pairs.jsonl + report       lidr.pairs (both directions; an id and language whose translation
                                          failed either way gives no pair, as in the reference; counted)
4. train       train/                     lidr.train (DPO + NLL); M_{t+1} is train/model, or M_t itself
                                          when the rows do not fill one global batch (train/unchanged.json):
                                          M_t's answers and its translations of them agree, nothing to learn
With method "sdrrl" (the related SDRRL, lidr/sdrrl.py) translation goes only from English (the
answers, and with sft_rows.reference_field the prompt set's own answers), stage 3 writes
sdrrl.jsonl (supervised rows: English answers, their self-translations, translated reference
answers, code-switched variants) and stage 4 trains on it with the SFT objective. Answers are asked
in recipe.answers.prompt_template, filled in for each prompt file's language. `swap_pairs` (a control,
not the method) reverses every pair.

A finished stage leaves WORK/iter{t}/done/{stage}, a record of what it was made from
(`stage_identities`: M_t, the prompt files, the languages, the stage's settings, and the stage
before it), and is skipped on a rerun that would make it from the same; an interrupted stage
resumes (each stage picks up its own partial outputs). Before the first stage the languages, the
model folder and every prompt folder are checked, WORK is locked (one iterate.py per work
folder), and every done-marker is compared with this command: a difference is refused, naming the
marker and what changed, or with --redo-from STAGE that stage and every later one are made again
(their outputs deleted only where their records prove lidr wrote them; anything else is left for
the stage to refuse by name). A stage runs in this process, or, when nproc > 1, under torchrun:
generation and translation data parallel (`-m lidr.generation`, `-m lidr.translation`), training
with FSDP (`-m lidr.train`), the same functions behind a command line, launched as modules so that
an installed package needs no checkout.

On several nodes (`Nodes`), iterate.py runs once on each, with the same flags but --node-rank,
and every torchrun stage is launched on every node with the c10d rendezvous (--rdzv-endpoint, and
an id per stage made from --rdzv-id and the stage's output); WORK must be one shared folder (each
stage checks that it is, lidr/cluster.py). Node 0 locks WORK, checks the done-markers, runs the
single-process stages (pairs, SFT rows), decides when too few rows leave M_t unchanged, and writes
the done markers; the other nodes write nothing: they take their part in each torchrun stage, then
wait for node 0's marker (`follow`).

How this departs from the paper: the paper ran generation and translation with vLLM and
training with LLaMA-Factory; here each is lidr's own. Pairs keep every language's dominant pairs
by default (see lidr.pairs).
"""

import json
import shlex
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from lidr import sdrrl, settings
from lidr.checkpoint import folder_identity
from lidr.cli import flags_argv
from lidr.generation import generate_file
from lidr.jsonl import (
    RECORD_SUFFIX, check_output, file_identity, hold_lock, identity_changes, record_output, remove_own_output,
    write_json_atomic,
)
from lidr.languages import checked_languages
from lidr.pairs import PairOptions, build_from_dir, read_translation_task_ids, write_pairs
from lidr.rows import Engine, check_model
from lidr.sdrrl import SDRRLOptions
from lidr.settings import Decoding, Training, provenance
from lidr.train import global_batch_size, options_argv, read_examples, split_held_out, train
from lidr.translation import translate_file

# how long a node other than node 0 waits for node 0 to mark a stage done before it gives up
FOLLOWER_WAIT_S = 1800


@dataclass(frozen=True)
class Recipe:
    """What an iteration does: its languages, method, decoding, pair rules and training."""

    langs: tuple[str, ...]  # the non-dominant languages; the dominant one is pairs.dominant
    method: str = "lidr"  # "lidr": preference pairs, DPO + NLL; "sdrrl": self-distilled SFT rows
    answers: Decoding = settings.ANSWERS  # step 2, M_t answering the prompts
    translation: Decoding = settings.TRANSLATION  # step 3, M_t translating its answers
    pairs: PairOptions = PairOptions()  # step 4's rules (lidr/pairs.py)
    sft_rows: SDRRLOptions = SDRRLOptions()  # step 4 with method "sdrrl" (lidr/sdrrl.py)
    translation_task_ids: str | None = None  # JSONL of prompt ids that are translation requests; None: none are
    swap_pairs: bool = False  # a control, not the method: every pair's chosen and rejected exchanged
    training: Training = settings.TRAINING  # step 5; the objective follows the method


# -----------------------------------------------------------------------------
# running a stage: here, or under torchrun


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
    """Run one of lidr's command-line modules (over the function the in-process path calls) under
    torchrun; a failure stops the iteration."""
    cmd = torchrun_argv(module, argv, nproc, nodes, out)
    print("  $ " + shlex.join(cmd), flush=True)
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise SystemExit(f"{module} failed (exit {result.returncode}); rerun the same command to resume")


def generate_stage(model, prompts, out, decoding: Decoding, batch_size: int, nproc: int, lang: str,
                   nodes: Nodes = Nodes()):
    if nproc == 1 and nodes.count == 1:
        generate_file(Engine(model, batch_size=batch_size), prompts, out, decoding, lang=lang)
    else:
        torchrun("lidr.generation", ["--model", model, "--prompts", prompts, "--out", out, "--batch-size", batch_size,
                                     "--lang", lang, *flags_argv(decoding)], nproc, nodes, out)


def translate_stage(model, source, out, to: str, decoding: Decoding, batch_size: int, nproc: int,
                    field: str = "response", nodes: Nodes = Nodes()):
    if nproc == 1 and nodes.count == 1:
        translate_file(Engine(model, batch_size=batch_size), source, out, to, decoding, field=field)
    else:  # translation asks in its own prompt: it has no --prompt-template
        torchrun("lidr.translation", ["--model", model, "--in", source, "--to", to, "--out", out, "--field", field,
                                      "--batch-size", batch_size, *flags_argv(decoding, skip=("prompt_template",))],
                 nproc, nodes, out)


def train_stage(model, data, out, options: Training, nproc: int, nodes: Nodes = Nodes()):
    if nproc == 1 and nodes.count == 1:
        train(model, data, out, options)
    else:
        torchrun("lidr.train", ["--model", model, "--data", data, "--out", out, *options_argv(options)], nproc,
                 nodes, out)


# -----------------------------------------------------------------------------
# what each stage is made from, recorded in its done-marker


def stage_names(recipe: Recipe) -> tuple[str, ...]:
    return ("generate", "translate", "pairs" if recipe.method == "lidr" else "sdrrl", "train")


def training_options(recipe: Recipe) -> Training:
    return replace(recipe.training, objective="sft") if recipe.method == "sdrrl" else recipe.training


def stage_identities(model, prompts, recipe: Recipe, train_nproc: int) -> dict[str, dict]:
    """{stage: what it is made from}, known before any stage runs: M_t (lidr.checkpoint.folder_identity),
    the prompt files, the languages and each stage's settings; each stage's identity holds the one
    before it, so a change anywhere shows in every stage after it."""
    en, langs = recipe.pairs.dominant, list(recipe.langs)
    generate = {"model": folder_identity(model), "languages": [en, *langs], "answers": provenance(recipe.answers),
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
    train = {"rows": rows, "training": provenance(options), "global_batch": global_batch_size(options, train_nproc)}
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


def stage(folder: Path, name: str, label: str, run_stage, identity: dict, result=None):
    """Run `run_stage()` unless the stage's done-marker records the same `identity`; write the marker,
    with the identity and result() (what the stage gives the next one), after it succeeds. A marker
    made from anything else is refused, naming what changed."""
    marker = folder / "done" / name
    if marker.exists():
        changes = marker_changes(marker, identity)
        if changes:
            raise SystemExit(f"{marker}: this stage was done from other inputs or settings ({'; '.join(changes[:4])}); "
                             f"rerun with --redo-from {name} to redo it and what follows, or use another --work")
        print(f"[{label}] {name}: done earlier, skipped", flush=True)
        return
    print(f"[{label}] {name} ...", flush=True)
    start = time.time()
    run_stage()
    done = {"result": str(result())} if result else {}
    write_marker(folder, name, identity, seconds=round(time.time() - start), **done)
    print(f"[{label}] {name}: finished in {time.time() - start:.0f}s", flush=True)


def follow(folder: Path, name: str, label: str, joint_part=None):
    """A stage on a node other than node 0: `joint_part()` (its torchrun launches, which need every
    node) unless node 0 marked the stage done, then wait for node 0's marker; nothing is written."""
    marker = folder / "done" / name
    if marker.exists():
        print(f"[{label}] {name}: done earlier, skipped", flush=True)
        return
    if joint_part is not None:
        print(f"[{label}] {name} ...", flush=True)
        joint_part()
    print(f"[{label}] {name}: waiting for node 0 to mark it done ({marker})", flush=True)
    deadline = time.time() + FOLLOWER_WAIT_S
    while not marker.exists():
        if time.time() > deadline:
            raise SystemExit(f"{marker}: node 0 has not marked {name} done in {FOLLOWER_WAIT_S} s; see its output, "
                             f"then rerun the same command on every node")
        time.sleep(2)


def remove_stage_outputs(folder: Path, name: str) -> list[Path]:
    """Delete what stage `name` of the iteration folder wrote and can prove it wrote (each output's
    made-from record names the stage's command), and its done-marker; anything else is left, for
    the stage to refuse by name. The removed outputs, in order."""
    removed = []
    if name == "train":
        removed += [p for p in (folder / "train",) if remove_own_output(p, "lidr.train")]
        removed += [p for p in (folder / "train" / "unchanged.json",) if remove_own_output(p, "lidr.iterate")]
    else:
        made_by, places = {"generate": ("generate.py", ["generate"]), "translate": ("translate.py", ["translate"]),
                           "pairs": ("lidr.pairs", ["."]), "sdrrl": ("lidr.sdrrl", ["."])}[name]
        for place in places:
            for record in sorted((folder / place).glob("*" + RECORD_SUFFIX)):
                out = record.with_name(record.name.removesuffix(RECORD_SUFFIX))
                reports = [out.with_name(out.stem + "_report.json")] if name in ("pairs", "sdrrl") else []
                if remove_own_output(out, made_by, companions=reports):
                    removed.append(out)
    (folder / "done" / name).unlink(missing_ok=True)
    return removed


# -----------------------------------------------------------------------------
# one iteration, and several


def run_iteration(model, prompts, folder, recipe: Recipe, label: str, batch_size: int = settings.SAMPLING_BATCH_SIZE,
                  nproc: int = 1, train_nproc: int = 1, nodes: Nodes = Nodes()) -> Path:
    """One iteration in `folder` from model M_t (a folder) over the prompt files prompts/{lang}.jsonl
    ({id, instruction}); returns the folder of M_{t+1}. nproc: processes per node for generation
    and translation, train_nproc for training (torchrun when > 1, or on several nodes)."""
    folder, prompts = Path(folder), Path(prompts)
    en, langs = recipe.pairs.dominant, list(recipe.langs)

    def generate():  # M_t answers x_l in every language: y_l
        for i, lang in enumerate([en, *langs], 1):
            print(f"[{label}] generate {lang} ({i}/{len(langs) + 1})", flush=True)
            generate_stage(model, prompts / f"{lang}.jsonl", folder / "generate" / f"{lang}.jsonl", recipe.answers,
                           batch_size, nproc, lang, nodes)

    def translate():  # y_en -> l, and (LIDR) y_l -> en; SDRRL: y_en -> l, and its reference answers a_en -> l
        reference = recipe.sft_rows.reference_field if recipe.method == "sdrrl" else None
        jobs = [(en, lang, "response", folder / "translate" / f"{en}-{lang}.jsonl") for lang in langs]
        if recipe.method == "lidr":
            jobs += [(lang, en, "response", folder / "translate" / f"{lang}-{en}.jsonl") for lang in langs]
        if reference:
            jobs += [(en, lang, reference, sdrrl.reference_translation_file(folder, en, lang)) for lang in langs]
        for i, (source, target, field, out) in enumerate(jobs, 1):
            print(f"[{label}] translate {source} -> {target}, {field} ({i}/{len(jobs)})", flush=True)
            translate_stage(model, folder / "generate" / f"{source}.jsonl", out, target, recipe.translation,
                            batch_size, nproc, field, nodes)

    def pairs():  # (x_l, y_en->l beats y_l) and (x_en, y_en beats y_l->en)
        task_ids = read_translation_task_ids(recipe.translation_task_ids)
        made, report = build_from_dir(folder, langs, recipe.pairs, task_ids)
        if recipe.swap_pairs:  # the control: every preference reversed
            made = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in made]
            report["swapped"] = True
        write_pairs(made, report, folder / "pairs.jsonl", folder / "pairs_report.json")
        print(f"  departures from the reference's rules: {'; '.join(report['departures_from_reference'])}", flush=True)
        for lang, counts in report["per_language"].items():
            print(f"  {lang}: {counts}", flush=True)
        if not made:
            raise SystemExit(f"{folder / 'pairs_report.json'}: no pairs were made; see the report")

    def sdrrl_rows():  # (x_l, y_en->l) and (x_en, y_en) as supervised rows
        task_ids = read_translation_task_ids(recipe.translation_task_ids)
        rows, report = sdrrl.build_from_dir(folder, langs, replace(recipe.sft_rows, dominant=en), task_ids)
        sdrrl.write_rows(rows, report, folder / "sdrrl.jsonl")
        for lang, counts in report["per_language"].items():
            print(f"  {lang}: {counts}", flush=True)
        if not rows:
            raise SystemExit(f"{folder / 'sdrrl_report.json'}: no SFT rows were made; see the report")

    data = folder / ("sdrrl.jsonl" if recipe.method == "sdrrl" else "pairs.jsonl")
    unchanged = folder / "train" / "unchanged.json"  # written when there was too little to train on

    def train_next():  # M_t -> M_{t+1}, M_t the reference
        options = training_options(recipe)
        _, examples, counts = read_examples(Path(model), data, options)  # the rows the trainer would keep
        global_batch = global_batch_size(options, train_nproc * nodes.count)
        n_train = len(split_held_out(examples, options.eval_split, options.seed)[0])  # less --eval-split's held out
        if n_train < global_batch:  # M_t and its own translations agree (almost) everywhere: nothing to learn
            print(f"[{label}] train: {len(examples)} usable rows of {counts['read']} in {data} do not fill one "
                  f"global batch of {global_batch}; M_t+1 is M_t ({model})", flush=True)
            made = {"rows": counts["read"], "usable_rows": len(examples), "global_batch": global_batch,
                    "model": str(model)}
            if nodes.rank == 0:
                check_output(unchanged, "lidr.iterate", made)
                record_output(unchanged, "lidr.iterate", made)
                write_json_atomic(unchanged, made)
            return
        train_stage(model, data, folder / "train", options, train_nproc, nodes)

    identities = stage_identities(model, prompts, recipe, train_nproc)
    steps = dict(zip(stage_names(recipe), (generate, translate, pairs if recipe.method == "lidr" else sdrrl_rows,
                                           train_next)))

    def next_model():  # what the train stage gives the next iteration
        return Path(model) if unchanged.exists() else folder / "train" / "model"

    for name, run_stage in steps.items():
        if nodes.rank == 0:
            stage(folder, name, label, run_stage, identities[name], result=next_model if name == "train" else None)
        else:  # the same torchrun launches as node 0; node 0 alone writes
            follow(folder, name, label, run_stage if name in ("generate", "translate", "train") else None)
    return Path(read_marker(folder / "done" / "train")["result"])


def check_inputs(model, prompt_dirs: list, recipe: Recipe):
    """Refuse, in one sentence and before the first stage, languages, a model folder, prompt folders
    or a translation-task file that cannot work."""
    try:
        checked_languages(recipe.langs, dominant=recipe.pairs.dominant)
        read_translation_task_ids(recipe.translation_task_ids)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    check_model(model, recipe.training.chat_format)
    for folder in prompt_dirs:
        for lang in (recipe.pairs.dominant, *recipe.langs):
            if not (Path(folder) / f"{lang}.jsonl").is_file():
                raise SystemExit(f"{Path(folder) / f'{lang}.jsonl'}: no such prompt file (--prompts names {folder}, "
                                 f"--langs and --dominant name {lang})")


def plan(model, prompt_dirs: list, work: Path, recipe: Recipe, iterations: int, train_nproc: int,
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
        identities = stage_identities(model, prompts, recipe, train_nproc) if Path(model).is_dir() else None
        for i, name in enumerate(names):
            changes = (marker_changes(folder / "done" / name, identities[name]) if identities
                       else [f"M{t - 1} ({model}) is not there"] if name in present else [])
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
        for out in remove_stage_outputs(place, name):
            print(f"--redo-from: removed {out}", flush=True)


def run(model, prompt_dirs: list, work, recipe: Recipe, iterations: int | None = None,
        batch_size: int = settings.SAMPLING_BATCH_SIZE, nproc: int = 1, train_nproc: int = 1,
        nodes: Nodes = Nodes(), redo_from: str | None = None) -> list[Path]:
    """Iterations 1..iterations (default: one per prompt folder) from M_0 = model in WORK/iter{t};
    iteration t reads the t-th prompt folder, or the last one when there are fewer. Returns [M1, M2, ...].

    Before any stage: the inputs are checked (`check_inputs`), WORK is locked (one iterate.py per
    work folder) and every done-marker is compared with what this command would make (`plan`):
    a difference is refused, naming it, or with redo_from (a stage name) redone from that stage on."""
    iterations = iterations or len(prompt_dirs)
    work = Path(work)
    check_inputs(model, prompt_dirs[:iterations], recipe)
    if redo_from is not None and redo_from not in stage_names(recipe):
        raise SystemExit(f"--redo-from {redo_from}: not a stage of --method {recipe.method} "
                         f"({', '.join(stage_names(recipe))})")
    with hold_lock(work, "iterate.py") if nodes.rank == 0 else nullcontext():  # node 0 alone writes in WORK
        if nodes.rank == 0:
            plan(model, prompt_dirs, work, recipe, iterations, train_nproc, redo_from)
        models = []
        for t in range(1, iterations + 1):
            label = f"iter {t}/{iterations}"
            model = run_iteration(model, prompt_dirs[min(t, len(prompt_dirs)) - 1], work / f"iter{t}", recipe,
                                  label, batch_size, nproc, train_nproc, nodes)
            print(f"[{label}] M{t} -> {model}", flush=True)
            models.append(model)
    return models
