"""The flags every command line shares, generated from the settings they set (lidr/settings.py).

    parser = argparse.ArgumentParser()
    add_engine_flags(parser, batch_size=settings.SAMPLING_BATCH_SIZE)
    add_flags(parser, settings.ANSWERS)                     # --max-new-tokens, --system, ... --seed
    add_flags(parser, settings.TRANSLATION, prefix="translate-")   # the same, for another stage
    args = parser.parse_args()
    generate_file(engine_from(args), ..., decoding=from_flags(args, settings.ANSWERS))

A setting is a dataclass field made by `lidr.settings.setting`; `add_flags` turns each field into
one flag (its default, help and range from the field), `from_flags` turns the parsed flags back into
the dataclass, and `flags_argv` is the inverse of both, for iterate's torchrun launches. So a new
setting is one new field, and every command that takes that dataclass has its flag. Commands turn
their flags into plain values here, at the door: nothing below a command line reads a Namespace.
Every command's `main` is decorated with `command()`: an operating-system error (a read-only
folder, a full disk, a parent path that is a file), Ctrl-C, SIGTERM or settings that do not go
together end in one line, not a traceback.
"""

import argparse
import errno
import functools
import importlib.util
import os
import signal
import sys
import threading
from dataclasses import fields, replace

from lidr.settings import DTYPES, SettingsError
from lidr.settings import out_of_range
from lidr.tokenizer import CHAT_FORMATS

# the sampling settings that the evaluations leave at their greedy defaults (the paper decodes greedily)
GREEDY_ONLY = ("temperature", "top_p", "top_k", "seed")
COMPILE_HELP = ("torch.compile the sampler's decode step: a one-time compile (about 40 s on CPU), then faster "
                "decoding (about 10%% on CPU; not yet measured on a GPU)")


def setting_type(kind: type, meta):
    """argparse type for a setting: the text parsed as `kind` and checked against the field's range or check."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        problem = out_of_range(value, meta)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


positive_int = setting_type(int, {"low": 1})  # argparse type for counts that must be at least 1 (--batch-size, --limit)


def add_engine_flags(parser, batch_size: int, model_help: str = "HF checkpoint folder"):
    """--model, --device, --dtype, --chat-format, --batch-size, --compile."""
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--device", help="default: cuda on a machine with a GPU, else cpu; under torchrun, cuda is "
                                         "each rank's own GPU")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: bfloat16 on CUDA, "
                                                                      "float32 on CPU)")
    parser.add_argument("--chat-format", choices=tuple(CHAT_FORMATS), default=None,
                        help="default: read from the folder")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help="prompts decoded together (default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def engine_from(args):
    """The Engine the flags give (imported here: --help never imports torch)."""
    from lidr.harness.sampled import Engine

    return Engine(args.model, args.device or Engine.device, args.dtype, args.chat_format, args.batch_size, args.compile)


def add_flags(parser, defaults, prefix: str = "", skip=(), title: str | None = None):
    """One flag --{prefix}{field} per field of the settings dataclass `defaults` (but those in
    `skip`), defaulting to its value there; in an argument group `title` when given."""
    group = parser.add_argument_group(title) if title else parser
    for f in fields(defaults):
        if f.name in skip:
            continue
        flag, default, meta = "--" + prefix + f.name.replace("_", "-"), getattr(defaults, f.name), f.metadata
        help_text = meta.get("help", "").replace("%", "%%")
        dest = (prefix + f.name).replace("-", "_")
        if isinstance(default, bool) or f.type == bool | None:  # None: unset, the command decides
            state = {True: "on", False: "off", None: "unset"}[default]
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{help_text} (default: {state})")
        elif "choices" in meta:
            group.add_argument(flag, dest=dest, choices=meta["choices"], default=default,
                               help=f"{help_text} (default: %(default)s)")
        elif isinstance(default, (int, float)):
            group.add_argument(flag, dest=dest, type=setting_type(type(default), meta), default=default,
                               help=f"{help_text} (default: %(default)s)")
        else:  # a text; '' stands for None
            group.add_argument(flag, dest=dest, default=default, help=f"{help_text} (default: %(default)r)",
                               type=setting_type(str, meta) if "check" in meta else None)


def from_flags(args, defaults, prefix: str = ""):
    """The settings dataclass that the flags of `add_flags(parser, defaults, prefix)` give: each
    field's flag where it was added, the value in `defaults` elsewhere; '' is None for a text."""
    values = {}
    for f in fields(defaults):
        dest = (prefix + f.name).replace("-", "_")
        if hasattr(args, dest):
            value = getattr(args, dest)
            values[f.name] = None if value == "" and not isinstance(getattr(defaults, f.name), bool) else value
    return replace(defaults, **values)


def flags_argv(values, prefix: str = "", skip=()) -> list[str]:
    """The flags that give the settings dataclass `values` back (the inverse of add_flags + from_flags)."""
    argv = []
    for f in fields(values):
        if f.name in skip:
            continue
        value, flag = getattr(values, f.name), "--" + prefix + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + prefix + f.name.replace("_", "-"))
        elif value is None and ("choices" in f.metadata or f.type == bool | None):
            continue  # None is the default of every setting with choices, and of every yes/no/unset one
        else:
            argv += [flag, "" if value is None else str(value)]
    return argv


def parse_iteration_rows(argv, doc: str, defaults, title: str, langs_help: str, out_help: str):
    """(args, options, translation task ids) of a command that turns one iteration folder into training rows
    (lidr.cli.pairs, lidr.cli.sdrrl): --dir, --langs, the rules' flags, --translation-task-ids, --out."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="iteration folder holding generate/ and translate/")
    parser.add_argument("--langs", required=True, help=langs_help)
    add_flags(parser, defaults, title=title)
    parser.add_argument("--translation-task-ids", help="JSONL with the ids of prompts that are translation requests")
    parser.add_argument("--out", help=out_help)
    args = parser.parse_args(argv)
    from lidr.harness.stage_files import read_translation_task_ids

    try:
        task_ids = read_translation_task_ids(args.translation_task_ids)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    return args, from_flags(args, defaults), task_ids


# -----------------------------------------------------------------------------
# the top of every command: the operating system's refusals and Ctrl-C as one sentence

WHAT_TO_DO = {
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is used up: free some space",
    errno.EROFS: "it is on a read-only filesystem: choose a writable place",
    errno.EACCES: "permission denied: choose a place you may write, or change its permissions",
    errno.EPERM: "operation not permitted: choose a place you may write, or change its permissions",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder, not a file: name a file",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "it exists already: choose another path",
}


def os_error_sentence(error: OSError, resume: str) -> str:
    """One line for an operating-system error: the path, what happened and what to do."""
    path = error.filename if error.filename is not None else "a file"
    if error.filename2 is not None:
        path = f"{path} -> {error.filename2}"
    what = WHAT_TO_DO.get(error.errno, error.strerror or str(error))
    if error.errno == errno.EEXIST and os.path.isfile(error.filename or ""):  # a folder was to be made there
        what = "it is a file where a folder is needed: choose another path"
    again = f"; then {resume}" if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{path}: {what}{again} ({error.strerror or type(error).__name__})"


class Terminated(BaseException):
    """SIGTERM (a scheduler's kill, torchrun stopping its workers), raised where the command was, so
    that what it holds (locks, the process group) is released on the way out."""


def on_sigterm(signum, frame):
    raise Terminated


def command(resume: str = "rerun the same command to resume"):
    """Decorate a command's `main`: an OSError (a read-only folder, a full disk, a parent path that
    is a file, a missing permission) ends in one line naming the path and what to do, Ctrl-C in one
    line and exit status 130, SIGTERM in one line and exit status 143, settings that do not go
    together (lidr.settings.SettingsError) in one line naming the flag; `resume` says what a rerun
    does (every lidr command writes its outputs resumably or atomically). A traceback is left for
    lidr's own bugs."""

    def wrap(main):
        @functools.wraps(main)
        def door(*args, **kwargs):
            main_thread = threading.current_thread() is threading.main_thread()  # where signals are handled
            previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
            try:
                return main(*args, **kwargs)
            except Terminated:
                print(f"stopped by SIGTERM; {resume}", file=sys.stderr)
                raise SystemExit(128 + signal.SIGTERM) from None
            except KeyboardInterrupt:
                print(f"interrupted (Ctrl-C); {resume}", file=sys.stderr)
                raise SystemExit(130) from None
            except SettingsError as e:
                raise SystemExit(f"{e.flag}: {e.problem}") from None
            except OSError as e:
                raise SystemExit(os_error_sentence(e, resume)) from None
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)

        return door

    return wrap


def require_extra(module: str, extra: str, what: str):
    """Stop in one line, before any work, when the optional package `module` (installed by lidr's extra
    `extra`, pyproject.toml) is missing: `what` says what needs it."""
    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"{what} needs {module}, which is not installed: pip install 'lidr[{extra}]' "
                         f"(in a clone: pip install -e '.[{extra}]')")
