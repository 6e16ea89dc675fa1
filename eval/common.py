"""What the evaluation commands share: loading the model under test, resumable generation, run settings.

`generate_resumable` is the loop behind MGSM and X-AlpacaEval generation: it skips the items an
output file already holds, generates the rest with lidr's sampler, and appends each row the
moment its completion finishes, so that a killed run loses only the rows still being generated.
Over-length prompts follow generate.py's policy: a prompt that fills the model's context is not
answered (counted as too long), and a reply ends where the context does.
Every output file records what it was made from (lidr/jsonl.py `bind_outputs`): a rerun with
another model, input file or settings is refused before anything is written, which would
otherwise mix two runs in one number. `model_identity` is the model part of that record.
"""

import dataclasses
import re
from pathlib import Path

import torch

from lidr.checkpoint import folder_identity
from lidr.cli import cut_at_context, params_within_context, positive_int, too_long_reason
from lidr.languages import checked_languages

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SYSTEM = "You are a helpful assistant."  # the system turn of the LIDR repository's Llama 3 template


def add_model_args(parser, batch_size: int):
    parser.add_argument("--model", required=True, help="HF checkpoint folder of the model under test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: %(default)s")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--chat-format", choices=("llama3", "chatml"), default=None,
                        help="override the chat format read from the folder")
    parser.add_argument("--system", default=DEFAULT_SYSTEM,
                        help="system turn of every prompt; '' for none (default: %(default)r)")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help="prompts per batch (default: %(default)s)")


def check_langs(parser, langs: list[str]):
    """--langs: every code known, none twice; an argparse error otherwise."""
    try:
        checked_languages(langs)
    except ValueError as e:
        parser.error(str(e))


def load_model(args):
    """(model, tokenizer); a folder that is not a usable checkpoint stops with the sentence naming it."""
    from lidr.checkpoint import default_dtype, load

    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(args.device)
    try:
        return load(args.model, device=args.device, dtype=dtype, chat_format=args.chat_format)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None


def model_identity(args) -> dict:
    """The model part of an output's record: the folder (lidr.checkpoint.folder_identity), dtype, chat format."""
    return {"folder": folder_identity(args.model), "dtype": args.dtype, "chat_format": args.chat_format}


def sampling_settings(params) -> dict:
    return dataclasses.asdict(params)


def generate_resumable(model, tokenizer, items, writer, params, batch_size: int, make_row) -> tuple[int, list]:
    """Generate for items [(key, prompt_ids, context)] not yet in `writer`: (how many were generated
    now, the keys of the prompts too long for the model's context, which are not answered).

    make_row(key, context, completion) -> the row to append (it must carry `key` under writer.key);
    each row is written the moment its completion finishes, cut where the model's context ends.
    """
    from lidr.sampler import generate

    context = model.cfg.max_seq_len
    too_long = [key for key, ids, _ in items if too_long_reason(len(ids), context)]
    skip = writer.done | {str(key) for key in too_long}
    todo = [item for item in items if str(item[0]) not in skip]
    params = params_within_context(params, [len(ids) for _, ids, _ in todo], context, flag="max_new_tokens")

    def on_finish(i, completion):
        key, ids, row_context = todo[i]
        writer.write(make_row(key, row_context, cut_at_context(completion, len(ids), context, tokenizer)))

    generate(model, tokenizer, [ids for _, ids, _ in todo], params, batch_size=batch_size, progress=True,
             on_finish=on_finish)
    return len(todo), too_long


def slug(name: str) -> str:
    """A folder-safe form of a judge or model name: 'gpt-4-1106-preview', 'models-M0'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "judge"
