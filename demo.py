"""The README's main job: LIDR at work in a controlled world, on a plain CPU, with the controls that explain it.

    python demo.py                      # the world: corpus, M0 from scratch, 2 LIDR iterations, SDRRL, report
    python demo.py --controls           # + broken translation and swapped pairs
    python demo.py --seed 3             # another world: corpus, splits and M0's initialisation
    python demo.py --english-soft-error-rate 0.3 --temperature 1 --samples 2   # the sampled world (README)
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
   then LIDR as in 2), swapped pairs (LIDR with chosen and rejected exchanged), and gold-SFT
   (SFT of M0 on the gold answers of the same prompts in every language)
5. WORK/report/: report.md (accuracy per language and model, self-translation fidelity, pairs per
   iteration, training), PNG charts, and results.json ({"M0": {"en": 0.97, ...}, "M1": ...}). The
   default world's report ends with this seed beside the study's ten (bench/world_study/): one seed
   is one draw, and a difference's sign can follow the thread count.

Iteration 1 of SDRRL and of the swapped control starts from the same M0 on the same prompts as
LIDR's: greedy decoding (or sampling with a generator per row, --temperature) makes their answers
and translations identical to LIDR's, so they are copied, not generated again. Everything is kept
in WORK (default runs/demo, runs/demo-quick, runs/demo-smollm2); rerunning the command skips what
is finished.

How this departs from the paper: a world of our own making instead of Meta-Llama-3-8B-Instruct and
AlpaGasus prompts; 100 prompts per language and iteration instead of 1,000; short generation limits
(answers <= 48 tokens, translations <= 64); each arm's trainer settings were chosen on dev
(TUNED below, bench/world_study.py --tune; LIDR: lr 3e-4, 2 epochs, β 1, α 4), and the NLL weight
is α = 4 instead of the paper's 1 (the grid tried both): DPO pushes down every token of a rejected answer, correct sub-steps
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
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from lidr.cli import command, require_extra
from lidr.harness.outputs import write_text_atomic
from lidr.settings import Training
from world.arms import ARMS, Arms, Size, recipe, run_lidr, run_world
from world.corpus import SPLITS, WorldSettings
from world.report import evaluate, finish_report, learning_summary, study_markdown

ROOT = Path(__file__).resolve().parent
STUDY = ROOT / "bench" / "world_study" / "summary.json"  # the study's ten fresh seeds, beside which a run is read

# the world's sizes and its two training jobs (pretraining M0; one LIDR/SDRRL step), overriding the paper's
# (the world keeps its own optimizer and schedule: AdamW β2 0.95 and a cosine fall, not LLaMA-Factory's)
WORLD_OPTIMIZER = dict(adam_beta2=0.95, lr_scheduler="cosine")
PRETRAIN = Training(objective="sft", lr=3e-3, batch_size=32, epochs=2, warmup_ratio=0.05, max_len=256,
                    save_every=100000, **WORLD_OPTIMIZER)
LIDR_STEP = Training(lr=1e-4, batch_size=16, epochs=2, beta=1.0, alpha=4, max_len=256, save_every=100000,
                     warmup_ratio=0.1, **WORLD_OPTIMIZER)
# each arm's settings, chosen on dev over tuning seeds 0 and 1 (bench/world_study.py --tune, 2026-12-07; the grid
# and every point's dev accuracy: bench/RESULTS.md); the LIDR step above is the base each changes
TUNED = {"lidr": dict(lr=3e-4, beta=1.0, alpha=4.0), "dpo-only": dict(lr=1e-4, beta=0.1),
         "nll-only": dict(lr=3e-4, epochs=4), "sdrrl": dict(lr=3e-4), "gold-sft": dict(lr=1e-3)}
WORLD = {
    # half the corpus and the splits of "large" (the world until issue 27), M0 pretrained 3 epochs: a seed in about
    # half the time, so the study runs ten fresh test seeds (bench/world_study.py)
    "default": Size(world=WorldSettings(n_english=2500, n_other=150, n_translation=300, n_dev=100, n_test=100,
                                        n_ood=50, n_prompts=100),
                    pretrain=replace(PRETRAIN, epochs=3), train=LIDR_STEP,
                    tuned={arm: replace(LIDR_STEP, **setting) for arm, setting in TUNED.items()}),
    "large": Size(world=WorldSettings(), pretrain=PRETRAIN, train=LIDR_STEP),
    # a smoke test of every stage: its M0 (a sixth of the default's parameters, pretrained in a quarter of the time)
    # translates too poorly for the sign check to leave a batch of pairs
    "quick": Size(world=WorldSettings(n_english=1500, n_other=60, n_translation=150, n_dev=8, n_test=8, n_ood=8,
                                      n_prompts=8, dim=64, n_layers=2, ffn_dim=192, vocab_size=600),
                  pretrain=replace(PRETRAIN, epochs=1), train=replace(LIDR_STEP, batch_size=4, epochs=1),
                  check_numbers=False),
}


# -----------------------------------------------------------------------------
# SmolLM2-135M-Instruct, the earlier demo

SMOLLM2 = {
    # LIDR iterations, training prompts per iteration and language, held-out problems per language, token limits,
    # trainer; quick: one iteration (the second is the same code from M1, which the world's --quick runs)
    "default": dict(iterations=2, n_train=16, n_eval=30, max_new_tokens=96, translate_max_new_tokens=144,
                    train=Training(epochs=1, batch_size=4, lr=1e-5, beta=0.1, alpha=1.0, warmup_ratio=0.1,
                                   **WORLD_OPTIMIZER)),
    "quick": dict(iterations=1, n_train=4, n_eval=4, max_new_tokens=32, translate_max_new_tokens=48,
                  train=Training(epochs=1, batch_size=2, lr=1e-5, beta=0.1, alpha=1.0, warmup_ratio=0.1,
                                 **WORLD_OPTIMIZER)),
}


def run_smollm2(args, size: dict, work: Path):
    """LIDR iterations (two; --quick: one) on SmolLM2-135M-Instruct over world/problems.py's word problems
    (numbers <= 20, asked plainly: MGSM's template makes this model describe the task instead of solving
    it). Answers <= 96 tokens, translations <= 144 with the repetition penalty 1.1 (greedy SmolLM2 loops on
    the pre-filled tag without it). The result, no gain at 135M, and why: README and bench/RESULTS.md."""
    from world.demo_model import DEFAULT_DIR, ensure
    from world.problems import write_sets

    m0 = ensure(DEFAULT_DIR)
    iterations = range(1, size["iterations"] + 1)
    for t in iterations:  # fresh training prompts per iteration, the same held-out set
        write_sets(work / f"problems{t}", size["n_train"], size["n_eval"], train_seed=t, eval_seed=100)
    prompts = [work / f"problems{t}" / "train" for t in iterations]
    # the repetition penalty 1.1 in translation too: greedy SmolLM2 loops on the pre-filled tag without it
    how = recipe(size["max_new_tokens"], size["translate_max_new_tokens"], 1.1, size["train"])
    lidr = run_lidr("LIDR", m0, prompts, work, how, args.train_nproc)
    models = {"M0": m0, **{f"M{t}": model for t, model in enumerate(lidr, 1)}}
    for name, model in models.items():
        evaluate(model, name, work / "problems1" / "eval", work / "eval", size["max_new_tokens"], "plain")
    learned, data = learning_summary({"LIDR": work})
    finish_report(models, {"test": work / "eval"}, work, learned, {}, {"iterations": data})


def run_part(work: Path, size: Size, arms: Arms, train_nproc: int, part: str, log: Path, threads: int):
    """One part of world.arms.run_world in this (spawned) process with `threads` threads, its output in `log`."""
    import os

    torch.set_num_threads(threads)
    with open(log, "a") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        run_world(work, size, arms, train_nproc, part)


def run_parts_side_by_side(work: Path, size: Size, arms: Arms, train_nproc: int, threads: int):
    """The world's prefix (M0, LIDR's iteration 1) here, then LIDR and the baselines in two processes at once;
    the caller's run_world then finds every model trained and evaluated and writes the report."""
    import multiprocessing

    run_world(work, size, arms, train_nproc, "prefix")
    context = multiprocessing.get_context("spawn")
    parts = {part: (work / f"{part}.log", context.Process(target=run_part, args=(work, size, arms, train_nproc, part,
                                                                               work / f"{part}.log", threads)))
             for part in ("lidr", "baselines")}
    for part, (log, process) in parts.items():
        print(f"[demo] {part} in a process of its own; its output: {log}", flush=True)
        process.start()
    for part, (log, process) in parts.items():
        process.join()
        print(f"[demo] {part}: {'finished' if process.exitcode == 0 else f'failed (exit {process.exitcode})'}",
              flush=True)
    failed = [f"{part} (see {log})" for part, (log, process) in parts.items() if process.exitcode]
    if failed:
        raise SystemExit(f"demo: {', '.join(failed)} failed; the same command resumes where they stopped")


def beside_the_study(results: dict, work: Path):
    """Appends this seed's differences beside the study's (STUDY) to WORK/report/report.md and prints them: the
    demo's world, arms and settings are the study's, so the study says what one seed can and cannot show."""
    if not STUDY.is_file():
        print(f"[demo] {STUDY} not found: the report does not compare this seed with the study", flush=True)
        return
    text = study_markdown(results["test"], json.loads(STUDY.read_text()), str(STUDY.relative_to(ROOT)))
    report = work / "report" / "report.md"
    write_text_atomic(report, report.read_text() + "\n" + text)
    print(text, flush=True)


def read_tuned(path: Path, parser) -> dict:
    """{arm: {setting: value}} from bench/world_study.py --tune's tuned.json ({"chosen": {arm: {"setting": ...}}})."""
    try:
        chosen = json.loads(path.read_text())["chosen"]
        tuned = {arm: dict(c["setting"]) for arm, c in chosen.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        parser.error(f"--tuned {path}: not a tuned.json of bench/world_study.py --tune ({e})")
    unknown = set(tuned) - set(ARMS)
    bad = [f"{arm}.{key}" for arm, setting in tuned.items() for key in setting if key not in Training.__dataclass_fields__]
    if unknown or bad:
        parser.error(f"--tuned {path}: unknown arms {sorted(unknown)} or settings {bad}; arms: {', '.join(ARMS)}")
    return tuned


@command()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("world", "smollm2"), default="world",
                        help="world: the controlled world, M0 trained here (default); smollm2: SmolLM2-135M-Instruct")
    parser.add_argument("--controls", action="store_true", help="(world) also broken translation and swapped pairs")
    parser.add_argument("--pair-noise", type=float, nargs="+", default=[], metavar="SHARE",
                        help="(world) one LIDR iteration per SHARE on its iteration-1 pairs with that share swapped")
    parser.add_argument("--noise-split", action="store_true",
                        help="(world) at each --pair-noise share also DPO only on the swapped pairs and NLL only on "
                             "their chosen answers: which term the swapped pairs hurt")
    parser.add_argument("--ablations-only", action="store_true",
                        help="(world) M0, one LIDR iteration (M1), DPO only and NLL only: the ablation alone")
    parser.add_argument("--eval-splits", nargs="+", choices=SPLITS, default=["test", "ood"],
                        help="(world) the splits every model is evaluated on (default: test and ood; dev is where "
                             "bench/world_study.py --tune chose the settings; its test seeds: test alone)")
    parser.add_argument("--only-lidr", action="store_true",
                        help="(world) M0, M1, M2 only: no SDRRL, DPO only, NLL only or gold-SFT")
    parser.add_argument("--english-error-rate", type=float, default=0.0,
                        help="(world) share of English (object, operation) cells misread in the corpus (default: 0)")
    parser.add_argument("--english-slip-rate", type=float, default=0.0,
                        help="(world) share of English (object, operation) cells whose answers slip: the operation "
                             "right, the result one too many, so LIDR's chosen answers there are better than the "
                             "rejected and still wrong (default: 0)")
    parser.add_argument("--english-soft-error-rate", type=float, default=0.0,
                        help="(world) share of all English answers in the corpus that misread the verb, at random in "
                             "every cell: the weak languages' error, rarer. Greedy decoding hides it; with "
                             "--temperature it shows in the answers LIDR pairs and in the sampled test (default: 0)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="(world) LIDR's answers (step 1) sampled at this temperature instead of greedily (the "
                             "paper), each row with a generator of its own, so a pair joins two independent answers; "
                             "every model is then also scored on test at it ('sampled' in the report; default: 0)")
    parser.add_argument("--samples", type=int, default=1,
                        help="(world) answers per prompt and language, each pair k of a prompt joining the k-th "
                             "answers (needs --temperature; default: 1)")
    parser.add_argument("--tuned", type=Path, default=None, metavar="TUNED_JSON",
                        help="(world) each arm's trainer settings chosen on dev (bench/world_study.py --tune writes "
                             "it); default: demo.py's TUNED, the study's choice")
    parser.add_argument("--translation-fidelity", type=float, default=1.0,
                        help="(world) share of the corpus's translation examples that keep their numbers (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="(world) draws the corpus, the splits and M0's init")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every stage")
    parser.add_argument("--size", choices=("default", "large"), default="default",
                        help="(world) default: 2,500 English problems, 100 prompts per iteration and language, 100 "
                             "dev and test problems; large: the world until issue 27 (6,000; 200; 200)")
    parser.add_argument("--work", default=None,
                        help="work folder (default: runs/demo, runs/demo-quick, runs/demo-smollm2[-quick])")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=2,
                        help="(world) processes of one thread each: 2 runs LIDR and the baselines side by side once "
                             "M0 and LIDR's iteration 1 exist, the same numbers as 1 (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="(world) torch threads per process (default: 1, the study's: digits follow the thread "
                             "count, the conclusions should not)")
    parser.add_argument("--train-nproc", type=int, default=1,
                        help="training processes (torchrun, FSDP over gloo, when > 1; default: %(default)s); "
                             "generation runs in this process")
    args = parser.parse_args(argv)
    world_flags = (args.controls, args.pair_noise, args.only_lidr, args.seed, args.english_error_rate,
                   args.translation_fidelity != 1.0, args.english_slip_rate, args.noise_split, args.tuned,
                   args.ablations_only, args.size != "default", args.eval_splits != ["test", "ood"],
                   args.threads != 1, args.english_soft_error_rate, args.temperature, args.samples != 1)
    if args.model == "smollm2" and any(world_flags):
        parser.error("--controls, --pair-noise, --only-lidr, --seed and the dials belong to the controlled world")
    shares = (*args.pair_noise, args.english_error_rate, args.translation_fidelity, args.english_slip_rate,
              args.english_soft_error_rate)
    if not all(0.0 <= x <= 1.0 for x in shares):
        parser.error("--pair-noise, --english-error-rate, --english-slip-rate, --english-soft-error-rate and "
                     "--translation-fidelity are shares between 0 and 1")
    if args.temperature != 0 and not 1e-5 <= args.temperature <= 100:
        parser.error(f"--temperature {args.temperature:g}: 0 (greedy) or from 1e-5 to 100")
    if args.samples < 1 or (args.samples > 1 and not args.temperature):
        parser.error(f"--samples {args.samples}: at least 1, and above 1 only with --temperature (greedy answers to "
                     "the same prompt are one answer)")
    if args.english_error_rate + args.english_slip_rate > 1.0:
        parser.error("--english-error-rate and --english-slip-rate share the twelve cells: their sum is at most 1")
    if args.ablations_only and (args.only_lidr or args.controls):
        parser.error("--ablations-only runs M1, DPO only and NLL only; --only-lidr and --controls ask for other arms")
    if "test" not in args.eval_splits:
        parser.error("--eval-splits: the report is on test; give test (and dev or ood beside it)")
    if args.jobs == 2 and args.train_nproc > 1:
        parser.error("--jobs 2 runs two one-thread processes; with --train-nproc > 1 use --jobs 1")
    if args.noise_split and not args.pair_noise:
        parser.error("--noise-split splits the --pair-noise arms: give --pair-noise SHARE too")
    tuned = read_tuned(args.tuned, parser) if args.tuned else {}
    require_extra("matplotlib", "demo", "the demo's report charts")
    require_extra("py3langid", "demo", "the demo's scores (off-target rates, eval/mgsm.py)")
    if args.model == "smollm2":
        require_extra("gguf", "demo", "the embedded SmolLM2-135M-Instruct (world/demo_model.py)")
    size_name = "quick" if args.quick else args.size
    default_work = ("runs/demo" + ("-smollm2" if args.model == "smollm2" else "") + ("-quick" if args.quick else "")
                    + ("-large" if args.size == "large" else ""))
    work = Path(args.work or default_work)
    torch.manual_seed(0)
    start = time.time()
    if args.model == "world":
        # one thread per process: the world's 1M-parameter model gains ~6% of wall time from a second thread, and
        # its digits follow the thread count (float reductions); one thread is what bench/world_study.py runs
        torch.set_num_threads(args.threads)
        size = WORLD[size_name]
        world = replace(size.world, seed=args.seed, english_error_rate=args.english_error_rate,
                        translation_fidelity=args.translation_fidelity, english_slip_rate=args.english_slip_rate,
                        english_soft_error_rate=args.english_soft_error_rate, samples=args.samples)
        arms = Arms(baselines=not args.only_lidr, pair_noise=tuple(args.pair_noise), controls=args.controls,
                    noise_split=args.noise_split, ablations_only=args.ablations_only,
                    splits=tuple(s for s in SPLITS if s in args.eval_splits))
        tuned = {**size.tuned, **{arm: replace(size.train, **setting) for arm, setting in tuned.items()}}
        size = replace(size, world=world, tuned=tuned, temperature=args.temperature)
        if args.jobs == 2:
            run_parts_side_by_side(work, size, arms, args.train_nproc, args.threads)
        results = run_world(work, size, arms, args.train_nproc)
        if size_name == "default" and not any((args.english_error_rate, args.english_slip_rate, args.tuned,
                                               args.translation_fidelity != 1.0, args.english_soft_error_rate,
                                               args.temperature, args.samples != 1)):
            beside_the_study(results, work)
    else:
        run_smollm2(args, SMOLLM2[size_name], work)
    print(f"demo finished in {(time.time() - start) / 60:.1f} min; report: {work / 'report'}", file=sys.stderr)


if __name__ == "__main__":
    main()
