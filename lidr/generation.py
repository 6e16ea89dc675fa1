"""M_t answers the prompts (LIDR step 2): each prompt one user turn (in a template), after the system turn.

    ids = prompt_ids(tokenizer, "Tom has 7 apples...", settings.ANSWERS, lang="en")
    replies = sampler.generate(model, tokenizer, [ids], settings.ANSWERS)

    python generate.py --model DIR --prompts ../shared/data/alpagasus/id_0_1000/fr.jsonl --out fr.jsonl
    python generate.py --model DIR --prompt "Tom has 26 apples. He buys 28 more. How many apples does he have?"
    torchrun --standalone --nproc_per_node=8 -m lidr.cli.generate --model DIR --prompts IN.jsonl --out OUT.jsonl

The reply is the completion's text; over a file (lidr/harness/sampled.py `generate_file`) an
output row is the input row plus the reply and `<field>_meta` (the settings, the finish reason,
the number of new tokens). Defaults are the paper's (lidr/settings.py ANSWERS); how this departs
from the paper's vLLM runs: docs/method.md §5.3.
"""

from lidr.settings import Decoding, user_turn
from lidr.tokenizer import chat_messages


def prompt_ids(tokenizer, instruction: str, decoding: Decoding, lang: str | None = None) -> list[int]:
    """The prompt as the model sees it: the user turn (`instruction` in decoding.prompt_template, `lang`
    filling a {language} in it) after decoding.system, in the model's chat format, up to the
    assistant header."""
    return tokenizer.encode_chat(chat_messages(user_turn(decoding.prompt_template, instruction, lang), decoding.system))
