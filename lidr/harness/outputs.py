"""Reading inputs and writing outputs that survive a crash and know what they were made from.

- `read_records(path)`: JSONL (one object a line) or a JSON list; bad rows (a line that is not
  JSON, not an object, not UTF-8) come back with their line numbers and a reason instead of
  stopping the run; a UTF-8 byte-order mark is not part of the first row. `usable_records`
  refuses, in a sentence, an input where no row is usable.
- `ResumableWriter(path, key)`: appends one JSON line per finished row and flushes it. Reopening
  the same path reads what is already there and tells the caller which keys are done (compared
  as text: the id 3 and the id "3" are one key), so a rerun never redoes or duplicates a row. A
  complete last row without its newline is a row; a torn last line (a crash mid-write) is cut off,
  said, and redone (`cut_torn_tail`, also for the training log); a torn line before the last is
  corruption, refused naming the line. Nothing is cut before the writer is opened.
- Outputs bound to their inputs: `check_output(out, made_by, identity)` refuses, naming the file
  and what changed, to resume or overwrite an output that another command wrote, or that was
  made from other inputs (`file_identity`: resolved path, size, sha256), another model folder or
  other settings; `record_output` writes that identity beside the output (OUT.made-from.json),
  once the inputs have been read and checked; `bind_outputs` does both for several outputs.
  Every stage of lidr that writes a resumable or derived output uses these, and nothing else
  decides whether a rerun may go on.
  `check_folder` is the same for a folder a command fills (a training run): a user's non-empty
  folder is refused, naming what is there. `remove_own_output` deletes an output only when its
  record proves which command wrote it (iterate.py --redo-from), and lists each removal.
- Names are text: the files that belong to OUT (OUT.rank<r>.partial, OUT.tmp<pid>) are found by
  listing the folder and comparing names exactly (`numbered`), never through a glob or a regular
  expression, so a name may hold any character, and a look-alike (OUT.tmp, OUT.tmpl) is left.
- One process per output: `hold_lock(out, command)` puts OUT.lock in place whole (written aside,
  then linked: never seen empty) with the holder's pid, host, boot and process start time; a
  second process is refused, naming the holder and the file to delete; a lock no process can
  hold (empty or unreadable for seconds, a dead pid, a pid reused by a later process, an earlier
  boot) is taken over; one from another host is reported, never broken.
- `write_json_atomic(path, obj)`: small reports and configs, replaced in one rename; the
  temporaries a killed writer left beside it (PATH.tmp<pid> of a dead process) go with the next
  successful write (`remove_stale_temporaries`).
"""

import atexit
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from lidr.checkpoint import INDEX_FILE, TOKENIZER_FILES

RECORD_SUFFIX = ".made-from.json"
# owners are the module a command runs as (`python -m lidr.cli.generate`); what older lidr wrote under other names
RENAMED_OWNERS = {"generate.py": "lidr.cli.generate", "translate.py": "lidr.cli.translate", "lidr.generation":
                  "lidr.cli.generate", "lidr.translation": "lidr.cli.translate", "lidr.pairs": "lidr.cli.pairs",
                  "lidr.sdrrl": "lidr.cli.sdrrl", "lidr.train": "lidr.cli.train", "lidr.iterate": "lidr.cli.iterate",
                  "iterate.py": "lidr.cli.iterate"}
BOM = "\ufeff".encode()
LOCK_SUFFIX = ".lock"
UNREADABLE_LOCK_S = 5  # a lock still empty or unreadable this long after it was written has no live writer


def read_records(path: str | os.PathLike) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """([(line_number, row)], [(line_number, reason)]) from a .jsonl file or a .json list.

    Line numbers are 1-based lines for JSONL and 1-based list positions for a JSON list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes().removeprefix(BOM)  # a byte-order mark some editors write is not part of the first row
    rows, bad = [], []
    if path.suffix == ".json" or data.lstrip().startswith(b"["):
        try:
            items = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save it as UTF-8") from None
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
    for n, raw in enumerate(data.split(b"\n"), 1):  # not splitlines(): U+2028 and friends sit inside JSON strings
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append((n, f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"))
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


def usable_records(path, rows: list, bad: list[tuple[int, str]], what: str = "row"):
    """Stop with one sentence when an input holds no usable row: every row bad, or none at all."""
    if rows:
        return
    if not bad:
        raise SystemExit(f"{path}: holds no {what}")
    line, reason = sorted(bad)[0]
    raise SystemExit(f"{path}: none of its {len(bad)} row(s) is usable; the first, line {line}: {reason}")


# -----------------------------------------------------------------------------
# appending rows that survive a crash


def read_output_rows(path: Path) -> tuple[list[dict], int | None]:
    """(rows, torn_at) of a JSONL output file, read without changing it.

    torn_at is the byte offset of a last line that does not parse (a crash mid-write), else None;
    a last line that parses without its newline is a complete row. Any other line that is not a
    JSON object stops with the file and line named: the file is not an output of lidr.
    """
    if not path.exists():
        return [], None
    if not path.is_file():
        raise SystemExit(f"{path}: is not a file")
    data = path.read_bytes()
    lines = data.split(b"\n")
    rows, offset, torn_at = [], 0, None
    for n, line in enumerate(lines, 1):
        last = n == len(lines)
        if line.strip():
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if not last:
                    raise SystemExit(f"{path}:{n}: corrupt line before the last one (a stopped run can tear only the "
                                     f"last); repair or remove line {n} to resume") from None
                row, torn_at = None, offset
            if row is not None and not isinstance(row, dict):
                raise SystemExit(f"{path}:{n}: not a JSON object; {path} is not a JSONL output of lidr")
            if row is not None:
                rows.append(row)
        offset += len(line) + 1
    return rows, torn_at


def read_complete_lines(path: Path) -> list[dict]:
    """The complete rows of an output file (a torn last line left out), without changing the file."""
    return read_output_rows(Path(path))[0]


def cut_torn_tail(path: Path, torn_at: int | None):
    """Cut the torn last line of an appended file at byte `torn_at` (read_output_rows), saying what was cut."""
    if torn_at is None:
        return
    with open(path, "r+b") as f:
        f.seek(torn_at)
        torn = f.read()
        f.truncate(torn_at)
    line = path.read_bytes().count(b"\n") + 1
    shown = torn.decode("utf-8", "replace")
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    print(f"{path}:{line}: cut a torn last line ({len(torn)} bytes, written when a run was stopped): {shown!r}",
          file=sys.stderr, flush=True)


class ResumableWriter:
    """Append-only JSONL output keyed by `key`: `done` holds the keys already written, as text.
    locked: the writer holds PATH.lock (one process appends to a file); False where the caller
    already holds the lock of the output the file belongs to (lidr.harness.sampled.SampledOutput)."""

    def __init__(self, path: str | os.PathLike, key: str, locked: bool = True):
        self.path, self.key = Path(path), key
        self.lock = hold_lock(self.path, "a resumable writer") if locked else None
        self.rows, torn_at = read_output_rows(self.path)
        missing = next((n for n, row in enumerate(self.rows, 1) if key not in row), None)
        if missing is not None:
            raise SystemExit(f"{self.path}: row {missing} has no {key!r}; is this an output of this command?")
        self.done = {str(row[key]) for row in self.rows}
        cut_torn_tail(self.path, torn_at)
        needs_newline = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self.file = open(self.path, "a", encoding="utf-8")
        if needs_newline:  # a complete last row whose newline was never written
            self.file.write("\n")

    def write(self, row: dict):
        if str(row[self.key]) in self.done:
            raise ValueError(f"{self.path}: {self.key}={row[self.key]!r} is already written")
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()
        self.done.add(str(row[self.key]))
        self.rows.append(row)

    def close(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.lock is not None:
            self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -----------------------------------------------------------------------------
# outputs bound to their inputs


def content_identity(path: Path) -> dict:
    """{size, sha256} of a file's bytes."""
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_identity(path: str | os.PathLike) -> dict:
    """{path (resolved), size, sha256} of an input file."""
    path = Path(path).resolve()
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    return {"path": str(path), **content_identity(path)}


def folder_identity(folder: str | os.PathLike) -> dict:
    """Which checkpoint a folder holds, cheaply: its resolved path, config and tokenizer files by
    size and sha256, safetensors files by size and modification time (hashing 16 GB of weights on
    every run would cost minutes). A folder that is not a checkpoint stops with one sentence."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise SystemExit(f"{folder}: no such model folder")
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder / 'config.json'}: no config.json; is {folder} an HF checkpoint folder?")
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name in ("config.json", INDEX_FILE, *TOKENIZER_FILES):
            files[path.name] = content_identity(path)
        elif path.suffix == ".safetensors":
            stat = path.stat()
            files[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"path": str(folder), "files": files}


def owner(made_by: str) -> str:
    """The command that wrote an output, under today's name (`RENAMED_OWNERS`)."""
    return RENAMED_OWNERS.get(made_by, made_by)


def named(out: str | os.PathLike) -> Path:
    """OUT as a path that ends in its own name: a folder given as '.', '..' or 'runs/..' made absolute (its
    record and lock go beside it, which needs a name), and '/' refused in a sentence."""
    out = Path(out)
    if out.name in ("", ".."):
        out = Path(os.path.abspath(out))
    if not out.name:
        raise SystemExit(f"{out}: has no name to put a record or a lock beside it; choose a folder below it")
    return out


def record_path(out: str | os.PathLike) -> Path:
    out = named(out)
    return out.with_name(out.name + RECORD_SUFFIX)


def identity_changes(before, now, prefix: str = "") -> list[str]:
    """'where: before -> now' for every leaf of two nested dicts that differs."""
    if isinstance(before, dict) and isinstance(now, dict):
        changes = []
        for k in sorted(set(before) | set(now), key=str):
            changes += identity_changes(before.get(k), now.get(k), f"{prefix}{k}.")
        return changes
    if before == now:
        return []

    def short(value):  # a text (a path, a name) whole: the reader must see which; a long list or table cut
        text = repr(value)
        return text if isinstance(value, str) or len(text) <= 80 else text[:77] + "..."

    return [f"{prefix.rstrip('.')}: {short(before)} -> {short(now)}"]


def check_output(out: str | os.PathLike, made_by: str, identity: dict, companions=()) -> bool:
    """Refuse, in a sentence naming the file, to write `out` unless this command may: True when
    `out` (or its record) exists from an earlier run of the same command on the same inputs,
    False when nothing is there yet. Reads only; the record is written by `record_output`.

    companions: other files that belong to `out` (partial files, a derived copy); they too must
    not exist unless the record does.
    """
    out = Path(out)
    record = record_path(out)
    if not record.exists():
        present = next((p for p in (out, *companions) if Path(p).exists()), None)
        if present is not None:
            raise SystemExit(f"{present}: exists and was not written by {made_by} (no {record.name} beside it); "
                             f"it is left as it is: choose another output, or move the file away")
        return False
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
        recorded_by, recorded_identity = recorded["made_by"], recorded["identity"]
        recorded_by = owner(recorded_by)
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise SystemExit(f"{record}: not a record of what {out} was made from; move it and {out} away") from None
    if recorded_by != made_by:
        raise SystemExit(f"{out}: was written by {recorded_by}, not {made_by}; it is left as it is: "
                         f"choose another output")
    changes = identity_changes(recorded_identity, json.loads(json.dumps(identity)))
    if changes:
        raise SystemExit(f"{out}: was made from other inputs or other settings ({'; '.join(changes)}); "
                         f"use another output, or delete {out} and {record.name} to start over")
    return True


def record_output(out: str | os.PathLike, made_by: str, identity: dict):
    """Write what `out` is made from beside it (call after `check_output` and after the inputs were read)."""
    write_json_atomic(record_path(out), {"made_by": made_by, "identity": identity})


def bind_outputs(made_by: str, bindings: list[tuple]):
    """check_output for every (out, identity, companions) first, then record_output for each: a
    command that writes several outputs refuses before it has touched any of them."""
    for out, identity, companions in bindings:
        check_output(out, made_by, identity, companions)
    for out, identity, _ in bindings:
        record_output(out, made_by, identity)


def check_folder(out: str | os.PathLike, made_by: str, identity: dict) -> bool:
    """check_output for a folder that a command fills (a training run): True when OUT is this
    command's own run on the same inputs (OUT.made-from.json beside it), False when OUT is absent
    or an empty folder; an existing file, or a non-empty folder without that record, is refused,
    naming what is there. Reads only; `record_output(out, ...)` claims the folder."""
    out = Path(out)
    if record_path(out).exists():
        return check_output(out, made_by, identity)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{out}: is a file, not a folder; it is left as it is: choose another --out")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise SystemExit(f"{out}: is a folder that {made_by} did not make (no {record_path(out).name} beside it; "
                         f"it holds {shown}); it is left as it is: choose a new or empty --out")
    return False


def numbered(path: Path, infix: str, suffix: str = "") -> list[tuple[Path, int]]:
    """(sibling, n) for each PATH{infix}{n}{suffix} beside PATH, n written in the digits 0-9: the
    folder listed and each name compared as text, never read as a pattern."""
    path = Path(path)
    head, found = path.name + infix, []
    for sibling in (path.parent.iterdir() if path.parent.is_dir() else ()):
        n = sibling.name[len(head):len(sibling.name) - len(suffix)]
        if sibling.name.startswith(head) and sibling.name.endswith(suffix) and n.isascii() and n.isdigit():
            found.append((sibling, int(n)))
    return sorted(found)


def stale_temporaries(path: Path) -> list[Path]:
    """The PATH.tmp<pid> files and folders (what `write_text_atomic` and lidr.checkpoint.save build
    before their rename) of processes of this host that no longer run, or of this one."""
    return [tmp for tmp, pid in numbered(path, ".tmp") if pid == os.getpid() or not process_alive(pid)]


def remove_path(path: Path):
    """A file, a link or a folder with what it holds."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_own_output(out: str | os.PathLike, made_by: str, companions=(), contents=None) -> list[Path]:
    """Delete OUT, its record, its partial files (OUT.rank<r>.partial), the temporaries of ended
    processes (`stale_temporaries`) and its `companions`, when OUT's record proves that `made_by`
    wrote it, under OUT's lock; the removed paths, in order ([] when the record does not prove it).
    contents: for a folder OUT, the names in it that `made_by` writes: those go, and OUT itself
    only when nothing else is left in it. A name that merely looks like one of these stays."""
    out = Path(out)
    record = record_path(out)
    try:
        recorded_by = owner(json.loads(record.read_text(encoding="utf-8"))["made_by"])
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return []
    if recorded_by != made_by:
        return []
    with hold_lock(out, f"removing what {made_by} wrote"):
        paths = [out / name for name in contents] if contents is not None and out.is_dir() else [out]
        paths += [Path(p) for p in companions]
        paths += [p for path in (*paths, record) for p in stale_temporaries(path)]
        paths += [p for p, _ in numbered(out, ".rank", ".partial")]
        removed = [path for path in paths if path.exists() or path.is_symlink()]
        for path in removed:
            remove_path(path)
        if contents is not None and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
            removed.append(out)
        record.unlink()
    return [*removed, record]


# -----------------------------------------------------------------------------
# one process per output


def lock_path(out: str | os.PathLike) -> Path:
    out = named(out)
    return out.with_name(out.name + LOCK_SUFFIX)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def boot_id() -> str | None:
    """This boot of this host (Linux); a lock from an earlier boot has no live holder."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (field 22 of /proc/PID/stat); None where
    it does not run or there is no /proc. A pid given again to a later process has a later start."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def started_after(pid: int, when: float) -> bool:
    """Whether process `pid` started after the time `when` (seconds since the epoch), by more than
    /proc/stat's btime, rounded to a second, can blur."""
    start = process_start(pid)
    try:
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return False
    return start is not None and btime + start / os.sysconf("SC_CLK_TCK") > when + 2


def command_line(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return argv if len(argv) <= 100 else argv[:97] + "..."


class OutputLock:
    """This process's hold on an output (OUT.lock, holding `record`); released by `release`, on
    leaving a `with`, or at exit: the file goes only while it still holds this record."""

    def __init__(self, path: Path, record: bytes):
        self.path, self.record = path, record
        atexit.register(self.release)

    def release(self):
        atexit.unregister(self.release)
        if self.path is not None:
            try:
                if self.path.read_bytes() == self.record:
                    self.path.unlink()
            except FileNotFoundError:
                pass
            self.path = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def hold_lock(out: str | os.PathLike, command: str) -> OutputLock:
    """Take the advisory lock of the output (file or folder) `out` for this process, or refuse in a
    sentence naming the process that holds it and the file to delete once it has ended. The lock
    is OUT.lock, put in place whole (`place_lock`) and holding {pid, host, boot_id, started,
    command, since}. A lock that no process can hold (`stale_reason`) is taken over, saying why; a
    lock from another host is reported and never broken (its process may still run).
    Under torchrun only rank 0 calls this."""
    out = Path(out)
    lock = lock_path(out)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": boot_id(), "started": process_start(os.getpid()),
          "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    record = json.dumps(me).encode()
    for _ in range(5):
        if place_lock(lock, record):
            remove_stale_temporaries(lock)  # what a writer killed before its link left
            return OutputLock(lock, record)
        found = read_lock(lock)
        if found is None:
            continue  # released meanwhile
        raw, holder, mtime = found
        why = stale_reason(holder, mtime, me)
        if why is not None:
            print(f"{lock}: taken over: {why}", file=sys.stderr, flush=True)
            take_over_stale(lock, raw)
        elif holder.get("host", me["host"]) != me["host"]:
            raise SystemExit(f"{out}: in use by process {holder['pid']} on {holder['host']} ({holder.get('command')}), "
                             f"says {lock}; this host cannot see that host's processes: check on {holder['host']} "
                             f"(ps -p {holder['pid']}), and if it has ended, delete {lock} and rerun")
        elif holder["pid"] == me["pid"]:
            return OutputLock(lock, raw)  # this process's own (a call that stopped before releasing it)
        else:
            pid, running = holder["pid"], command_line(holder["pid"])
            raise SystemExit(f"{out}: in use by process {pid} on this host ({holder.get('command')})"
                             + (f", running `{running}`" if running else "")
                             + (f" since {holder['since']}" if holder.get("since") else "")
                             + f"; wait for it to end, or stop it (kill {pid}), then rerun; if that process is not "
                             f"lidr's (its pid reused), delete {lock} and rerun")
    raise SystemExit(f"{out}: its lock {lock} keeps changing hands; another process is starting on it, rerun later")


def place_lock(lock: Path, record: bytes) -> bool:
    """Put `record` in LOCK whole or not at all: written to LOCK.tmp<pid>, then linked to LOCK (a link,
    like O_EXCL, fails where LOCK exists), so no reader finds a live holder's lock empty; False when
    LOCK exists. Where the filesystem has no hard links, LOCK is created (O_EXCL), then filled."""
    tmp = lock.with_name(f"{lock.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(record)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, lock)
        except FileExistsError:
            return False
        except OSError:  # no hard links here: readers wait UNREADABLE_LOCK_S for an empty lock to fill
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(record)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def read_lock(lock: Path) -> tuple[bytes, dict | None, float] | None:
    """(its bytes, the holder it names, its modification time) of a lock file; None when it is gone.
    holder is None for a lock that stays empty or unreadable for UNREADABLE_LOCK_S (read again meanwhile)."""
    for _ in range(int(UNREADABLE_LOCK_S / 0.2)):
        try:
            raw, mtime = lock.read_bytes(), lock.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            holder = None
        pid = holder.get("pid") if isinstance(holder, dict) else None
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
            return raw, holder, mtime
        if time.time() - mtime >= UNREADABLE_LOCK_S:
            break
        time.sleep(0.2)
    return raw, None, mtime


def stale_reason(holder: dict | None, mtime: float, me: dict) -> str | None:
    """Why no process can hold a lock naming `holder` (written at `mtime`), or None when one may."""
    if holder is None:
        return f"it stayed empty or unreadable for {UNREADABLE_LOCK_S} s (its writer stopped before filling it)"
    pid = holder["pid"]
    if holder.get("host", me["host"]) != me["host"]:
        return None  # another host's processes cannot be seen from here
    if holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
        return "it was written before this host last started"
    if not process_alive(pid):
        return f"process {pid} ({holder.get('command')}) no longer runs"
    started = process_start(pid)
    if isinstance(holder.get("started"), int) and started is not None and started != holder["started"]:
        return f"process {pid} is not the one that wrote it (that one started at tick {holder['started']}, " \
               f"this one at {started}): its pid was reused"
    if holder.get("started") is None:  # an older lidr's lock: no start time to compare
        if started_after(pid, mtime):
            return f"process {pid} started after the lock was written: its pid was reused"
        try:
            program = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return None
        if not any(name in Path(program).name for name in ("python", "pypy")):
            return f"process {pid} runs {program}, not Python: its pid was reused"
    return None


def take_over_stale(lock: Path, raw: bytes):
    """Move a stale lock aside, unless another process took it over between our read and the move."""
    aside = lock.with_name(f"{lock.name}.stale{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if aside.read_bytes() != raw:  # not the lock judged stale: put it back
        try:
            os.link(aside, lock)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


def remove_stale_temporaries(path: str | os.PathLike):
    """Delete, and name, the PATH.tmp<pid> left by processes of this host that no longer run (`stale_temporaries`)."""
    for tmp in stale_temporaries(Path(path)):
        remove_path(tmp)
        if tmp.name != f"{Path(path).name}.tmp{os.getpid()}":
            print(f"removed {tmp}, left by process {tmp.name.rsplit('.tmp', 1)[1]}, which has ended", flush=True)


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
    remove_stale_temporaries(path)  # a killed run's leftovers do not outlive one that succeeds
