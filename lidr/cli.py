"""The flags every command line shares, written once: the model and how it runs, how a stage decodes.

    parser = argparse.ArgumentParser()
    add_engine_flags(parser, batch_size=settings.SAMPLING_BATCH_SIZE)
    add_decoding_flags(parser, settings.ANSWERS)
    args = parser.parse_args()
    generate_file(engine_from(args), ..., decoding=decoding_from(args))

The defaults come from lidr/settings.py and the help says so. `decoding_argv` is the inverse of
`add_decoding_flags`, for iterate's torchrun launches. Commands turn their flags into plain values
here, at the door: nothing below a command line reads an argparse Namespace.
"""

import argparse
from dataclasses import fields

import torch

from lidr.rows import DTYPES, Engine
from lidr.settings import Decoding

COMPILE_HELP = ("torch.compile the sampler's decode step: a one-time compile (about 40 s on CPU), then faster "
                "decoding (about 10%% on CPU; not yet measured on a GPU)")


def positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1 (--batch-size, --max-new-tokens)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def add_engine_flags(parser, batch_size: int, model_help: str = "HF checkpoint folder"):
    """--model, --device, --dtype, --chat-format, --batch-size, --compile."""
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: %(default)s; under torchrun, cuda is each rank's own GPU")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: bfloat16 on CUDA, "
                                                                      "float32 on CPU)")
    parser.add_argument("--chat-format", choices=("llama3", "chatml"), default=None,
                        help="default: read from the folder")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help="prompts decoded together (default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def engine_from(args) -> Engine:
    return Engine(args.model, args.device, args.dtype, args.chat_format, args.batch_size, args.compile)


def add_decoding_flags(parser, paper: Decoding, sampling: bool = True):
    """--system, --max-new-tokens, --repetition-penalty (and with `sampling` --temperature, --top-p,
    --top-k, --seed), their defaults the stage's paper settings (lidr/settings.py)."""
    parser.add_argument("--system", default=paper.system,
                        help="system turn before every prompt; '' for none, or the chat template's own "
                             "(default: the paper's, %(default)r)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=paper.max_new_tokens,
                        help="default: the paper's, %(default)s; lowered, with a warning, to what the model's "
                             "context leaves")
    parser.add_argument("--repetition-penalty", type=float, default=paper.repetition_penalty,
                        help="vLLM's meaning, 1 = off (default: the paper's, %(default)s)")
    if sampling:
        parser.add_argument("--temperature", type=float, default=paper.temperature,
                            help="0 = greedy (default: the paper's, %(default)s)")
        parser.add_argument("--top-p", type=float, default=paper.top_p, help="default: %(default)s (off)")
        parser.add_argument("--top-k", type=int, default=paper.top_k, help="default: %(default)s (off)")
        parser.add_argument("--seed", type=int, default=paper.seed,
                            help="row i samples with seed + its input line (default: %(default)s)")


def decoding_from(args, paper: Decoding) -> Decoding:
    """The Decoding the flags of `add_decoding_flags` give (what they lack stays the paper's)."""
    values = {f.name: getattr(args, f.name) for f in fields(Decoding) if hasattr(args, f.name)}
    values["system"] = values.get("system") or None
    return Decoding(**{**vars(paper), **values})


def decoding_argv(decoding: Decoding) -> list[str]:
    """The flags that give `decoding` back (the inverse of add_decoding_flags)."""
    return ["--system", decoding.system or "", "--max-new-tokens", str(decoding.max_new_tokens),
            "--repetition-penalty", str(decoding.repetition_penalty), "--temperature", str(decoding.temperature),
            "--top-p", str(decoding.top_p), "--top-k", str(decoding.top_k), "--seed", str(decoding.seed)]
