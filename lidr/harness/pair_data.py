"""The trainer's data files: their rows read, and each row put in one shape whatever its format.

    rows, bad = read_rows("pairs.parquet")   # [(row number, dict)], [(row number, why it is unreadable)]
    parts = row_parts(row, "dpo", "pairs.parquet:7")  # Parts(prompt, responses, system, conversational) or a reason

Files: JSONL, a JSON list, Parquet (needs pyarrow) or a folder written by `datasets`' save_to_disk (needs
datasets); a missing package is refused in a sentence. Rows (README, "Data and flags for TRL users"): lidr's own
{"prompt", "chosen", "rejected"} texts ({"prompt", "response"} for SFT) with optional "id", "lang", "system", which
is also TRL's standard format; TRL's implicit prompt ("chosen" and "rejected" alone: the prompt is their shared
beginning); TRL's conversational format (the same fields as lists of {role, content} messages). A missing or empty
field, chosen == rejected, or no shared prompt drops the row (counted); a row that mixes texts and messages, or
whose messages are not {role, content}, stops the run with a sentence naming the file, the row and the formats.
How each format becomes tokens: lidr/train_data.py.
"""

from pathlib import Path
from typing import NamedTuple

from lidr.harness.outputs import content_identity, file_identity, read_records

FORMATS = ("expected one of: lidr's rows and TRL's standard format ({\"prompt\", \"chosen\", \"rejected\"} texts), "
           "TRL's implicit prompt ({\"chosen\", \"rejected\"} texts), or TRL's conversational format (the same fields "
           "as lists of {\"role\", \"content\"} messages, the prompt optional)")
ROLES = ("system", "user", "assistant")


def read_rows(path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """([(row number, row)], [(row number, why unreadable)]) of a JSONL, JSON list or Parquet file, or of a
    save_to_disk folder; row numbers from 1 (JSONL: the line)."""
    path = Path(path)
    if path.is_dir():
        return read_saved_dataset(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"PAR1":  # every Parquet file starts (and ends) with these bytes
                return read_parquet(path)
    return read_records(path)


def read_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: a Parquet file; reading it needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's own errors (ArrowInvalid, OSError) for a damaged file
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    return list(enumerate(table.to_pylist(), 1)), []


def read_saved_dataset(folder: Path):
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise ValueError(f"{folder}: a datasets DatasetDict (splits: {', '.join(splits)}); pass one split's folder, "
                         f"e.g. {folder / (splits[0] if splits else 'train')}")
    if not (folder / "state.json").is_file():
        raise ValueError(f"{folder}: a folder, but not one written by datasets' save_to_disk (no state.json); pass a "
                         f"JSONL, JSON or Parquet file, or such a folder")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{folder}: a datasets.save_to_disk folder; reading it needs datasets: pip install "
                         f"datasets") from None
    return list(enumerate(datasets.load_from_disk(str(folder)).to_list(), 1)), []


def data_identity(path) -> dict:
    """What a run records of its data: file_identity of a file; of a save_to_disk folder, its resolved path and
    every file's size and sha256."""
    path = Path(path)
    if not path.is_dir():
        return file_identity(path)
    files = {str(file.relative_to(path)): content_identity(file) for file in sorted(path.rglob("*")) if file.is_file()}
    return {"path": str(path.resolve()), "files": files}


class Parts(NamedTuple):
    """A row in one shape: prompt and responses both texts, or both lists of messages (conversational)."""
    prompt: str | list[dict]
    responses: list  # [chosen, rejected] for DPO, [response] for SFT
    system: str | None  # lidr's "system" field (texts only)
    conversational: bool


def row_parts(row: dict, objective: str, where: str) -> Parts | str:
    """The row's Parts, or why it is dropped (a count's name); ValueError naming `where` (file:row) for a row in
    none of the formats. A missing "prompt" is implicit, as TRL's extract_prompt: the responses' shared leading
    messages, or their shared leading characters (a space before the point they part stays with the responses)."""
    fields = ("chosen", "rejected") if objective == "dpo" else ("response",)
    implicit = "prompt" not in row and objective == "dpo"
    values = [row.get(k) for k in ("prompt", *fields)]
    if not any(isinstance(v, list) for v in values):  # texts
        if not all(isinstance(t, str) and t.strip() for t in values[1 if implicit else 0 :]):
            return "missing or empty field"
        if objective == "dpo" and row["chosen"].strip() == row["rejected"].strip():
            return "chosen == rejected"
        system = row.get("system") if isinstance(row.get("system"), str) else None
        if not implicit:
            return Parts(values[0], values[1:], system, False)
        n = shared_length(row["chosen"], row["rejected"])
        n -= n > 0 and row["chosen"][n - 1] == " "
        prompt, responses = row["chosen"][:n], [row["chosen"][n:], row["rejected"][n:]]
        if not prompt.strip():
            return "no shared prompt"
        if not all(r.strip() for r in responses):
            return "missing or empty field"
        return Parts(prompt, responses, system, False)
    if objective != "dpo":
        raise ValueError(f"{where}: message lists are for --objective dpo; SFT rows are {{\"prompt\", \"response\"}} "
                         f"texts")
    if not all(v is None or isinstance(v, list) for v in values):
        raise ValueError(f"{where}: mixes texts and message lists; {FORMATS}")
    for k, messages in zip(("prompt", *fields), values):
        for i, m in enumerate(messages or []):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: {k} message {i + 1} is not {{\"role\": system/user/assistant, "
                                 f"\"content\": text}} ({m!r:.80}); {FORMATS}")
    if isinstance(row.get("system"), str):
        raise ValueError(f"{where}: a conversational row with a \"system\" field; put it in the messages as "
                         f"{{\"role\": \"system\", ...}}")
    prompt, chosen, rejected = values
    if not chosen or not rejected or (not implicit and not prompt):
        return "missing or empty field"
    if chosen == rejected:
        return "chosen == rejected"
    if not implicit:
        return Parts(prompt, [chosen, rejected], None, True)
    n = shared_length(chosen, rejected)
    if n == 0:
        return "no shared prompt"
    responses = [chosen[n:], rejected[n:]]
    return Parts(chosen[:n], responses, None, True) if all(responses) else "missing or empty field"


def shared_length(a, b) -> int:
    """How many leading items (characters, messages, tokens) a and b share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
