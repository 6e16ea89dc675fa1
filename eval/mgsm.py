"""MGSM (and the translated GSM8K test sets): accuracy of the last number, and the off-target rate.

    python -m eval.mgsm --model runs/M1 --out runs/eval/M1 \\
        --data ../shared/data/mgsm --langs en es ru de fr ja sw th zh bn te
    python -m eval.mgsm --model runs/M1 --out runs/eval/M1 --name gsm8k \\
        --data ../shared/data/gsm8k/test --langs en de es fr ru
    torchrun --standalone --nproc_per_node=8 -m eval.mgsm ...      # the questions shared among 8 ranks
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB \\
        -m eval.mgsm ...                                           # on each node; OUT shared (lidr/harness/cluster.py)

Every question is put to the model in the repository's MGSM prompt (--prompt-template alpaca, the
default: lidr/settings.py PROMPT_TEMPLATES; docs/method.md §1.8), inside the model's chat format,
after the system turn, and answered as the repository's MGSM script decodes: greedily, with the
repetition penalty 1.1, at most 2,048 new tokens (lidr/settings.py MGSM). The prediction is the
last number of the answer; it is right when it equals the reference number. The off-target rate
is the share of answers that language identification (lidr/languages.py) places in another language
than the one asked for.

Files: {out}/{name}/{lang}.jsonl holds one row per question (question, answer, prediction, right or
wrong, detected language), in the data's order; while generating, rows are appended to
{lang}.jsonl.rank0.partial and merged in at the end (lidr/harness/sampled.py), so a rerun skips the rows
already there.
{lang}.jsonl.made-from.json beside it records what it was made from (the data file's path, size
and sha256, the model folder, the prompt and decoding settings): a rerun with another --data,
--model or setting is refused before anything is written (--limit may grow: rows are keyed by
question). {out}/{name}/summary.json holds accuracy and off-target rate per language,
recomputed from every row at the end of each run and merged with the languages evaluated there
before (one job per language into one folder gives one summary; eval/common.py); eval/report.py
reads it. It too is owned: one this command did not write, or wrote for another model or
settings, is refused before any work.

Input: a folder of {lang}.jsonl files, rows {query, response} (MGSM) or {instruction, final_answer}
(translated GSM8K); a row missing them, or whose reference answer is not one number (`read_gold`:
integers, decimals, fractions and powers of ten are read exactly, never as their last number), is
dropped and counted; a file with no usable row is refused. A question too long for the model's
context is not answered and is counted ("too_long"); an answer ends where the context does
(lidr/harness/sampled.py's policy, every stage's).

Reading the last number (`extract_last_number`): digits of any script (Bengali ১২, Thai ๑๒,
Devanagari १२, full-width １２ — Unicode decimal digits; superscripts such as m² are not digits);
thousands separators "," "." and spaces (also no-break, narrow no-break and thin spaces, only
before a group of exactly three digits); decimal "," or "."; a leading minus ("-" or "−") when no
letter or digit stands before it; trailing units and punctuation are ignored. One separator
followed by exactly three digits, after a first group of one to three digits not starting with 0,
is a thousands separator ("1,000" and "1.000" are 1000, "0,125" and "2.50" are decimals): GSM
answers are almost always integers.

How this departs from the paper and its repository:
- The paper does not say how the last number is read, nor which language identifier gave its
  off-target rates: here the reading above and py3langid. Numbers written in words or in CJK
  numerals (十八) are not read.
- Off-target: an answer with too few letters to identify counts as on target; the count of such
  answers is reported beside the rate.
- The system turn is the LIDR repository's "You are a helpful assistant." (--system).
"""

import argparse
import math
import re
import unicodedata
from dataclasses import asdict
from pathlib import Path

from eval.common import check_langs, claim_summary, model_identity, write_summary
from lidr import settings
from lidr.harness import cluster
from lidr.cli import GREEDY_ONLY, add_engine_flags, add_flags, command, from_flags, positive_int, require_extra
from lidr.harness.outputs import file_identity, read_records
from lidr.languages import detect_language
from lidr.languages import checked_languages
from lidr.harness.sampled import Prompt, SampledOutput, check_outputs, open_model, too_long_reason
from lidr.settings import Decoding, derived_seed, template_text, user_turn
from lidr.tokenizer import chat_messages

MADE_BY = "eval.mgsm"
MERGED, AVERAGED = ("languages", "dropped", "too_long"), ("accuracy", "off_target")  # summary.json, by language

# -----------------------------------------------------------------------------
# reading the last number of an answer

SPACES = " \u00a0\u202f\u2009"  # space, no-break, narrow no-break, thin
ARABIC_DECIMAL, ARABIC_THOUSANDS = "\u066b", "\u066c"
NUMBER = re.compile(
    r"(?P<sign>(?<!\w)[-\u2212])?"
    r"(?P<body>\d+(?:(?:[.,\u066b\u066c]|[" + SPACES + r"](?=\d{3}(?!\d)))\d+)*)"
)


def to_ascii_digits(text: str) -> str:
    return "".join(str(unicodedata.decimal(ch)) if ch.isdecimal() else ch for ch in text)


def parse_number(body: str) -> float:
    """The value of one matched number body ("1,000.5", "১২", "3,5", "1 000")."""
    body = to_ascii_digits(body)
    for space in SPACES:
        body = body.replace(space, ARABIC_THOUSANDS)  # spaces only ever separate thousands
    groups = re.split(r"[^0-9]", body)
    seps = re.findall(r"[^0-9]", body)
    if not seps:
        return float(groups[0])
    last, rest = seps[-1], seps[:-1]
    if last == ARABIC_DECIMAL:
        decimal = True
    elif last == ARABIC_THOUSANDS:
        decimal = False
    elif rest:  # "1,000,000" (one kind: thousands) or "1,000.5" / "1.000,5" / "1 000,5" (the last is decimal)
        decimal = any(sep != last for sep in rest)
    else:
        thousands = len(groups[1]) == 3 and len(groups[0]) <= 3 and not groups[0].startswith("0")
        decimal = not thousands
    if decimal:
        return float("".join(groups[:-1]) + "." + groups[-1])
    return float("".join(groups))


def extract_last_number(text: str) -> float | None:
    """The last number written in `text`, or None when it has none."""
    matches = list(NUMBER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    value = parse_number(last.group("body"))
    return -value if last.group("sign") else value


FRACTION = re.compile(r"(?P<sign>[-\u2212])?(?P<num>\d+)\s*/\s*(?P<den>\d+)")
EXPONENT = re.compile(r"(?P<mantissa>[-\u2212]?\d+(?:\.\d+)?)\s*(?:[eE]|[x×*·]\s*10\s*(?:\^|\*\*))"
                      r"\s*(?P<exp>[-+]?\d+)")


def read_gold(value) -> float | None:
    """The exact value of a reference answer, or None when it is not one number: a JSON number, or
    a text that is wholly one number as `extract_last_number` reads numbers ("18", "1,000", "-3",
    "2.5"), a fraction ("1/2", "-3 / 4") or a power of ten ("1e3", "2.5×10^3"). Never the last number
    of a longer text: "1/2" is 0.5, not 2."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    text = to_ascii_digits(str(value)).strip()
    if (m := FRACTION.fullmatch(text)) and int(m["den"]):
        return (-1 if m["sign"] else 1) * int(m["num"]) / int(m["den"])
    if m := EXPONENT.fullmatch(text):
        return float(m["mantissa"].replace("\u2212", "-")) * 10.0 ** int(m["exp"])
    if (m := NUMBER.fullmatch(text)) and m.group("body"):
        value = parse_number(m.group("body"))
        return -value if m.group("sign") else value
    return None


def same_number(prediction: float | None, gold: float) -> bool:
    return prediction is not None and abs(prediction - gold) <= 1e-6 * max(1.0, abs(gold))


# -----------------------------------------------------------------------------
# data


def read_questions(path: Path) -> tuple[list[dict], list[str]]:
    """[{index, question, gold_text, gold}] from an MGSM or translated-GSM8K file, and the dropped rows' reasons."""
    try:
        rows, bad = read_records(path)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    questions, dropped = [], [(n, f"{path}:{n}: {reason}") for n, reason in bad]
    for n, row in rows:
        question = row.get("query", row.get("instruction"))
        gold_text = row.get("response", row.get("final_answer"))
        if not isinstance(question, str) or not question.strip():
            dropped.append((n, f"{path}:{n}: no question (field 'query' or 'instruction')"))
            continue
        gold = read_gold(gold_text)
        if gold is None:
            dropped.append((n, f"{path}:{n}: no reference number: field 'response' or 'final_answer' is not one "
                               f"number ({gold_text!r})"))
            continue
        questions.append({"index": n, "question": question, "gold_text": str(gold_text), "gold": gold})
    return questions, [reason for _, reason in sorted(dropped)]


# -----------------------------------------------------------------------------
# scoring


def score_answer(answer: str, gold: float, lang: str) -> dict:
    prediction = extract_last_number(answer)
    detected, _ = detect_language(answer)
    return {
        "prediction": prediction,
        "correct": same_number(prediction, gold),
        "detected_lang": detected,
        "off_target": detected is not None and detected != lang,
    }


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    return {
        "n": n,
        "accuracy": sum(r["correct"] for r in rows) / n if n else None,
        "off_target": sum(r["off_target"] for r in rows) / n if n else None,
        "undetermined_lang": sum(r["detected_lang"] is None for r in rows),
        "no_number": sum(r["prediction"] is None for r in rows),
        "truncated": sum(r["finish_reason"] == "length" for r in rows),
    }


def run(model, tokenizer, data: Path, langs: list[str], out: Path, decoding: Decoding, batch_size: int,
        system: str | None, limit: int | None = None, template: str = settings.MGSM.prompt_template,
        model_identity: dict | None = None) -> dict:
    """Generate what is missing, score every row, and merge it into {out}/summary.json; returns the summary
    (every language evaluated into `out` so far, this run's as it scored them now).

    decoding: the sampler's settings (its `system` and `prompt_template` are not read: the system
    turn is `system`, the user turn `template`). template: a name or a text with {instruction} and
    optionally {language} (lidr.settings.user_turn; default: the repository's "alpaca" prompt).
    model_identity: what the model under test is (eval.common.model_identity), recorded with each
    output; None where the caller keeps one folder per model (the demo).
    """
    try:
        checked_languages(langs)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    summary = {"benchmark": out.name, "data": str(data), "languages": {}, "dropped": {}, "too_long": {}}
    read = {}
    for lang in langs:
        path = data / f"{lang}.jsonl"
        questions, dropped = read_questions(path)
        if not questions:
            first = f"; first dropped: {dropped[0]}" if dropped else ""
            raise SystemExit(f"{path}: holds no usable question{first}")
        read[lang] = questions, dropped
    sampling = {name: value for name, value in asdict(decoding).items() if name not in ("system", "prompt_template")}
    settings = {"system": system, "template": template_text(template), "sampling": sampling}
    identities = {lang: {"inputs": {"data": file_identity(data / f"{lang}.jsonl")}, "model": model_identity,
                         "settings": settings} for lang in langs}
    summary_identity = {"model": model_identity, "settings": settings}  # every language's, merged into one summary

    def claim():  # rank 0, before any work: the outputs and the summary this run may write
        check_outputs(MADE_BY, [(out / f"{lang}.jsonl", identities[lang], ()) for lang in langs])
        claim_summary(out / "summary.json", MADE_BY, summary_identity, MERGED)

    cluster.on_rank0(claim)
    context = model.cfg.max_seq_len
    for lang in langs:
        questions, dropped = read[lang]
        summary["dropped"][lang] = len(dropped)  # 0 too: the merge keeps another run's count only for its languages
        if dropped:
            print(f"{lang}: dropped {len(dropped)} row(s), first: {dropped[0]}")
        questions = questions[:limit] if limit else questions
        prompts, too_long = [], []
        for q in questions:
            user = user_turn(template, q["question"], lang)
            ids = tokenizer.encode_chat(chat_messages(user, system))
            if too_long_reason(len(ids), context):
                too_long.append(q["index"])
            else:
                prompts.append(Prompt(str(q["index"]), ids, derived_seed(decoding.seed, lang, q["index"]), q))

        with SampledOutput(out / f"{lang}.jsonl", "index", prompts, MADE_BY, identities[lang]) as output:
            for prompt, completion in output.sample(model, tokenizer, decoding, batch_size=batch_size):
                q, answer = prompt.source, completion.text.strip()
                output.write({"index": q["index"], "lang": lang, "question": q["question"], "gold": q["gold_text"],
                              "answer": answer, "finish_reason": completion.finish_reason,
                              "n_tokens": len(completion.tokens), **score_answer(answer, q["gold"], lang)})
        rows, generated = output.rows, output.generated
        wanted = {q["index"] for q in questions}
        rows = [r for r in rows if r["index"] in wanted]
        summary["languages"][lang] = summarize(rows)
        summary["too_long"][lang] = len(too_long)
        s = summary["languages"][lang]
        if too_long:
            print(f"{lang}: {len(too_long)} question(s) too long for the model's context, not answered; "
                  f"first: {data / f'{lang}.jsonl'}:{too_long[0]}")
        if s["n"]:
            print(f"{out.name} {lang}: accuracy {s['accuracy']:.3f}  off-target {s['off_target']:.3f}  "
                  f"(n={s['n']}, {generated} generated now)")
    if cluster.rank_and_world()[0] == 0:  # the other ranks of a torchrun launch hold no rows
        summary = write_summary(out / "summary.json", MADE_BY, summary_identity, summary, MERGED, AVERAGED)
    return summary


@command()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_flags(parser, batch_size=settings.EVAL_BATCH_SIZE,
                     model_help="HF checkpoint folder of the model under test")
    add_flags(parser, settings.MGSM, skip=GREEDY_ONLY, title="decoding (greedy; defaults: the paper's, lidr/settings.py MGSM)")
    parser.add_argument("--data", required=True, help="folder of {lang}.jsonl question files")
    parser.add_argument("--langs", nargs="+", required=True, help="language codes to evaluate, e.g. en es ru de fr")
    parser.add_argument("--out", required=True, help="the model's results folder; writes {out}/{name}/")
    parser.add_argument("--name", default="mgsm",
                        help="benchmark name and subfolder (default: %(default)s; gsm8k for GSM8K)")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N questions per language")
    args = parser.parse_args(argv)
    require_extra("py3langid", "langid", "eval.mgsm's off-target rate")

    check_langs(parser, args.langs)
    for lang in args.langs:
        if not (Path(args.data) / f"{lang}.jsonl").is_file():
            parser.error(f"{Path(args.data) / f'{lang}.jsonl'}: no such file")
    decoding = from_flags(args, settings.MGSM)
    cluster.check_shared(Path(args.out) / args.name, args.model)  # under torchrun: every node sees OUT and the model
    identity = model_identity(args.model, args.dtype, args.chat_format)
    model, tokenizer = open_model(args.model, args.device, args.dtype, args.chat_format)
    run(model, tokenizer, Path(args.data), args.langs, Path(args.out) / args.name, decoding,
        args.batch_size, decoding.system, args.limit, decoding.prompt_template, model_identity=identity)


if __name__ == "__main__":
    main()
