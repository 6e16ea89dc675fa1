"""Every arm's trainer settings chosen on dev, the same way: a grid per arm, the mean over tuning seeds.

    python -m world.tune --seed 0 --work runs/world-tune/seed0      # one tuning seed: every arm at every setting
    python bench/world_study.py --tune                             # the tuning seeds two at a time, then the choice
    python -m world.tune --seed 0 --work W --arms lidr dpo-only nll-only \
        --english-soft-error-rate 0.3 --temperature 1 --samples 2     # the sampled world's ablation arms

For one seed: the world, M0, and LIDR's iteration 1 up to its pairs (the answers, translations and pairs do
not depend on the trainer), then one iteration of each arm from M0 at each setting of GRID, each evaluated on
the dev split only. `choose` picks, per arm, the setting with the highest mean non-dominant dev accuracy over
the tuning seeds (ties: the first in GRID's order). The test split is never read here.
"""

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from lidr.cli import command
from lidr.harness.outputs import write_json_atomic
from world.arms import ARMS, Size, arm_training, make_world, one_iteration_arm, pretrain, recipe, run_lidr
from world.report import evaluate, non_dominant

# per arm, the settings tried (each a change to the world's LIDR step); the demo's setting is in each
GRID = {
    "lidr": [dict(lr=lr, beta=beta, alpha=alpha) for lr in (1e-4, 3e-4) for beta in (0.1, 1.0) for alpha in (1.0, 4.0)],
    "dpo-only": [dict(lr=lr, beta=beta) for lr in (3e-5, 1e-4, 3e-4) for beta in (0.1, 1.0)],
    "nll-only": [dict(lr=lr, epochs=epochs) for lr in (1e-4, 3e-4, 1e-3) for epochs in (2, 4)],
    "sdrrl": [dict(lr=lr) for lr in (1e-4, 3e-4, 1e-3)],
    "gold-sft": [dict(lr=lr) for lr in (1e-4, 3e-4, 1e-3)],
}


def tag(setting: dict) -> str:
    return "_".join(f"{key}{value:g}" for key, value in setting.items())


def tune_seed(work: Path, size: Size, grid: dict = GRID, train_nproc: int = 1, arms=ARMS) -> dict:
    """{arm: {tag: dev accuracy per language}} for one world (size.world.seed) and `arms`, every model kept in work."""
    world = make_world(work / "world", size.world)
    m0 = pretrain(world, work / "m0", size.pretrain, train_nproc)
    base = recipe(size.max_new_tokens, size.translate_max_new_tokens, 1.0, size.train, size.temperature)
    checked = replace(base, pairs=replace(base.pairs, check_numbers=size.check_numbers))
    run_lidr("LIDR", m0, [world / "prompts1"], work / "lidr", checked, train_nproc)  # iteration 1: the pairs
    dev = {"M0": evaluate(m0, "M0", world / "dev", work / "eval", size.max_new_tokens, "plain")}
    for arm in arms:
        for setting in grid[arm]:
            name = f"{arm}-{tag(setting)}"
            training = arm_training(replace(size, tuned={arm: replace(size.train, **setting)}), arm)
            model = one_iteration_arm(arm, work / "tune" / name, m0, world, work / "lidr", checked, training,
                                      train_nproc)
            dev[name] = evaluate(model, name, world / "dev", work / "eval", size.max_new_tokens, "plain")
    return {name: {lang: s["accuracy"] for lang, s in summary["languages"].items()} for name, summary in dev.items()}


def choose(per_seed: dict[int, dict], grid: dict = GRID) -> dict:
    """{arm: {"setting", "dev_mean", "table": {tag: mean}}}: per arm the setting whose non-dominant dev accuracy,
    averaged over the tuning seeds, is highest (the first in the grid's order on a tie)."""
    chosen = {}
    for arm in [a for a in ARMS if all(f"{a}-{tag(grid[a][0])}" in r for r in per_seed.values())]:  # the arms tuned
        table = {tag(s): sum(non_dominant(r[f"{arm}-{tag(s)}"]) for r in per_seed.values()) / len(per_seed)
                 for s in grid[arm]}
        best = max(grid[arm], key=lambda s: table[tag(s)])  # max keeps the first of equals
        chosen[arm] = {"setting": best, "dev_mean": table[tag(best)], "table": table}
    return chosen


@command()
def main(argv=None):
    import demo  # the world's sizes live beside the demo's command

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True, help="the tuning seed: its world, splits and M0")
    parser.add_argument("--work", required=True, help="folder of this seed's runs; dev.json is written there")
    parser.add_argument("--size", choices=sorted(demo.WORLD), default="default", help="the world's size")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="the arms tuned (default: all)")
    parser.add_argument("--english-soft-error-rate", type=float, default=0.0, help="the world's dial (demo.py --help)")
    parser.add_argument("--temperature", type=float, default=0.0, help="the world's dial (demo.py --help)")
    parser.add_argument("--samples", type=int, default=1, help="the world's dial (demo.py --help)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the study's rule: one thread per process, digits that follow the seed alone
    size = demo.WORLD[args.size]
    size = replace(size, temperature=args.temperature, world=replace(
        size.world, seed=args.seed, english_soft_error_rate=args.english_soft_error_rate, samples=args.samples))
    result = tune_seed(Path(args.work), size, arms=args.arms)
    out = Path(args.work) / "dev.json"
    write_json_atomic(out, {"seed": args.seed, "dev": result})  # bench/world_study.py reads a seed as done by it
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
