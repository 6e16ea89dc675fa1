"""Answer a file of prompts with a model: resumable, data parallel under torchrun, rows kept in input order.

    python generate.py --model models/smollm2-135m-instruct --prompt "Tom has 26 apples. He buys 28 more. How many apples does he have?"
    python generate.py --model DIR --prompts ../shared/data/alpagasus/id_0_1000/en.jsonl --out runs/M0/generate_en.jsonl
    python generate.py --model DIR --prompts ../shared/data/mgsm/fr.jsonl --field query --out-field answer --out mgsm_fr.jsonl
    torchrun --standalone --nproc_per_node=8 generate.py --model DIR --prompts IN.jsonl --out OUT.jsonl

IN is JSONL or a JSON list of objects; `--field` names the prompt (AlpaGasus and X-AlpacaEval:
`instruction`, MGSM: `query`). Each prompt becomes one user turn (after `--system`, if given) in
the model's chat format. An output row is the input row plus `--out-field` (the reply) and
`<out-field>_meta` (the settings that made it, the finish reason, the number of new tokens).
Bad rows (not JSON, not an object, no such field, an empty or whitespace-only prompt, a prompt
too long for the model) are reported with their line numbers, skipped and counted; an input with
no usable row is refused.

Over-length input (the context is the model's max_position_embeddings): a prompt that fills the
context by itself is a bad row (skipped, counted as "longer than the context"); every reply ends
where the context does, so a row gets at most context − its prompt's tokens new tokens (finish
reason "length"), and a --max-new-tokens past that is lowered, with a warning.

Resuming: rerun the same command after a crash or Ctrl-C. Rows are keyed by `id` (compared as
text) when every input row has a distinct one, otherwise by their line in IN (written as
`input_line`). Each rank appends finished rows to `OUT.rank<r>.partial`, flushed row by row; at
the start and at the end rank 0 merges the partial files into OUT in input order (one atomic
rename) and deletes them. A torn last line is dropped and redone; a key already written is never
written again. OUT.made-from.json records what OUT is made from (IN's path, size and sha256, the
model folder, the settings): a rerun with another input, model or settings is refused, naming
what changed, before anything is written, and so is an OUT that generate.py did not write.

How this departs from the paper's setup (vLLM): the defaults are its generation settings (greedy,
repetition penalty 1.1, at most 2,400 new tokens), with lidr's sampler (lidr/sampler.py) in place
of vLLM; torchrun runs one model per process (data parallel), no tensor parallelism.
"""

import argparse
import json
import os
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lidr.checkpoint import check, default_dtype, folder_identity, load
from lidr.cli import cut_at_context, params_within_context, positive_int, too_long_reason
from lidr.jsonl import (
    ResumableWriter, check_output, file_identity, read_complete_lines, read_records, record_output, usable_records,
    write_text_atomic,
)
from lidr.sampler import SamplingParams, generate
from lidr.tokenizer import Tokenizer, chat_messages

SETTINGS = ("model", "system", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
MADE_BY = "generate.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF checkpoint folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="input file: JSONL or a JSON list of objects")
    source.add_argument("--prompt", help="answer this one prompt and print the reply")
    parser.add_argument("--out", help="output JSONL (required with --prompts)")
    parser.add_argument("--field", default="instruction", help="the input field holding the prompt (default: %(default)s)")
    parser.add_argument("--out-field", default="response", help="the output field for the reply (default: %(default)s)")
    parser.add_argument("--system", default=None, help="system prompt (default: none, or the chat template's own)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=2400,
                        help="default: %(default)s; lowered, with a warning, to what the model's context leaves")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.1, help="vLLM's meaning (default: %(default)s, the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="row i samples with seed + its input line")
    parser.add_argument("--stop", action="append", default=[], metavar="STRING",
                        help="end a reply where this string appears, cut before it (repeatable)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--chat-format", choices=["llama3", "chatml"], default=None, help="default: read from the folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (CPU: ~10%% faster after ~40 s of compiling)")
    args = parser.parse_args(argv)
    if args.prompts and not args.out:
        parser.error("--prompts needs --out")
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt is empty")
    if "" in args.stop:
        parser.error("--stop needs a non-empty string")
    return args


def sampling_params(args) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop_strings=tuple(args.stop),
    )


def load_model(args, device):
    """(model, tokenizer); a folder that is not a usable checkpoint stops with the sentence naming it."""
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    try:
        return load(args.model, device=device, dtype=dtype, chat_format=args.chat_format)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None


def check_model(args) -> tuple[Tokenizer, int]:
    """The tokenizer and the model's context length, once config, tokenizer and weight headers are
    checked (lidr.checkpoint.check), without reading the weights."""
    try:
        cfg, tokenizer = check(args.model, chat_format=args.chat_format)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    return tokenizer, cfg.max_seq_len


def encode(tokenizer, text: str, system: str | None) -> list[int]:
    return tokenizer.encode_chat(chat_messages(text, system))


# -----------------------------------------------------------------------------
# input rows and their keys


def read_prompts(path, field: str, out_field: str):
    """([(line, row)], [(line, reason)], key_name) for the rows that have a non-empty prompt."""
    try:
        records, bad = read_records(path)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    for meta_field in (out_field, out_field + "_meta"):
        clash = next((line for line, row in records if meta_field in row), None)
        if clash is not None:
            raise SystemExit(
                f"{path}:{clash}: the row already has a {meta_field!r} field (a gold answer?); "
                f"name another output field with --out-field"
            )
    rows = []
    for line, row in records:
        text = row.get(field)
        if not isinstance(text, str):
            bad.append((line, f"no string field {field!r}" + (f" (fields: {', '.join(row)})" if field not in row else "")))
        elif not text.strip():
            bad.append((line, f"empty {field!r}"))
        else:
            rows.append((line, row))
    usable_records(path, rows, bad, f"row with a prompt in {field!r}")
    ids = [row.get("id") for _, row in rows]
    key = "id" if None not in ids and len(set(map(str, ids))) == len(ids) else "input_line"
    return rows, sorted(bad), key


def row_key(key: str, line: int, row: dict) -> str:
    """The row's key as text: its id (3 and "3" are one id) or its line."""
    return str(row["id"] if key == "id" else line)


# -----------------------------------------------------------------------------
# resumable output: partial files per rank, merged into OUT in input order


def partial_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".rank*.partial"))


def merge(out: Path, key: str, order: dict) -> list[dict]:
    """Fold every partial file into OUT (input order, each key once, atomically); the merged rows."""
    parts = partial_files(out)
    rows = {}
    for path in [out, *parts]:
        for row in read_complete_lines(path):
            if key not in row:
                raise SystemExit(f"{path}: a row has no {key!r}; was it written from another input file?")
            rows.setdefault(str(row[key]), row)
    if parts:
        merged = sorted(rows.values(), key=lambda row: order.get(str(row[key]), len(order)))
        write_text_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in merged))
        for path in parts:
            path.unlink()
    return list(rows.values())


# -----------------------------------------------------------------------------
# main


def answer_one(args):
    device = torch.device(args.device)
    model, tokenizer = load_model(args, device)
    prompt, context = encode(tokenizer, args.prompt, args.system), model.cfg.max_seq_len
    reason = too_long_reason(len(prompt), context)
    if reason:
        raise SystemExit(f"--prompt: {reason}")
    params = params_within_context(sampling_params(args), [len(prompt)], context)
    completion = generate(model, tokenizer, [prompt], params, compile=args.compile)[0]
    print(cut_at_context(completion, len(prompt), context, tokenizer).text)


def run_rows(args, settings: dict, params: SamplingParams, encode_row, result_fields, made_by: str = MADE_BY):
    """The resumable, data-parallel loop over an input file (generate.py's and translate.py's).

    args: prompts (input path), out, out_field, field, seed, batch_size, device, dtype, chat_format,
    compile, model. encode_row(tokenizer, row) -> prompt ids; result_fields(completion) -> the
    fields added to the row ({out_field: ...}); `<out_field>_meta` records settings and finish.
    Every rank reads and checks the input, the model folder and OUT before anything is written
    (so every rank refuses alike); rank 0 then records what OUT is made from.
    """
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    out, meta_field = Path(args.out), args.out_field + "_meta"
    rows, bad, key = read_prompts(args.prompts, args.field, args.out_field)
    identity = {"inputs": {"prompts": file_identity(args.prompts)}, "model": folder_identity(args.model),
                "settings": {**settings, "field": args.field, "out_field": args.out_field,
                             "chat_format": args.chat_format, "dtype": args.dtype}}
    check_output(out, made_by, identity, companions=partial_files(out))
    tokenizer, context = check_model(args)
    prompts, too_long = {}, 0
    for line, row in rows:
        ids = encode_row(tokenizer, row)
        reason = too_long_reason(len(ids), context)
        if reason:
            bad.append((line, reason))
            too_long += 1
        else:
            prompts[line] = ids
    bad.sort()
    rows = [(line, row) for line, row in rows if line in prompts]
    usable_records(args.prompts, rows, bad, "prompt that fits the model's context")
    order = {row_key(key, line, row): i for i, (line, row) in enumerate(rows)}

    if world > 1:
        dist.init_process_group("gloo", timeout=timedelta(days=1))  # only barriers travel between ranks
    barrier = dist.barrier if world > 1 else (lambda: None)
    if rank == 0:
        record_output(out, made_by, identity)
        for line, reason in bad[:20]:
            print(f"{args.prompts}:{line}: skipped: {reason}", file=sys.stderr)
        if len(bad) > 20:
            print(f"... and {len(bad) - 20} more bad rows", file=sys.stderr)
        merge(out, key, order)  # what an interrupted run left in partial files
    barrier()
    written = read_complete_lines(out)
    done = {str(row[key]) for row in written}
    todo = [(line, row) for line, row in rows if row_key(key, line, row) not in done][rank::world]

    if todo:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else args.device)
        model, tokenizer = load_model(args, device)
        todo_prompts = [prompts[line] for line, _ in todo]
        params = params_within_context(params, list(map(len, todo_prompts)), context)
        with ResumableWriter(out.with_name(f"{out.name}.rank{rank}.partial"), key) as writer:

            def write(i, completion):
                line, row = todo[i]
                completion = cut_at_context(completion, len(todo_prompts[i]), context, tokenizer)
                extra = {"input_line": line} if key == "input_line" else {}
                meta = {**settings, "finish_reason": completion.finish_reason, "new_tokens": len(completion.tokens)}
                writer.write({**row, **extra, **result_fields(completion), meta_field: meta})

            seeds = [args.seed + line for line, _ in todo]
            generate(model, tokenizer, todo_prompts, params, batch_size=args.batch_size,
                     progress=rank == 0, seeds=seeds, on_finish=write, compile=args.compile)
    barrier()
    if rank == 0:
        merged = merge(out, key, order)
        reasons = Counter(row.get(meta_field, {}).get("finish_reason") for row in merged)
        print(
            f"{out}: {len(merged)} rows ({len(rows) - len(done)} generated now, {len(done)} already there), "
            f"{len(bad)} bad input rows skipped ({too_long} longer than the model's context of {context} tokens); "
            f"finish reasons: {dict(reasons)}"
        )
    if world > 1:
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    if args.prompt is not None:
        return answer_one(args)
    settings = {**{k: getattr(args, k) for k in SETTINGS}, "model": str(Path(args.model).resolve())}
    run_rows(args, settings, sampling_params(args), lambda tokenizer, row: encode(tokenizer, row[args.field], args.system),
             lambda completion: {args.out_field: completion.text})


if __name__ == "__main__":
    main()
