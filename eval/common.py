"""What the evaluation commands share: the languages checked, the model's part of an output's record, folder names.

Generation for MGSM and X-AlpacaEval runs through lidr/harness/sampled.py `SampledOutput`, as every stage that
samples does: resumable (a killed run loses only the rows still being generated), bound to what
the output is made from (a rerun with another model, input file or settings is refused before
anything is written, which would otherwise mix two runs in one number), over-length prompts not
answered and counted. `model_identity` is the model part of that record.
"""

import re

from lidr.harness.outputs import folder_identity
from lidr.languages import checked_languages


def check_langs(parser, langs: list[str]):
    """--langs: every code known, none twice; an argparse error otherwise."""
    try:
        checked_languages(langs)
    except ValueError as e:
        parser.error(str(e))


def model_identity(folder, dtype: str | None, chat_format: str | None) -> dict:
    """The model part of an output's record: the folder (lidr.harness.outputs.folder_identity), dtype, chat format."""
    return {"folder": folder_identity(folder), "dtype": dtype, "chat_format": chat_format}


def slug(name: str) -> str:
    """A folder-safe form of a judge or model name: 'gpt-4-1106-preview', 'models-M0'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "judge"
