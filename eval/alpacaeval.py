"""X-AlpacaEval: the 805 AlpacaEval instructions per language, judged against gpt-4-turbo's outputs.

    # 1. the model's outputs (greedy, repetition penalty 1.1, 2,048 new tokens, as the paper)
    python -m eval.alpacaeval generate --model runs/M1 --out runs/eval/M1 \\
        --prompts ../shared/data/x-alpacaeval/prompts --langs en es ru de fr
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB \\
        -m eval.alpacaeval generate ...       # on each node (or --standalone on one); OUT shared (lidr/harness/cluster.py)
    # 2. pairwise judgements against the reference outputs, with an API judge ...
    OPENAI_API_KEY=... python -m eval.alpacaeval judge --out runs/eval/M1 --langs en es ru de fr \\
        --reference ../shared/data/x-alpacaeval/reference-gpt-4-turbo-2024-04-09 \\
        --judge http --judge-model gpt-4-1106-preview
    # ... or any local checkpoint as the judge, both orders of every pair
    python -m eval.alpacaeval judge ... --judge local --judge-model models/Llama-3.1-70B-Instruct --both-orders

Files, in the model's results folder {out}/x-alpacaeval/:
- outputs/{lang}.jsonl: one row per instruction, appended as generated (a rerun resumes);
  outputs/{lang}.json: alpaca_eval's model_outputs.json ({generator, dataset, id, instruction,
  output}), written once a language is complete; outputs/summary.json: the outputs' off-target
  rate and how many hit the token limit, per language.
- judge-{judge}[-both]/{lang}.jsonl: one row per instruction {key (the id), preference = P(the
  model's output beats the reference), orders (the judge's raw P(M better) per order)}, appended
  as judged; judge-.../summary.json: win rate = 100 × mean preference ± standard error per
  language (eval/report.py reads it), and beside it the length-controlled win rate.
- judge-.../{lang}.annotations.json: the verdicts in alpaca_eval's annotations.json format
  ({instruction, output_1: the reference, generator_1, output_2: the model's, generator_2,
  annotator, preference = 1 + P(output_2 is better), index: the instruction's position in the
  reference file, alpaca_eval's order of its 805 instructions}), items without a verdict left out.
  The length-controlled (LC) win rate is alpaca_eval's own (`get_length_controlled_winrate`, its
  length_controlled_v1 GLM, not re-implemented here) on that list, when alpaca_eval is installed
  (`pip install 'lidr[alpacaeval]'`) and can read the data its GLM needs (df_gamed.csv, from the
  Hugging Face Hub); else the summary says why it is missing.
- beside every {lang}.jsonl, {lang}.jsonl.made-from.json: what it was made from (input files by
  resolved path, size and sha256; the model folder or the judge; the settings). A rerun with
  another input, model, judge or setting is refused before anything is written, and so is an
  output folder holding files this command did not write. Each summary.json is owned too
  (summary.json.made-from.json: the model or judge, the settings) and merged by language: one job
  per language into one folder gives one summary of every language (eval/common.py).

Inputs: prompts/{lang}.json, a JSON list of {id, instruction[, dataset]}; reference/{lang}.json and
the outputs to judge are model_outputs.json lists. Items are matched by id (as text) when both
files give every row one, else by instruction text as alpaca_eval does (the English reference
file has no ids). A row that lacks a field, an item without a reference or output, and an id whose
instruction differs between the two files are dropped and counted; a file with no usable row is
refused. An instruction too long for the model's context is not answered and is counted
("too_long"); an output ends where the context does (lidr/harness/sampled.py's policy, every stage's). Items the judge gives
no verdict on are left out of n and counted ("no_verdict"); a tie counts half in the hard win rate.

How this departs from the paper: the judge's prompt, settings and scoring are alpaca_eval's
weighted annotator, the paper's (eval/judge.py); the pair order is a fixed hash of the id instead
of a random draw (or both orders, --both-orders), and a local checkpoint can judge. The system turn is the LIDR repository's "You are a helpful assistant." (--system).
"""

import argparse
import importlib.util
from dataclasses import asdict
from pathlib import Path

from lidr import settings
from lidr.harness import cluster
from lidr.cli import GREEDY_ONLY, add_engine_flags, add_flags, command, from_flags, positive_int, require_extra
from eval.common import claim_summary, write_summary
from lidr.harness.outputs import ResumableWriter, bind_outputs, file_identity, read_records, write_json_atomic
from lidr.languages import detect_language
from lidr.harness.sampled import Prompt, SampledOutput, check_outputs, open_model, too_long_reason
from lidr.settings import Decoding, derived_seed
from lidr.tokenizer import chat_messages

BENCHMARK = "x-alpacaeval"
GENERATE = "eval.alpacaeval generate"
JUDGE = "eval.alpacaeval judge"


def read_items(path: Path, fields: tuple[str, ...], key: str = "id") -> tuple[dict, list[str]]:
    """{row[key] as stripped text: row} from an alpaca_eval-style JSON list, and why rows were dropped."""
    try:
        rows, bad = read_records(path)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    items, dropped = {}, [(n, f"{path}:{n}: {reason}") for n, reason in bad]
    for n, row in rows:
        missing = [f for f in (key, *fields)
                   if not isinstance(row.get(f), (str, int)) or isinstance(row.get(f), bool) or not str(row[f]).strip()]
        if missing:
            dropped.append((n, f"{path}:{n}: missing or empty field(s) {', '.join(missing)}"))
        elif str(row[key]).strip() in items:
            dropped.append((n, f"{path}:{n}: duplicate {key} {str(row[key])[:80]!r}"))
        else:
            items[str(row[key]).strip()] = row
    if not items:
        first = f"; first dropped: {sorted(dropped)[0][1]}" if dropped else ""
        raise SystemExit(f"{path}: holds no usable row{first}")
    return items, [reason for _, reason in sorted(dropped)]


def every_row_has_an_id(path: Path) -> bool:
    rows, _ = read_records(path)
    return all("id" in row for _, row in rows)


def report_dropped(lang: str, what: str, dropped: list[str]):
    if dropped:
        print(f"{lang}: dropped {len(dropped)} {what} row(s); first: {dropped[0]}")


# -----------------------------------------------------------------------------
# generation


def generate_outputs(model, tokenizer, prompts_dir: Path, langs: list[str], out: Path, decoding: Decoding,
                     batch_size: int, system: str | None, generator: str, limit: int | None = None,
                     model_identity: dict | None = None) -> dict:
    """decoding: the sampler's settings (its `system` is not read: the system turn is `system`).
    model_identity: what the model is (eval.common.model_identity), recorded with each output."""
    summary = {"benchmark": BENCHMARK + "-outputs", "generator": generator, "languages": {}}
    read = {lang: read_items(prompts_dir / f"{lang}.json", ("instruction",)) for lang in langs}
    sampling = {name: value for name, value in asdict(decoding).items() if name != "system"}  # the turn: `system`
    settings = {"system": system, "generator": generator, "sampling": sampling}
    identities = {lang: {"inputs": {"prompts": file_identity(prompts_dir / f"{lang}.json")}, "model": model_identity,
                         "settings": settings} for lang in langs}
    summary_identity = {"model": model_identity, "settings": settings}  # every language's, merged into one summary

    def claim():  # rank 0, before any work: the outputs and the summary this run may write
        check_outputs(GENERATE, [(out / f"{lang}.jsonl", identities[lang], [out / f"{lang}.json"]) for lang in langs])
        claim_summary(out / "summary.json", GENERATE, summary_identity)

    cluster.on_rank0(claim)
    rank, _ = cluster.rank_and_world()
    context = model.cfg.max_seq_len
    for lang in langs:
        prompts, dropped = read[lang]
        report_dropped(lang, "prompt", dropped)
        chosen = list(prompts.values())[:limit] if limit else list(prompts.values())
        to_answer, too_long = [], []
        for i, p in enumerate(chosen):
            ids = tokenizer.encode_chat(chat_messages(p["instruction"], system))
            if too_long_reason(len(ids), context):
                too_long.append(str(p["id"]))
            else:
                to_answer.append(Prompt(str(p["id"]), ids, derived_seed(decoding.seed, lang, i), p))

        with SampledOutput(out / f"{lang}.jsonl", "id", to_answer, GENERATE, identities[lang],
                           companions=[out / f"{lang}.json"]) as output:
            for prompt, completion in output.sample(model, tokenizer, decoding, batch_size=batch_size):
                p = prompt.source
                output.write({"id": prompt.key, "dataset": p.get("dataset", ""), "instruction": p["instruction"],
                              "output": completion.text.strip(), "finish_reason": completion.finish_reason,
                              "n_tokens": len(completion.tokens)})
        written, generated = output.rows, output.generated
        if rank != 0:  # the other ranks of a torchrun launch hold no rows
            continue
        by_id = {str(row["id"]): row for row in written}
        rows = [by_id[str(p["id"])] for p in chosen if str(p["id"]) in by_id]
        write_json_atomic(out / f"{lang}.json", [
            {"generator": generator, "dataset": r["dataset"], "id": r["id"], "instruction": r["instruction"],
             "output": r["output"]} for r in rows])
        detected = [detect_language(r["output"])[0] for r in rows]
        summary["languages"][lang] = {
            "n": len(rows),
            "off_target": sum(d is not None and d != lang for d in detected) / len(rows) if rows else None,
            "undetermined_lang": sum(d is None for d in detected),
            "truncated": sum(r["finish_reason"] == "length" for r in rows),
            "dropped_prompts": len(dropped),
            "too_long": len(too_long),
        }
        print(f"{lang}: {len(rows)} outputs ({generated} generated now, {len(too_long)} instructions too long for "
              f"the model's context) -> {out / f'{lang}.json'}")
    if rank == 0:
        summary = write_summary(out / "summary.json", GENERATE, summary_identity, summary)
    return summary


# -----------------------------------------------------------------------------
# judging


def build_pairs(outputs_path: Path, reference_path: Path, lang: str) -> tuple[list[dict], dict]:
    """Pairs {key, instruction, first: the model's output, second: the reference}, and drop counts."""
    # alpaca_eval matches outputs to references by instruction; the translated sets carry ids (the
    # English reference file has none), so match by id where both files have them
    match_by = "id" if every_row_has_an_id(outputs_path) and every_row_has_an_id(reference_path) else "instruction"
    outputs, dropped_outputs = read_items(outputs_path, ("instruction", "output"), match_by)
    references, dropped_references = read_items(reference_path, ("instruction", "output"), match_by)
    report_dropped(lang, "output", dropped_outputs)
    report_dropped(lang, "reference", dropped_references)
    reference_position = {match: i for i, match in enumerate(references)}  # alpaca_eval's order of its instructions
    pairs, mismatched = [], []
    for match, row in outputs.items():
        reference = references.get(match)
        if reference is None:
            continue
        if reference["instruction"].strip() != row["instruction"].strip():
            mismatched.append(match)
            continue
        pairs.append({"key": str(row.get("id", match)), "instruction": row["instruction"], "first": row["output"],
                      "second": reference["output"], "index": reference_position[match]})
    if mismatched:
        print(f"{lang}: {len(mismatched)} id(s) whose instruction differs from the reference's were dropped, "
              f"first: {mismatched[0]}")
    counts = {"matched_by": match_by, "dropped_outputs": len(dropped_outputs),
              "dropped_references": len(dropped_references),
              "no_reference": sum(match not in references for match in outputs),
              "no_output": sum(match not in outputs for match in references),
              "instruction_mismatch": len(mismatched)}
    return pairs, counts


def judge_outputs(judge, outputs_dir: Path, reference_dir: Path, langs: list[str], out: Path,
                  both_orders: bool, judge_name: str, limit: int | None = None) -> dict:
    from eval.judge import judge_resumable, summarize_preferences

    summary = {"benchmark": BENCHMARK, "judge": judge_name, "both_orders": both_orders,
               "reference": str(reference_dir), "languages": {}}
    built = {lang: build_pairs(outputs_dir / f"{lang}.json", reference_dir / f"{lang}.json", lang) for lang in langs}
    summary_identity = {"judge": {"name": judge_name, "identity": getattr(judge, "identity", None)},
                        "settings": {"both_orders": both_orders}}
    claim_summary(out / "summary.json", JUDGE, summary_identity)  # before any output is touched
    bind_outputs(JUDGE, [
        (out / f"{lang}.jsonl", {"inputs": {"outputs": file_identity(outputs_dir / f"{lang}.json"),
                                            "reference": file_identity(reference_dir / f"{lang}.json")},
                                 **summary_identity}, (out / f"{lang}.annotations.json",))
        for lang in langs])
    for lang in langs:
        pairs, counts = built[lang]
        pairs = pairs[:limit] if limit else pairs
        with ResumableWriter(out / f"{lang}.jsonl", key="key") as writer:
            judge_resumable(judge, pairs, writer, both_orders, desc=f"judge {lang}")
            wanted = {p["key"] for p in pairs}
            rows = [r for r in writer.rows if r["key"] in wanted]
        annotations = alpaca_eval_annotations(pairs, rows, judge_name, lang)
        write_json_atomic(out / f"{lang}.annotations.json", annotations)
        summary["languages"][lang] = {**summarize_preferences(rows), **length_controlled_win_rate(annotations),
                                      **counts}
        s = summary["languages"][lang]
        if s["win_rate"] is not None:
            se = f" ± {s['se']:.2f}" if s["se"] is not None else ""
            lc = f"length-controlled {s['lc_win_rate']:.2f}" if s["lc_win_rate"] is not None else s["lc_note"]
            print(f"{lang}: win rate {s['win_rate']:.2f}{se}, {lc} (n={s['n']}, no verdict {s['no_verdict']})")
    return write_summary(out / "summary.json", JUDGE, summary_identity, summary, averaged=("win_rate",))


def alpaca_eval_annotations(pairs: list[dict], rows: list[dict], judge_name: str, lang: str) -> list[dict]:
    """The verdicts with one (rows: {key, preference = P(the model's output wins)}) as alpaca_eval's annotations:
    output_1 the reference (its baseline), output_2 the model's, preference 1 + P(output_2 is better)."""
    preference = {r["key"]: r["preference"] for r in rows if r["preference"] is not None}
    return [{"instruction": p["instruction"], "output_1": p["second"], "generator_1": f"reference-{lang}",
             "output_2": p["first"], "generator_2": f"model-{lang}", "annotator": judge_name,
             "preference": 1 + preference[p["key"]], "index": p["index"]}
            for p in pairs if p["key"] in preference]


def length_controlled_win_rate(annotations: list[dict]) -> dict:
    """{"lc_win_rate", "lc_se"}: alpaca_eval's length-controlled win rate of the annotations (its own
    length_controlled_v1 GLM), or {"lc_win_rate": None, "lc_note": why it is missing}."""
    if importlib.util.find_spec("alpaca_eval") is None:
        return {"lc_win_rate": None, "lc_note": "no length-controlled win rate: pip install 'lidr[alpacaeval]'"}
    try:
        from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate
    except ImportError as e:  # e.g. alpaca_eval 0.6.6 imports pkg_resources, gone from setuptools 81 on
        return {"lc_win_rate": None, "lc_note": f"no length-controlled win rate: alpaca_eval is installed but does not "
                                                f"import ({type(e).__name__}: {e})"}
    if len(annotations) < 2:
        return {"lc_win_rate": None, "lc_note": "no length-controlled win rate: fewer than 2 verdicts"}
    try:
        metrics = get_length_controlled_winrate(annotations, save_weights_dir=None, is_warn_extreme_changes=False)
    except OSError as e:  # its GLM first reads df_gamed.csv from the Hugging Face Hub (or the hub's cache)
        return {"lc_win_rate": None, "lc_note": f"no length-controlled win rate: alpaca_eval's GLM failed "
                                                f"({type(e).__name__}: {str(e)[:200]})"}
    return {"lc_win_rate": float(metrics["length_controlled_winrate"]), "lc_se": float(metrics["lc_standard_error"])}


# -----------------------------------------------------------------------------
# command line


@command()
def main(argv=None):
    from eval.common import check_langs, model_identity
    from eval.judge import add_judge_args, judge_folder_name, make_judge

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="the model's outputs in alpaca_eval's model_outputs.json format")
    add_engine_flags(gen, batch_size=settings.EVAL_BATCH_SIZE,
                     model_help="HF checkpoint folder of the model under test")
    add_flags(gen, settings.ALPACAEVAL, skip=(*GREEDY_ONLY, "prompt_template"),
              title="decoding (greedy; defaults: the paper's, lidr/settings.py ALPACAEVAL)")
    gen.add_argument("--prompts", required=True, help="folder of {lang}.json instruction lists")
    gen.add_argument("--langs", nargs="+", required=True, help="language codes, e.g. en es ru de fr")
    gen.add_argument("--out", required=True, help="the model's results folder; writes {out}/x-alpacaeval/outputs/")
    gen.add_argument("--generator", default=None,
                     help="generator name in the outputs (default: the model folder's name)")
    gen.add_argument("--limit", type=positive_int, default=None, help="only the first N instructions per language")

    jud = commands.add_parser("judge", help="pairwise judgements of the outputs against reference outputs")
    jud.add_argument("--out", required=True, help="the model's results folder; writes {out}/x-alpacaeval/judge-*/")
    jud.add_argument("--outputs", default=None,
                     help="folder of {lang}.json model outputs to judge (default: {out}/x-alpacaeval/outputs)")
    jud.add_argument("--reference", required=True, help="folder of {lang}.json reference outputs")
    jud.add_argument("--langs", nargs="+", required=True, help="language codes, e.g. en es ru de fr")
    jud.add_argument("--limit", type=positive_int, default=None, help="only the first N items per language")
    add_judge_args(jud)
    args = parser.parse_args(argv)

    check_langs(parser, args.langs)
    base = Path(args.out) / BENCHMARK
    if args.command == "generate":
        require_extra("py3langid", "langid", "the off-target rate of eval.alpacaeval generate")
        for lang in args.langs:
            if not (Path(args.prompts) / f"{lang}.json").is_file():
                parser.error(f"{Path(args.prompts) / f'{lang}.json'}: no such file")
        decoding = from_flags(args, settings.ALPACAEVAL)
        cluster.check_shared(base / "outputs", args.model)  # under torchrun: every node sees OUT and the model
        identity = model_identity(args.model, args.dtype, args.chat_format)
        model, tokenizer = open_model(args.model, args.device, args.dtype, args.chat_format)
        generate_outputs(model, tokenizer, Path(args.prompts), args.langs, base / "outputs", decoding,
                         args.batch_size, decoding.system, args.generator or Path(args.model).resolve().name,
                         args.limit, model_identity=identity)
    else:
        outputs = Path(args.outputs) if args.outputs else base / "outputs"
        for lang in args.langs:
            for path in (outputs / f"{lang}.json", Path(args.reference) / f"{lang}.json"):
                if not path.is_file():
                    parser.error(f"{path}: no such file")
        judge = make_judge(args)
        try:
            judge_outputs(judge, outputs, Path(args.reference), args.langs, base / judge_folder_name(args),
                          args.both_orders, judge.name, args.limit)
        finally:
            judge.close()


if __name__ == "__main__":
    main()
