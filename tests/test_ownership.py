"""Nothing lost, part 2 (issue 22): every command owns its outputs, the pipeline knows what it was made from,
one process per output, values checked before anything is recorded, and errors as sentences."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
from helpers import dead_pid, pairs, write_jsonl

import lidr.cli.pairs
import lidr.harness.stage_files
from lidr.harness.outputs import lock_path, read_records, record_path, remove_stale_temporaries


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_jsonl(path, rows)


def snapshot(folder):
    """Every file under `folder`, and beside it under its name (its record, its lock), by path: its bytes."""
    files = [*folder.rglob("*"), *folder.parent.glob(folder.name + ".*")]
    return {str(p.relative_to(folder.parent)): p.read_bytes() for p in files if p.is_file()}


def write_stage_outputs(folder, answers=("A", "B"), translations=("A-fr", "B-fr")):
    """One iteration's generate/ and translate/ outputs for en and fr
    (the inputs of lidr.cli.pairs and lidr.cli.sdrrl)."""
    ids = ["1", "2"]
    write_rows(folder / "generate" / "en.jsonl",
                [{"id": i, "instruction": f"Q{i}", "response": a} for i, a in zip(ids, answers)])
    write_rows(folder / "generate" / "fr.jsonl",
                [{"id": i, "instruction": f"Q{i}-fr", "response": f"r{i}"} for i in ids])
    write_rows(folder / "translate" / "en-fr.jsonl",
                [{"id": i, "translation": t, "translation_error": None} for i, t in zip(ids, translations)])
    write_rows(folder / "translate" / "fr-en.jsonl",
                [{"id": i, "translation": f"r{i}-en", "translation_error": None} for i in ids])
    return folder


# -----------------------------------------------------------------------------
# 1. ownership: the trainer's OUT


def train_main(model, data, out, *extra):
    from lidr.cli.train import main

    main(["--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "4", "--max-len", "96",
          *extra])


def test_the_trainer_refuses_a_users_folder_naming_what_is_there_and_leaves_it_as_it_is(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(4))
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")  # today: "finished earlier, nothing to do", exit 0
    (out / "notes.txt").write_text("my notes")
    before = snapshot(out)
    with pytest.raises(SystemExit, match=r"mine: is a folder that lidr.cli.train did not make .*holds model, notes\.txt"):
        train_main(tiny_dir, data, out)
    assert snapshot(out) == before and not lock_path(out).exists()


@pytest.mark.slow
def test_a_model_folder_the_run_never_exported_is_refused_not_replaced(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(4))
    out = tmp_path / "run"
    train_main(tiny_dir, data, out)
    assert record_path(out).is_file() and record_path(out / "model").is_file()
    assert not list(tmp_path.glob("*.lock")) and not list(out.glob("*.tmp*"))
    shutil.rmtree(out / "model")
    record_path(out / "model").unlink()
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text('{"mine": true}')  # not the export: no record of it
    with pytest.raises(SystemExit, match=r"run/model: exists, but this run never recorded exporting it"):
        train_main(tiny_dir, data, out)
    assert (out / "model" / "config.json").read_text() == '{"mine": true}'


def test_stale_temporaries_of_dead_processes_go_and_a_live_ones_stay(tmp_path, sleeper):
    out = tmp_path / "model"
    dead, live, user = (tmp_path / f"model.tmp{dead_pid()}", tmp_path / f"model.tmp{sleeper}",
                        tmp_path / "model.tmpl")
    dead.mkdir()
    (dead / "w.safetensors").write_text("x")
    live.mkdir()
    user.write_text("a template of the user's")
    remove_stale_temporaries(out)
    assert not dead.exists() and live.exists() and user.read_text() == "a template of the user's"


def test_a_killed_ranks_partial_file_and_its_lock_go_once_merged(tmp_path):
    from lidr.harness.outputs import ResumableWriter
    from lidr.harness.sampled import merge

    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.rank1.partial"
    writer = ResumableWriter(partial, "id")
    writer.write({"id": "2", "text": "b"})
    writer.file.close()  # killed: its lock stays behind
    lock_path(partial).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    assert merge(out, "id", {"1": 0, "2": 1}) == [{"id": "2", "text": "b"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_the_world_builder_refuses_a_users_folder(tmp_path):
    from world.corpus import main

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "mine.txt").write_text("x")
    with pytest.raises(SystemExit, match=r"w: is a folder that world.corpus did not make .*holds mine\.txt"):
        main(["--out", str(tmp_path / "w")])
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["mine.txt"]


# -----------------------------------------------------------------------------
# 2. the pipeline bound to its inputs


def iterate_case(tiny_dir, tmp_path, **answers):
    from lidr import settings
    from lidr.harness.stages import stage_identities, write_marker
    from lidr.iterate import Recipe

    prompts = tmp_path / "prompts"
    for lang in ("en", "fr"):
        write_rows(prompts / f"{lang}.jsonl", [{"id": "1", "instruction": "Q"}])
    recipe = Recipe(langs=("fr",), answers=replace(settings.ANSWERS, max_new_tokens=2))
    work = tmp_path / "work"
    identities = stage_identities(tiny_dir, prompts, recipe, 1)
    write_marker(work / "iter1", "generate", identities["generate"])
    return work, prompts, recipe


def test_a_rerun_with_another_setting_is_refused_before_any_work_naming_it(tiny_dir, tmp_path):
    from lidr.iterate import run

    work, prompts, recipe = iterate_case(tiny_dir, tmp_path)
    before = snapshot(work)
    other = replace(recipe, answers=replace(recipe.answers, max_new_tokens=3))
    with pytest.raises(SystemExit, match=r"iter1/done/generate: done from other inputs or settings .*"
                                         r"answers\.max_new_tokens: 2 -> 3.*--redo-from generate"):
        run(tiny_dir, [prompts], work, other)
    (prompts / "fr.jsonl").write_text('{"id": "1", "instruction": "Q, autrement"}\n')
    with pytest.raises(SystemExit, match=r"prompts\.fr\.sha256"):
        run(tiny_dir, [prompts], work, recipe)
    assert snapshot(work) == before and not lock_path(work).exists()


def test_redo_from_removes_only_what_the_stage_can_prove_it_wrote(tiny_dir, tmp_path):
    from lidr.harness.stages import plan, write_marker
    from lidr.harness.outputs import record_output

    work, prompts, recipe = iterate_case(tiny_dir, tmp_path)
    generated = work / "iter1" / "generate" / "en.jsonl"
    write_rows(generated, [{"id": "1", "response": "old"}])
    record_output(generated, "lidr.cli.generate", {"old": True})
    users = work / "iter1" / "generate" / "notes.jsonl"
    write_rows(users, [{"mine": 1}])
    other = replace(recipe, answers=replace(recipe.answers, max_new_tokens=3))
    trained, kept = work / "iter1" / "train", work / "iter1" / "pairs.jsonl"
    (trained / "model").mkdir(parents=True)
    record_output(trained, "lidr.train", {"old": True})
    kept.write_text("pairs the user wrote by hand\n")  # no record: not provably lidr.cli.pairs'
    write_marker(work / "iter1", "pairs", {"old": True})
    plan(tiny_dir, [prompts], work, other, 1, 1, redo_from="generate")
    assert not generated.exists() and not record_path(generated).exists()
    assert users.exists() and not (work / "iter1" / "done" / "generate").exists()
    assert not trained.exists() and not record_path(trained).exists()
    assert kept.read_text() == "pairs the user wrote by hand\n" and not (work / "iter1" / "done" / "pairs").exists()


def test_languages_and_prompt_folders_are_checked_before_the_first_stage(tiny_dir, tmp_path):
    from lidr.iterate import run

    work, prompts, recipe = iterate_case(tiny_dir, tmp_path)
    shutil.rmtree(work)
    (prompts / "fr.jsonl").unlink()
    with pytest.raises(SystemExit, match=r"prompts/fr\.jsonl: no such prompt file"):
        run(tiny_dir, [prompts], work, recipe)
    assert not work.exists()
    with pytest.raises(SystemExit, match=r"more than once"):
        run(tiny_dir, [prompts], work, replace(recipe, langs=("fr", "fr")))
    assert not work.exists()


# -----------------------------------------------------------------------------
# 3. one process per output


def test_a_second_process_is_refused_a_dead_ones_lock_taken_over_another_hosts_reported(tmp_path, sleeper):
    folder = write_stage_outputs(tmp_path / "iter1")
    out = folder / "pairs.jsonl"
    lock = lock_path(out)
    lock.write_text(json.dumps({"pid": sleeper, "host": socket.gethostname(), "command": "lidr.cli.pairs"}))
    with pytest.raises(SystemExit, match=rf"pairs\.jsonl: in use by process {sleeper} on this host"):
        lidr.cli.pairs.main(["--dir", str(folder), "--langs", "fr"])
    assert not out.exists() and not record_path(out).exists()
    lock.write_text(json.dumps({"pid": 1234, "host": "node-7", "command": "lidr.cli.pairs"}))
    with pytest.raises(SystemExit, match=r"in use by process 1234 on node-7 .*delete .*pairs\.jsonl\.lock"):
        lidr.cli.pairs.main(["--dir", str(folder), "--langs", "fr"])
    assert json.loads(lock.read_text())["host"] == "node-7"  # never broken
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "command": "lidr.cli.pairs"}))
    lidr.cli.pairs.main(["--dir", str(folder), "--langs", "fr"])
    assert len(read_records(out)[0]) == 4 and not lock.exists()


def test_a_second_generation_on_one_output_is_refused_before_it_writes(tiny_dir, tmp_path, sleeper):
    from lidr import settings
    from lidr.harness.sampled import Engine, generate_file

    prompts = write_rows(tmp_path / "in.jsonl", [{"id": 1, "instruction": "Hi"}])
    out = tmp_path / "out.jsonl"
    lock_path(out).write_text(json.dumps({"pid": sleeper, "host": socket.gethostname(), "command": "lidr.cli.generate"}))
    with pytest.raises(SystemExit, match=rf"out\.jsonl: in use by process {sleeper} on this host \(lidr\.cli\.generate\)"):
        generate_file(Engine(tiny_dir, device="cpu"), prompts, out, replace(settings.ANSWERS, max_new_tokens=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl.lock"]


def test_hold_lock_is_atomic_between_processes(tmp_path):
    """Two processes race for one lock: exactly one holds it."""
    code = ("import sys, time; from lidr.harness.outputs import hold_lock\n"
            "try:\n    hold_lock(sys.argv[1], 'race'); print('held', flush=True); time.sleep(3)\n"
            "except SystemExit as e:\n    print('refused', e, flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out.jsonl")], stdout=subprocess.PIPE,
                              text=True, cwd=os.getcwd()) for _ in range(2)]
    outputs = sorted(proc.communicate()[0].split()[0] for proc in procs)
    assert outputs == ["held", "refused"]
    assert not lock_path(tmp_path / "out.jsonl").exists()


# -----------------------------------------------------------------------------
# 4. validate, then record


def test_a_tokenizer_that_does_not_belong_to_the_model_is_named_at_load(tiny_dir, tmp_path):
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel

    from lidr.checkpoint import check

    folder = tmp_path / "mixed"
    shutil.copytree(tiny_dir, folder)
    tok = Tokenizer(WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|begin_of_text|>", "<|end_of_text|>",
                                                                  "<|eot_id|>")])
    tok.save(str(folder / "tokenizer.json"))  # no <|start_header_id|>: every prompt would be plain text
    with pytest.raises(ValueError, match=r"mixed/tokenizer\.json: the llama3 chat format needs the special token "
                                         r"'<\|start_header_id\|>'"):
        check(folder)
    shutil.copy(tiny_dir / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": 13}))  # "." in Llama 3's vocabulary
    with pytest.raises(ValueError, match=r"mixed/config\.json: eos_token_id 13 is '\.' in .*not a token a llama3 turn"):
        check(folder)


def test_mgsm_gold_answers_are_read_exactly_or_dropped_and_counted(tmp_path):
    from eval.mgsm import read_questions

    path = write_jsonl(tmp_path / "en.jsonl", [{"query": "q", "response": g} for g in
                                               ("1/2", "1e3", "2.5×10^3", "1,000", "18 eggs and 2 hens", 7)])
    questions, dropped = read_questions(path)
    assert [q["gold"] for q in questions] == [0.5, 1000.0, 2500.0, 1000.0, 7.0]
    assert len(dropped) == 1 and dropped[0].startswith(f"{path}:5: no reference number")


@pytest.mark.slow
def test_a_run_stopped_at_its_first_step_takes_a_corrected_learning_rate(tiny_dir, tmp_path, monkeypatch):
    import math

    import lidr.train

    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(4))
    real_loss = lidr.train.preference_loss
    monkeypatch.setattr(lidr.train, "preference_loss", lambda *a, **k: tuple(t * math.nan for t in real_loss(*a, **k)))
    with pytest.raises(SystemExit, match="step 1: loss nan"):
        train_main(tiny_dir, data, tmp_path / "run", "--lr", "1e3")
    monkeypatch.setattr(lidr.train, "preference_loss", real_loss)
    with pytest.raises(SystemExit, match=r"other inputs or other settings \(data\."):  # other data: still refused
        train_main(tiny_dir, write_jsonl(tmp_path / "other.jsonl", pairs(5)), tmp_path / "run")
    train_main(tiny_dir, data, tmp_path / "run", "--lr", "1e-5")  # today: refused, "lr: 1000.0 -> 1e-05"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["lr"] == 1e-5
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_decoding_values_that_give_garbage_are_refused(capsys):
    from lidr.settings import Decoding, Training

    for build, message in ((lambda: Decoding(max_new_tokens=1, repetition_penalty=1.0, temperature=1e-40),
                            "Decoding.temperature: 1e-40 is neither 0 nor at least 1e-05"),
                           (lambda: Decoding(max_new_tokens=1, repetition_penalty=1e-39),
                            "Decoding.repetition_penalty: 1e-39 is below its least value 0.01"),
                           (lambda: Decoding(max_new_tokens=1, repetition_penalty=1.0, seed=2**64),
                            "Decoding.seed: 18446744073709551616 is above its greatest value"),
                           (lambda: Training(seed=2**63), "Training.seed: 9223372036854775808 is above")):
        with pytest.raises(ValueError, match=message):
            build()


def test_an_engine_that_cannot_work_is_refused_before_anything_is_recorded(tiny_dir, tmp_path):
    from lidr.harness.sampled import Engine

    with pytest.raises(ValueError, match=r"Engine\.batch_size: 0"):
        Engine(tiny_dir, batch_size=0)
    with pytest.raises(ValueError, match=r"Engine\.dtype: 'float64'"):
        Engine(tiny_dir, dtype="float64")


# -----------------------------------------------------------------------------
# 5. errors as sentences


def test_a_parent_path_that_is_a_file_a_full_disk_and_ctrl_c_are_one_line(tmp_path, monkeypatch, capsys):
    folder = write_stage_outputs(tmp_path / "iter1")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match=r"afile: it is a file where a folder is needed"):
        lidr.cli.pairs.main(["--dir", str(folder), "--langs", "fr", "--out", str(tmp_path / "afile" / "pairs.jsonl")])

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "pairs.jsonl"))

    monkeypatch.setattr(lidr.harness.stage_files, "write_text_atomic", full)
    with pytest.raises(SystemExit, match=r"pairs\.jsonl: the disk is full: free some space; then rerun the same"):
        lidr.cli.pairs.main(["--dir", str(folder), "--langs", "fr"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lidr.harness.stage_files, "pairs_from_dir", interrupted)  # lidr.cli.pairs imports it in main
    with pytest.raises(SystemExit) as stop:
        lidr.cli.pairs.main(["--dir", str(folder), "--langs", "fr"])
    assert stop.value.code == 130 and "interrupted (Ctrl-C); rerun the same command" in capsys.readouterr().err


@pytest.mark.parametrize("door", ["generate", "translate", "train_dpo", "iterate", "lidr.cli.pairs", "lidr.cli.sdrrl",
                                  "lidr.cli.train", "world.corpus", "world.demo_model", "eval.mgsm", "eval.alpacaeval",
                                  "eval.report", "eval.agreement"])
def test_every_command_has_the_top_level_handler(door):
    import importlib

    main = importlib.import_module(door).main
    assert main.__wrapped__ is not main and main.__code__.co_name == "door"


def test_a_bom_is_not_a_bad_row_and_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"id": 1}\n{"id": "\xff"}\n{"id": 3}\n')
    rows, bad = read_records(path)
    assert rows == [(1, {"id": 1}), (3, {"id": 3})]
    assert bad == [(2, "not UTF-8 text (byte 0xff at column 9)")]
    listed = tmp_path / "in.json"
    listed.write_bytes(b'[{"id": 1},\n {"id": "\xff"}]')
    with pytest.raises(ValueError, match=r"in\.json:2: not UTF-8 text"):
        read_records(listed)
