"""Why an iteration helps or hurts in the controlled world: the sign each answer writes, per operation.

    python bench/world_signs.py runs/demo                       # one seed's demo folder
    python bench/world_signs.py runs/world-study/seed2 --models M0 M1 M2 --split dev

Every world problem either adds ("buys 5 more") or subtracts ("gives 5 to a friend"), and every
answer shows its work ("7 + 5 = 12"), so three things can be read straight from the files:
1. per model, language and operation: the share of held-out answers that write the right sign
   (eval/{split}/{model}/mgsm/{lang}.jsonl); a model that learned "always +" shows 1.00 / 0.00;
2. per LIDR iteration and language: the kinds of pairs it trained on (lidr/iter{t}/pairs.jsonl):
   chosen "+" over rejected "-", "-" over "+", the same sign on both sides, or no sign;
3. per iteration: how many self-translations changed a sign while keeping every number
   (lidr/iter{t}/translate/*.jsonl), which lidr.pairs.arithmetic (--check-numbers) catches.
bench/RESULTS.md reads these tables for seeds 0, 1 and 2.
"""

import argparse
import json
import re
from collections import Counter
from pathlib import Path

LANGS = ["en", "es", "fr", "de", "ru"]
WORK = re.compile(r"\d+ ([+-]) \d+ = \d+")


def sign(text: str) -> str | None:
    found = WORK.search(text or "")
    return found.group(1) if found else None


def gold_sign(question: str, gold: str) -> str:
    a, b = (int(n) for n in re.findall(r"\d+", question)[:2])
    return "+" if a + b == int(gold) else "-"


def sign_accuracy(rows: list[dict]) -> dict:
    right, total = Counter(), Counter()
    for row in rows:
        op = gold_sign(row["question"], row["gold"])
        total[op] += 1
        right[op] += sign(row["answer"]) == op
    return {op: right[op] / total[op] for op in "+-" if total[op]}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="a demo folder (python demo.py --work WORK)")
    parser.add_argument("--models", nargs="+", default=["M0", "M1", "M2"])
    parser.add_argument("--split", choices=("test", "dev", "ood"), default="test", help="default: %(default)s")
    args = parser.parse_args(argv)

    print(f"right sign on the {args.split} problems, adding / subtracting:")
    print("| lang | " + " | ".join(args.models) + " |")
    for lang in LANGS:
        cells = []
        for model in args.models:
            acc = sign_accuracy(read_jsonl(args.work / "eval" / args.split / model / "mgsm" / f"{lang}.jsonl"))
            cells.append(f"{acc.get('+', float('nan')):.2f} / {acc.get('-', float('nan')):.2f}")
        print(f"| {lang} | " + " | ".join(cells) + " |")

    for folder in sorted((args.work / "lidr").glob("iter*"), key=lambda f: int(f.name[4:])):
        kinds = Counter()
        for pair in read_jsonl(folder / "pairs.jsonl"):
            chosen, rejected = sign(pair["chosen"]), sign(pair["rejected"])
            kind = f"{chosen} over {rejected}" if chosen and rejected and chosen != rejected else (
                "same sign" if chosen and chosen == rejected else "no sign")
            kinds[(pair["lang"], kind)] += 1
        print(f"\n{folder.name} pairs by kind (lang: counts):")
        for lang in LANGS:
            counts = {kind: n for (l, kind), n in sorted(kinds.items()) if l == lang}
            if counts:
                print(f"  {lang}: {counts}")
        flips = Counter()
        for path in sorted((folder / "translate").glob("*.jsonl")):
            for row in read_jsonl(path):
                source, target = sign(row.get("response")), sign(row.get("translation"))
                if source and target:
                    flips["changed" if source != target else "kept"] += 1
        print(f"  self-translations whose sign was kept / changed: {flips['kept']} / {flips['changed']}")


if __name__ == "__main__":
    main()
