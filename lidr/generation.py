"""M_t answers prompts (LIDR step 2): each prompt one user turn (in a template), after the system turn, in the
model's chat format.

    from lidr.generation import generate_file
    generate_file(Engine("runs/M0"), "../shared/data/alpagasus/id_0_1000/fr.jsonl", "runs/lidr/iter1/generate/fr.jsonl")
    python generate.py --model DIR --prompts IN.jsonl --out OUT.jsonl        # the command line over it

An output row is the input row plus `out_field` (the reply) and `<out_field>_meta` (the settings
that made it, the finish reason, the number of new tokens). The rows of the file, resuming,
torchrun, the record of what OUT is made from and over-length prompts: lidr/rows.py.

How this departs from the paper: its settings are the defaults (lidr/settings.py ANSWERS: greedy,
repetition penalty 1.1, at most 2,400 new tokens, the system turn "You are a helpful assistant.",
the prompt as it is), with lidr's sampler (lidr/sampler.py) in place of vLLM. The repository's
reasoning runs (GSM8K prompts) wrap each prompt in its "Below is an instruction..." template:
prompt_template "alpaca" with the prompts' language (README, "the MGSM recipe").
"""

from dataclasses import asdict
from pathlib import Path

from lidr import settings
from lidr.rows import (
    Engine, cut_at_context, decoding_within_context, open_model, sample_file, too_long_reason,
)
from lidr.sampler import generate
from lidr.settings import Decoding, template_text, user_turn
from lidr.tokenizer import chat_messages


def generate_file(engine: Engine, prompts, out, decoding: Decoding = settings.ANSWERS, field: str = "instruction",
                  out_field: str = "response", stop_strings=(), lang: str | None = None) -> list[dict]:
    """Answer the prompt in `field` of every row of `prompts` (JSONL or a JSON list) into OUT; OUT's rows.

    The user turn is `field` in decoding.prompt_template (lidr.settings.user_turn; `lang` fills a
    {language} in it); `<out_field>_meta` records the template's text and `lang`, so a later stage
    (lidr.pairs) rebuilds exactly the user turn that was asked. stop_strings: a reply ends where one
    appears, cut before it.
    """
    user_turn(decoding.prompt_template, "", lang)  # a template that needs a language refuses before any work
    run_settings = {"model": str(Path(engine.model).resolve()), **asdict(decoding),
                    "prompt_template": template_text(decoding.prompt_template), "lang": lang,
                    "stop": list(stop_strings)}
    return sample_file(engine, prompts, out, field, out_field,
                       lambda tokenizer, row: tokenizer.encode_chat(chat_messages(
                           user_turn(decoding.prompt_template, row[field], lang), decoding.system)),
                       lambda completion: {out_field: completion.text}, run_settings,
                       decoding, stop_strings, made_by="generate.py")


def answer(engine: Engine, text: str, decoding: Decoding = settings.ANSWERS, stop_strings=(),
           lang: str | None = None) -> str:
    """The model's reply to one prompt (in decoding.prompt_template, `lang` filling its {language})."""
    model, tokenizer = open_model(engine.model, engine.device, engine.dtype, engine.chat_format)
    user = user_turn(decoding.prompt_template, text, lang)
    prompt, context = tokenizer.encode_chat(chat_messages(user, decoding.system)), model.cfg.max_seq_len
    reason = too_long_reason(len(prompt), context)
    if reason:
        raise SystemExit(f"--prompt: {reason}")
    decoding = decoding_within_context(decoding, [len(prompt)], context)
    completion = generate(model, tokenizer, [prompt], decoding, stop_strings, compile=engine.compile)[0]
    return cut_at_context(completion, len(prompt), context, tokenizer).text
