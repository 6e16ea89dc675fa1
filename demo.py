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
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from lidr.cli import command
from lidr.settings import Training
from world.arms import Arms, Size, recipe, run_lidr, run_world
from world.corpus import WorldSettings
from world.report import evaluate, finish_report, learning_summary

# the world's sizes and its two training jobs (pretraining M0; one LIDR/SDRRL step), overriding the paper's
# (the world keeps its own optimizer and schedule: AdamW β2 0.95 and a cosine fall, not LLaMA-Factory's)
WORLD_OPTIMIZER = dict(adam_beta2=0.95, lr_scheduler="cosine")
PRETRAIN = Training(objective="sft", lr=3e-3, batch_size=32, epochs=2, warmup_ratio=0.05, max_len=256,
                    save_every=100000, **WORLD_OPTIMIZER)
LIDR_STEP = Training(lr=1e-4, batch_size=16, epochs=2, beta=1.0, alpha=4, max_len=256, save_every=100000,
                     warmup_ratio=0.1, **WORLD_OPTIMIZER)
WORLD = {
    "default": Size(world=WorldSettings(), pretrain=PRETRAIN, train=LIDR_STEP),
    # a smoke test of every stage: its M0 translates too poorly for the sign check to leave a batch of pairs
    "quick": Size(world=WorldSettings(n_english=1500, n_other=60, n_translation=150, n_dev=8, n_test=8, n_ood=8,
                                      n_prompts=8),
                  pretrain=PRETRAIN, train=replace(LIDR_STEP, batch_size=4, epochs=1), check_numbers=False),
}


# -----------------------------------------------------------------------------
# SmolLM2-135M-Instruct, the earlier demo

SMOLLM2 = {
    # training prompts per iteration and language, held-out problems per language, token limits, trainer
    "default": dict(n_train=16, n_eval=30, max_new_tokens=96, translate_max_new_tokens=144,
                    train=Training(epochs=1, batch_size=4, lr=1e-5, beta=0.1, alpha=1.0, warmup_ratio=0.1,
                                   **WORLD_OPTIMIZER)),
    "quick": dict(n_train=4, n_eval=4, max_new_tokens=32, translate_max_new_tokens=48,
                  train=Training(epochs=1, batch_size=2, lr=1e-5, beta=0.1, alpha=1.0, warmup_ratio=0.1,
                                 **WORLD_OPTIMIZER)),
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
        evaluate(model, name, work / "problems1" / "eval", work / "eval", size["max_new_tokens"], "plain")
    learned, data = learning_summary({"LIDR": work})
    finish_report(models, {"test": work / "eval"}, work, learned, {}, {"iterations": data})


@command()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("world", "smollm2"), default="world",
                        help="world: the controlled world, M0 trained here (default); smollm2: SmolLM2-135M-Instruct")
    parser.add_argument("--controls", action="store_true", help="(world) also broken translation and swapped pairs")
    parser.add_argument("--pair-noise", type=float, nargs="+", default=[], metavar="SHARE",
                        help="(world) one LIDR iteration per SHARE on its iteration-1 pairs with that share swapped")
    parser.add_argument("--only-lidr", action="store_true",
                        help="(world) M0, M1, M2 only: no SDRRL, DPO only, NLL only or gold-SFT")
    parser.add_argument("--english-error-rate", type=float, default=0.0,
                        help="(world) share of English (object, operation) cells misread in the corpus (default: 0)")
    parser.add_argument("--translation-fidelity", type=float, default=1.0,
                        help="(world) share of the corpus's translation examples that keep their numbers (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="(world) draws the corpus, the splits and M0's init")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every stage")
    parser.add_argument("--work", default=None,
                        help="work folder (default: runs/demo, runs/demo-quick, runs/demo-smollm2[-quick])")
    parser.add_argument("--train-nproc", type=int, default=1,
                        help="training processes (torchrun, FSDP over gloo, when > 1; default: %(default)s); "
                             "generation runs in this process")
    args = parser.parse_args(argv)
    world_flags = (args.controls, args.pair_noise, args.only_lidr, args.seed, args.english_error_rate,
                   args.translation_fidelity != 1.0)
    if args.model == "smollm2" and any(world_flags):
        parser.error("--controls, --pair-noise, --only-lidr, --seed and the dials belong to the controlled world")
    if not all(0.0 <= x <= 1.0 for x in (*args.pair_noise, args.english_error_rate, args.translation_fidelity)):
        parser.error("--pair-noise, --english-error-rate and --translation-fidelity are shares between 0 and 1")
    size_name = "quick" if args.quick else "default"
    default_work = "runs/demo" + ("-smollm2" if args.model == "smollm2" else "") + ("-quick" if args.quick else "")
    work = Path(args.work or default_work)
    torch.manual_seed(0)
    start = time.time()
    if args.model == "world":
        # one thread: the world's 1M-parameter model gains ~6% of wall time from a second (12.9 vs 13.7 min here),
        # and its digits follow the thread count (float reductions); one thread is what bench/world_study.py runs
        torch.set_num_threads(1)
        size = WORLD[size_name]
        world = replace(size.world, seed=args.seed, english_error_rate=args.english_error_rate,
                        translation_fidelity=args.translation_fidelity)
        arms = Arms(baselines=not args.only_lidr, pair_noise=tuple(args.pair_noise), controls=args.controls)
        run_world(work, replace(size, world=world), arms, args.train_nproc)
    else:
        run_smollm2(args, SMOLLM2[size_name], work)
    print(f"demo finished in {(time.time() - start) / 60:.1f} min; report: {work / 'report'}", file=sys.stderr)


if __name__ == "__main__":
    main()
