"""Benchmark (not a test): lidr's DPO trainer against TRL's DPOTrainer, same model, pairs and settings.

    pip install -e '.[bench]'                  # trl (and transformers) for the TRL side
    python bench/train_dpo.py                  # --pairs 32 --batch-size 4 --max-len 512 --beta 0.1

Model: the SmolLM2-135M-Instruct demo folder (world.demo_model), fp32, CPU. Pairs: the first
--pairs usable rows of ../shared/data/llama3-8b-instruct-m0/translate_en_to_fr.jsonl: prompt;
chosen = the French self-translation (`en2fr_reponse`); rejected = the English answer
(`response`); failed translations (`Translation Error`) left out, and so are rows whose prompt and
longer answer exceed --max-len in the model's chat format, so that neither side truncates (TRL
would cut the answers, lidr would drop the row). One epoch: pairs / batch optimizer steps.

Each side runs in its own subprocess, so its peak RSS (ru_maxrss) is its own. Timed: for TRL,
`trainer.train()` (the reference model scores each batch inside it); for lidr, the whole run
(`lidr.cli.train.main`: weights loading, tokenizing, the reference pass, training, the checkpoint
and the HF export). TRL keeps its defaults apart from what the comparison fixes (fp32 instead of
its bf16 autocast, batch, max length, β, one epoch, no saving, no reporting); its defaults include
gradient checkpointing, so lidr runs with --activation-checkpointing too, and once more without.
The machine's load average is printed beside the numbers: the machine may be shared.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "llama3-8b-instruct-m0" / "translate_en_to_fr.jsonl"


def make_pairs(model_dir: Path, n: int, max_len: int) -> list[dict]:
    from lidr.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(model_dir)
    pairs = []
    for line in DATA.read_text().splitlines():
        row = json.loads(line)
        chosen, rejected = row["en2fr_reponse"], row["response"]
        if chosen.strip() == "Translation Error" or not chosen.strip() or chosen.strip() == rejected.strip():
            continue
        prompt_len = len(tokenizer.encode_chat([{"role": "user", "content": row["prompt"]}]))
        if prompt_len + max(len(tokenizer.encode(chosen)), len(tokenizer.encode(rejected))) + 1 > max_len:
            continue
        pairs.append({"id": row["id"], "prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
        if len(pairs) == n:
            return pairs
    raise SystemExit(f"{DATA}: only {len(pairs)} usable pairs fit in {max_len} tokens")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def run_lidr(args, pairs_file: Path, work: Path, activation_checkpointing: bool) -> dict:
    from lidr.cli.train import main

    argv = ["--model", str(args.model), "--data", str(pairs_file), "--out", str(work / ("lidr-ac" if activation_checkpointing else "lidr-no-ac")),
            "--batch-size", str(args.batch_size), "--max-len", str(args.max_len), "--beta", str(args.beta),
            "--alpha", "0", "--lr", "1e-6", "--epochs", "1", "--save-every", "1000000"]
    t0 = time.perf_counter()
    main(argv + (["--activation-checkpointing"] if activation_checkpointing else []))
    return {"seconds": time.perf_counter() - t0}


def run_trl(args, pairs_file: Path, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows
    ])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size, max_length=args.max_len,
        beta=args.beta, num_train_epochs=1, learning_rate=1e-6, bf16=False, use_cpu=True,
        save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    return {"seconds": time.perf_counter() - t0}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="default: the demo model folder (built if absent)")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--sides", default="trl,lidr,lidr-no-ac", help="which runs, comma-separated (default: all three)")
    p.add_argument("--side", choices=("lidr", "lidr-no-ac", "trl"), help="internal: run one side and print JSON")
    p.add_argument("--pairs-file", type=Path, help="internal")
    p.add_argument("--work", type=Path, help="internal")
    args = p.parse_args()
    if args.model is None:
        from world.demo_model import DEFAULT_DIR, ensure

        args.model = ensure(ROOT / DEFAULT_DIR)

    if args.side is not None:  # a child: one side, one JSON line
        if args.side == "trl":
            result = run_trl(args, args.pairs_file, args.work)
        else:
            result = run_lidr(args, args.pairs_file, args.work, activation_checkpointing=args.side == "lidr")
        result.update(side=args.side, pairs_per_s=args.pairs / result["seconds"], peak_rss_gb=peak_rss_gb())
        print("RESULT " + json.dumps(result), flush=True)
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs_file = work / "pairs.jsonl"
        pairs_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_pairs(args.model, args.pairs, args.max_len)))
        results = {}
        for side in args.sides.split(","):
            load_before = os.getloadavg()
            cmd = [sys.executable, __file__, "--side", side, "--pairs-file", str(pairs_file), "--work", str(work),
                   "--model", str(args.model), "--pairs", str(args.pairs), "--batch-size", str(args.batch_size),
                   "--max-len", str(args.max_len), "--beta", str(args.beta)]
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                raise SystemExit(f"{side} failed (exit {proc.returncode})")
            results[side] = json.loads(lines[-1].removeprefix("RESULT "))
            results[side]["load"] = f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"

    print(f"{args.pairs} pairs, batch {args.batch_size}, max length {args.max_len}, β {args.beta}, fp32, "
          f"{os.cpu_count()} CPUs, torch threads per side: default")
    print(f"{'side':<34} {'seconds':>8} {'pairs/s':>8} {'peak RSS GB':>12}   load average (1 min)")
    names = {"trl": "TRL DPOTrainer (grad checkpointing)", "lidr": "lidr (activation checkpointing)",
             "lidr-no-ac": "lidr (no activation checkpointing)"}
    for side, r in results.items():
        print(f"{names[side]:<34} {r['seconds']:8.1f} {r['pairs_per_s']:8.3f} {r['peak_rss_gb']:12.2f}   {r['load']}")
    trl = results.get("trl")
    for side in [s for s in ("lidr", "lidr-no-ac") if s in results and trl]:
        r = results[side]
        print(f"{names[side]} / TRL: {r['pairs_per_s'] / trl['pairs_per_s']:.2f}× pairs/s, "
              f"{r['peak_rss_gb'] / trl['peak_rss_gb']:.2f}× peak RSS")


if __name__ == "__main__":
    main()
