"""Sampled files: the sampler run over the rows of a file, resumable, data parallel, bound to its inputs.

    from lidr.harness.sampled import Engine, generate_file, translate_file
    engine = Engine("runs/M0")                     # the model is loaded once, on first use, and kept
    generate_file(engine, "prompts/fr.jsonl", "iter1/generate/fr.jsonl", settings.ANSWERS, lang="fr")
    translate_file(engine, "iter1/generate/en.jsonl", "iter1/translate/en-fr.jsonl", "fr")

`generate_file` and `translate_file` are the stages of lidr/generation.py and lidr/translation.py
over a file: what is asked and what is kept is theirs; everything else is here, in one place
(`SampledOutput`), also for the evaluations (eval/mgsm.py, eval/alpacaeval.py):

- Bound to its inputs: OUT.made-from.json records what OUT is made from (input files, model
  folder, settings). A rerun with other ones is refused, naming what changed, before anything is
  written, and so is an OUT that this command did not write (lidr/harness/outputs.py).
- One process per output: rank 0 holds OUT.lock while it runs; a second command is refused.
- Resumable: each rank appends finished rows to OUT.rank<r>.partial, flushed row by row; at the
  start and at the end rank 0 merges the partial files into OUT in input order (one atomic
  rename) and deletes them. A torn last line is dropped and redone; a key already in OUT is never
  generated again.
- Data parallel: under torchrun each rank takes every world-th remaining prompt, loads its own
  model (on its own GPU), and only barriers and small objects travel between ranks (gloo), on one
  node or several (lidr/harness/cluster.py).
- One over-length policy: a prompt that fills the model's context cannot be answered (left out
  and counted: `too_long_reason`); a reply ends where the context does (finish reason "length"),
  and a max_new_tokens past that is lowered, with a warning.
- A seed per row: derived_seed(seed, the language asked for, the row's input line) (lidr/settings.py),
  so a row samples the same tokens alone or in any batch, on any rank, resumed or not, and parallel
  files (line i in every language) sample with unrelated draws, not the same ones.

Rows of an input file (JSONL or a JSON list) are keyed by `id` (as text) when every row has a
distinct one, else by their line (`input_line`); bad rows (not JSON, not an object, no such field,
an empty prompt, a prompt that fills the context) are reported with their line numbers, skipped
and counted, and an input with no usable row is refused.
"""

import dataclasses
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from lidr import generation, sampler, settings, translation
from lidr.checkpoint import check, default_dtype, load
from lidr.harness import cluster
from lidr.harness.outputs import (
    ResumableWriter, check_output, file_identity, folder_identity, hold_lock, lock_path, numbered, read_complete_lines,
    read_records, record_output, usable_records, write_text_atomic,
)
from lidr.harness.progress import Progress
from lidr.sampler import Completion
from lidr.settings import DTYPES, SAMPLING_BATCH_SIZE, Decoding, derived_seed
from lidr.tokenizer import CHAT_FORMATS, Tokenizer

# the owner each sampling command names in its outputs' records (lidr/harness/outputs.py)
GENERATE, TRANSLATE = "lidr.cli.generate", "lidr.cli.translate"


@dataclass(frozen=True)
class Engine:
    """A checkpoint folder and how this process runs it: what every sampling stage takes beside its own
    settings. The model is loaded (`load`) and the folder fingerprinted (`identity`) once per Engine."""

    model: str | os.PathLike  # HF checkpoint folder
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # "cuda": this rank's GPU under torchrun
    dtype: str | None = None  # one of DTYPES; None: bfloat16 on CUDA, float32 elsewhere
    chat_format: str | None = None  # "llama3" | "chatml"; None: read from the folder
    batch_size: int = SAMPLING_BATCH_SIZE  # prompts decoded together
    compile: bool = False  # torch.compile the sampler's decode step
    kept: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # what `load` and `identity` keep

    def __post_init__(self):  # refused when built, before any stage records an output made with it
        if self.dtype not in (None, *DTYPES):
            raise ValueError(f"Engine.dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.chat_format not in (None, *CHAT_FORMATS):
            raise ValueError(f"Engine.chat_format: {self.chat_format!r} is not one of {', '.join(CHAT_FORMATS)}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"Engine.batch_size: {self.batch_size!r} is not a whole number of at least 1")

    def load(self):
        """(model, tokenizer), loaded on the first call and kept: every stage of an iteration that
        samples from M_t shares one model, its KV cache and its compiled step."""
        if "loaded" not in self.kept:
            self.kept["loaded"] = open_model(self.model, self.device, self.dtype, self.chat_format)
        return self.kept["loaded"]

    def checked(self) -> tuple[Tokenizer, int]:
        """(tokenizer, context length) once config, tokenizer and weight headers are checked, without
        reading the weights (or from the loaded model)."""
        if "loaded" in self.kept:
            model, tokenizer = self.kept["loaded"]
            return tokenizer, model.cfg.max_seq_len
        if "checked" not in self.kept:
            self.kept["checked"] = check_model(self.model, self.chat_format)
        return self.kept["checked"]

    def identity(self) -> dict:
        """The model folder's fingerprint (lidr.harness.outputs.folder_identity), taken once."""
        if "identity" not in self.kept:
            self.kept["identity"] = folder_identity(self.model)
        return self.kept["identity"]


def open_model(folder, device: str, dtype: str | None = None, chat_format: str | None = None):
    """(model, tokenizer), the one way a command loads a checkpoint to sample or score with.

    device "cuda" is this process's GPU (torchrun's LOCAL_RANK); dtype None is bfloat16 on CUDA,
    float32 elsewhere; device None (a command's --device unset) is Engine's default, cuda when there is one.
    A folder that is not a usable checkpoint stops with the sentence naming it.
    """
    device = device or Engine.device
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


def answer(engine: Engine, text: str, decoding: Decoding = settings.ANSWERS, stop_strings=(),
           lang: str | None = None) -> str:
    """The model's reply to one prompt (generate.py --prompt), bounded by the model's context."""
    model, tokenizer = engine.load()
    prompt, context = generation.prompt_ids(tokenizer, text, decoding, lang), model.cfg.max_seq_len
    reason = too_long_reason(len(prompt), context)
    if reason:
        raise SystemExit(f"--prompt: {reason}")
    decoding = decoding_within_context(decoding, [len(prompt)], context)
    completion = sampler.generate(model, tokenizer, [prompt], decoding, stop_strings, compile=engine.compile)[0]
    return cut_at_context(completion, len(prompt), context, tokenizer).text


# -----------------------------------------------------------------------------
# partial files per rank, merged into OUT in input order


def partial_files(out: Path) -> list[Path]:
    """OUT.rank<r>.partial, r a number: names compared as text (another output's OUT.rank0.x.partial is not OUT's)."""
    return [path for path, _ in numbered(out, ".rank", ".partial")]


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
            lock_path(path).unlink(missing_ok=True)  # an older lidr's partial-file lock
    return merged


def check_outputs(made_by: str, bindings: list[tuple]):
    """Refuse, before anything is written, every (out, identity, companions) that this command may
    not write (lidr.harness.outputs.check_output; partial files count as OUT's): a command with
    several outputs checks them all before the first `SampledOutput` writes."""
    for out, identity, companions in bindings:
        check_output(out, made_by, identity, companions=[*companions, *partial_files(Path(out))])


# -----------------------------------------------------------------------------
# one output of sampled rows


@dataclass(frozen=True)
class Prompt:
    key: str  # the output row's key, as text (its id, or its line in the input)
    tokens: list[int]  # the prompt in the model's chat format
    seed: int  # the row's own sampling seed
    source: object = None  # what the caller needs back to make the row: the input row, the question


class SampledOutput:
    """OUT while a command samples into it:

        with SampledOutput(out, "id", prompts, made_by, identity) as output:
            for prompt, completion in output.sample(model, tokenizer, decoding, stop_strings):
                output.write({...the row, with prompt.key under "id"...})
        output.rows    # OUT's rows in input order, on rank 0 ([] on the others)

    Entering it claims OUT (rank 0: checked, locked, recorded; an interrupted run's partial files
    merged) and sets `todo`, this rank's share of the prompts not yet in OUT; `sample` yields
    (prompt, completion) for each of them, the completion cut where the model's context ends (load
    the model only when `todo` is not empty); leaving it merges every rank's rows.
    """

    def __init__(self, out, key: str, prompts: list[Prompt], made_by: str, identity: dict, companions=()):
        self.out, self.key, self.prompts = Path(out), key, prompts
        self.made_by, self.identity, self.companions = made_by, identity, companions
        self.order = {prompt.key: i for i, prompt in enumerate(prompts)}
        self.rank, self.world = cluster.join()
        self.lock, self.writer, self.rows, self.todo, self.generated = None, None, [], [], 0

    def __enter__(self):
        def claim():  # rank 0: this command may write OUT, and holds OUT.lock (one process per output)
            binding = [(self.out, self.identity, self.companions)]
            check_outputs(self.made_by, binding)  # refused before anything, the lock included, is written
            self.lock = hold_lock(self.out, self.made_by)
            check_outputs(self.made_by, binding)  # again, now that no other process can write OUT

        cluster.on_rank0(claim)  # every rank refuses alike
        if self.rank == 0:
            record_output(self.out, self.made_by, self.identity)
            merge(self.out, self.key, self.order)  # what an interrupted run left in partial files
        self.barrier()
        done = cluster.on_rank0(lambda: {str(row[self.key]) for row in read_complete_lines(self.out)} & set(self.order))
        self.todo = [prompt for prompt in self.prompts if prompt.key not in done][self.rank :: self.world]
        self.generated = len(self.prompts) - len(done)
        return self

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def sample(self, model, tokenizer, decoding: Decoding, stop_strings=(), batch_size: int = SAMPLING_BATCH_SIZE,
               compile: bool = False):
        """(prompt, completion) for each of this rank's prompts not yet in OUT (`todo`), as rows finish."""
        if not self.todo:
            return
        context = model.cfg.max_seq_len
        decoding = decoding_within_context(decoding, [len(prompt.tokens) for prompt in self.todo], context)
        # rank 0 holds OUT.lock for the whole command: the partial file needs no lock of its own
        self.writer = ResumableWriter(self.out.with_name(f"{self.out.name}.rank{self.rank}.partial"), self.key,
                                      locked=False)
        bar, tokens, start = Progress(len(self.todo), "generate", enabled=self.rank == 0), 0, time.perf_counter()
        for i, completion in sampler.completions(model, tokenizer, [prompt.tokens for prompt in self.todo], decoding,
                                                 stop_strings, batch_size, [prompt.seed for prompt in self.todo],
                                                 compile):
            prompt = self.todo[i]
            yield prompt, cut_at_context(completion, len(prompt.tokens), context, tokenizer)
            tokens += len(completion.tokens) + 1  # counted once the caller has written the row
            bar.update(1, **{"tok/s": tokens / (time.perf_counter() - start)})
        bar.close()

    def write(self, row: dict):
        self.writer.write(row)

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()
        if exc[0] is None:
            self.barrier()
            self.rows = merge(self.out, self.key, self.order) if self.rank == 0 else []
        if self.lock is not None:
            self.lock.release()


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


class SampledFile:
    """One sampling stage over the rows of an input file into OUT (`generate_file`, `translate_file`):
    the rows read and checked, each given its prompt (`add`), then sampled through a `SampledOutput`."""

    def __init__(self, engine: Engine, path, out, field: str, out_field: str, settings: dict, made_by: str):
        self.rank, _ = cluster.join()
        cluster.check_shared(out, engine.model)  # under torchrun: every node sees OUT and the same model
        self.engine, self.path, self.out, self.out_field, self.settings = engine, path, out, out_field, settings
        self.made_by = made_by
        self.rows, self.bad, self.key = read_prompts(path, field, out_field)
        self.identity = {"inputs": {"prompts": file_identity(path)}, "model": engine.identity(),
                         "settings": {**settings, "field": field, "out_field": out_field,
                                      "chat_format": engine.chat_format, "dtype": engine.dtype}}
        self.tokenizer, self.context = engine.checked()
        self.prompts, self.too_long = [], 0

    def add(self, line: int, row: dict, tokens: list[int], seed: int):
        """The prompt of the row at `line`, or a bad row when it fills the model's context."""
        reason = too_long_reason(len(tokens), self.context)
        if reason:
            self.bad.append((line, reason))
            self.too_long += 1
        else:
            key = str(row["id"] if self.key == "id" else line)
            self.prompts.append(Prompt(key, tokens, seed, (line, row)))

    def output(self) -> SampledOutput:
        """OUT, once every row has its prompt: an input with no usable prompt is refused here."""
        self.bad.sort()
        usable_records(self.path, self.prompts, self.bad, "prompt that fits the model's context")
        if self.rank == 0:
            for line, reason in self.bad[:20]:
                print(f"{self.path}:{line}: skipped: {reason}", file=sys.stderr)
            if len(self.bad) > 20:
                print(f"... and {len(self.bad) - 20} more bad rows", file=sys.stderr)
        return SampledOutput(self.out, self.key, self.prompts, self.made_by, self.identity)

    def row(self, prompt: Prompt, completion: Completion, fields: dict) -> dict:
        """The output row: the input row, its line when rows are keyed by line, `fields` and the meta."""
        line, row = prompt.source
        extra = {"input_line": line} if self.key == "input_line" else {}
        meta = {**self.settings, "finish_reason": completion.finish_reason, "new_tokens": len(completion.tokens)}
        return {**row, **extra, **fields, self.out_field + "_meta": meta}

    def report(self, output: SampledOutput):
        if self.rank == 0:
            finish_reasons = Counter(row.get(self.out_field + "_meta", {}).get("finish_reason") for row in output.rows)
            print(f"{self.out}: {len(output.rows)} rows ({output.generated} generated now, "
                  f"{len(self.prompts) - output.generated} already there), {len(self.bad)} bad input rows skipped "
                  f"({self.too_long} longer than the model's context of {self.context} tokens); finish reasons: "
                  f"{dict(finish_reasons)}")


def generate_file(engine: Engine, prompts, out, decoding: Decoding = settings.ANSWERS, field: str = "instruction",
                  out_field: str = "response", stop_strings=(), lang: str | None = None) -> list[dict]:
    """lidr/generation.py over a file: the prompt in `field` of every row of `prompts` answered into
    OUT's `out_field`; OUT's rows. `<out_field>_meta` records the settings, the template's text and
    `lang`, so a later stage (lidr.pairs) rebuilds exactly the user turn that was asked."""
    settings.user_turn(decoding.prompt_template, "", lang)  # a template that needs a language refuses first
    run = {"model": str(Path(engine.model).resolve()), **dataclasses.asdict(decoding),
           "prompt_template": settings.template_text(decoding.prompt_template), "lang": lang, "stop": list(stop_strings)}
    job = SampledFile(engine, prompts, out, field, out_field, run, GENERATE)
    for line, row in job.rows:
        job.add(line, row, generation.prompt_ids(job.tokenizer, row[field], decoding, lang),
                derived_seed(decoding.seed, lang, line))
    with job.output() as output:
        model, tokenizer = engine.load() if output.todo else (None, None)
        for prompt, completion in output.sample(model, tokenizer, decoding, stop_strings, engine.batch_size,
                                                engine.compile):
            output.write(job.row(prompt, completion, {out_field: completion.text}))
    job.report(output)
    return output.rows


def translate_file(engine: Engine, source, out, to: str, decoding: Decoding = settings.TRANSLATION,
                   field: str = "response", out_field: str = "translation") -> list[dict]:
    """lidr/translation.py over a file: `field` of every row of `source` translated into language
    `to`, into OUT (`translation.fields`: the translation or null, why it failed, the reply); OUT's
    rows. Decoding stops at </translated>; a reply cut before it is a failed translation, counted."""
    if settings.template_text(decoding.prompt_template) != settings.PROMPT_TEMPLATES["plain"]:
        raise ValueError(f"translation asks in its own prompt; decoding.prompt_template {decoding.prompt_template!r} "
                         f"would be ignored: leave it 'plain'")
    run = {"model": str(Path(engine.model).resolve()), "to": to, "field": field, **dataclasses.asdict(decoding)}
    job = SampledFile(engine, source, out, field, out_field, run, TRANSLATE)
    for line, row in job.rows:
        job.add(line, row, translation.prompt_ids(job.tokenizer, row[field], to, decoding.system),
                derived_seed(decoding.seed, to, line))
    with job.output() as output:
        model, tokenizer = engine.load() if output.todo else (None, None)
        for prompt, completion in output.sample(model, tokenizer, decoding, (translation.CLOSING_TAG,),
                                                engine.batch_size, engine.compile):
            output.write(job.row(prompt, completion, translation.fields(completion, out_field)))
    job.report(output)
    if output.rows:
        errors = Counter(row[out_field + "_error"] for row in output.rows if row.get(out_field + "_error"))
        failed = sum(errors.values())
        print(f"{out}: {failed} failed translations" + (f" ({dict(errors)})" if failed else ""))
    return output.rows
