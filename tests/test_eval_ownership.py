"""Evaluation outputs are owned and merged by language (eval/common.py): a summary of the user's, another
command's or a hand-edited one is refused before any work; one job per language into one folder gives the
summary one job over every language gives; a report folder of the user's and a model named twice are refused;
the judge's flags and failures end in one sentence; interrupted evaluations change nothing they do not own."""

import json
import os
from pathlib import Path

import pytest
from helpers import dead_pid, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eval import agreement, alpacaeval, mgsm, report
from eval.judge import HttpJudge, JudgeError
from lidr.harness.outputs import file_identity, lock_path, record_output, record_path

LANGS = ("es", "ru", "de")


class LengthJudge:
    """Prefers the longer output (P(M better) 0.9, else 0.3); after `fail_after` calls it raises `failure`."""

    name, identity = "length", None

    def __init__(self, fail_after=None, failure=None):
        self.calls, self.fail_after, self.failure = 0, fail_after, failure

    def prefer_second(self, triples, progress=True):
        if self.fail_after is not None and self.calls + len(triples) > self.fail_after:
            raise self.failure
        self.calls += len(triples)
        return [0.9 if len(M) > len(m) else 0.3 for _, m, M in triples]

    def close(self):
        pass


def pairs_file(folder: Path) -> Path:
    rows = [{"id": f"{lang}{i}", "lang": lang, "prompt": f"p{i}", "chosen": "a long answer" if i % 3 else "short",
             "rejected": "brief" if i % 3 else "a longer answer"} for lang in LANGS for i in range(5)]
    return write_jsonl(folder / "pairs.jsonl", rows)


def run_agreement(pairs: Path, out: Path, langs, judge=None) -> dict:
    return agreement.run(judge or LengthJudge(), pairs, out, sample=None, seed=0, both_orders=True,
                         judge_name="length", langs=list(langs))


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -----------------------------------------------------------------------------
# one job per language, one summary


def test_agreement_one_language_per_job_gives_the_summary_of_one_job_over_all(tmp_path):
    pairs = pairs_file(tmp_path)
    whole = run_agreement(pairs, tmp_path / "whole", ["es", "ru"])
    run_agreement(pairs, tmp_path / "jobs", ["es"])
    merged = run_agreement(pairs, tmp_path / "jobs", ["ru"])
    assert merged == whole
    assert (tmp_path / "jobs" / "summary.json").read_text() == (tmp_path / "whole" / "summary.json").read_text()
    run_agreement(pairs, tmp_path / "jobs", ["es"])  # a rerun of the first job: the other language stays
    assert json.loads((tmp_path / "jobs" / "summary.json").read_text()) == whole


def test_alpacaeval_judge_one_language_per_job_merges_and_averages_every_language(tmp_path):
    outputs, reference = tmp_path / "outputs", tmp_path / "reference"
    for lang in LANGS:
        items = [{"id": str(i), "instruction": f"{lang} question {i}"} for i in range(4)]
        (outputs / f"{lang}.json").parent.mkdir(parents=True, exist_ok=True)
        (reference / f"{lang}.json").parent.mkdir(parents=True, exist_ok=True)
        (outputs / f"{lang}.json").write_text(json.dumps([{**it, "output": "x" * (i + 2)} for i, it in
                                                          enumerate(items)]))
        (reference / f"{lang}.json").write_text(json.dumps([{**it, "output": "y" * (3 + len(lang) % 2)}
                                                            for it in items]))

    def judge(langs, out):
        return alpacaeval.judge_outputs(LengthJudge(), outputs, reference, langs, out, both_orders=False,
                                        judge_name="length")

    whole = judge(list(LANGS), tmp_path / "whole")
    for lang in LANGS:
        merged = judge([lang], tmp_path / "jobs")
    assert merged == whole and merged["average"]["win_rate"] == pytest.approx(
        sum(s["win_rate"] for s in whole["languages"].values()) / 3)
    assert (tmp_path / "jobs" / "summary.json").read_text() == (tmp_path / "whole" / "summary.json").read_text()


def write_questions(folder: Path, lang: str, n: int):
    write_jsonl(folder / f"{lang}.jsonl", [{"query": f"Tom has {i} apples and buys 2. How many?",
                                           "response": str(i + 2)} for i in range(n)])


def test_mgsm_one_language_per_job_gives_the_summary_of_one_job_over_all(tiny_dir, tmp_path):
    from lidr.checkpoint import load
    from lidr.settings import Decoding

    model, tokenizer = load(tiny_dir)
    data = tmp_path / "data"
    write_questions(data, "en", 3)
    write_questions(data, "fr", 2)
    decoding = Decoding(max_new_tokens=3, repetition_penalty=1.0)

    def run(langs, out):
        return mgsm.run(model, tokenizer, data, langs, out, decoding, 4, "Sys.")

    whole = run(["en", "fr"], tmp_path / "whole" / "mgsm")
    run(["en"], tmp_path / "jobs" / "mgsm")
    assert run(["fr"], tmp_path / "jobs" / "mgsm") == whole
    assert (tmp_path / "jobs" / "mgsm" / "summary.json").read_text() == \
        (tmp_path / "whole" / "mgsm" / "summary.json").read_text()


# -----------------------------------------------------------------------------
# summaries this command may not merge into: refused before any work


def user_summary(out: Path) -> bytes:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text('{"languages": {"es": {"agreement": 99.0}}, "note": "mine"}\n')
    return (out / "summary.json").read_bytes()


@pytest.mark.parametrize("made_by, content, message", [
    (None, None, r"summary\.json: exists and was not written by eval\.agreement \(no summary\.json\.made-from\.json "
                 r"beside it\)"),
    ("eval.mgsm", None, r"summary\.json: was written by eval\.mgsm, not eval\.agreement"),
    ("eval.agreement", "{broken", r"summary\.json: not valid JSON .*; fix it, or move it and its record away"),
    ("eval.agreement", '["es"]', r"summary\.json: not a JSON object, not a summary as eval/ writes it"),
    ("eval.agreement", '{"languages": {"es": 3}}', r"summary\.json: its 'languages' is not an object keyed by "
                                                   r"language"),
])
def test_a_summary_this_command_may_not_merge_into_is_refused_before_any_work(made_by, content, message, tmp_path):
    pairs, out = pairs_file(tmp_path), tmp_path / "agree"
    user_summary(out)
    if content is not None:
        (out / "summary.json").write_text(content)
    if made_by is not None:
        identity = {"inputs": {"pairs": file_identity(pairs)},
                    "judge": {"name": "length", "identity": None},
                    "settings": {"sample": None, "seed": 0, "both_orders": True}}
        record_output(out / "summary.json", made_by, identity)
    before, judge = files_of(out), LengthJudge()
    with pytest.raises(SystemExit, match=message) as stopped:
        run_agreement(pairs, out, ["es"], judge)
    assert "\n" not in stopped.value.code
    assert judge.calls == 0 and files_of(out) == before  # nothing judged, nothing written


def test_mgsm_refuses_a_users_summary_before_generating(tiny_dir, tmp_path, monkeypatch):
    import lidr.sampler

    data, out = tmp_path / "data", tmp_path / "M0"
    write_questions(data, "en", 2)
    before = user_summary(out / "mgsm")
    monkeypatch.setattr(lidr.sampler, "completions", lambda *a, **k: pytest.fail("generated before refusing"))
    with pytest.raises(SystemExit, match=r"mgsm/summary\.json: exists and was not written by eval\.mgsm"):
        mgsm.main(["--model", str(tiny_dir), "--data", str(data), "--langs", "en", "--out", str(out),
                   "--max-new-tokens", "2"])
    assert (out / "mgsm" / "summary.json").read_bytes() == before and not (out / "mgsm" / "en.jsonl").exists()


def test_a_summary_of_another_model_is_refused_before_any_work(tmp_path):
    pairs, out = pairs_file(tmp_path), tmp_path / "agree"
    run_agreement(pairs, out, ["es"])
    before = files_of(out)
    other = LengthJudge()
    other.name = "longer"
    with pytest.raises(SystemExit, match=r"summary\.json: was made from other inputs or other settings "
                                         r"\(judge\.name: 'length' -> 'longer'\)"):
        agreement.run(other, pairs, out, None, 0, True, "longer", ["ru"])
    assert other.calls == 0 and files_of(out) == before


# -----------------------------------------------------------------------------
# the report: its own folder, one name per model, summaries that read


def summaries(folder: Path, accuracy=0.5):
    out = folder / "mgsm"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"benchmark": "mgsm", "languages": {
        "en": {"n": 4, "accuracy": accuracy, "off_target": 0.0}}}))
    return folder


def test_report_refuses_a_model_named_twice(tmp_path, capsys):
    a, b = summaries(tmp_path / "a"), summaries(tmp_path / "b", 0.75)
    with pytest.raises(SystemExit) as stopped:
        report.main(["--model", f"M0={a}", "--model", f"M0={b}", "--out", str(tmp_path / "report")])
    assert stopped.value.code == 2
    assert f"--model 'M0={b}': the name M0 is given twice (also M0={a}); give each model its own name" in \
        capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_report_owns_its_folder(tmp_path):
    a = summaries(tmp_path / "a")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("my notes")
    with pytest.raises(SystemExit, match=r"mine: is a folder that eval\.report did not make .*it holds notes\.md\)"):
        report.main(["--model", f"M0={a}", "--out", str(mine)])
    assert files_of(mine) == {"notes.md": b"my notes"}
    out = tmp_path / "report"
    report.main(["--model", f"M0={a}", "--out", str(out)])
    first = (out / "report.md").read_text()
    summaries(a, 0.25)
    report.main(["--model", f"M0={a}", "--out", str(out)])  # its own folder: rewritten
    assert (out / "report.md").read_text() == first.replace("0.500", "0.250")
    assert json.loads(record_path(out).read_text())["made_by"] == "eval.report"


def test_report_into_a_folder_named_dot(tmp_path, monkeypatch):
    a = summaries(tmp_path / "a")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    report.main(["--model", f"M0={a}", "--out", "."])
    assert (here / "report.md").is_file() and record_path(here).is_file() and not lock_path(here).exists()


@pytest.mark.parametrize("content, message", [
    ('{"languages": {"en": {"accuracy": "0.5"}}}', r"languages\.en\.accuracy is '0\.5', not a number"),
    ('{"languages": {"en": {"win_rate": 12.0, "se": true}}}', r"languages\.en\.se is True, not a number"),
    ('{"languages": {"en": [0.5]}}', r"its 'languages' is not an object keyed by language"),
    ('[1, 2]', r"not a JSON object"),
    ('{"languages": {"en": {"accuracy": NaN}}}', r"languages\.en\.accuracy is nan, not a number"),
])
def test_report_names_a_hand_edited_summary(content, message, tmp_path):
    a = summaries(tmp_path / "a")
    (a / "mgsm" / "summary.json").write_text(content)
    with pytest.raises(SystemExit, match=rf"mgsm/summary\.json: .*{message}") as stopped:
        report.main(["--model", f"M0={a}", "--out", str(tmp_path / "report")])
    assert "\n" not in stopped.value.code


# -----------------------------------------------------------------------------
# the judge: flags in range, failures in one sentence, a cache of its own


@pytest.mark.parametrize("flag, value, message", [("--max-retries", "-1", "-1 is below its least value 0"),
                                                  ("--timeout", "0", "0.0 is not greater than 0"),
                                                  ("--timeout", "nan", "nan is not a finite number")])
def test_judge_flags_out_of_range_are_refused_naming_them(flag, value, message, tmp_path, capsys):
    pairs = pairs_file(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        agreement.main(["--pairs", str(pairs), "--out", str(tmp_path / "a"), "--judge", "http", flag, value])
    assert stopped.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="HttpJudge max_retries: -1 is not a whole number of at least 0"):
        HttpJudge("http://127.0.0.1:9/v1", "m", max_retries=-1)


def test_a_judge_that_gives_up_ends_in_one_sentence_and_keeps_its_verdicts(tmp_path):
    pairs, out = pairs_file(tmp_path), tmp_path / "agree"
    failing = LengthJudge(fail_after=0, failure=JudgeError("http://judge/v1/chat/completions: gave up after 9 "
                                                           "attempts; last error: HTTP 503: busy"))
    run_agreement(pairs, out, ["es"])  # es judged
    with pytest.raises(SystemExit) as stopped:
        run_agreement(pairs, out, ["es", "ru"], failing)
    assert stopped.value.code == (f"http://judge/v1/chat/completions: gave up after 9 attempts; last error: HTTP 503: "
                                  f"busy; the 0 verdict(s) in {out / 'ru.jsonl'} are kept: rerun the same command to "
                                  f"resume")
    assert not lock_path(out / "ru.jsonl").exists()
    assert run_agreement(pairs, out, ["es", "ru"]) == run_agreement(pairs, tmp_path / "whole", ["es", "ru"])


def test_a_file_of_the_users_at_the_cache_path_is_never_appended_to(tmp_path):
    cache = write_jsonl(tmp_path / "notes.jsonl", [{"key": "mine", "text": "my own row"}])
    before = cache.read_bytes()
    with pytest.raises(SystemExit, match=r"notes\.jsonl: exists and was not written by eval\.judge cache"):
        HttpJudge("http://127.0.0.1:9/v1", "m", cache_path=cache)
    assert cache.read_bytes() == before and not lock_path(cache).exists()
    judge = HttpJudge("http://127.0.0.1:9/v1", "m", cache_path=tmp_path / "cache.jsonl")  # its own: made, reopened
    judge.close()
    HttpJudge("http://127.0.0.1:9/v1", "m", cache_path=tmp_path / "cache.jsonl").close()


def test_the_openai_endpoint_without_a_key_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    pairs = pairs_file(tmp_path)
    with pytest.raises(SystemExit, match=r"--judge http at https://api\.openai\.com/v1 needs an API key, and "
                                         r"\$OPENAI_API_KEY is not set"):
        agreement.main(["--pairs", str(pairs), "--out", str(tmp_path / "a"), "--judge", "http", "--cache",
                        str(tmp_path / "cache.jsonl")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


# -----------------------------------------------------------------------------
# evaluations in any order, interrupted anywhere: nothing changes that the command does not own


class Killed(BaseException):
    """The process dying where it stands (not an error the command may catch)."""


OUT_FILES = {"summary.json", *(f"{lang}.jsonl" for lang in LANGS)}
STEP = st.one_of(
    st.tuples(st.just("run"), st.sets(st.sampled_from(LANGS), min_size=1)),
    st.tuples(st.just("killed while judging"), st.sets(st.sampled_from(LANGS), min_size=1),
              st.integers(0, 24)),
    st.tuples(st.just("killed while writing"), st.sets(st.sampled_from(LANGS), min_size=1), st.integers(0, 8)),
    st.tuples(st.just("user file"), st.sampled_from(["notes.txt", "summary.json", "ru.jsonl"])),
    st.tuples(st.just("remove user file"), st.sampled_from(["notes.txt", "summary.json", "ru.jsonl"])),
)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=1, max_size=8))
def test_evaluations_in_any_order_killed_anywhere_change_only_what_they_own(steps, tmp_path_factory):
    import contextlib
    import socket
    from unittest import mock

    root = tmp_path_factory.mktemp("eval")
    pairs, out = pairs_file(root), root / "agree"
    out.mkdir()
    user = {}  # name -> content of the files the user put in OUT
    finished = set()  # the languages of the runs that ended normally
    for step in steps:
        before = files_of(out)
        if step[0] == "user file":  # where no file is, nor a record saying lidr's file is there
            if step[1] not in before and not record_path(out / step[1]).exists():
                (out / step[1]).write_text("the user's own file\n")
                user[step[1]] = (out / step[1]).read_bytes()
            continue
        if step[0] == "remove user file":
            if step[1] in user:
                (out / step[1]).unlink()
                del user[step[1]]
            continue
        langs = sorted(step[1])
        if step[0] == "run":
            judge = LengthJudge()
            judged = sum(len((out / f"{lang}.jsonl").read_text().splitlines()) for lang in langs
                         if (out / f"{lang}.jsonl").exists() and f"{lang}.jsonl" not in user)
            try:
                summary = run_agreement(pairs, out, langs, judge)
            except SystemExit as e:  # refused: a file of the user's is in the way, and named
                assert isinstance(e.code, str) and "\n" not in e.code
                assert any(name in e.code for name in user), e.code
                assert files_of(out) == before
                continue
            finished |= set(langs)
            reference = run_agreement(pairs, root / f"reference-{len(finished)}-{os.getpid()}", sorted(finished))
            assert summary["languages"] == reference["languages"]  # every language run so far, as one run gives
            assert json.loads((out / "summary.json").read_text()) == summary
            assert judge.calls == 2 * (5 * len(langs) - judged)  # what killed runs judged is not asked again
            mine = {"summary.json", *(f"{lang}.jsonl" for lang in langs)}  # a killed run's leftovers: gone
            assert not [p for p in out.iterdir() if p.name.split(".lock")[0].split(".tmp")[0] in mine
                        and (p.name.endswith(".lock") or ".tmp" in p.name)]
        else:  # killed: in the judge after some comparisons, or between the writes of its outputs
            kill_at = step[2]
            real_replace, calls = os.replace, []

            def replace_then_die(*args):
                calls.append(args)
                if len(calls) > kill_at:
                    raise Killed
                return real_replace(*args)

            judging = step[0] == "killed while judging"
            judge = LengthJudge(fail_after=kill_at, failure=Killed()) if judging else LengthJudge()
            with contextlib.nullcontext() if judging else mock.patch("lidr.harness.outputs.os.replace",
                                                                     replace_then_die):
                try:
                    run_agreement(pairs, out, langs, judge)
                    finished |= set(langs)
                except (Killed, SystemExit):
                    pass
            pid = dead_pid()  # what the dead process leaves: its temporaries, and locks naming it
            for tmp in out.glob(f"*.tmp{os.getpid()}"):
                tmp.rename(tmp.with_name(tmp.name.removesuffix(str(os.getpid())) + str(pid)))
            for name in ("summary.json", *(f"{lang}.jsonl" for lang in langs)):
                if (out / name).exists() and not lock_path(out / name).exists():
                    lock_path(out / name).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
        after = files_of(out)
        for name, content in user.items():  # the user's files, as they were
            assert after.get(name) == content, name
        for name in set(before) | set(after):  # and nothing but the command's own outputs changed
            if before.get(name) != after.get(name):
                base = name.split(".made-from.json")[0].split(".lock")[0].split(".tmp")[0]
                assert base in OUT_FILES and name not in user, name
