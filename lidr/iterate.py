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

A finished stage leaves WORK/iter{t}/done/{stage} and is skipped on a rerun; an interrupted stage
resumes (each stage picks up its own partial outputs). A stage runs in this process, or, when
nproc > 1, under torchrun: generation and translation data parallel (`-m lidr.generation`,
`-m lidr.translation`), training with FSDP (`-m lidr.train`), the same functions behind a command
line, launched as modules so that an installed package needs no checkout.

On several nodes (`Nodes`), iterate.py runs once on each, with the same flags but --node-rank,
and every torchrun stage is launched on every node with the c10d rendezvous (--rdzv-endpoint, and
an id per stage made from --rdzv-id and the stage's output); WORK must be one shared folder (each
stage checks that it is, lidr/cluster.py). Node 0 runs the single-process stages (pairs, SFT
rows), decides when too few rows leave M_t unchanged, and writes the done markers; the other
nodes write nothing: they take their part in each torchrun stage, then wait for node 0's marker
(`follow`).

How this departs from the paper: the paper ran generation and translation with vLLM and
training with LLaMA-Factory; here each is lidr's own. Pairs keep every language's dominant pairs
by default (see lidr.pairs).
"""

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from lidr import sdrrl, settings
from lidr.cli import flags_argv
from lidr.generation import generate_file
from lidr.jsonl import write_json_atomic
from lidr.pairs import PairOptions, build_from_dir, read_translation_task_ids, write_pairs
from lidr.rows import Engine
from lidr.sdrrl import SDRRLOptions
from lidr.settings import Decoding, Training
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


def stage(folder: Path, name: str, label: str, run_stage):
    """Run `run_stage()` unless the stage's done-marker exists; write the marker after it succeeds."""
    marker = folder / "done" / name
    if marker.exists():
        print(f"[{label}] {name}: done earlier, skipped", flush=True)
        return
    print(f"[{label}] {name} ...", flush=True)
    start = time.time()
    run_stage()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"finished in {time.time() - start:.0f}s\n")
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
        options = replace(recipe.training, objective="sft") if recipe.method == "sdrrl" else recipe.training
        _, examples, counts = read_examples(Path(model), data, options)  # the rows the trainer would keep
        global_batch = global_batch_size(options, train_nproc * nodes.count)
        n_train = len(split_held_out(examples, options.eval_split, options.seed)[0])  # less --eval-split's held out
        if n_train < global_batch:  # M_t and its own translations agree (almost) everywhere: nothing to learn
            print(f"[{label}] train: {len(examples)} usable rows of {counts['read']} in {data} do not fill one "
                  f"global batch of {global_batch}; M_t+1 is M_t ({model})", flush=True)
            if nodes.rank == 0:
                write_json_atomic(unchanged, {"rows": counts["read"], "usable_rows": len(examples),
                                              "global_batch": global_batch, "model": str(model)})
            return
        train_stage(model, data, folder / "train", options, train_nproc, nodes)

    if nodes.rank == 0:
        stage(folder, "generate", label, generate)
        stage(folder, "translate", label, translate)
        if recipe.method == "lidr":
            stage(folder, "pairs", label, pairs)
        else:
            stage(folder, "sdrrl", label, sdrrl_rows)
        stage(folder, "train", label, train_next)
    else:  # the same torchrun launches as node 0; node 0 alone writes
        follow(folder, "generate", label, generate)
        follow(folder, "translate", label, translate)
        follow(folder, "pairs" if recipe.method == "lidr" else "sdrrl", label)
        follow(folder, "train", label, train_next)
    return Path(model) if unchanged.exists() else folder / "train" / "model"


def run(model, prompt_dirs: list, work, recipe: Recipe, iterations: int | None = None,
        batch_size: int = settings.SAMPLING_BATCH_SIZE, nproc: int = 1, train_nproc: int = 1,
        nodes: Nodes = Nodes()) -> list[Path]:
    """Iterations 1..iterations (default: one per prompt folder) from M_0 = model in WORK/iter{t};
    iteration t reads the t-th prompt folder, or the last one when there are fewer. Returns [M1, M2, ...]."""
    iterations = iterations or len(prompt_dirs)
    models = []
    for t in range(1, iterations + 1):
        label = f"iter {t}/{iterations}"
        model = run_iteration(model, prompt_dirs[min(t, len(prompt_dirs)) - 1], Path(work) / f"iter{t}", recipe,
                              label, batch_size, nproc, train_nproc, nodes)
        print(f"[{label}] M{t} -> {model}", flush=True)
        models.append(model)
    return models
