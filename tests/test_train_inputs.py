"""The trainer's everyday mistakes: inputs checked before anything is recorded, reruns bound to their inputs,
flags that cannot work refused by argparse, rows over --max-len counted in OUT/data_report.json."""

import json
import shutil

import pytest
from helpers import pairs, write_jsonl

from lidr.cli.train import main, parse_args


def args_for(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "4", "--max-len", "96", *extra]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pairs(4))


@pytest.mark.slow
def test_a_typo_in_model_or_data_leaves_nothing_behind_and_the_corrected_command_runs(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"no such model folder"):
        main(args_for(tmp_path / "no-such-model", data, out))
    with pytest.raises(SystemExit, match=r"no-such-pairs.jsonl: no such file"):
        main(args_for(tiny_dir, tmp_path / "no-such-pairs.jsonl", out))
    assert not out.exists()
    main(args_for(tiny_dir, data, out))
    assert (out / "model" / "config.json").is_file()


@pytest.mark.slow  # a whole training run
def test_rerun_with_a_relative_path_to_the_same_data_is_the_same_run(tiny_dir, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    main(args_for(tiny_dir, data, out))
    monkeypatch.chdir(tmp_path)
    main(args_for(tiny_dir, "pairs.jsonl", "run"))
    assert "this run finished earlier, nothing to do" in capsys.readouterr().out


@pytest.mark.slow
def test_rerun_on_changed_data_is_refused_naming_it_before_anything_is_touched(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    main(args_for(tiny_dir, data, out))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    write_jsonl(data, pairs(5))
    with pytest.raises(SystemExit, match=r"other inputs or other settings \(data\.sha256: .*data\.size: "):
        main(args_for(tiny_dir, data, out))
    with pytest.raises(SystemExit, match=r"lr: 5e-07 -> 0\.001"):
        main(args_for(tiny_dir, data, out, "--lr", "1e-3"))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_no_usable_row_is_one_sentence(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", ["{not json", {"prompt": "p", "chosen": "same", "rejected": "same"}])
    with pytest.raises(SystemExit, match=r"bad.jsonl: 0 usable rows of 2 \(dropped: 1 unreadable, 1 chosen == rejected"):
        main(args_for(tiny_dir, data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--batch-size", "--grad-accum", "--epochs", "--max-len", "--save-every"])
def test_zero_is_an_argparse_error(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model", "m", "--data", "d", "--out", "o", flag, "0"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: 0 is below its least value 1" in capsys.readouterr().err


@pytest.mark.slow  # a whole training run
def test_rows_over_max_len_are_counted_in_the_data_report(tiny_dir, tmp_path, capsys):
    long_answer = {"prompt": "Say a lot.", "chosen": "word " * 200, "rejected": "no"}
    long_prompt = {"prompt": "Read: " + "blah " * 200 + "Yes or no?", "chosen": "Yes.", "rejected": "No."}
    data = write_jsonl(tmp_path / "pairs.jsonl", [*pairs(4), long_answer, long_prompt])
    out = tmp_path / "run"
    main(args_for(tiny_dir, data, out))
    report = json.loads((out / "data_report.json").read_text())
    assert report == {"read": 6, "unreadable": 0, "too long": 1, "prompt truncated": 1, "kept": 5}
    printed = capsys.readouterr().out
    assert "6 rows read, 5 kept (dropped: 1 too long; 1 prompts truncated)" in printed


def test_a_truncated_weight_file_is_named_before_anything_is_recorded(tiny_dir, data, tmp_path):
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SystemExit, match=r"model.safetensors"):
        main(args_for(model, data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
