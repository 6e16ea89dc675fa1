"""Every setting written once (lidr/settings.py): the flags, their inverse and the run records are
generated from the dataclass fields, and a value outside its range is refused before anything runs."""

import argparse
import math
from dataclasses import fields, replace

import pytest

from lidr import settings
from lidr.cli import add_flags, flags_argv, from_flags
from lidr.pairs import PairOptions
from lidr.sdrrl import SDRRLOptions
from lidr.settings import Decoding, Training

CHANGED = [  # a value other than the default for every field
    replace(settings.ANSWERS, max_new_tokens=7, repetition_penalty=1.3, prompt_template="alpaca", system=None,
            temperature=0.7, top_p=0.9, top_k=5, seed=3),
    Decoding(max_new_tokens=9, repetition_penalty=1.05, prompt_template="Q ({language}): {instruction}\nA:",
             system="Translate.", temperature=1.0, top_p=0.5, top_k=1, seed=11),
    Training(objective="sft", beta=0.5, alpha=0.0, lr=3e-5, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6,
             weight_decay=0.1, lr_scheduler="cosine", warmup_ratio=0.2, grad_clip=2.0, epochs=3, batch_size=2,
             grad_accum=4, max_len=512, seed=7, save_every=9, activation_checkpointing=True, dtype="bfloat16",
             chat_format="chatml", plain_text="raw", loss="robust", length_normalize=True, label_smoothing=0.2,
             eval_split=0.1, eval_every=5, eval_data="held.jsonl", report_to="tensorboard"),
    PairOptions(dominant="de", dominant_pairs="one", drop_identical=False, check_language=True, check_numbers=True,
                drop_same_answer=True, min_chars=2, max_chars=100, failed_translation="drop-one", seed=4),
    SDRRLOptions(dominant="fr", include_english=False, reference_field="answer", code_switch_rows=0.25,
                 code_switch_unit="line", code_switch_units=1.0, seed=2),
]


def parse(defaults, argv, prefix=""):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, defaults, prefix=prefix)
    return from_flags(parser.parse_args(argv), defaults, prefix)


@pytest.mark.parametrize("values", CHANGED, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("prefix", ["", "translate-"])
def test_flags_argv_gives_the_settings_back(values, prefix):
    defaults = settings.ANSWERS if isinstance(values, Decoding) else type(values)()
    assert all(getattr(values, f.name) != getattr(defaults, f.name) for f in fields(values))  # each flag matters
    assert parse(defaults, flags_argv(values, prefix), prefix) == values
    assert parse(defaults, [], prefix) == defaults  # no flag: every default


def test_every_field_is_a_flag_with_help():
    for defaults in (settings.ANSWERS, settings.TRAINING, PairOptions(), SDRRLOptions()):
        parser = argparse.ArgumentParser()
        add_flags(parser, defaults)
        options = {a.dest: a for a in parser._actions if a.dest != "help"}
        assert set(options) == {f.name for f in fields(defaults)}
        assert all(a.help and "default" in a.help for a in options.values())


@pytest.mark.parametrize("argv, message", [
    (["--lr", "nan"], "argument --lr: nan is not a finite number"),
    (["--lr", "0"], "argument --lr: 0.0 is not greater than 0.0"),
    (["--warmup-ratio", "1.5"], "argument --warmup-ratio: 1.5 is above its greatest value 1.0"),
    (["--batch-size", "0"], "argument --batch-size: 0 is below its least value 1"),
    (["--epochs", "two"], "'two' is not a whole number"),
    (["--adam-beta2", "1"], "argument --adam-beta2: 1.0 is not below 1"),
])
def test_a_flag_out_of_range_is_refused_naming_it(argv, message, capsys):
    parser = argparse.ArgumentParser()
    add_flags(parser, settings.TRAINING)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("build, message", [
    (lambda: Training(lr=math.inf), "Training.lr: inf is not a finite number"),
    (lambda: Training(objective="ppo"), "Training.objective: 'ppo' is not one of 'dpo', 'sft'"),
    (lambda: Training(loss="hinge", label_smoothing=0.1),
     "Training.label_smoothing: 0.1 is for the sigmoid (cDPO) and robust losses; the hinge loss has none"),
    (lambda: Training(loss="robust", label_smoothing=0.5), "Training.label_smoothing: 0.5 is above its greatest value 0.49"),
    (lambda: Training(loss="ipo", length_normalize=True), "Training.length_normalize: the ipo loss is per token already"),
    (lambda: Decoding(max_new_tokens=10, repetition_penalty=0.0),
     "Decoding.repetition_penalty: 0.0 is below its least value 0.01"),
    (lambda: Decoding(max_new_tokens=10, repetition_penalty=1.0, top_p=0.0), "Decoding.top_p: 0.0 is not greater than 0.0"),
    (lambda: PairOptions(min_chars=-1), "PairOptions.min_chars: -1 is below its least value 0"),
    (lambda: SDRRLOptions(code_switch_rows=2.0), "SDRRLOptions.code_switch_rows: 2.0 is above its greatest value 1.0"),
    (lambda: Decoding(max_new_tokens=10, repetition_penalty=1.0, prompt_template="{question}"),
     "Decoding.prompt_template: prompt template '{question}' is neither a name (plain, alpaca) nor a text with "
     "{instruction}"),
])
def test_a_value_out_of_range_is_refused_from_python_too(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_the_run_record_holds_every_setting_that_changes_the_result():
    record = settings.provenance(settings.TRAINING)
    assert set(record) == {f.name for f in fields(Training)} - {"save_every", "activation_checkpointing", "eval_every",
                                                                "eval_data", "report_to"}
    assert record["loss"] == "sigmoid" and record["length_normalize"] is False  # the paper's loss, recorded


def test_iterate_takes_the_stages_own_flags():
    """iterate.py's answer, translation, pair and SFT-row flags are generate.py's, translate.py's,
    lidr.pairs' and lidr.sdrrl's, with prefixes: one declaration each."""
    import lidr.cli.iterate as iterate

    translation = replace(CHANGED[1], prompt_template="plain")  # translation asks in its own prompt: no such flag
    argv = ["--model", "M", "--work", "W", "--prompts", "P", "--langs", "fr", "--dominant", "de",
            "--no-translation-tasks",
            *flags_argv(CHANGED[0]), *flags_argv(translation, "translate-", skip=("prompt_template",)),
            *flags_argv(CHANGED[3], "pairs-", skip=("dominant",)), *flags_argv(CHANGED[4], "sdrrl-", skip=("dominant",)),
            "--", *flags_argv(CHANGED[2])]
    args, training = iterate.parse_args(argv)
    assert from_flags(args, settings.ANSWERS) == CHANGED[0]
    assert from_flags(args, settings.TRANSLATION, "translate-") == translation
    assert replace(from_flags(args, PairOptions(), "pairs-"), dominant="de") == CHANGED[3]
    assert replace(from_flags(args, SDRRLOptions(), "sdrrl-"), dominant="fr") == CHANGED[4]
    assert training == CHANGED[2]


@pytest.mark.parametrize("command, argv, sentence", [
    ("train", ["--model", "M", "--data", "D", "--out", "O", "--loss", "ipo", "--length-normalize"],
     "--length-normalize: the ipo loss is per token already"),
    ("train", ["--model", "M", "--data", "D", "--out", "O", "--eval-every", "3"],
     "--eval-every: 3 scores the held-out pairs every so many steps, but none are held out: give --eval-split or "
     "--eval-data"),
    ("iterate", ["--model", "M", "--work", "W", "--prompts", "P", "--langs", "fr", "--no-translation-tasks", "--",
                 "--loss", "hinge", "--label-smoothing", "0.1"],
     "--label-smoothing: 0.1 is for the sigmoid (cDPO) and robust losses; the hinge loss has none"),
])
def test_settings_that_do_not_go_together_end_a_command_in_one_sentence_naming_the_flag(command, argv, sentence,
                                                                                       tmp_path, monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(f"lidr.cli.{command}").main(argv)
    assert stopped.value.code == sentence
    assert list(tmp_path.iterdir()) == []  # refused before anything was read or written
