"""M_t answers prompts (LIDR step 2): each prompt one user turn, after the system turn, in the model's chat format.

    from lidr.generation import generate_file
    generate_file(Engine("runs/M0"), "../shared/data/alpagasus/id_0_1000/fr.jsonl", "runs/lidr/iter1/generate/fr.jsonl")
    python generate.py --model DIR --prompts IN.jsonl --out OUT.jsonl        # the command line over it

An output row is the input row plus `out_field` (the reply) and `<out_field>_meta` (the settings
that made it, the finish reason, the number of new tokens). The rows of the file, resuming,
torchrun, the record of what OUT is made from and over-length prompts: lidr/rows.py.

How this departs from the paper: its settings are the defaults (lidr/settings.py ANSWERS: greedy,
repetition penalty 1.1, at most 2,400 new tokens, the system turn "You are a helpful assistant."),
with lidr's sampler (lidr/sampler.py) in place of vLLM.
"""

from dataclasses import asdict
from pathlib import Path

from lidr import settings
from lidr.rows import (
    Engine, cut_at_context, decoding_within_context, open_model, sample_file, too_long_reason,
)
from lidr.sampler import generate
from lidr.settings import Decoding
from lidr.tokenizer import chat_messages


def generate_file(engine: Engine, prompts, out, decoding: Decoding = settings.ANSWERS, field: str = "instruction",
                  out_field: str = "response", stop_strings=()) -> list[dict]:
    """Answer the prompt in `field` of every row of `prompts` (JSONL or a JSON list) into OUT; OUT's rows.

    stop_strings: a reply ends where one appears, cut before it.
    """
    run_settings = {"model": str(Path(engine.model).resolve()), **asdict(decoding), "stop": list(stop_strings)}
    return sample_file(engine, prompts, out, field, out_field,
                       lambda tokenizer, row: tokenizer.encode_chat(chat_messages(row[field], decoding.system)),
                       lambda completion: {out_field: completion.text}, run_settings,
                       decoding, stop_strings, made_by="generate.py")


def answer(engine: Engine, text: str, decoding: Decoding = settings.ANSWERS, stop_strings=()) -> str:
    """The model's reply to one prompt."""
    model, tokenizer = open_model(engine.model, engine.device, engine.dtype, engine.chat_format)
    prompt, context = tokenizer.encode_chat(chat_messages(text, decoding.system)), model.cfg.max_seq_len
    reason = too_long_reason(len(prompt), context)
    if reason:
        raise SystemExit(f"--prompt: {reason}")
    decoding = decoding_within_context(decoding, [len(prompt)], context)
    completion = generate(model, tokenizer, [prompt], decoding, stop_strings, compile=engine.compile)[0]
    return cut_at_context(completion, len(prompt), context, tokenizer).text
