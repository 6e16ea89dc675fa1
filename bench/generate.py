"""Generation speed: lidr's sampler against transformers' `generate`, side by side in one process.

    python bench/generate.py                       # SmolLM2-135M demo model, fp32, CPU, batch 1 and 16
    python bench/generate.py --batch-sizes 1 --repeats 3 --no-compile

Same model, same prompts (the first AlpaGasus English instructions in the chat format), greedy,
128 new tokens with stop tokens ignored on both sides so both generate exactly as many tokens.
Reports tokens/s for each and the ratio; the time includes prefill. It also measures the machine's
limit for batch-1 decoding: every weight is read once per token, so the limit is the measured read
bandwidth of a large fp32 matrix-vector product over the model's weight bytes, and lidr's batch-1
speed is printed as a percentage of it. lidr runs twice: eager (its default) and with the decode
step compiled (`compile=True`; compiled once per batch size before the timed runs, and that
compilation time is printed apart). Runs alternate between the sides and the best of --repeats
is kept, so that load from other processes hurts all alike; check `uptime` first.

    python bench/generate.py --batch-sizes 16 --keep-stops --no-compare   # compaction: what compiling costs

--keep-stops adds lidr runs with the stop tokens kept: rows end at different steps, so the batch
is compacted and a compiled decode step meets several batch sizes; it prints the batch sizes the
step saw, how many graphs torch compiled, and the time of the first compiled run (compiling
included) against the best later one. --no-compare skips the runs without stops.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lidr.checkpoint import load  # noqa: E402
from lidr.sampler import generate  # noqa: E402
from lidr.settings import Decoding  # noqa: E402
from world.demo_model import DEFAULT_DIR, ensure  # noqa: E402

DEFAULT_PROMPTS = ROOT.parent / "shared" / "data" / "alpagasus" / "id_0_1000" / "en.jsonl"


def matvec_bandwidth(n: int = 8192, repeats: int = 20) -> float:
    """Bytes/s of an fp32 [n, n] @ [n] product (256 MiB of matrix: far beyond the caches)."""
    matrix, vector = torch.randn(n, n), torch.randn(n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matrix @ vector
        best = min(best, time.perf_counter() - start)
    return matrix.numel() * matrix.element_size() / best


def run_lidr(model, tokenizer, prompts, new_tokens, compile=False):
    decoding = Decoding(max_new_tokens=new_tokens, repetition_penalty=1.0)  # greedy
    outs = generate(model, tokenizer, prompts, decoding, batch_size=len(prompts), compile=compile)
    return [o.tokens for o in outs]


def run_transformers(hf_model, tokenizer, prompts, new_tokens):
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_id)
    return out[:, width:].tolist()


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def time_compaction(model, tokenizer, prompts, new_tokens, repeats, with_compiled: bool):
    """lidr with stop tokens, eager then compiled: rows end at different steps and the batch shrinks."""
    from torch._dynamo.utils import counters

    import lidr.kernels.cache

    sizes = set()
    decode = lidr.kernels.cache.Session.decode

    def recording_decode(self, tokens, *args):
        sizes.add(len(tokens))
        return decode(self, tokens, *args)

    lidr.kernels.cache.Session.decode = recording_decode
    try:
        for compile in (False, True) if with_compiled else (False,):
            sizes.clear()
            graphs = counters["stats"]["unique_graphs"]
            first, outputs = timed(run_lidr, model, tokenizer, prompts, new_tokens, compile)
            graphs = counters["stats"]["unique_graphs"] - graphs
            best = min(timed(run_lidr, model, tokenizer, prompts, new_tokens, compile)[0] for _ in range(repeats))
            n_tokens = sum(map(len, outputs))
            side = "compiled" if compile else "eager"
            print(f"batch {len(prompts):3d}, stops kept: lidr {side:8s} {n_tokens / best:7.1f} tok/s ({n_tokens} tokens, "
                  f"rows of {min(map(len, outputs))}-{max(map(len, outputs))}); decode batch sizes {sorted(sizes, reverse=True)}; "
                  f"first run {first:.1f} s against {best:.1f} s, {graphs} graphs compiled", flush=True)
    finally:
        lidr.kernels.cache.Session.decode = decode


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder (default: the SmolLM2 demo model)")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip lidr's compiled decode step")
    parser.add_argument("--keep-stops", action="store_true", help="also time lidr with stop tokens (compaction)")
    parser.add_argument("--no-compare", action="store_true", help="skip the runs without stops (and transformers)")
    args = parser.parse_args()
    from transformers import LlamaForCausalLM

    folder = args.model or ensure(ROOT / DEFAULT_DIR)
    model, tokenizer = load(folder)
    hf_model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    no_stops = copy.copy(tokenizer)
    no_stops.stop_ids = frozenset()
    instructions = [json.loads(line)["instruction"] for line in Path(args.prompts).read_text().splitlines()]
    prompts = [tokenizer.encode_chat([{"role": "user", "content": text}]) for text in instructions[: max(args.batch_sizes)]]

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = matvec_bandwidth()
    limit = bandwidth / weight_bytes
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {folder}: {weight_bytes / 1e6:.0f} MB of weights")
    print(f"matvec read bandwidth {bandwidth / 1e9:.1f} GB/s -> batch-1 limit {limit:.1f} tok/s")

    with torch.inference_mode():
        run_lidr(model, no_stops, prompts[:2], 4)  # warm up both sides
        run_transformers(hf_model, tokenizer, prompts[:2], 4)
        for batch in args.batch_sizes:
            if args.keep_stops:
                time_compaction(model, tokenizer, prompts[:batch], args.new_tokens, args.repeats, not args.no_compile)
            if args.no_compare:
                continue
            batch_prompts, n_tokens = prompts[:batch], batch * args.new_tokens
            sides = {"lidr": False, "lidr compiled": True, "transformers": None}  # side -> compile
            if args.no_compile:
                del sides["lidr compiled"]
            else:
                seconds, _ = timed(run_lidr, model, no_stops, batch_prompts, args.new_tokens, True)
                print(f"batch {batch:3d}: lidr compiled's first run (compiling the decode step) took {seconds:.1f} s", flush=True)
            best, outputs = {side: float("inf") for side in sides}, {}
            for _ in range(args.repeats):
                for side, compile in sides.items():
                    if side == "transformers":
                        seconds, outputs[side] = timed(run_transformers, hf_model, tokenizer, batch_prompts, args.new_tokens)
                    else:
                        seconds, outputs[side] = timed(run_lidr, model, no_stops, batch_prompts, args.new_tokens, compile)
                    best[side] = min(best[side], seconds)
            speed = {side: n_tokens / seconds for side, seconds in best.items()}
            hf_tps = speed.pop("transformers")
            ours, theirs = outputs["lidr"], outputs["transformers"]
            # transformers' min_new_tokens bans the stop tokens, so compare up to lidr's first stop
            cut = [next((i for i, t in enumerate(row) if t in tokenizer.stop_ids), len(row)) for row in ours]
            same = sum(a[:n] == b[:n] for a, b, n in zip(ours, theirs, cut))
            same_compiled = sum(a == b for a, b in zip(ours, outputs.get("lidr compiled", ours)))
            print(f"batch {batch:3d}: transformers {hf_tps:7.1f} tok/s; lidr rows token-identical to transformers up to "
                  f"the first stop {same}/{batch}, compiled rows identical to eager {same_compiled}/{batch}")
            for side, tps in speed.items():
                line = f"batch {batch:3d}: {side:13s} {tps:7.1f} tok/s   ratio to transformers {tps / hf_tps:.2f}x"
                if batch == 1:
                    line += f"   = {100 * tps / limit:.0f}% of the limit ({tps * weight_bytes / 1e9:.1f} GB/s)"
                print(line, flush=True)


if __name__ == "__main__":
    main()
