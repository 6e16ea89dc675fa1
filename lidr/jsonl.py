"""Reading inputs and writing outputs that survive a crash: every stage of lidr uses these.

- `read_records(path)`: JSONL (one object a line) or a JSON list; bad rows come back with their
  line numbers and a reason instead of stopping the run.
- `ResumableWriter(path, key)`: appends one JSON line per finished row and flushes it. Reopening
  the same path reads what is already there, drops a half-written last line (a crash mid-write),
  and tells the caller which keys are done, so a rerun never redoes or duplicates a row.
- `write_json_atomic(path, obj)`: small reports and configs, replaced in one rename.
"""

import json
import os
from pathlib import Path


def read_records(path: str | os.PathLike) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """([(line_number, row)], [(line_number, reason)]) from a .jsonl file or a .json list.

    Line numbers are 1-based lines for JSONL and 1-based list positions for a JSON list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    rows, bad = [], []
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
        for n, item in enumerate(items, 1):
            if isinstance(item, dict):
                rows.append((n, item))
            else:
                bad.append((n, "not a JSON object"))
        return rows, bad
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append((n, f"not JSON ({e.msg})"))
            continue
        if isinstance(item, dict):
            rows.append((n, item))
        else:
            bad.append((n, "not a JSON object"))
    return rows, bad


def read_complete_lines(path: Path) -> list[dict]:
    """The complete JSON lines of an output file; a torn last line is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline was never finished
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    rows = []
    for n, line in enumerate(data[:end].splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: corrupt line inside an output file; remove it to resume") from None
    return rows


class ResumableWriter:
    """Append-only JSONL output keyed by `key`: `done` holds the keys already written."""

    def __init__(self, path: str | os.PathLike, key: str):
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = read_complete_lines(self.path)
        self.done = {row[key] for row in self.rows}
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict):
        if row[self.key] in self.done:
            raise ValueError(f"{self.path}: {self.key}={row[self.key]!r} is already written")
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()
        self.done.add(row[self.key])
        self.rows.append(row)

    def close(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 2):
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
