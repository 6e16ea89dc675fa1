"""What the command-line stages that sample share (generate.py, translate.py, eval/): the type of
their count flags and the over-length policy.

Over-length input (the context is the model's max_position_embeddings): a prompt that fills the
context by itself is not answered (`too_long_reason`), and every reply ends where the context
does, so a row gets at most context − its prompt's tokens new tokens (`params_within_context`
lowers a --max-new-tokens past that, with a warning; `cut_at_context` is the completion such a
bounded generation gives).
"""

import argparse
import dataclasses
import sys

from lidr.sampler import Completion, SamplingParams


def positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1 (--batch-size, --max-new-tokens)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def too_long_reason(prompt_len: int, context: int) -> str | None:
    """Why a prompt cannot be answered within the context, or None when it can."""
    if prompt_len >= context:
        return f"the prompt is {prompt_len} tokens, the model's context {context}: no room for a reply"
    return None


def params_within_context(params: SamplingParams, prompt_lens: list[int], context: int, flag="--max-new-tokens"):
    """params with max_new_tokens lowered to the most any of these prompts has room for, with a warning."""
    room = context - min(prompt_lens, default=0)
    if params.max_new_tokens <= room:
        return params
    print(f"warning: {flag} {params.max_new_tokens} reaches past the model's context of {context} tokens; "
          f"each reply ends where the context does (at most {room} new tokens here)", file=sys.stderr)
    return dataclasses.replace(params, max_new_tokens=room)


def cut_at_context(completion: Completion, prompt_len: int, context: int, tokenizer) -> Completion:
    """The completion a generation bounded by the context gives: decoding is causal, so it is the
    first context − prompt_len tokens of the unbounded one (the end-of-turn token needs a place too)."""
    room = context - prompt_len
    if len(completion.tokens) < room or (len(completion.tokens) == room and completion.finish_reason != "stop_token"):
        return completion
    tokens = completion.tokens[:room]
    return Completion(tokens, tokenizer.decode(tokens), "length")
