"""The trainer's rows as token sequences, and the held-out split. python train_dpo.py --data pairs.parquet ...

    examples, counts = load_examples("pairs.jsonl", tokenizer, "dpo", max_len=2048, plain_text="chat")

Each row (file formats and row shapes: lidr/harness/pair_data.py) becomes a prompt and its responses:
- texts, --plain-text chat (the default; lidr's rows): the prompt is the user turn of the chat template (after the
  row's "system"), then the assistant header; a response is its text's tokens and the end-of-turn token.
- texts, --plain-text raw (TRL's standard format): no template, as TRL: the prompt's text and prompt + response +
  end-of-turn text are tokenized as they are (the tokenizer's own BOS first, where it adds one).
- messages (TRL's conversational format): the chat template, as TRL: the prompt's messages and the assistant
  header, and prompt + response messages as one conversation.
In the last two the response is what follows the tokens both share (TRL's split). A prompt that does not fit beside
its longer response keeps its last tokens; a response is never cut (a row whose response does not fit is dropped).
"""

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lidr.checkpoint import check
from lidr.harness.pair_data import Parts, read_rows, row_parts, shared_length
from lidr.settings import Training
from lidr.tokenizer import Tokenizer, chat_messages


@dataclass
class Example:
    line: int  # the row's number in the data file (JSONL: its line)
    prompt: list[int]
    responses: list[list[int]]  # [chosen, rejected] for DPO, [response] for SFT
    group: str = ""  # the row's prompt "id" (every pair of one prompt shares it), else its prompt's text
    lang: str | None = None  # the row's "lang", for the held-out scores per language


def tokenize(tokenizer: Tokenizer, parts: Parts, plain_text: str) -> tuple[list[int], list[list[int]]]:
    """(prompt tokens, [response tokens]) of a row, by the module docstring's rules."""
    if not parts.conversational and plain_text == "chat":
        prompt = tokenizer.encode_chat(chat_messages(parts.prompt, parts.system))
        return prompt, [tokenizer.encode(r) + [tokenizer.end_of_turn_id] for r in parts.responses]
    if parts.conversational:
        prompt = tokenizer.encode_chat(parts.prompt)
        whole = [tokenizer.encode(tokenizer.render_chat(parts.prompt + r, add_generation_prompt=False))
                 for r in parts.responses]
    else:  # tokenizers' own encode adds the special tokens its post-processor names, as transformers' tokenizer(text)
        end = tokenizer.tok.id_to_token(tokenizer.end_of_turn_id)
        prompt = tokenizer.tok.encode(parts.prompt).ids
        whole = [tokenizer.tok.encode(parts.prompt + r + ("" if r.endswith(end) else end)).ids for r in parts.responses]
    n = min(shared_length(prompt, ids) for ids in whole)  # a token that merges across the boundary is the response's
    return prompt[:n], [ids[n:] for ids in whole]


def load_examples(path, tokenizer: Tokenizer, objective: str, max_len: int, plain_text: str = "chat"):
    """(examples, counts): the usable rows tokenized, and how many rows went where."""
    header_len = len(tokenizer.encode_chat([])) - len(tokenizer.encode_chat([], add_generation_prompt=False))
    rows, bad = read_rows(path)
    counts = Counter({"read": len(rows) + len(bad), "unreadable": len(bad)})
    examples = []
    for line, row in rows:
        parts = row_parts(row, objective, f"{path}:{line}")
        if isinstance(parts, str):  # why the row is dropped
            counts[parts] += 1
            continue
        raw = plain_text == "raw" and not parts.conversational
        if raw and parts.system is not None:
            raise ValueError(f"{path}:{line}: a \"system\" field needs the chat template; --plain-text raw has none")
        prompt, responses = tokenize(tokenizer, parts, plain_text)
        room = max_len - max(map(len, responses))  # prompt tokens that fit
        if room < (1 if raw else header_len):
            counts["too long"] += 1
            continue
        if len(prompt) > room:
            prompt = prompt[-room:]
            counts["prompt truncated"] += 1
        row_id, lang = row.get("id"), row.get("lang")
        group = str(row_id) if isinstance(row_id, (str, int)) else f"prompt {parts.prompt!r}"
        examples.append(Example(line, prompt, responses, group, lang if isinstance(lang, str) else None))
    counts["kept"] = len(examples)
    return examples, counts


def read_examples(model_dir: Path, data: Path, options: Training):
    """(tokenizer, usable examples, counts), or one sentence and exit; the model folder is checked, no weights read."""
    try:
        _, tokenizer = check(model_dir, options.chat_format)
        examples, counts = load_examples(data, tokenizer, options.objective, options.max_len, options.plain_text)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    return tokenizer, examples, counts


def split_held_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices), both in the file's order: round(fraction × prompts) prompts (at least
    one when fraction > 0), drawn with `seed`, are held out with every pair they have (any direction, language); a
    prompt is its row's "id", else its text, so no prompt is on both sides."""
    groups = sorted({ex.group for ex in examples})
    n_held_out = max(1, round(fraction * len(groups))) if fraction > 0 else 0
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = {groups[i] for i in order[:n_held_out]}
    train = [i for i, ex in enumerate(examples) if ex.group not in held_out]
    return train, [i for i, ex in enumerate(examples) if ex.group in held_out]
