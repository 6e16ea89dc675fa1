"""What the evaluation commands share: loading the model under test, resumable generation, run settings.

`generate_resumable` is the loop behind MGSM and X-AlpacaEval generation: it skips the items an
output file already holds, generates the rest with lidr's sampler, and appends each row the
moment its completion finishes, so that a killed run loses only the rows still being generated.
`check_settings` refuses to resume a results folder that was produced with other generation
settings (another model, prompt or decoding), which would mix two runs in one number.
"""

import json
import re
from pathlib import Path

import torch
from lidr.jsonl import write_json_atomic

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
    parser.add_argument("--batch-size", type=int, default=batch_size, help="prompts per batch (default: %(default)s)")


def load_model(args):
    from lidr.checkpoint import default_dtype, load

    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(args.device)
    return load(args.model, device=args.device, dtype=dtype, chat_format=args.chat_format)


def check_settings(folder: Path, settings: dict):
    """Record the run's settings in folder/settings.json, or refuse to resume under different ones."""
    path = Path(folder) / "settings.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
        if changed:
            details = "; ".join(f"{k}: {recorded.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
            raise SystemExit(f"{path}: these results were made with other settings ({details}); "
                             f"use another --out folder or delete {folder}")
    else:
        write_json_atomic(path, settings)


def generate_resumable(model, tokenizer, items, writer, params, batch_size: int, make_row) -> int:
    """Generate for items [(key, prompt_ids, context)] not yet in `writer`; returns how many were generated.

    make_row(key, context, completion) -> the row to append (it must carry `key` under writer.key);
    each row is written the moment its completion finishes.
    """
    from lidr.sampler import generate

    todo = [item for item in items if item[0] not in writer.done]

    def on_finish(i, completion):
        key, _, context = todo[i]
        writer.write(make_row(key, context, completion))

    generate(model, tokenizer, [ids for _, ids, _ in todo], params, batch_size=batch_size, progress=True,
             on_finish=on_finish)
    return len(todo)


def slug(name: str) -> str:
    """A folder-safe form of a judge or model name: 'gpt-4-1106-preview', 'models-M0'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "judge"
