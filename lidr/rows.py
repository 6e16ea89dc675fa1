"""Running the sampler over rows: resumable, data parallel, bound to what the output is made from.

    from lidr.rows import Prompt, sample_rows
    rows, generated = sample_rows([Prompt(key, ids, seed, source), ...], out, "id", make_row, load, decoding,
                                  made_by="generate.py", identity={...}, batch_size=16)

Every stage that samples runs through `sample_rows`: answering prompts (lidr/generation.py),
self-translation (lidr/translation.py) and the evaluations (eval/mgsm.py, eval/alpacaeval.py).
The caller gives each prompt a key, its token ids, a seed and whatever it needs back (`source`),
and `make_row(prompt, completion)` turns a finished completion into the output row (carrying the
key). Then, in one place:

- Bound to its inputs: OUT.made-from.json records what OUT is made from (the caller's identity:
  input files, model folder, settings). A rerun with other ones is refused, naming what changed,
  before anything is written, and so is an OUT that this command did not write (lidr/jsonl.py).
- One process per output: rank 0 holds OUT.lock while it runs (lidr.jsonl.hold_lock); a second
  command on the same OUT is refused in a sentence.
- Resumable: each rank appends finished rows to OUT.rank<r>.partial, flushed row by row; at the
  start and at the end rank 0 merges the partial files into OUT in input order (one atomic
  rename) and deletes them. A torn last line is dropped and redone; a key already in OUT is never
  generated again.
- Data parallel: under torchrun each rank takes every world-th remaining prompt, loads its own
  model (on its own GPU: `open_model`), and only barriers and small objects travel between ranks
  (gloo), on one node or several (lidr/cluster.py: the commands, the check that every node sees
  OUT and the same model, before anything is written; OUT's record is checked by rank 0 alone).
- One over-length policy: a prompt that fills the model's context cannot be answered (the caller
  leaves it out and counts it: `too_long_reason`); a reply ends where the context does, so a row
  gets at most context − its prompt's tokens new tokens (finish reason "length"), and a
  max_new_tokens past that is lowered, with a warning.
- A seed per prompt (answers: derived_seed(seed, the row's input line), lidr/settings.py's rule),
  so a row samples the same tokens alone or in any batch, on any rank, resumed or not.

`sample_file` is the case of generate.py and translate.py: one prompt per row of an input file
(JSONL or a JSON list), the output row the input row plus the stage's fields. Rows are keyed by
`id` (as text) when every row has a distinct one, else by their line (`input_line`); bad rows (not
JSON, not an object, no such field, an empty prompt, a prompt that fills the context) are reported
with their line numbers, skipped and counted, and an input with no usable row is refused.

How this departs from the paper's setup (vLLM): one model per process (data parallel), no tensor
parallelism.
"""

import dataclasses
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lidr import cluster, sampler
from lidr.checkpoint import check, default_dtype, folder_identity, load
from lidr.jsonl import (
    ResumableWriter, check_output, file_identity, hold_lock, lock_path, read_complete_lines, read_records,
    record_output, usable_records, write_text_atomic,
)
from lidr.sampler import Completion
from lidr.settings import SAMPLING_BATCH_SIZE, Decoding, derived_seed
from lidr.tokenizer import CHAT_FORMATS, Tokenizer

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Engine:
    """A checkpoint folder and how this process runs it: what every sampling stage takes beside its own settings."""

    model: str | os.PathLike  # HF checkpoint folder
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # "cuda": this rank's GPU under torchrun
    dtype: str | None = None  # one of DTYPES; None: bfloat16 on CUDA, float32 elsewhere
    chat_format: str | None = None  # "llama3" | "chatml"; None: read from the folder
    batch_size: int = SAMPLING_BATCH_SIZE  # prompts decoded together
    compile: bool = False  # torch.compile the sampler's decode step

    def __post_init__(self):  # refused when built, before any stage records an output made with it
        if self.dtype not in (None, *DTYPES):
            raise ValueError(f"Engine.dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.chat_format not in (None, *CHAT_FORMATS):
            raise ValueError(f"Engine.chat_format: {self.chat_format!r} is not one of {', '.join(CHAT_FORMATS)}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"Engine.batch_size: {self.batch_size!r} is not a whole number of at least 1")


# -----------------------------------------------------------------------------
# the model: loaded once per process, checked before anything is recorded


def open_model(folder, device: str, dtype: str | None = None, chat_format: str | None = None):
    """(model, tokenizer), the one way a command loads a checkpoint to sample or score with.

    device "cuda" is this process's GPU (torchrun's LOCAL_RANK); dtype None is bfloat16 on CUDA,
    float32 elsewhere. A folder that is not a usable checkpoint stops with the sentence naming it.
    """
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    torch_dtype = getattr(torch, dtype) if dtype else default_dtype(device)
    try:
        return load(folder, device=device, dtype=torch_dtype, chat_format=chat_format)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None


def check_model(folder, chat_format: str | None = None) -> tuple[Tokenizer, int]:
    """The tokenizer and the model's context length, once config, tokenizer and weight headers are
    checked (lidr.checkpoint.check), without reading the weights."""
    try:
        cfg, tokenizer = check(folder, chat_format=chat_format)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    return tokenizer, cfg.max_seq_len


# -----------------------------------------------------------------------------
# over-length input: one policy for every stage that samples


def too_long_reason(prompt_len: int, context: int) -> str | None:
    """Why a prompt cannot be answered within the context, or None when it can."""
    if prompt_len >= context:
        return f"the prompt is {prompt_len} tokens, the model's context {context}: no room for a reply"
    return None


def decoding_within_context(decoding: Decoding, prompt_lens: list[int], context: int) -> Decoding:
    """decoding with max_new_tokens lowered to the most any of these prompts has room for, with a warning."""
    room = context - min(prompt_lens, default=0)
    if decoding.max_new_tokens <= room:
        return decoding
    print(f"warning: --max-new-tokens {decoding.max_new_tokens} reaches past the model's context of {context} "
          f"tokens; each reply ends where the context does (at most {room} new tokens here)", file=sys.stderr)
    return dataclasses.replace(decoding, max_new_tokens=room)


def cut_at_context(completion: Completion, prompt_len: int, context: int, tokenizer) -> Completion:
    """The completion a generation bounded by the context gives: decoding is causal, so it is the
    first context − prompt_len tokens of the unbounded one (the end-of-turn token needs a place too)."""
    room = context - prompt_len
    if len(completion.tokens) < room or (len(completion.tokens) == room and completion.finish_reason != "stop_token"):
        return completion
    tokens = completion.tokens[:room]
    return Completion(tokens, tokenizer.decode(tokens), "length")


# -----------------------------------------------------------------------------
# partial files per rank, merged into OUT in input order


def partial_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".rank*.partial"))


def merge(out: Path, key: str, order: dict) -> list[dict]:
    """Fold every partial file into OUT (input order, each key once, atomically); OUT's rows in input order."""
    parts = partial_files(out)
    rows = {}
    for path in [out, *parts]:
        for row in read_complete_lines(path):
            if key not in row:
                raise SystemExit(f"{path}: a row has no {key!r}; was it written from another input file?")
            rows.setdefault(str(row[key]), row)
    merged = sorted(rows.values(), key=lambda row: order.get(str(row[key]), len(order)))
    if parts:
        write_text_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in merged))
        for path in parts:
            path.unlink()
            lock_path(path).unlink(missing_ok=True)  # a killed writer's: no writer is open while merging
    return merged


def check_outputs(made_by: str, bindings: list[tuple]):
    """Refuse, before anything is written, every (out, identity, companions) that this command may
    not write (lidr.jsonl.check_output; partial files count as OUT's): a command with several
    outputs checks them all before `sample_rows` writes the first."""
    for out, identity, companions in bindings:
        check_output(out, made_by, identity, companions=[*companions, *partial_files(Path(out))])


# -----------------------------------------------------------------------------
# the loop


@dataclass(frozen=True)
class Prompt:
    key: str  # the output row's key, as text (its id, or its line in the input)
    tokens: list[int]  # the prompt in the model's chat format
    seed: int  # the row's own sampling seed
    source: object = None  # what make_row needs back: the input row, the question


def sample_rows(prompts: list[Prompt], out, key: str, make_row, load, decoding: Decoding, *, made_by: str,
                identity: dict, batch_size: int, stop_strings=(), compile: bool = False,
                companions=()) -> tuple[list[dict], int]:
    """(OUT's rows in input order, how many were generated now) once every prompt has its row in OUT.

    prompts: in input order, each fitting the model's context (`too_long_reason`). make_row(prompt,
    completion) -> the output row, with the prompt's key under `key`; the completion is cut where
    the context ends. load() -> (model, tokenizer), called only when this rank has prompts to
    answer. decoding, stop_strings: how the sampler samples (the prompts already hold the system
    turn). made_by, identity: what OUT is made from (see the module docstring); companions: other
    files that belong to OUT. Under torchrun, rank 0 returns the rows and the others [].
    """
    rank, world = cluster.join()
    out = Path(out)
    locks = []

    def claim():  # rank 0: this command may write OUT, and holds OUT.lock (one process per output)
        check_outputs(made_by, [(out, identity, companions)])  # refused before anything, the lock included, is written
        locks.append(hold_lock(out, made_by))
        check_outputs(made_by, [(out, identity, companions)])  # again, now that no other process can write OUT

    cluster.on_rank0(claim)  # every rank refuses alike
    barrier = dist.barrier if world > 1 else (lambda: None)
    order = {prompt.key: i for i, prompt in enumerate(prompts)}
    if rank == 0:
        record_output(out, made_by, identity)
        merge(out, key, order)  # what an interrupted run left in partial files
    barrier()
    done = cluster.on_rank0(lambda: {str(row[key]) for row in read_complete_lines(out)} & set(order))
    todo = [prompt for prompt in prompts if prompt.key not in done][rank::world]

    if todo:
        model, tokenizer = load()
        context = model.cfg.max_seq_len
        decoding = decoding_within_context(decoding, [len(prompt.tokens) for prompt in todo], context)
        with ResumableWriter(out.with_name(f"{out.name}.rank{rank}.partial"), key) as writer:

            def write(i: int, completion: Completion):
                prompt = todo[i]
                writer.write(make_row(prompt, cut_at_context(completion, len(prompt.tokens), context, tokenizer)))

            sampler.generate(model, tokenizer, [prompt.tokens for prompt in todo], decoding, stop_strings,
                             batch_size=batch_size, progress=rank == 0, seeds=[prompt.seed for prompt in todo],
                             on_finish=write, compile=compile)
    barrier()
    rows = merge(out, key, order) if rank == 0 else []
    for lock in locks:
        lock.release()
    return rows, len(prompts) - len(done)


# -----------------------------------------------------------------------------
# the rows of an input file: one prompt each, the output row = the input row + fields


def read_prompts(path, field: str, out_field: str):
    """([(line, row)], [(line, reason)], key_name) for the rows that have a non-empty prompt in `field`.

    Rows are keyed by `id` (compared as text) when every row has a distinct one, otherwise by their
    line in the file (written as `input_line`).
    """
    try:
        records, bad = read_records(path)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    for meta_field in (out_field, out_field + "_meta"):
        clash = next((line for line, row in records if meta_field in row), None)
        if clash is not None:
            raise SystemExit(
                f"{path}:{clash}: the row already has a {meta_field!r} field (a gold answer?); "
                f"name another output field with --out-field"
            )
    rows = []
    for line, row in records:
        text = row.get(field)
        if not isinstance(text, str):
            bad.append((line, f"no string field {field!r}" + (f" (fields: {', '.join(row)})" if field not in row else "")))
        elif not text.strip():
            bad.append((line, f"empty {field!r}"))
        else:
            rows.append((line, row))
    usable_records(path, rows, bad, f"row with a prompt in {field!r}")
    ids = [row.get("id") for _, row in rows]
    key = "id" if None not in ids and len(set(map(str, ids))) == len(ids) else "input_line"
    return rows, sorted(bad), key


def sample_file(engine: Engine, path, out, field: str, out_field: str, encode, result_fields, settings: dict,
                decoding: Decoding, stop_strings, made_by: str) -> list[dict]:
    """Sample once for every row of the file at `path` that has a prompt in `field`; OUT's rows.

    encode(tokenizer, row) -> prompt ids; result_fields(completion) -> the fields added to the row
    ({out_field: ...}); `<out_field>_meta` records `settings`, the finish reason and the number of
    new tokens. Bad rows (not JSON, not an object, no such field, an empty prompt, a prompt that
    fills the model's context) are reported with their line numbers, skipped and counted; an input
    with no usable row is refused, before anything is recorded. A row samples with
    derived_seed(decoding.seed, its input line) (lidr/settings.py's seed rule); a reply ends at any
    of stop_strings.
    """
    rank, _ = cluster.join()
    cluster.check_shared(out, engine.model)  # under torchrun: every node sees OUT and the same model
    rows, bad, key = read_prompts(path, field, out_field)
    identity = {"inputs": {"prompts": file_identity(path)}, "model": folder_identity(engine.model),
                "settings": {**settings, "field": field, "out_field": out_field,
                             "chat_format": engine.chat_format, "dtype": engine.dtype}}
    tokenizer, context = check_model(engine.model, engine.chat_format)
    prompts, too_long = [], 0
    for line, row in rows:
        ids = encode(tokenizer, row)
        reason = too_long_reason(len(ids), context)
        if reason:
            bad.append((line, reason))
            too_long += 1
        else:
            prompts.append(Prompt(str(row["id"] if key == "id" else line), ids, derived_seed(decoding.seed, line),
                                  (line, row)))
    bad.sort()
    usable_records(path, prompts, bad, "prompt that fits the model's context")
    if rank == 0:
        for line, reason in bad[:20]:
            print(f"{path}:{line}: skipped: {reason}", file=sys.stderr)
        if len(bad) > 20:
            print(f"... and {len(bad) - 20} more bad rows", file=sys.stderr)

    def make_row(prompt: Prompt, completion: Completion) -> dict:
        line, row = prompt.source
        extra = {"input_line": line} if key == "input_line" else {}
        meta = {**settings, "finish_reason": completion.finish_reason, "new_tokens": len(completion.tokens)}
        return {**row, **extra, **result_fields(completion), out_field + "_meta": meta}

    def load():
        return open_model(engine.model, engine.device, engine.dtype, engine.chat_format)

    merged, generated = sample_rows(prompts, out, key, make_row, load, decoding, made_by=made_by, identity=identity,
                                    batch_size=engine.batch_size, stop_strings=stop_strings, compile=engine.compile)
    if rank == 0:
        finish_reasons = Counter(row.get(out_field + "_meta", {}).get("finish_reason") for row in merged)
        print(f"{out}: {len(merged)} rows ({generated} generated now, {len(prompts) - generated} already there), "
              f"{len(bad)} bad input rows skipped ({too_long} longer than the model's context of {context} "
              f"tokens); finish reasons: {dict(finish_reasons)}")
    return merged
