"""One command for LIDR: M_t -> M_{t+1}, as many iterations as asked, every stage kept on disk.

    python iterate.py --model Meta-Llama-3-8B-Instruct --work runs/lidr --langs es,ru,de,fr \\
        --prompts ../shared/data/alpagasus/id_0_1000,../shared/data/alpagasus/id_1000_2000 \\
        --translation-task-ids ../shared/data/alpagasus/translation_task_ids.jsonl \\
        --iterations 2 --nproc 8

Each iteration t (METHOD.md §1) runs these stages in WORK/iter{t}/, with M_t as the model and,
in training, as the reference:
1. generate    generate/{lang}.jsonl      M_t answers the prompts in every language (generate.py)
2. translate   translate/en-{l}.jsonl     y_en into each l, and translate/{l}-en.jsonl, y_l into English
3. pairs       pairs.jsonl + report       lidr.pairs (both directions, failures skipped and counted)
4. train       train/                     train_dpo.py (DPO + NLL); M_{t+1} is train/model
With --method sdrrl (the related SDRRL, lidr/sdrrl.py) translation goes only from English, stage
3 writes sdrrl.jsonl (supervised rows: English answers and their self-translations) and stage 4
trains on it with --objective sft. --swap-pairs (a control, not the method) reverses every pair.
Iteration t reads PROMPTS' t-th folder ({lang}.jsonl with {id, instruction}), or the last one
given when there are fewer folders than iterations.

A finished stage leaves WORK/iter{t}/done/{stage} and is skipped on a rerun; an interrupted
stage resumes (generate.py, translate.py and train_dpo.py pick up their own partial outputs).
With --nproc N > 1 generation and translation run under torchrun (data parallel), and so does
training (FSDP) unless --train-nproc says otherwise; with 1 they run inside this process.
Everything after `--` goes to train_dpo.py unchanged (e.g. -- --lr 1e-6 --epochs 2).

How this departs from the paper: the paper ran generation and translation with vLLM and
training with LLaMA-Factory; here each is lidr's own script. Pairs keep every language's
dominant pairs by default (see lidr.pairs).
"""

import argparse
import importlib
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lidr import sdrrl
from lidr.pairs import PairOptions, build_from_dir, read_translation_task_ids, write_pairs

ROOT = Path(__file__).resolve().parent


def launch(script: str, args: list, nproc: int):
    """Run one of lidr's scripts: under torchrun when nproc > 1, else its main() in this process
    (no interpreter start or torch import per call). A failure stops the iteration."""
    args = [str(a) for a in args]
    if nproc == 1:
        print(f"  $ python {script} {shlex.join(args)}", flush=True)
        importlib.import_module(Path(script).stem).main(args)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *args]
    print("  $ " + shlex.join(cmd), flush=True)
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise SystemExit(f"{script} failed (exit {result.returncode}); rerun the same command to resume")


def stage(folder: Path, name: str, label: str, run):
    """Run `run()` unless the stage's done-marker exists; write the marker after it succeeds."""
    marker = folder / "done" / name
    if marker.exists():
        print(f"[{label}] {name}: done earlier, skipped", flush=True)
        return
    print(f"[{label}] {name} ...", flush=True)
    start = time.time()
    run()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"finished in {time.time() - start:.0f}s\n")
    print(f"[{label}] {name}: finished in {time.time() - start:.0f}s", flush=True)


def run_iteration(t: int, model: Path, prompts: Path, args) -> Path:
    """Iteration t from model M_{t-1} (a folder); returns the folder of the trained model."""
    folder = Path(args.work) / f"iter{t}"
    label = f"iter {t}/{args.iterations}"
    langs = args.langs.split(",")
    en = args.dominant
    nproc = args.nproc
    gen_flags = ["--max-new-tokens", args.max_new_tokens, "--repetition-penalty", args.repetition_penalty,
                 "--batch-size", args.batch_size, "--field", "instruction"]
    system = ["--system", args.system] if args.system else []  # the paper's, for answers and translations
    gen_flags += system

    def generate():
        for i, lang in enumerate([en, *langs], 1):
            print(f"[{label}] generate {lang} ({i}/{len(langs) + 1})", flush=True)
            launch("generate.py", ["--model", model, "--prompts", prompts / f"{lang}.jsonl",
                                   "--out", folder / "generate" / f"{lang}.jsonl", *gen_flags], nproc)

    def translate():  # SDRRL needs only y_en -> l
        jobs = [(en, lang) for lang in langs] + ([(lang, en) for lang in langs] if args.method == "lidr" else [])
        for i, (src, dst) in enumerate(jobs, 1):
            print(f"[{label}] translate {src} -> {dst} ({i}/{len(jobs)})", flush=True)
            launch("translate.py", ["--model", model, "--in", folder / "generate" / f"{src}.jsonl",
                                    "--field", "response", "--to", dst,
                                    "--out", folder / "translate" / f"{src}-{dst}.jsonl",
                                    "--max-new-tokens", args.translate_max_new_tokens,
                                    "--repetition-penalty", args.repetition_penalty,
                                    "--batch-size", args.batch_size, *system], nproc)

    def pairs():
        options = PairOptions(dominant=en, dominant_pairs=args.dominant_pairs, check_language=args.check_language,
                              check_numbers=args.check_numbers, drop_same_answer=args.drop_same_answer)
        task_ids = read_translation_task_ids(args.translation_task_ids)
        made, report = build_from_dir(folder, langs, options, task_ids)
        if args.swap_pairs:  # the control: every preference reversed
            made = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in made]
            report["swapped"] = True
        write_pairs(made, report, folder / "pairs.jsonl", folder / "pairs_report.json")
        for lang, counts in report["per_language"].items():
            print(f"  {lang}: {counts}", flush=True)
        if not made:
            raise SystemExit(f"{folder / 'pairs_report.json'}: no pairs were made; see the report")

    def sdrrl_rows():
        rows, report = sdrrl.build_from_dir(folder, langs, sdrrl.SDRRLOptions(dominant=en))
        sdrrl.write_rows(rows, report, folder / "sdrrl.jsonl")
        for lang, counts in report["per_language"].items():
            print(f"  {lang}: {counts}", flush=True)
        if not rows:
            raise SystemExit(f"{folder / 'sdrrl_report.json'}: no SFT rows were made; see the report")

    def train():
        data, objective = folder / "pairs.jsonl", []
        if args.method == "sdrrl":
            data, objective = folder / "sdrrl.jsonl", ["--objective", "sft"]
        launch("train_dpo.py", ["--model", model, "--data", data, "--out", folder / "train", *objective,
                                *args.train_args], args.train_nproc or nproc)

    stage(folder, "generate", label, generate)
    stage(folder, "translate", label, translate)
    if args.method == "lidr":
        stage(folder, "pairs", label, pairs)
    else:
        stage(folder, "sdrrl", label, sdrrl_rows)
    stage(folder, "train", label, train)
    return folder / "train" / "model"


def parse_args(argv=None):
    """The flags; everything after `--` is kept in args.train_args for train_dpo.py."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF folder of M0")
    parser.add_argument("--work", required=True, help="work folder: iter1/, iter2/, ... are kept here")
    parser.add_argument("--prompts", required=True,
                        help="comma-separated folders of {lang}.jsonl prompt files, one per iteration")
    parser.add_argument("--langs", required=True, help="non-dominant languages, comma-separated")
    parser.add_argument("--dominant", default="en")
    parser.add_argument("--method", choices=("lidr", "sdrrl"), default="lidr",
                        help="lidr: preference pairs and DPO + NLL (default); sdrrl: self-distilled SFT rows "
                             "(lidr/sdrrl.py) and train_dpo.py --objective sft")
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes for generation and translation (torchrun when > 1, else in this process)")
    parser.add_argument("--train-nproc", type=int, default=None, help="processes for training (default: --nproc)")
    parser.add_argument("--system", default="You are a helpful assistant.",
                        help="system prompt for answers and translations (default: the paper's, %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=2400, help="answer length limit (paper: 2,400)")
    parser.add_argument("--translate-max-new-tokens", type=int, default=4096, help="translation limit (paper: 4,096)")
    parser.add_argument("--repetition-penalty", type=float, default=1.1,
                        help="for answers and translations (paper: 1.1, vLLM's meaning; without it greedy "
                             "translation can loop on the pre-filled <translated> tag)")
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch per process")
    parser.add_argument("--dominant-pairs", choices=("all", "one"), default="all")
    parser.add_argument("--check-language", action="store_true", help="drop pairs whose chosen is off-target")
    parser.add_argument("--check-numbers", action="store_true",
                        help="drop pairs whose translated side changes its source's numbers or the signs between them")
    parser.add_argument("--drop-same-answer", action="store_true",
                        help="drop pairs whose chosen and rejected end in the same number (see lidr/pairs.py)")
    parser.add_argument("--swap-pairs", action="store_true",
                        help="a control, not the method: every pair's chosen and rejected exchanged before training")
    parser.add_argument("--translation-task-ids", help="JSONL of prompt ids that are translation requests")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.train_args = argv[split + 1:]
    return args


def main(argv=None):
    args = parse_args(argv)
    prompt_dirs = [Path(p) for p in args.prompts.split(",")]
    model = Path(args.model)
    for t in range(1, args.iterations + 1):
        model = run_iteration(t, model, prompt_dirs[min(t, len(prompt_dirs)) - 1], args)
        print(f"[iter {t}/{args.iterations}] M{t} -> {model}", flush=True)
    return model


if __name__ == "__main__":
    main()
