"""A controlled world where LIDR's premise holds by construction: a corpus, a tokenizer and an M0 from scratch.

    python -m world.corpus --out runs/world/data --seed 0          # corpus, splits, tokenizer, M0's random init
    python train_dpo.py --objective sft --model runs/world/data/init --data runs/world/data/corpus.jsonl \\
        --out runs/world/m0 --lr 3e-3 --batch-size 32 --epochs 1 --max-len 256   # pretraining -> M0
    python demo.py                                                # all of it, then LIDR, SDRRL and the controls

LIDR needs two things of M0 (docs in README, "The controlled world"): it is better in the
dominant language than in the others, and it translates its own answers faithfully. No real model
that does both runs on a CPU here, so this module builds a small world where both are true and
every dial can be turned:

- The task: one-step arithmetic word problems ("Tom has 7 apples. He buys 5 more. How many apples
  does he have now?", world/problems.py), the same draw written in en, es, fr, de and ru (parallel
  ids). An answer shows its work and ends in a checkable number, in the question's language:
  "Tom has 7 apples and buys 5 more: 7 + 5 = 12. The answer is 12."
- The corpus (chat rows {system, prompt, response} for `train_dpo.py --objective sft`):
  * solved problems: plenty in English (--n-english), few in each other language (--n-other), and
    those few are noisy: a share (--other-error-rate) misreads the verb and applies the wrong
    operation ("buys 5 more: 7 - 5 = 2"). This is the imbalance, by construction: M0 learns
    English arithmetic well and, in the other languages, a habit of confusing gains and losses.
  * English can be imperfect too (--english-error-rate, default 0): that share of the twelve
    (object, operation) cells always misreads the verb in English, so M0 learns those cells wrong
    and greedy decoding repeats it (a random share would not show: greedy picks the majority).
  * English can slip (--english-slip-rate, default 0): that share of the cells, none misread, gets
    the operation right and the result one too many ("7 + 5 = 13"). LIDR's chosen answers there
    are better than the rejected (the operation) and still wrong (the sum): NLL copies the slip,
    a preference between the two need not.
  * English errors can be soft (--english-soft-error-rate, default 0): that share of all English
    answers misreads the verb at random, in every cell: the weak languages' kind of error at a
    lower rate. Greedy decoding reads the majority and hides it; answers sampled at a temperature
    (world/arms.py) carry it, and so do LIDR's chosen answers: English then has room to improve,
    and its pairs (y_en over y_l→en, wrong less often than the rejected) a direction to improve in.
  * translations of answers between English and each language, in the paper's exact prompt
    (lidr/translation.py) with the reply written as "<translated>\\n...\\n</translated>"
    (--n-translation per direction and language). Sources are correct or wrong answers alike
    (--translation-source-error-rate), so M0 learns to copy the numbers it reads, not to redo the
    sum: faithful self-translation. --translation-fidelity below 1 replaces every number of that
    share of the targets by a random one (the tag still closes, the language is right); at 0 it
    is the control where the premise's second half fails.
- Splits, all from one --seed, each problem written in every language with the same id: dev
  (--n-dev, where every setting of the demo is chosen) and test (--n-test, what is reported),
  distinct draws from one distribution; each LIDR iteration's prompts (--n-prompts, distinct;
  --samples K writes each prompt row K times, ids "{id}~{k}", so that at a temperature each prompt
  is answered K times, and pairs k of a prompt join independent answers);
  the pretraining problems (drawn with repetition, never a dev, test or iteration draw); and an
  out-of-distribution test (--n-ood): the same arithmetic about two people and two objects that
  the corpus never names (world/problems.py NEW_PEOPLE, NEW_OBJECTS).
- The tokenizer: byte-level BPE trained with `tokenizers` on the corpus, Llama 3's chat special
  tokens, every newline its own pre-token (so a pre-filled "<translated>\\n" tokenizes the same
  in a prompt as in a training reply). M0's init: a small Llama (`lidr.model`, tied embeddings,
  GQA) with random weights, saved as an HF folder with that tokenizer.

Files written in OUT: corpus.jsonl, corpus_report.json, {dev,test,ood}/{lang}.jsonl ({id, query,
response}), prompts{t}/{lang}.jsonl ({id, instruction}), gold{t}/{lang}.jsonl (gold answers:
{id, lang, prompt, response, answer}, the SFT ceiling's rows and the key that pairs are scored
against), tokenizer/ and init/ (the HF folder of M0 before pretraining).

How this departs from the paper: everything here is synthetic and tiny by design; the imbalance
is planted (scarce, noisy non-English data) rather than found, so that the mechanism can be seen
and switched off. LIDR itself runs unchanged on it (iterate.py).
"""

import argparse
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lidr.cli import command
from lidr.harness.outputs import check_folder, hold_lock, record_output, write_json_atomic, write_text_atomic
from world.problems import (NEW_OBJECTS, NEW_PEOPLE, OBJECTS, PEOPLE, distinct_draws, draw, ru_count,
                            write_problem)
from lidr.translation import CLOSING_TAG, PREFILL, translation_prompt

LANGS = ("en", "es", "fr", "de", "ru")
SPLITS = ("test", "dev", "ood")  # evaluation sets, each split/{lang}.jsonl: test is reported, dev beside it
# a problem names PEOPLE[i] and OBJECTS[j]; the indices past the corpus's lists name the out-of-distribution ones
ALL_PEOPLE, ALL_OBJECTS = PEOPLE + NEW_PEOPLE, OBJECTS + NEW_OBJECTS
SYSTEM = "You are a helpful assistant."
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass
class WorldSettings:
    seed: int = 0
    max_number: int = 12  # operands in 2..max_number (subtraction: the result is at least 1)
    n_english: int = 6000  # solved English problems in the corpus
    n_other: int = 300  # solved problems per other language
    other_error_rate: float = 0.6  # share of those that apply the wrong operation, at random
    english_error_rate: float = 0.0  # share of (object, operation) cells whose English answers always misread the verb
    english_slip_rate: float = 0.0  # share of the other cells whose English answers slip: operation right, result + 1
    english_soft_error_rate: float = 0.0  # share of all English answers that misread the verb, at random in every cell
    n_translation: int = 600  # translated answers per direction (en->l and l->en) per language
    translation_source_error_rate: float = 0.3  # share of translated answers that are wrong answers
    translation_fidelity: float = 1.0  # share of translation targets that keep their numbers (0: the broken control)
    n_dev: int = 200  # dev problems per language: every setting is chosen on these
    n_test: int = 200  # test problems per language, same distribution: what is reported
    n_ood: int = 100  # out-of-distribution problems per language: people and objects the corpus never names
    n_prompts: int = 200  # LIDR prompts per iteration and language
    samples: int = 1  # answers per prompt: each prompt row written this many times, ids "{id}~{k}" (temperature > 0)
    iterations: int = 2
    vocab_size: int = 1024
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 384
    tie_embeddings: bool = False  # tied, DPO's push on a rejected number token moves its input embedding too


# -----------------------------------------------------------------------------
# problems and answers


def solve(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b


def write_answer(lang: str, problem: tuple, wrong_operation: bool = False, slip: bool = False) -> str:
    """The worked answer to `problem` in `lang`; with wrong_operation the verb is misread (+ for -, - for +);
    with slip the operation is right and the result one too many ("7 + 5 = 13")."""
    person, obj, a, b, op = problem
    name, pron = ALL_PEOPLE[person][lang]
    used = {"+": "-", "-": "+"}[op] if wrong_operation else op
    result = solve(a, b, used) + slip
    work = f"{a} {used} {b} = {result}"
    if lang == "en":
        act = f"buys {b} more" if op == "+" else f"gives {b} to a friend"
        return f"{name} has {a} {ALL_OBJECTS[obj]['en']} and {act}: {work}. The answer is {result}."
    if lang == "es":
        noun = ALL_OBJECTS[obj]["es"][0]
        act = f"compra {b} más" if op == "+" else f"le da {b} a un amigo"
        return f"{name} tiene {a} {noun} y {act}: {work}. La respuesta es {result}."
    if lang == "fr":
        act = f"en achète {b} de plus" if op == "+" else f"en donne {b} à un ami"
        return f"{name} a {a} {ALL_OBJECTS[obj]['fr']} et {act} : {work}. La réponse est {result}."
    if lang == "de":
        act = f"kauft {b} dazu" if op == "+" else f"gibt einem Freund {b} davon"
        return f"{name} hat {a} {ALL_OBJECTS[obj]['de']} und {act}: {work}. Die Antwort ist {result}."
    if lang == "ru":
        act = f"покупает ещё {b}" if op == "+" else f"отдаёт другу {b}"
        return f"У {pron} есть {a} {ru_count(a, ALL_OBJECTS[obj]['ru'])}, {name} {act}: {work}. Ответ: {result}."
    raise ValueError(f"no answer template for language {lang!r}; known: {', '.join(LANGS)}")


def write_question(lang: str, problem: tuple) -> str:
    person, obj, a, b, op = problem
    return write_problem(lang, ALL_PEOPLE[person], ALL_OBJECTS[obj], a, b, op)


def scramble_numbers(text: str, rng: random.Random, max_number: int) -> str:
    """Every number of `text` replaced by a random one: a fluent, well-formed, unfaithful translation."""
    return re.sub(r"\d+", lambda _: str(rng.randint(1, 2 * max_number)), text)


# -----------------------------------------------------------------------------
# the corpus and the splits


def chat_row(kind: str, lang: str, prompt: str, response: str, **extra) -> dict:
    return {"kind": kind, "lang": lang, "system": SYSTEM, "prompt": prompt, "response": response, **extra}


def translation_reply(text: str) -> str:
    """The reply the model should give to a translation prompt: the pre-filled tag, the text, the closing tag."""
    return f"{PREFILL}{text}\n{CLOSING_TAG}"


def ood_draws(n: int, rng: random.Random, max_number: int) -> list[tuple]:
    """n distinct problems about NEW_PEOPLE and NEW_OBJECTS (numbers and operations as in the corpus)."""
    draws, seen = [], set()
    while len(draws) < n:
        _, _, a, b, op = draw(rng, max_number)
        d = (len(PEOPLE) + rng.randrange(len(NEW_PEOPLE)), len(OBJECTS) + rng.randrange(len(NEW_OBJECTS)), a, b, op)
        if d not in seen:
            seen.add(d)
            draws.append(d)
    return draws


def misread_cells(rate: float, seed: int) -> set:
    """The (object, operation) cells whose English answers always apply the wrong operation: round(rate · 12)."""
    cells = [(obj, op) for obj in range(len(OBJECTS)) for op in "+-"]
    return set(random.Random(seed + 2).sample(cells, round(rate * len(cells))))


def slip_cells(rate: float, seed: int, misread: set) -> set:
    """The (object, operation) cells whose English answers always slip (the operation right, the result one
    too many): round(rate · 12) of the cells that are not misread, from a stream of their own."""
    cells = [(obj, op) for obj in range(len(OBJECTS)) for op in "+-" if (obj, op) not in misread]
    return set(random.Random(seed + 3).sample(cells, round(rate * 2 * len(OBJECTS))))


def build(out, settings: WorldSettings, langs=LANGS) -> dict:
    """Write the corpus, the splits, the tokenizer and M0's random init into `out`; returns the report."""
    out = Path(out)
    rng = random.Random(settings.seed)
    scramble_rng = random.Random(settings.seed + 1)  # its own stream: a broken world differs in nothing else
    n = settings.max_number
    taken: set = set()
    dev_draws = distinct_draws(settings.n_dev, rng, n, taken)
    prompt_draws = [distinct_draws(settings.n_prompts, rng, n, taken) for _ in range(settings.iterations)]
    test_draws = distinct_draws(settings.n_test, rng, n, taken)
    splits = {"dev": dev_draws, "test": test_draws, "ood": ood_draws(settings.n_ood, rng, n)}
    held = set(taken)
    misread = misread_cells(settings.english_error_rate, settings.seed)
    slips = slip_cells(settings.english_slip_rate, settings.seed, misread)
    soft_rng = random.Random(settings.seed + 4)  # a stream of its own: at rate 0 the world is the one without it

    def pretraining_draw():
        while True:
            d = draw(rng, n)
            if d not in held:
                return d

    en, others = langs[0], langs[1:]
    rows = []
    for _ in range(settings.n_english):
        d = pretraining_draw()
        wrong, slip = (d[1], d[4]) in misread, (d[1], d[4]) in slips
        if not (wrong or slip) and settings.english_soft_error_rate:
            wrong = soft_rng.random() < settings.english_soft_error_rate
        rows.append(chat_row("solve", en, write_question(en, d), write_answer(en, d, wrong, slip), wrong=wrong,
                             **({"slip": True} if slip else {})))
    for lang in others:
        for _ in range(settings.n_other):
            d = pretraining_draw()
            wrong = rng.random() < settings.other_error_rate
            rows.append(chat_row("solve", lang, write_question(lang, d), write_answer(lang, d, wrong), wrong=wrong))
        for src, dst in ((en, lang), (lang, en)):
            for _ in range(settings.n_translation):
                d = pretraining_draw()
                wrong = rng.random() < settings.translation_source_error_rate
                target = write_answer(dst, d, wrong)
                if scramble_rng.random() >= settings.translation_fidelity:
                    target = scramble_numbers(target, scramble_rng, n)
                rows.append(chat_row("translate", f"{src}-{dst}", translation_prompt(write_answer(src, d, wrong), dst),
                                     translation_reply(target)))
    rng.shuffle(rows)
    write_text_atomic(out / "corpus.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    for lang in langs:
        for split, draws in splits.items():
            write_jsonl(out / split / f"{lang}.jsonl", [{"id": f"{split}-{i}", "query": write_question(lang, d),
                                                          "response": str(solve(*d[2:]))} for i, d in enumerate(draws)])
        for t, draws in enumerate(prompt_draws, 1):
            ids = [f"iter{t}-{i}" for i in range(len(draws))]
            write_jsonl(out / f"prompts{t}" / f"{lang}.jsonl",
                        [{"id": sample_id(i, k, settings.samples), "instruction": write_question(lang, d)}
                         for i, d in zip(ids, draws) for k in range(settings.samples)])
            # no system turn, as in LIDR's pairs and SDRRL's rows: every arm trains on the same chat turns
            write_jsonl(out / f"gold{t}" / f"{lang}.jsonl",
                        [{"id": i, "lang": lang, "prompt": write_question(lang, d), "response": write_answer(lang, d),
                          "answer": solve(*d[2:])} for i, d in zip(ids, draws)])

    tokenizer_dir = train_tokenizer([r["prompt"] + "\n" + r["response"] for r in rows], out / "tokenizer",
                                    settings.vocab_size)
    init_model(tokenizer_dir, out / "init", settings)
    kinds = Counter(f"{r['kind']} {r['lang']}" for r in rows)
    report = {"settings": asdict(settings), "rows": len(rows), "per_kind": dict(sorted(kinds.items())),
              "wrong_solutions": dict(Counter(r["lang"] for r in rows if r.get("wrong"))),
              "english_misread_cells": sorted(f"{OBJECTS[obj]['en']} {op}" for obj, op in misread),
              **({"english_slip_cells": sorted(f"{OBJECTS[obj]['en']} {op}" for obj, op in slips)} if slips else {})}
    write_json_atomic(out / "corpus_report.json", report)
    return report


def sample_id(problem_id: str, k: int, samples: int) -> str:
    """The id of the k-th answer to a prompt: the problem's id itself with one sample per prompt, else "{id}~{k}"."""
    return problem_id if samples == 1 else f"{problem_id}~{k}"


def problem_id(row_id: str) -> str:
    """The problem a prompt row (or a pair) asks: its id less the sample suffix (gold files hold one row per problem)."""
    return str(row_id).split("~")[0]


def write_jsonl(path: Path, rows: list[dict]):
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# -----------------------------------------------------------------------------
# tokenizer and M0's initialisation


def train_tokenizer(texts: list[str], out: Path, vocab_size: int) -> Path:
    """Byte-level BPE over `texts` plus Llama 3's chat special tokens, written as an HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # a newline is always its own pre-token: "\n\n" at the end of a prompt and "\n" + "\n" inside a
    # pre-filled reply tokenize alike, so a training reply and a generation prompt agree
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": LLAMA3_CHAT_TEMPLATE, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "pad_token": "<|end_of_text|>", "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512,
    }, indent=2))
    return out


def init_model(tokenizer_dir: Path, out: Path, settings: WorldSettings) -> Path:
    """M0 before pretraining: a small Llama with random weights (seeded), as an HF folder."""
    from lidr.checkpoint import save
    from lidr.model import Llama, LlamaConfig
    from lidr.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(tokenizer_dir)
    vocab = tokenizer.vocab_size
    cfg = LlamaConfig(vocab_size=vocab, dim=settings.dim, n_layers=settings.n_layers, n_heads=settings.n_heads,
                      n_kv_heads=settings.n_kv_heads, ffn_dim=settings.ffn_dim,
                      head_dim=settings.dim // settings.n_heads, rope_theta=10000.0, max_seq_len=512,
                      tie_embeddings=settings.tie_embeddings, bos_token_id=tokenizer.bos_id,
                      eos_token_id=sorted(tokenizer.stop_ids))
    torch.manual_seed(settings.seed)
    model = Llama(cfg)
    model.init_weights(std=0.02)
    save(out, cfg, model.state_dict(), tokenizer_from=tokenizer_dir)
    return out


@command()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the corpus, splits, tokenizer and init")
    defaults = WorldSettings()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"default: {value}")
    args = vars(parser.parse_args(argv))
    out, settings = Path(args.pop("out")), WorldSettings(**args)
    with hold_lock(out, "world.corpus"):
        check_folder(out, "world.corpus", asdict(settings))  # a folder of the user's, or another world: refused
        record_output(out, "world.corpus", asdict(settings))  # claimed: a killed build is rebuilt by the same command
        report = build(out, settings)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
