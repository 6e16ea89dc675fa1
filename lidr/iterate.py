"""LIDR, one iteration after another: M_t -> M_{t+1} as plain stage calls, every stage kept on disk.

    python iterate.py --model M0 --work runs/lidr --langs es,ru,de,fr --prompts P1,P2 --iterations 2 \\
        --translation-task-ids ../shared/data/alpagasus/translation_task_ids.jsonl --nproc 8
    models = run("M0", ["prompts/id_0_1000", "prompts/id_1000_2000"], "runs/lidr", Recipe(langs=("es", "fr")))

Iteration t, in WORK/iter{t}/, with M_t as the model and, in training, the reference (docs/method.md §1):
1. generate   generate/{l}.jsonl       M_t answers the prompts x_l in every language: y_l
2. translate  translate/en-{l}.jsonl   y_en into each l; translate/{l}-en.jsonl, each y_l into English
3. pairs      pairs.jsonl              (x_l, y_en->l ≻ y_l) and (x_en, y_en ≻ y_l->en), lidr/pairs.py
4. train      train/model              DPO + NLL from M_t (lidr/train.py): M_{t+1}
With method "sdrrl" translation goes only from English and step 3 writes SFT rows (lidr/sdrrl.py).
Each stage is skipped when done from the same inputs and resumes when interrupted; the markers,
the WORK lock, --redo-from, torchrun and several nodes are lidr/harness/stages.py's `Runner`.
Departures from the paper (vLLM, LLaMA-Factory): docs/method.md §5.8.
"""

from dataclasses import dataclass, replace
from pathlib import Path

from lidr import settings
from lidr.harness.stage_files import pairs_from_dir, read_translation_task_ids, sdrrl_from_dir, write_pairs, write_rows
from lidr.harness.stages import Nodes, Runner, claim_work, training_options
from lidr.pairs import PairOptions
from lidr.sdrrl import SDRRLOptions, reference_translation_file
from lidr.settings import Decoding, Training


@dataclass(frozen=True)
class Recipe:
    """What an iteration does: its languages, method, decoding, pair rules and training."""

    langs: tuple[str, ...]  # the non-dominant languages; the dominant one is pairs.dominant
    method: str = "lidr"  # "lidr": preference pairs, DPO + NLL; "sdrrl": self-distilled SFT rows
    answers: Decoding = settings.ANSWERS  # step 1, M_t answering the prompts
    translation: Decoding = settings.TRANSLATION  # step 2, M_t translating its answers
    pairs: PairOptions = PairOptions()  # step 3's rules (lidr/pairs.py)
    sft_rows: SDRRLOptions = SDRRLOptions()  # step 3 with method "sdrrl" (lidr/sdrrl.py)
    translation_task_ids: str | None = None  # JSONL of prompt ids that are translation requests; None: none are
    swap_pairs: bool = False  # a control, not the method: every pair's chosen and rejected exchanged
    training: Training = settings.TRAINING  # step 4; the objective follows the method


class NothingToTrain(SystemExit):
    """Step 3 made no pairs (or SDRRL rows): the command stops, naming the report. A study that runs iterations
    (world/arms.py) may end the run at M_t instead, since M_t can lose the skill the next step needs."""

    def __init__(self, report: Path, made: str):
        super().__init__(f"{report}: no {made} were made; see the report")


def translation_jobs(folder: Path, recipe: Recipe) -> list[tuple[str, str, str, Path]]:
    """(source language, target language, field, output) of step 2: y_en -> l; LIDR also y_l -> en;
    SDRRL with a reference field also the prompt set's own English answers a_en -> l."""
    en, langs = recipe.pairs.dominant, recipe.langs
    jobs = [(en, lang, "response", folder / "translate" / f"{en}-{lang}.jsonl") for lang in langs]
    if recipe.method == "lidr":
        jobs += [(lang, en, "response", folder / "translate" / f"{lang}-{en}.jsonl") for lang in langs]
    if recipe.method == "sdrrl" and recipe.sft_rows.reference_field:
        field = recipe.sft_rows.reference_field
        jobs += [(en, lang, field, reference_translation_file(folder, en, lang)) for lang in langs]
    return jobs


def run_iteration(runner: Runner, prompts: Path, folder: Path, recipe: Recipe) -> Path:
    """One iteration in `folder` from M_t (runner.model) over prompts/{lang}.jsonl; M_{t+1}'s folder."""
    en, langs = recipe.pairs.dominant, list(recipe.langs)
    if runner.begin("generate"):  # 1. y_l for every language
        for i, lang in enumerate([en, *langs], 1):
            print(f"[{runner.label}] generate {lang} ({i}/{len(langs) + 1})", flush=True)
            runner.generate(prompts / f"{lang}.jsonl", folder / "generate" / f"{lang}.jsonl", recipe.answers, lang)
        runner.done("generate")
    if runner.begin("translate"):  # 2. the model translates its own answers
        jobs = translation_jobs(folder, recipe)
        for i, (source, target, field, out) in enumerate(jobs, 1):
            print(f"[{runner.label}] translate {source} -> {target}, {field} ({i}/{len(jobs)})", flush=True)
            runner.translate(folder / "generate" / f"{source}.jsonl", out, target, recipe.translation, field)
        runner.done("translate")
    task_ids = read_translation_task_ids(recipe.translation_task_ids)
    if recipe.method == "lidr" and runner.begin("pairs"):  # 3. the gap between languages, as preferences
        made, report = pairs_from_dir(folder, langs, recipe.pairs, task_ids)
        if recipe.swap_pairs:  # the control: every preference reversed
            made = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in made]
            report["swapped"] = True
        write_pairs(made, report, folder / "pairs.jsonl", folder / "pairs_report.json")
        print(f"  departures from the reference's rules: {'; '.join(report['departures_from_reference'])}", flush=True)
        for lang, counts in report["per_language"].items():
            print(f"  {lang}: {counts}", flush=True)
        if not made:
            raise NothingToTrain(folder / "pairs_report.json", "pairs")
        runner.done("pairs")
    if recipe.method == "sdrrl" and runner.begin("sdrrl"):  # 3. SDRRL: (x_l, y_en->l) and (x_en, y_en) as SFT rows
        rows, report = sdrrl_from_dir(folder, langs, replace(recipe.sft_rows, dominant=en), task_ids)
        write_rows(rows, report, folder / "sdrrl.jsonl")
        for lang, counts in report["per_language"].items():
            print(f"  {lang}: {counts}", flush=True)
        if not rows:
            raise NothingToTrain(folder / "sdrrl_report.json", "SFT rows")
        runner.done("sdrrl")
    if runner.begin("train"):  # 4. M_t -> M_{t+1}, M_t the reference
        data = folder / ("sdrrl.jsonl" if recipe.method == "sdrrl" else "pairs.jsonl")
        runner.done("train", result=runner.train(data, folder / "train", training_options(recipe)))
    return runner.next_model()


def run(model, prompt_dirs: list, work, recipe: Recipe, iterations: int | None = None,
        batch_size: int = settings.SAMPLING_BATCH_SIZE, nproc: int = 1, train_nproc: int = 1,
        nodes: Nodes = Nodes(), redo_from: str | None = None) -> list[Path]:
    """Iterations 1..iterations (default: one per prompt folder) from M_0 = model in WORK/iter{t};
    iteration t reads the t-th prompt folder, or the last one when there are fewer. Returns [M1, M2, ...].
    nproc: processes per node for generation and translation, train_nproc for training (torchrun when
    > 1, or on several nodes). Before any stage the inputs are checked, WORK is locked (node 0) and
    every done-marker compared with this command (a difference refused, or redone with redo_from)."""
    iterations, work = iterations or len(prompt_dirs), Path(work)
    models = []
    with claim_work(model, prompt_dirs, work, recipe, iterations, train_nproc, nodes, redo_from):
        for t in range(1, iterations + 1):
            label, prompts = f"iter {t}/{iterations}", Path(prompt_dirs[min(t, len(prompt_dirs)) - 1])
            runner = Runner(model, prompts, work / f"iter{t}", recipe, label, batch_size, nproc, train_nproc, nodes)
            model = run_iteration(runner, prompts, work / f"iter{t}", recipe)
            print(f"[{label}] M{t} -> {model}", flush=True)
            models.append(model)
    return models
