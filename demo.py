"""The README's main job: LIDR at work in a controlled world, on a plain CPU, with the controls that explain it.

    python demo.py                      # the world: corpus, M0 from scratch, 2 LIDR iterations, SDRRL, report
    python demo.py --controls           # + broken translation, swapped pairs and the gold-SFT ceiling
    python demo.py --seed 3             # another world: corpus, splits and M0's initialisation
    python demo.py --quick              # toy sizes: a smoke test of every stage (CI)
    python demo.py --model smollm2      # the earlier demo: SmolLM2-135M-Instruct (no effect at 135M)

The controlled world (world/corpus.py) makes LIDR's premise true by construction: M0, a 1.0M-parameter
Llama trained here from scratch with lidr's own trainer, solves arithmetic word problems well in
English and badly in es/fr/de/ru (its scarce, noisy non-English data taught it to confuse gains and
losses), and it translates its own answers faithfully. Then, unchanged:
1. M0 is evaluated on held-out problems (eval/mgsm.py: greedy, last number of the answer)
2. LIDR (lidr/iterate.py, the functions behind iterate.py): two iterations of generate ->
   self-translate -> pairs -> DPO + NLL -> M1, M2
3. SDRRL (method "sdrrl"): the same prompts, self-translated English answers as SFT rows
4. with --controls: broken translation (an M0 pretrained on translations whose numbers are random,
   then LIDR as in 2), swapped pairs (LIDR with chosen and rejected exchanged), and the ceiling
   (SFT of M0 on the gold answers of the same prompts in every language)
5. WORK/report/: report.md (accuracy per language and model, self-translation fidelity, pairs per
   iteration, training), PNG charts, and results.json ({"M0": {"en": 0.97, ...}, "M1": ...}).

Iteration 1 of SDRRL and of the swapped control starts from the same M0 on the same prompts as
LIDR's: greedy decoding makes their answers and translations identical to LIDR's, so they are
copied, not generated again. Everything is kept in WORK (default runs/demo, runs/demo-quick,
runs/demo-smollm2); rerunning the command skips what is finished.

How this departs from the paper: a world of our own making instead of Meta-Llama-3-8B-Instruct and
AlpaGasus prompts; 200 prompts per language and iteration instead of 1,000; short generation limits
(answers <= 48 tokens, translations <= 64); the trainer's settings were chosen for this model
(lr 1e-4, 2 epochs, bench/RESULTS.md says what else was tried), and the NLL weight is α = 4
instead of the paper's 1: DPO pushes down every token of a rejected answer, correct sub-steps
included ("12 - 1 = 11" inside an answer that subtracted where it should have added), and at α = 1
that costs M1 4.5 points of English arithmetic; at α = 4, 1.5. β = 1 instead of 0.1 and LIDR's
pairs checked for faithful arithmetic (--check-numbers): after iteration 1, M1's self-translations
keep the numbers but flip "-" to "+" in up to 40% of answers, and its remaining errors are
one-sided (one operation per language), so at β = 0.1 iteration 2 learned a sign for every problem
instead of reading the verb (bench/RESULTS.md has the evidence). The paper's other settings
(greedy, no repetition penalty in translation, the translation prompt, the pair rules) are unchanged.
"""

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from eval.mgsm import run as run_mgsm
from eval.report import write_report
from lidr import settings
from lidr.checkpoint import load
from lidr.iterate import Recipe, train_stage
from lidr.iterate import run as run_iterations
from lidr.jsonl import write_json_atomic, write_text_atomic
from lidr.pairs import arithmetic, read_texts, read_translations
from lidr.sampler import SamplingParams
from lidr.settings import Training
from world.corpus import SYSTEM, WorldSettings, build

LANGS = ["es", "fr", "de", "ru"]
ALL_LANGS = ["en", *LANGS]
BATCH_SIZE = 64  # prompts decoded together: the world's model is tiny

# the world's sizes, its generation limits (answers <= 48 tokens, translations <= 64, no repetition
# penalty) and its two training jobs (pretraining M0; one LIDR/SDRRL step), overriding the paper's
PRETRAIN = Training(objective="sft", lr=3e-3, batch_size=32, epochs=2, warmup_ratio=0.05, max_len=256,
                    save_every=100000)
LIDR_STEP = Training(lr=1e-4, batch_size=16, epochs=2, beta=1.0, alpha=4, max_len=256, save_every=100000)
WORLD = {
    "default": dict(settings=WorldSettings(), max_new_tokens=48, translate_max_new_tokens=64,
                    pretrain=PRETRAIN, train=LIDR_STEP, check_numbers=True),
    # a smoke test of every stage: its M0 translates too poorly for the sign check to leave a batch of pairs
    "quick": dict(settings=WorldSettings(n_english=1500, n_other=60, n_translation=150, n_eval=8, n_prompts=8),
                  max_new_tokens=48, translate_max_new_tokens=64,
                  pretrain=PRETRAIN, train=replace(LIDR_STEP, batch_size=4, epochs=1), check_numbers=False),
}


# -----------------------------------------------------------------------------
# stages shared by the two demos


def evaluate(model_dir: Path, name: str, problems: Path, out: Path, max_new_tokens: int, template: str) -> dict:
    """Accuracy per language of one model on the held-out problems (eval/mgsm.py), kept in out/name."""
    summary_path = out / name / "mgsm" / "summary.json"
    if summary_path.exists():
        print(f"[eval] {name}: done earlier, skipped", flush=True)
        return json.loads(summary_path.read_text())
    print(f"[eval] {name} ...", flush=True)
    model, tokenizer = load(model_dir)
    params = SamplingParams(max_new_tokens=max_new_tokens)  # greedy, no repetition penalty
    return run_mgsm(model, tokenizer, problems, ALL_LANGS, out / name / "mgsm", params, batch_size=64,
                    system=SYSTEM, template=template)


def recipe(max_new_tokens: int, translate_max_new_tokens: int, repetition_penalty: float,
           training: Training) -> Recipe:
    """LIDR over LANGS with the demo's own decoding limits and penalty in place of the paper's."""
    return Recipe(langs=tuple(LANGS), training=training,
                  answers=replace(settings.ANSWERS, system=SYSTEM, max_new_tokens=max_new_tokens,
                                  repetition_penalty=repetition_penalty),
                  translation=replace(settings.TRANSLATION, system=SYSTEM, max_new_tokens=translate_max_new_tokens,
                                      repetition_penalty=repetition_penalty))


def run_lidr(name: str, m0: Path, prompts: list[Path], work: Path, how: Recipe, train_nproc: int) -> list[Path]:
    """lidr.iterate's iterations from m0 (one prompt folder each) in work, generation in this process;
    returns [M1, M2, ...]."""
    print(f"== {name}: {len(prompts)} iterations", flush=True)
    return run_iterations(m0, prompts, work, how, batch_size=BATCH_SIZE, train_nproc=train_nproc)


def copy_first_generation(source: Path, target: Path):
    """Iteration 1's answers and translations from `source` (same M0, same prompts, greedy: identical)."""
    for stage in ("generate", "translate"):
        if (target / "iter1" / "done" / stage).exists():
            continue
        shutil.copytree(source / "iter1" / stage, target / "iter1" / stage, dirs_exist_ok=True)
        (target / "iter1" / "done").mkdir(parents=True, exist_ok=True)
        (target / "iter1" / "done" / stage).write_text(f"copied from {source / 'iter1' / stage}\n")


# -----------------------------------------------------------------------------
# the controlled world


def pretrain(world: Path, out: Path, options: Training, train_nproc: int) -> Path:
    """M0: lidr's trainer (the SFT objective) from the world's random init over its corpus."""
    print(f"== pretraining {out}", flush=True)
    train_stage(world / "init", world / "corpus.jsonl", out, options, train_nproc)
    return out / "model"


def make_world(folder: Path, settings: WorldSettings) -> Path:
    report = folder / "corpus_report.json"
    if report.exists() and json.loads(report.read_text())["settings"] == json.loads(json.dumps(vars(settings))):
        print(f"[world] {folder}: built earlier, kept", flush=True)
        return folder
    if folder.exists():
        raise SystemExit(f"{folder} holds a world built with other settings; use another --work")
    print(f"[world] building {folder} ...", flush=True)
    build(folder, settings)
    return folder


def translation_fidelity(iteration: Path) -> dict:
    """Per y_en -> l file of an iteration: share of M_t's translations that close the tag, and that also
    carry every number of their source and every sign between two numbers, in order (lidr.pairs.arithmetic)."""
    sources = read_texts(iteration / "generate" / "en.jsonl", "response")
    fidelity = {}
    for lang in LANGS:
        translations = read_translations(iteration / "translate" / f"en-{lang}.jsonl")
        n = len(translations)
        closed = [i for i, text in translations.items() if text is not None]
        faithful = [i for i in closed if arithmetic(translations[i]) == arithmetic(sources.get(i) or "")]
        fidelity[lang] = {"n": n, "closed": len(closed) / n if n else 0.0, "faithful": len(faithful) / n if n else 0.0}
    return fidelity


def learning_summary(runs: dict[str, Path]) -> tuple[str, dict]:
    """Markdown and JSON: self-translation fidelity, pairs and training, per run and iteration."""
    lines = ["## What each iteration learned from", "",
             "Fidelity: share of M_t's translations y_en→l that close `</translated>` / that also keep every "
             "number of y_en and every sign between two numbers, in order. Pairs: non-dominant / dominant, after failed translations and chosen == "
             "rejected were dropped.", "",
             "| run | iteration | language | closed | faithful | pairs or SFT rows |",
             "| --- | --- | --- | --- | --- | --- |"]
    training, data = [], {}
    for run, work in runs.items():
        for folder in sorted(work.glob("iter*"), key=lambda f: int(f.name[4:])):
            if not (folder / "done" / "train").exists():
                continue
            fidelity = translation_fidelity(folder)
            if (folder / "pairs_report.json").exists():
                per_lang = json.loads((folder / "pairs_report.json").read_text())["per_language"]
                made = {lang: f"{c['non_dominant']} / {c['dominant']}" for lang, c in per_lang.items()}
            else:
                per_lang = json.loads((folder / "sdrrl_report.json").read_text())["per_language"]
                made = {lang: str(c.get("target", 0) + c.get("code_switched", 0)) for lang, c in per_lang.items()}
            for lang in LANGS:
                f = fidelity[lang]
                lines.append(f"| {run} | {folder.name[4:]} | {lang} | {f['closed']:.2f} | {f['faithful']:.2f} | "
                             f"{made.get(lang, '0')} |")
            if (folder / "train" / "unchanged.json").exists():
                rows = json.loads((folder / "train" / "unchanged.json").read_text())["rows"]
                training.append(f"- {run}, iteration {folder.name[4:]}: not trained, {rows} rows fill no batch "
                                f"(M{folder.name[4:]} is M{int(folder.name[4:]) - 1})")
                data[f"{run}/{folder.name}"] = {"fidelity": fidelity, "made": made, "training": {}}
                continue
            log = [json.loads(line) for line in (folder / "train" / "log.jsonl").read_text().splitlines()]
            first, last = log[0], log[-1]
            keys = [k for k in ("dpo", "reward_accuracy", "margin", "nll") if k in first]
            changes = ", ".join(f"{k} {first[k]:.3f} → {last[k]:.3f}" for k in keys)
            curves = folder / "train" / "curves.png"
            training.append(f"- {run}, iteration {folder.name[4:]}: {len(log)} steps; {changes} ([curves]({curves}))")
            data[f"{run}/{folder.name}"] = {"fidelity": fidelity, "made": made,
                                           "training": {k: [first[k], last[k]] for k in keys}}
    return "\n".join(lines + ["", "Training (first step → last step):", *training]) + "\n", data


def plot_learning(data: dict, path: Path):
    """Two panels per run and iteration: faithful self-translations and pairs (or SFT rows) per language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    width = 0.8 / len(LANGS)
    for k, lang in enumerate(LANGS):
        xs = [i + (k - (len(LANGS) - 1) / 2) * width for i in range(len(names))]
        axes[0].bar(xs, [data[n]["fidelity"][lang]["faithful"] for n in names], width, label=lang)
        made = [sum(int(x) for x in data[n]["made"].get(lang, "0").split(" / ")) for n in names]
        axes[1].bar(xs, made, width, label=lang)
    for ax, title in zip(axes, ("faithful self-translations y_en→l (share)", "pairs (LIDR) or SFT rows (SDRRL)")):
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylim(0, 1.05)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_world(args, size: dict, work: Path):
    world_settings = replace(size["settings"], seed=args.seed)
    lidr_recipe = recipe(size["max_new_tokens"], size["translate_max_new_tokens"], 1.0, size["train"])
    world = make_world(work / "world", world_settings)
    prompts = [world / f"prompts{t}" for t in (1, 2)]
    results, models = work / "eval", {}

    def add(named_models: dict):  # each model is evaluated as soon as it exists
        for name, model in named_models.items():
            models[name] = model
            evaluate(model, name, world / "eval", results, size["max_new_tokens"], "{question}")

    add({"M0": pretrain(world, work / "m0", size["pretrain"], args.train_nproc)})
    # LIDR's pairs keep only translations that carry their source's numbers and signs (see the docstring)
    checked = replace(lidr_recipe, pairs=replace(lidr_recipe.pairs, check_numbers=size["check_numbers"]))
    lidr = run_lidr("LIDR", models["M0"], prompts, work / "lidr", checked, args.train_nproc)
    add({"M1": lidr[0], "M2": lidr[1]})
    copy_first_generation(work / "lidr", work / "sdrrl")
    sdrrl = run_lidr("SDRRL", models["M0"], prompts, work / "sdrrl", replace(lidr_recipe, method="sdrrl"),
                     args.train_nproc)
    add({"SDRRL-1": sdrrl[0], "SDRRL-2": sdrrl[1]})
    runs = {"LIDR": work / "lidr", "SDRRL": work / "sdrrl"}
    if args.controls:
        broken_world = make_world(work / "world-broken", replace(world_settings, broken_translation=True))
        add({"broken-M0": pretrain(broken_world, work / "m0-broken", size["pretrain"], args.train_nproc)})
        # the paper's unfiltered pairs: the check would drop every one (no broken translation keeps a number)
        broken = run_lidr("broken translation", models["broken-M0"], prompts, work / "broken", lidr_recipe,
                          args.train_nproc)
        add({"broken-M1": broken[0], "broken-M2": broken[1]})
        copy_first_generation(work / "lidr", work / "swapped")
        swapped = run_lidr("swapped pairs", models["M0"], prompts, work / "swapped",
                           replace(checked, swap_pairs=True), args.train_nproc)
        add({"swapped-M1": swapped[0], "swapped-M2": swapped[1]})
        add({"gold-SFT": gold_sft(world, models["M0"], work / "gold", size["train"], args.train_nproc)})
        runs.update({"broken": work / "broken", "swapped": work / "swapped"})
    learned, data = learning_summary(runs)
    finish_report(models, results, work, learned, extra={"settings": vars(world_settings), "iterations": data})


def gold_sft(world: Path, m0: Path, out: Path, options: Training, train_nproc: int) -> Path:
    """The ceiling: M0 fine-tuned on the gold answers of both iterations' prompts, in every language."""
    data = out / "gold.jsonl"
    if not data.exists():
        rows = [line for t in (1, 2) for lang in ALL_LANGS
                for line in (world / f"gold{t}" / f"{lang}.jsonl").read_text().splitlines()]
        write_text_atomic(data, "\n".join(rows) + "\n")
    print("== gold-SFT ceiling", flush=True)
    train_stage(m0, data, out / "train", replace(options, objective="sft"), train_nproc)
    return out / "train" / "model"


def finish_report(models: dict, results: Path, work: Path, learned: str, extra: dict):
    """report.md with its charts, and results.json: accuracy per model and language."""
    report = write_report({name: results / name for name in models}, work / "report")
    plot_learning(extra["iterations"], work / "report" / "learning.png")
    learned += "\n![what each iteration learned from](learning.png)\n"
    write_text_atomic(report, report.read_text() + "\n" + learned)
    accuracy = {name: {lang: s["accuracy"] for lang, s in
                       json.loads((results / name / "mgsm" / "summary.json").read_text())["languages"].items()}
                for name in models}
    write_json_atomic(work / "report" / "results.json", accuracy)
    write_json_atomic(work / "report" / "details.json", extra)
    print(report.read_text())


# -----------------------------------------------------------------------------
# SmolLM2-135M-Instruct, the earlier demo

SMOLLM2 = {
    # training prompts per iteration and language, held-out problems per language, token limits, trainer
    "default": dict(n_train=16, n_eval=30, max_new_tokens=96, translate_max_new_tokens=144,
                    train=Training(epochs=1, batch_size=4, lr=1e-5, beta=0.1, alpha=1.0)),
    "quick": dict(n_train=4, n_eval=4, max_new_tokens=32, translate_max_new_tokens=48,
                  train=Training(epochs=1, batch_size=2, lr=1e-5, beta=0.1, alpha=1.0)),
}


def run_smollm2(args, size: dict, work: Path):
    """Two LIDR iterations on SmolLM2-135M-Instruct over world/problems.py's word problems (numbers <= 20,
    asked plainly: MGSM's template makes this model describe the task instead of solving it). Answers
    <= 96 tokens, translations <= 144 with the repetition penalty 1.1 (greedy SmolLM2 loops on the
    pre-filled tag without it). The result, no gain at 135M, and why: README and bench/RESULTS.md."""
    from world.demo_model import DEFAULT_DIR, ensure
    from world.problems import write_sets

    m0 = ensure(DEFAULT_DIR)
    for t in (1, 2):  # fresh training prompts per iteration, the same held-out set
        write_sets(work / f"problems{t}", size["n_train"], size["n_eval"], train_seed=t, eval_seed=100)
    prompts = [work / f"problems{t}" / "train" for t in (1, 2)]
    # the repetition penalty 1.1 in translation too: greedy SmolLM2 loops on the pre-filled tag without it
    how = recipe(size["max_new_tokens"], size["translate_max_new_tokens"], 1.1, size["train"])
    lidr = run_lidr("LIDR", m0, prompts, work, how, args.train_nproc)
    models = {"M0": m0, "M1": lidr[0], "M2": lidr[1]}
    for name, model in models.items():
        evaluate(model, name, work / "problems1" / "eval", work / "eval", size["max_new_tokens"], "{question}")
    learned, data = learning_summary({"LIDR": work})
    finish_report(models, work / "eval", work, learned, extra={"iterations": data})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("world", "smollm2"), default="world",
                        help="world: the controlled world, M0 trained here (default); smollm2: SmolLM2-135M-Instruct")
    parser.add_argument("--controls", action="store_true",
                        help="(world) also broken translation, swapped pairs and the gold-SFT ceiling")
    parser.add_argument("--seed", type=int, default=0, help="(world) draws the corpus, the splits and M0's init")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every stage")
    parser.add_argument("--work", default=None,
                        help="work folder (default: runs/demo, runs/demo-quick, runs/demo-smollm2[-quick])")
    parser.add_argument("--train-nproc", type=int, default=1,
                        help="training processes (torchrun, FSDP over gloo, when > 1; default: %(default)s); "
                             "generation runs in this process")
    args = parser.parse_args(argv)
    if args.model == "smollm2" and (args.controls or args.seed):
        parser.error("--controls and --seed belong to the controlled world")
    size_name = "quick" if args.quick else "default"
    default_work = "runs/demo" + ("-smollm2" if args.model == "smollm2" else "") + ("-quick" if args.quick else "")
    work = Path(args.work or default_work)
    torch.manual_seed(0)
    start = time.time()
    if args.model == "world":
        run_world(args, WORLD[size_name], work)
    else:
        run_smollm2(args, SMOLLM2[size_name], work)
    print(f"demo finished in {(time.time() - start) / 60:.1f} min; report: {work / 'report'}", file=sys.stderr)


if __name__ == "__main__":
    main()
