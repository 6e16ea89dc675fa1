"""What the evaluation commands share: the languages checked, the model's part of an output's record, folder
names, and the summaries.

Generation for MGSM and X-AlpacaEval runs through lidr/harness/sampled.py `SampledOutput`, as every stage that
samples does: resumable (a killed run loses only the rows still being generated), bound to what
the output is made from (a rerun with another model, input file or settings is refused before
anything is written, which would otherwise mix two runs in one number), over-length prompts not
answered and counted. `model_identity` is the model part of that record.

A summary.json is owned as every output is (SUMMARY.made-from.json: the command, the model or judge
and the settings; `claim_summary` refuses before any work a summary another command wrote, or one
made with another model or settings) and keyed by language: `write_summary` merges this run's
languages into those already there, under the summary's lock, so one job per language into one
folder gives one summary of every language.
"""

import json
import re
import time
from pathlib import Path

from lidr.harness.outputs import check_output, folder_identity, hold_lock, record_output, write_json_atomic
from lidr.languages import checked_languages

LOCK_WAIT_S = 120  # how long a job waits for another job's merge into the same summary (a merge takes milliseconds)


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


def read_summary(path: Path, merged=("languages",)) -> dict:
    """The summary.json at `path`: an object whose `merged` entries are objects keyed by language ("languages":
    an object per language); one sentence naming the file otherwise (a hand-edited or cut file)."""
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"{path}: not valid JSON ({e}); fix it, or move it and its record away") from None
    if not isinstance(summary, dict):
        problem = "not a JSON object"
    else:
        bad = [key for key in merged if not isinstance(summary.get(key, {}), dict)]
        if not bad and not all(isinstance(entry, dict) for entry in summary.get("languages", {}).values()):
            bad = ["languages"]
        problem = f"its {bad[0]!r} is not an object keyed by language" if bad else None
    if problem:
        raise SystemExit(f"{path}: {problem}, not a summary as eval/ writes it; fix it, or move it and its record away")
    return summary


def claim_summary(path: Path, made_by: str, identity: dict, merged=("languages",)):
    """Before any work: refuse, in one sentence, a summary.json that `made_by` may not merge into (another
    command's, a file without a record, one made with another model or settings, one that does not read)."""
    if check_output(path, made_by, identity) and Path(path).exists():
        read_summary(path, merged)


def write_summary(path: Path, made_by: str, identity: dict, summary: dict, merged=("languages",),
                  averaged=()) -> dict:
    """`summary` merged into the summary.json at `path`: each entry of `merged` ({lang: ...}) keeps the
    languages already there that this run did not evaluate, and `average` is the mean of each metric in
    `averaged` over every language that has it. Under the summary's lock (a job evaluating other
    languages into the same folder waits for it), recorded as `made_by`'s, written atomically; the
    merged summary."""
    deadline = time.time() + LOCK_WAIT_S
    while True:
        try:
            lock = hold_lock(path, made_by)
            break
        except SystemExit:  # another job merges now; its lock outlasting the wait is reported in its sentence
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    with lock:
        ours = check_output(path, made_by, identity) and Path(path).exists()  # (a run killed after its record)
        before = read_summary(path, merged) if ours else {}
        summary = {**summary, **{key: {**before.get(key, {}), **summary.get(key, {})} for key in merged}}
        if averaged:
            summary["average"] = {}
            for metric in averaged:
                values = [s[metric] for s in summary["languages"].values() if s.get(metric) is not None]
                summary["average"][metric] = sum(values) / len(values) if values else None
        record_output(path, made_by, identity)
        write_json_atomic(path, summary)
    return summary
