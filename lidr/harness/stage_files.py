"""One iteration folder's stage files in, pairs.jsonl or sdrrl.jsonl (with a report) out.

    pairs, report = pairs_from_dir("runs/lidr/iter1", ["es", "ru"], PairOptions())
    write_pairs(pairs, report, folder / "pairs.jsonl", folder / "pairs_report.json")

Reads generate/{lang}.jsonl ({id, instruction, response}), translate/{en}-{l}.jsonl and
translate/{l}-{en}.jsonl ({id, translation, translation_error}), and with an SDRRL reference field
translate/{en}-{l}.reference.jsonl; hands the texts to lidr.pairs.build_pairs or
lidr.sdrrl.build_sdrrl_rows. Ids are compared as text (3 and "3" are one id); an empty or
whitespace-only answer or translation is none; a bad row, a row without an id or an id written
twice is an error naming the file and line. The report records each input's path, size and sha256.
An existing output is written over only when the same command (PAIRS, SDRRL) made it from the same
inputs and options (OUT.made-from.json); another command's file, a file of unknown origin or other
inputs are refused, naming the file and what changed. A translation whose record says it was made
from other answers than the generate/ file holds now is refused (`check_translated_from`).
"""

import json
from pathlib import Path

from lidr.harness.outputs import (
    RECORD_SUFFIX, check_output, file_identity, hold_lock, read_records, record_output, record_path,
    write_json_atomic, write_text_atomic,
)
from lidr.languages import checked_languages
from lidr.pairs import PairOptions, build_pairs
from lidr.sdrrl import SDRRLOptions, build_sdrrl_rows, reference_translation_file
from lidr.settings import user_turn
from lidr.translation import REFERENCE_FAILURE_MARKER

# the owners written into the outputs' records: the module each command runs as
PAIRS = "lidr.cli.pairs"
SDRRL = "lidr.cli.sdrrl"


def text_or_none(value) -> str | None:
    """A usable text, or None: not a string, empty, or only whitespace."""
    return value if isinstance(value, str) and value.strip() else None


def stage_rows(path: Path) -> list[tuple[int, dict, str]]:
    """[(line, row, id as text)] of a stage output; a bad row, a row without an id or an id written
    twice is an error naming the file and line."""
    rows, bad = read_records(path)
    if bad:
        raise ValueError(f"{path}:{bad[0][0]}: {bad[0][1]}")
    seen, out = {}, []
    for line, row in rows:
        if "id" not in row:
            raise ValueError(f"{path}:{line}: row has no 'id'")
        key = str(row["id"])
        if key in seen:
            raise ValueError(f"{path}:{line}: id {key!r} again (first on line {seen[key]})")
        seen[key] = line
        out.append((line, row, key))
    return out


def read_texts(path: Path, field: str) -> dict:
    """id (as text) -> text from a stage output, None where the field is missing, empty or whitespace."""
    return {key: text_or_none(row.get(field)) for _, row, key in stage_rows(path)}


def read_user_turns(path: Path, lang: str, field: str = "instruction", out_field: str = "response") -> dict:
    """id (as text) -> the user turn M_t was asked, None where the prompt is missing or empty: the prompt in
    the template generate.py recorded in `<out_field>_meta` (lidr.settings.user_turn, `lang` filling its
    {language}; a row without one was asked as it is)."""
    turns = {}
    for line, row, key in stage_rows(path):
        text, meta = text_or_none(row.get(field)), row.get(out_field + "_meta")
        template = meta.get("prompt_template", "plain") if isinstance(meta, dict) else "plain"
        try:
            turns[key] = user_turn(template, text, lang) if text else None
        except ValueError as e:
            raise ValueError(f"{path}:{line}: {e}") from None
    return turns


def read_translations(path: Path) -> dict:
    """id (as text) -> translation, None where it failed (lidr's translation_error, the reference's
    marker, or an empty or whitespace-only text)."""
    out = {}
    for line, row, key in stage_rows(path):
        if "translation" not in row:
            raise ValueError(f"{path}:{line}: row needs 'id' and 'translation'")
        text = text_or_none(row["translation"])
        failed = row.get("translation_error") or text is None or text == REFERENCE_FAILURE_MARKER
        out[key] = None if failed else text
    return out


def read_translation_task_ids(path) -> set:
    """The ids (as text) of the prompts that are translation requests; a row without an id is an error."""
    if path is None:
        return set()
    rows, bad = read_records(path)
    if bad:
        raise ValueError(f"{path}:{bad[0][0]}: {bad[0][1]}")
    missing = next((line for line, row in rows if "id" not in row), None)
    if missing is not None:
        raise ValueError(f"{path}:{missing}: row has no 'id'")
    return {str(row["id"]) for _, row in rows}


def translated_from(translation: Path) -> tuple[str, str, str] | None:
    """(the answers file's name, its sha256, the field) that a translation's made-from record (lidr.cli.translate's)
    says it translated; None for a translation without a record (a file of the user's: nothing to check)."""
    record = record_path(translation)
    if not record.exists():
        return None
    try:
        made_from = json.loads(record.read_text(encoding="utf-8"))["identity"]
        source = made_from["inputs"]["prompts"]
        return Path(source["path"]).name, source["sha256"], made_from["settings"]["field"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise SystemExit(f"{record}: not a record of what {translation} was made from; move both away") from None


def check_translated_from(translation: Path, source: Path, source_identity: dict, field: str):
    """Refuse, in one sentence, a translation that its record says translated another text than `field`
    of `source` (file_identity `source_identity`) as it is now: the answers were made again after they
    were translated, and a pair would join a new answer to an old one's translation."""
    made = translated_from(translation)
    if made is None:
        return
    redo = (f"translate it again (delete {translation} and {record_path(translation).name}, or rerun iterate.py "
            f"with --redo-from translate)")
    if made[2] != field:
        raise SystemExit(f"{translation}: translates the field {made[2]!r} of {source}, not {field!r}; {redo}")
    if made[1] != source_identity["sha256"]:
        raise SystemExit(f"{translation}: was translated from another version of {source} (sha256 {made[1][:12]}, "
                         f"now {source_identity['sha256'][:12]}): the answers were made again since; {redo}")


def stale_translations(folder: Path) -> list[str]:
    """What changed under the iteration folder's translations: one line for each translate/ output whose
    record names a generate/ file that holds other answers now (lidr.harness.stages.plan redoes or refuses)."""
    changes, place = [], Path(folder) / "translate"
    records = sorted(p for p in place.iterdir() if p.name.endswith(RECORD_SUFFIX)) if place.is_dir() else []
    for record in records:
        translation = record.with_name(record.name.removesuffix(RECORD_SUFFIX))
        name, sha256, _ = translated_from(translation)
        source = Path(folder) / "generate" / name
        if source.is_file() and file_identity(source)["sha256"] != sha256:
            changes.append(f"translate/{translation.name}: translated another version of generate/{name}")
    return changes


def stage_files(folder: Path, langs, en: str) -> dict:
    """name -> path of every stage output the pairs are built from."""
    files = {f"generate/{lang}": folder / "generate" / f"{lang}.jsonl" for lang in (en, *langs)}
    for lang in langs:
        files[f"translate/{en}-{lang}"] = folder / "translate" / f"{en}-{lang}.jsonl"
        files[f"translate/{lang}-{en}"] = folder / "translate" / f"{lang}-{en}.jsonl"
    return files


def pairs_from_dir(folder, langs, options=PairOptions(), translation_task_ids=frozenset(), field="response",
                   prompt_field="instruction"):
    """(pairs, report) of lidr.pairs.build_pairs from an iteration folder's generate/ and translate/ outputs."""
    folder = Path(folder)
    en = options.dominant
    langs = checked_languages(langs, dominant=en)
    files = stage_files(folder, langs, en)
    identities = {name: file_identity(path) for name, path in files.items()}  # before reading: a missing one is named
    for lang in langs:  # each translation made from the answers as they are now
        check_translated_from(files[f"translate/{en}-{lang}"], files[f"generate/{en}"], identities[f"generate/{en}"],
                              field)
        check_translated_from(files[f"translate/{lang}-{en}"], files[f"generate/{lang}"],
                              identities[f"generate/{lang}"], field)
    prompts = {lang: {k: v for k, v in read_user_turns(files[f"generate/{lang}"], lang, prompt_field, field).items()
                      if v} for lang in (en, *langs)}
    answers = {lang: {k: v for k, v in read_texts(files[f"generate/{lang}"], field).items() if v}
               for lang in (en, *langs)}
    en_to = {lang: read_translations(files[f"translate/{en}-{lang}"]) for lang in langs}
    to_en = {lang: read_translations(files[f"translate/{lang}-{en}"]) for lang in langs}
    pairs, report = build_pairs(prompts, answers, en_to, to_en, {str(i) for i in translation_task_ids}, langs, options)
    report["made_from"]["inputs"] = identities
    return pairs, report


def sdrrl_from_dir(folder, langs, options=SDRRLOptions(), translation_task_ids=frozenset(), field="response",
                   prompt_field="instruction"):
    """(rows, report) of lidr.sdrrl.build_sdrrl_rows from an iteration folder's generate/ and translate/ outputs
    (translate/{en}-{l}.reference.jsonl too when options.reference_field is set)."""
    folder = Path(folder)
    en = options.dominant
    langs = checked_languages(langs, dominant=en)
    files = {f"generate/{lang}": folder / "generate" / f"{lang}.jsonl" for lang in (en, *langs)}
    files.update({f"translate/{en}-{lang}": folder / "translate" / f"{en}-{lang}.jsonl" for lang in langs})
    if options.reference_field:
        files.update({f"translate/{en}-{lang}.reference": reference_translation_file(folder, en, lang)
                      for lang in langs})
    identities = {name: file_identity(path) for name, path in files.items()}
    for lang in langs:  # each translation made from the answers as they are now
        check_translated_from(files[f"translate/{en}-{lang}"], files[f"generate/{en}"], identities[f"generate/{en}"],
                              field)
        if options.reference_field:
            check_translated_from(files[f"translate/{en}-{lang}.reference"], files[f"generate/{en}"],
                                  identities[f"generate/{en}"], options.reference_field)
    prompts = {lang: {k: v for k, v in read_user_turns(files[f"generate/{lang}"], lang, prompt_field, field).items()
                      if v} for lang in (en, *langs)}
    answers = {en: {k: v for k, v in read_texts(files[f"generate/{en}"], field).items() if v}}
    en_to = {lang: read_translations(files[f"translate/{en}-{lang}"]) for lang in langs}
    references_to = ({lang: read_translations(files[f"translate/{en}-{lang}.reference"]) for lang in langs}
                     if options.reference_field else None)
    rows, report = build_sdrrl_rows(prompts, answers, en_to, langs, options,
                                    {str(i) for i in translation_task_ids}, references_to)
    report["made_from"]["inputs"] = identities
    return rows, report


def write_rows_and_report(rows, report, out_jsonl, out_report, made_by: str):
    """Write the rows and their report, over an earlier output only when `made_by` made it from the
    same inputs and options (report["made_from"]); refuse, naming the file, otherwise."""
    with hold_lock(out_jsonl, made_by):  # one process per output
        check_output(out_jsonl, made_by, report["made_from"], companions=[out_report])
        record_output(out_jsonl, made_by, report["made_from"])
        write_text_atomic(out_jsonl, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        write_json_atomic(out_report, report)


def write_pairs(pairs, report, out_jsonl, out_report):
    """The pairs and their report (python -m lidr.cli.pairs' output)."""
    write_rows_and_report(pairs, report, out_jsonl, out_report, PAIRS)


def write_rows(rows, report, out):
    """The SDRRL rows and their report (beside `out`), over an earlier output only when lidr.cli.sdrrl
    made it from the same inputs and options; refuse, naming the file, otherwise."""
    write_rows_and_report(rows, report, out, out.with_name(out.stem + "_report.json"), SDRRL)
