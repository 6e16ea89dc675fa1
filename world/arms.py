"""The controlled world as an experiment: one world, one M0, and every arm trained from it on equal terms.

    python demo.py [--controls] [--pair-noise 0.1 0.3] [--english-error-rate 0.25] [--seed N]   # the door
    python bench/world_study.py                         # seeds, intervals, the noise curve (bench/RESULTS.md)

One world (world/corpus.py) and its M0, pretrained here with lidr's trainer, then these arms. All of them start
from the same M0 on the same prompts; every arm trained on self-translations drops the same unfaithful ones (the
sign check, lidr.pairs.arithmetic); every arm's rows carry the same chat turns (the user turn, no system turn:
LIDR's pairs and SDRRL's rows have none, so neither have the gold rows); every arm has the same trainer
settings (lr, epochs, batch) but its objective:
- LIDR: two iterations of DPO + α·NLL (lidr.iterate) -> M1, M2.
- SDRRL: two iterations of SFT on the English answers and their self-translations (lidr.sdrrl) -> SDRRL-1, -2.
- DPO only (α 0) and NLL only (SFT on the chosen answers, the objective LIDR's loss becomes at β -> 0 up to
  the factor α, which AdamW all but ignores): one iteration each, on LIDR's iteration-1 pairs.
- gold-SFT: SFT on the gold answers of both iterations' prompts in every language (no ceiling: the study
  found a seed where LIDR's M2 passes it).
- pair noise s (optional): LIDR's iteration-1 pairs with a seeded share s of them swapped, DPO + α·NLL: the gain
  as a function of pair accuracy.
- controls (optional): broken translation (an M0 whose translation examples carry random numbers; its pairs are
  unchecked, the check would drop them all) and swapped pairs (every pair reversed, two iterations).
Every model is evaluated on dev, test and the out-of-distribution test; LIDR's pairs are scored against gold.

Iteration 1 of every arm starts from the same M0 on the same prompts, and decoding is greedy (or, at a temperature,
seeded per row: lidr/settings.py), so its answers and translations are LIDR's: they are copied, not generated again
(and the one-iteration arms copy LIDR's pairs).
Everything stays in WORK; rerunning skips what is finished and resumes what is not.

How this departs from the paper: see demo.py's docstring (the world's sizes, limits and trainer settings). SDRRL
here is filtered like LIDR's pairs, which SDRRL's paper does not do; without it the two arms would not learn
from the same self-translations.
"""

import json
import random
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from lidr import settings
from lidr.harness.stages import Nodes, Runner, stage_identities, train, write_marker
from lidr.iterate import NothingToTrain, Recipe, run_iteration
from lidr.harness.outputs import write_json_atomic, write_text_atomic
from lidr.harness.stage_files import read_texts, sdrrl_from_dir, write_rows
from lidr.pairs import PairOptions, arithmetic
from lidr.sdrrl import SDRRLOptions
from lidr.settings import Training
from world.corpus import LANGS, SPLITS, SYSTEM, WorldSettings, build
from world.report import evaluate, finish_report, learning_summary, pair_accuracy

OTHERS = tuple(LANGS[1:])
SAMPLED = "test-sampled"  # results.json's test accuracy of answers sampled at the world's temperature
BATCH_SIZE = 200  # prompts decoded together: the world's model is tiny


@dataclass(frozen=True)
class Size:
    """The world's sizes, its generation limits and its two training jobs (pretraining M0; one iteration)."""

    world: WorldSettings
    pretrain: Training
    train: Training
    max_new_tokens: int = 48  # answers
    temperature: float = 0.0  # answers (LIDR's step 1) sampled at this temperature; above 0 every model is also
    # evaluated on test at it (results "test-sampled"): the accuracy of the answers the methods learn from
    translate_max_new_tokens: int = 64
    check_numbers: bool = True  # the sign check on every arm's self-translations
    tuned: dict = field(default_factory=dict)  # {arm: Training}, each arm's settings chosen on dev (ARMS)


ARMS = ("lidr", "sdrrl", "dpo-only", "nll-only", "gold-sft")  # the arms whose trainer settings are tuned


def arm_training(size: Size, arm: str) -> Training:
    """An arm's trainer settings: its own from `size.tuned`, else the world's LIDR step; DPO only keeps α 0."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; the arms: {', '.join(ARMS)}")
    training = size.tuned.get(arm, size.train)
    return replace(training, alpha=0.0) if arm == "dpo-only" else training


@dataclass(frozen=True)
class Arms:
    """Which arms beyond LIDR to run (LIDR always runs)."""

    baselines: bool = True  # SDRRL, DPO only, NLL only, gold-SFT
    ablations_only: bool = False  # one LIDR iteration, DPO only and NLL only: no M2, SDRRL or gold-SFT
    pair_noise: tuple[float, ...] = ()  # shares of LIDR's iteration-1 pairs swapped, one arm each
    noise_split: bool = False  # at each share also DPO only on the swapped pairs and NLL only on their chosen
    controls: bool = False  # broken translation, swapped pairs
    splits: tuple[str, ...] = SPLITS  # where every model is evaluated (the study's test seeds: test alone)


def recipe(max_new_tokens: int, translate_max_new_tokens: int, repetition_penalty: float,
           training: Training, temperature: float = 0.0) -> Recipe:
    """LIDR over es/fr/de/ru with the demo's own decoding limits and penalty in place of the paper's (answers at
    `temperature`, greedy by default, as the paper; translations greedy), and
    lidr's earlier failed-translation rule (drop only the failed direction's pair), under which the
    world's numbers were measured and without which SmolLM2's mostly failing back-translations leave
    no pair; real runs keep the reference's rule (drop both), lidr/pairs.py."""
    return Recipe(langs=OTHERS, training=training, pairs=PairOptions(failed_translation="drop-one"),
                  answers=replace(settings.ANSWERS, system=SYSTEM, max_new_tokens=max_new_tokens,
                                  repetition_penalty=repetition_penalty, temperature=temperature),
                  translation=replace(settings.TRANSLATION, system=SYSTEM, max_new_tokens=translate_max_new_tokens,
                                      repetition_penalty=repetition_penalty))


# -----------------------------------------------------------------------------
# the world and M0


def make_world(folder: Path, world: WorldSettings) -> Path:
    """The world of these settings in folder: built, or kept when built earlier with them (a setting added since
    then reads as its default, which is the world that was built)."""
    report = folder / "corpus_report.json"
    built = json.loads(report.read_text())["settings"] if report.exists() else None
    if built is not None and {**vars(WorldSettings()), **built} == json.loads(json.dumps(vars(world))):
        print(f"[world] {folder}: built earlier, kept", flush=True)
        return folder
    if folder.exists():
        raise SystemExit(f"{folder} holds a world built with other settings; use another --work")
    print(f"[world] building {folder} ...", flush=True)
    build(folder, world)
    return folder


def pretrain(world: Path, out: Path, options: Training, train_nproc: int) -> Path:
    """M0: lidr's trainer (the SFT objective) from the world's random init over its corpus."""
    print(f"== pretraining {out}", flush=True)
    return train(world / "init", world / "corpus.jsonl", out, options, train_nproc)


# -----------------------------------------------------------------------------
# the arms


def copy_iteration1(source: Path, target: Path, m0: Path, prompts: Path, how: Recipe, train_nproc: int):
    """Iteration 1's answers and translations from `source` (same M0, same prompts, same seeds: identical),
    marked done as made from what `how` would make them from (lidr.harness.stages.stage_identities)."""
    identities = stage_identities(m0, prompts, how, train_nproc)
    for name in ("generate", "translate"):
        if (target / "iter1" / "done" / name).exists():
            continue
        shutil.copytree(source / "iter1" / name, target / "iter1" / name, dirs_exist_ok=True)
        write_marker(target / "iter1", name, identities[name], copied_from=str(source / "iter1" / name))


def run_lidr(name: str, m0: Path, prompts: list[Path], work: Path, how: Recipe, train_nproc: int) -> list[Path]:
    """lidr/iterate.py's iterations from m0 (one prompt folder each) in work; returns [M1, M2, ...], fewer when an
    iteration after the first makes no pairs (its model no longer closes its translations: `stopped`)."""
    print(f"== {name}: {len(prompts)} iterations", flush=True)
    models = []
    for t, folder in enumerate(prompts, 1):
        runner = Runner(models[-1] if models else m0, folder, work / f"iter{t}", how, f"{name} {t}", BATCH_SIZE, 1,
                        train_nproc, Nodes())
        try:
            models.append(run_iteration(runner, folder, work / f"iter{t}", how))
        except NothingToTrain as stop:
            if t == 1:
                raise
            stopped(name, t, stop)
            break
    return models


def stopped(name: str, t: int, why: NothingToTrain):
    """After iteration 1 a model can lose what the method needs (M_{t-1} no longer closes its translations): there is
    nothing to train on, so the run ends at M_{t-1}, said here and in the study's counts (M_t missing)."""
    print(f"== {name}: iteration {t} made nothing to train on ({why}); the run ends at iteration {t - 1}", flush=True)


def checked_sdrrl_rows(folder: Path, how: Recipe) -> tuple[list, dict]:
    """lidr.sdrrl's rows, less those whose self-translation changed its source's numbers or signs (the check
    LIDR's pairs pass), counted per language in the report."""
    rows, report = sdrrl_from_dir(folder, list(how.langs), SDRRLOptions(dominant=how.pairs.dominant))
    if not how.pairs.check_numbers:
        return rows, report
    english = read_texts(folder / "generate" / f"{how.pairs.dominant}.jsonl", "response")
    kept = []
    for row in rows:
        if row["kind"] == "english" or arithmetic(row["response"]) == arithmetic(english[row["id"]]):
            kept.append(row)
        else:
            counts = report["per_language"][row["lang"]]
            counts["dropped:numbers_changed"] = counts.get("dropped:numbers_changed", 0) + 1
    report["rows"] = len(kept)
    return kept, report


def run_sdrrl(m0: Path, prompts: list[Path], work: Path, how: Recipe, train_nproc: int) -> list[Path]:
    """SDRRL's iterations in work: lidr/iterate.py's stages, with the rows checked as LIDR's pairs are."""
    how = replace(how, method="sdrrl")
    en, models = how.pairs.dominant, []
    print(f"== SDRRL: {len(prompts)} iterations", flush=True)
    for t, folder_in in enumerate(prompts, 1):
        model, folder, label = models[-1] if models else m0, work / f"iter{t}", f"SDRRL {t}"
        runner = Runner(model, folder_in, folder, how, label, BATCH_SIZE, 1, train_nproc, Nodes())
        if runner.begin("generate"):
            for lang in (en, *how.langs):
                runner.generate(folder_in / f"{lang}.jsonl", folder / "generate" / f"{lang}.jsonl", how.answers, lang)
            runner.done("generate")
        if runner.begin("translate"):
            for lang in how.langs:
                runner.translate(folder / "generate" / f"{en}.jsonl", folder / "translate" / f"{en}-{lang}.jsonl",
                                 lang, how.translation, "response")
            runner.done("translate")
        if runner.begin("sdrrl"):
            rows, report = checked_sdrrl_rows(folder, how)
            write_rows(rows, report, folder / "sdrrl.jsonl")
            if not rows:  # as lidr/iterate.py's own step 3
                stop = NothingToTrain(folder / "sdrrl_report.json", "SFT rows")
                if t == 1:
                    raise stop
                stopped("SDRRL", t, stop)
                break
            runner.done("sdrrl")
        models.append(run_iteration(runner, folder_in, folder, how))  # trains: the stages before are done
    return models


def from_lidr_pairs(name: str, m0: Path, prompts: Path, lidr: Path, work: Path, how: Recipe, train_nproc: int,
                    swap_share: float = 0.0, seed: int = 0) -> Path:
    """One iteration from M0 on LIDR's iteration-1 pairs (a seeded share of them swapped), trained as `how` says."""
    from_lidr_pairs_file(m0, prompts, lidr, work, how, train_nproc, swap_share, seed)
    return run_lidr(name, m0, [prompts], work, how, train_nproc)[0]


def from_lidr_pairs_file(m0: Path, prompts: Path, lidr: Path, work: Path, how: Recipe, train_nproc: int,
                         swap_share: float, seed: int) -> Path:
    """work/iter1 as LIDR's iteration 1 up to its pairs, a seeded share `swap_share` of them swapped; the pairs' path."""
    copy_iteration1(lidr, work, m0, prompts, how, train_nproc)
    folder = work / "iter1"
    if not (folder / "done" / "pairs").exists():
        pairs = [json.loads(line) for line in (lidr / "iter1" / "pairs.jsonl").read_text().splitlines()]
        swapped = set(random.Random(seed).sample(range(len(pairs)), round(swap_share * len(pairs))))
        pairs = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} if i in swapped else p
                 for i, p in enumerate(pairs)]
        report = json.loads((lidr / "iter1" / "pairs_report.json").read_text())
        write_text_atomic(folder / "pairs.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        write_json_atomic(folder / "pairs_report.json", {**report, "swapped": len(swapped)})
        write_marker(folder, "pairs", stage_identities(m0, prompts, how, train_nproc)["pairs"],
                     copied_from=str(lidr / "iter1" / "pairs.jsonl"), swapped=len(swapped), seed=seed)
    return folder / "pairs.jsonl"


def sft(name: str, m0: Path, rows: list[dict], out: Path, options: Training, train_nproc: int) -> Path:
    """M0 fine-tuned with the SFT objective on `rows` ({id, lang, prompt, response})."""
    data = out / "rows.jsonl"
    if not data.exists():
        write_text_atomic(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"== {name}", flush=True)
    return train(m0, data, out / "train", replace(options, objective="sft"), train_nproc)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chosen_rows(pairs: Path) -> list[dict]:
    """NLL only's rows: the chosen answer of every pair in `pairs`, as SFT rows."""
    return [{"id": p["id"], "lang": p["lang"], "prompt": p["prompt"], "response": p["chosen"]} for p in read_jsonl(pairs)]


def gold_rows(world: Path, iterations: int) -> list[dict]:
    """gold-SFT's rows: the gold answers of every iteration's prompts in every language."""
    return [{k: r[k] for k in ("id", "lang", "prompt", "response")} for t in range(1, iterations + 1)
            for lang in LANGS for r in read_jsonl(world / f"gold{t}" / f"{lang}.jsonl")]


def one_iteration_arm(arm: str, out: Path, m0: Path, world: Path, lidr: Path, checked: Recipe, training: Training,
                      train_nproc: int, swap_share: float = 0.0, seed: int = 0) -> Path:
    """One iteration of `arm` from M0 in `out`, trained with `training`, from LIDR's iteration 1 in `lidr` (its
    answers, translations and pairs; a seeded share `swap_share` of the pairs swapped): lidr and dpo-only on
    the pairs, nll-only on their chosen answers, sdrrl on its own rows, gold-sft on the gold answers."""
    prompts = world / "prompts1"
    how = replace(checked, training=training)
    if arm in ("lidr", "dpo-only"):
        return from_lidr_pairs(arm, m0, prompts, lidr, out, how, train_nproc, swap_share=swap_share, seed=seed)
    if arm == "nll-only":
        pairs = lidr / "iter1" / "pairs.jsonl"
        if swap_share:  # the chosen answers of the swapped pairs: the pairs' file of the arm that swapped them
            pairs = from_lidr_pairs_file(m0, prompts, lidr, out, how, train_nproc, swap_share, seed)
        return sft("NLL only", m0, chosen_rows(pairs), out, training, train_nproc)
    if arm == "sdrrl":
        copy_iteration1(lidr, out, m0, prompts, replace(how, method="sdrrl"), train_nproc)
        return run_sdrrl(m0, [prompts], out, how, train_nproc)[0]
    if arm == "gold-sft":
        iterations = json.loads((world / "corpus_report.json").read_text())["settings"]["iterations"]
        return sft("gold-SFT", m0, gold_rows(world, iterations), out, training, train_nproc)
    raise ValueError(f"unknown arm {arm!r}; the arms: {', '.join(ARMS)}")


# -----------------------------------------------------------------------------
# the whole experiment


PARTS = ("all", "prefix", "lidr", "baselines")


def run_world(work: Path, size: Size, arms: Arms, train_nproc: int = 1, part: str = "all") -> dict:
    """The world in work/world, M0, the arms, their evaluations and the report; returns results.json's content.

    part "all" runs everything and writes the report. The others split it for two processes (demo.py --jobs 2):
    "prefix" (the world, M0 and LIDR's iteration 1, which every arm reads), then side by side "lidr" (LIDR's
    later iterations, gold-SFT, the noise arms, the controls, and M0's and their evaluations) and "baselines"
    (SDRRL, DPO only, NLL only and theirs); "all" afterwards finds everything done and writes the report."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; the parts: {', '.join(PARTS)}")
    world = make_world(work / "world", size.world)
    prompts = [world / f"prompts{t}" for t in range(1, size.world.iterations + 1)]
    models: dict[str, Path] = {}

    evaluations = {split: (split, 0.0) for split in arms.splits}  # {results' name: (split, temperature)}
    if size.temperature:
        evaluations[SAMPLED] = ("test", size.temperature)

    def add(named: dict, group: str):  # each model is evaluated on every split as soon as it exists (in its part)
        for name, model in named.items():
            models[name] = model
            if part in ("all", group):
                for key, (split, temperature) in evaluations.items():
                    evaluate(model, name, world / split, work / "eval" / key, size.max_new_tokens, "plain",
                             temperature)

    # the prefix trains M0; the two parts side by side take its folder as done (claiming its run folder at once,
    # one of them would find the other's lock and stop)
    m0 = pretrain(world, work / "m0", size.pretrain, train_nproc) if part in ("all", "prefix") else work / "m0" / "model"
    seed = size.world.seed
    lidr_recipe = recipe(size.max_new_tokens, size.translate_max_new_tokens, 1.0, arm_training(size, "lidr"),
                         size.temperature)
    checked = replace(lidr_recipe, pairs=replace(lidr_recipe.pairs, check_numbers=size.check_numbers))
    run_lidr("LIDR", m0, prompts[:1], work / "lidr", checked, train_nproc)  # iteration 1: every arm reads it
    if part == "prefix":
        return {}
    add({"M0": m0}, "lidr")
    runs = {"LIDR": work / "lidr"}

    def one(arm: str, out: Path, swap_share: float = 0.0) -> Path:
        return one_iteration_arm(arm, out, m0, world, work / "lidr", checked, arm_training(size, arm), train_nproc,
                                 swap_share, seed)

    if part in ("all", "lidr"):
        lidr = run_lidr("LIDR", m0, prompts[:1] if arms.ablations_only else prompts, work / "lidr", checked,
                        train_nproc)
        add({f"M{t}": model for t, model in enumerate(lidr, 1)}, "lidr")
    if part in ("all", "baselines") and (arms.baselines or arms.ablations_only):
        if not arms.ablations_only:
            sdrrl_how = replace(checked, training=arm_training(size, "sdrrl"))
            copy_iteration1(work / "lidr", work / "sdrrl", m0, prompts[0], replace(sdrrl_how, method="sdrrl"),
                            train_nproc)
            sdrrl_models = run_sdrrl(m0, prompts, work / "sdrrl", sdrrl_how, train_nproc)
            add({f"SDRRL-{t}": model for t, model in enumerate(sdrrl_models, 1)}, "baselines")
            runs["SDRRL"] = work / "sdrrl"
        add({"DPO-only-1": one("dpo-only", work / "dpo-only"), "NLL-only-1": one("nll-only", work / "nll-only")},
            "baselines")
    if part in ("all", "lidr") and arms.baselines and not arms.ablations_only:  # in LIDR's part: the two even out
        add({"gold-SFT": one("gold-sft", work / "gold")}, "lidr")
    if part == "baselines":
        return {}
    pair_noise = {}
    for share in arms.pair_noise:
        name = f"pair-noise-{share:g}-1"
        add({name: one("lidr", work / name, share)}, "lidr")
        scored = pair_accuracy(work / name / "iter1" / "pairs.jsonl", world / "gold1")
        pair_noise[f"{share:g}"] = {"model": name, "swapped": share, **scored}
        if arms.noise_split:  # the same swapped pairs, each term alone: DPO on them, NLL on their chosen answers
            add({f"pair-noise-{share:g}-dpo-only": one("dpo-only", work / f"{name}-dpo-only", share),
                 f"pair-noise-{share:g}-nll-only": one("nll-only", work / f"{name}-nll-only", share)}, "lidr")
    if arms.controls:
        broken_world = make_world(work / "world-broken", replace(size.world, translation_fidelity=0.0))
        add({"broken-M0": pretrain(broken_world, work / "m0-broken", size.pretrain, train_nproc)}, "lidr")
        broken = run_lidr("broken translation", models["broken-M0"], prompts, work / "broken", lidr_recipe, train_nproc)
        add({f"broken-M{t}": model for t, model in enumerate(broken, 1)}, "lidr")
        copy_iteration1(work / "lidr", work / "swapped", m0, prompts[0], replace(checked, swap_pairs=True),
                        train_nproc)
        swapped = run_lidr("swapped pairs", m0, prompts, work / "swapped", replace(checked, swap_pairs=True),
                           train_nproc)
        add({f"swapped-M{t}": model for t, model in enumerate(swapped, 1)}, "lidr")
        runs.update({"broken": work / "broken", "swapped": work / "swapped"})
    if part == "lidr":
        return {}
    pairs = {str(t): pair_accuracy(work / "lidr" / f"iter{t}" / "pairs.jsonl", world / f"gold{t}")
             for t in range(1, len(lidr) + 1)}
    learned, iterations = learning_summary(runs)
    summary = {"pairs": pairs, **({"pair_noise": pair_noise} if pair_noise else {})}
    return finish_report(models, {key: work / "eval" / key for key in evaluations}, work, learned, summary,
                         {"settings": vars(size.world), "temperature": size.temperature, "iterations": iterations})
