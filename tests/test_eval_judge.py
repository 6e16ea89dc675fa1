"""Judges: the HTTP judge against a scripted local chat-completions server, the local-model judge
against transformers' logits, both orders / random order, win rates, and the X-AlpacaEval and
agreement commands end to end on small files."""

import hashlib
import json
import math
import shutil
import socket
import statistics
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from helpers import ROOT, shared_data

from eval import agreement, alpacaeval
from eval.judge import (
    PROTOCOL_DIR, HttpJudge, JudgeError, LocalJudge, judge_both_orders, judge_messages, judge_random_order,
    logprob_preference, order_is_swapped, win_rate,
)
from lidr.harness.outputs import ResumableWriter

TRIPLE = ("¿Cuál es la capital de Francia?", "La capital de Francia es París.", "Paris is the capital.")

# The messages alpaca_eval sends for TRIPLE (weighted_alpaca_eval_gpt4_turbo_multilingual), written out by hand
PAPER_SYSTEM = (
    "You are a highly efficient assistant, who evaluates and selects the best large language model (LLMs) based "
    "on the quality of their responses to a given instruction. This process will be used to create a leaderboard "
    "reflecting the most accurate and human-preferred answers."
)
PAPER_USER = """I require a leaderboard for various large language models. I'll provide you with prompts given \
to these models and their corresponding outputs. Your task is to assess these responses, and select the model \
that produces the best output from a human perspective.

## Instruction

{
    "instruction": \"\"\"¿Cuál es la capital de Francia?\"\"\",
}

## Model Outputs

Here are the unordered outputs from the models. Each output is associated with a specific model, identified by a \
unique model identifier.

{
    {
        "model_identifier": "m",
        "output": \"\"\"La capital de Francia es París.\"\"\"
    },
    {
        "model_identifier": "M",
        "output": \"\"\"Paris is the capital.\"\"\"
    }
}

## Task

A good output should be in the same language as the instruction, except when the instruction explicitly \
requests the output in a different language. Evaluate the models based on the quality and relevance of their \
outputs, and select the model that generated the best output. Answer by providing the model identifier of the \
best model. We will use your output as the name of the best model, so make sure your output only contains one \
of the following model identifiers and nothing else (no quotes, no spaces, no new lines, ...): m or M.

## Best Model Identifier"""


# -----------------------------------------------------------------------------
# a scripted chat-completions server on 127.0.0.1


def completion_body(top: list[tuple[str, float]], text: str | None = None) -> dict:
    text = top[0][0] if text is None else text
    return {"id": "x", "object": "chat.completion", "choices": [{
        "index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": text},
        "logprobs": {"content": [{"token": text, "logprob": top[0][1],
                                  "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]}]}}]}


class ScriptedServer:
    """Answers request i with script[i] = (status, headers, body bytes) or "drop" (close, no answer)."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "json": json.loads(body)})
                if not outer.script:
                    raise AssertionError("the client sent more requests than scripted")
                step = outer.script.pop(0)
                if step == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, headers, payload = step
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def ok(body: dict):
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


def test_http_judge_retries_reads_logprobs_and_caches(tmp_path):
    sleeps = []
    answer = completion_body([("M", math.log(0.6)), ("m", math.log(0.25)), (" m", math.log(0.05)), ("x", -5.0)])
    server = ScriptedServer([
        (429, {"Retry-After": "7"}, b'{"error": {"message": "rate limited"}}'),
        (500, {}, b"internal error"),
        "drop",  # connection closed without an answer
        ok(answer),
    ])
    with server as url:
        judge = HttpJudge(url, "judge-model-x", api_key="sk-test", cache_path=tmp_path / "cache.jsonl",
                          backoff=1.5, sleep=sleeps.append, workers=2)
        [p] = judge.prefer_second([TRIPLE], progress=False)
        # alpaca_eval compares tokens exactly: " m" is not the answer m, so P(M better) = 1 − 0.25 / (0.25 + 0.6)
        assert p == pytest.approx(1 - 0.25 / 0.85)
        # Retry-After wins over the backoff; then 1.5 * 2**1 and 1.5 * 2**2
        assert sleeps == [7.0, 3.0, 6.0]
        assert judge.calls == 4 and len(server.requests) == 4
        # the same comparison again, in this judge and in a new one reading the cache file: no request
        assert judge.prefer_second([TRIPLE], progress=False) == [p]
        judge.close()
        again = HttpJudge(url, "judge-model-x", cache_path=tmp_path / "cache.jsonl", sleep=sleeps.append)
        assert again.prefer_second([TRIPLE], progress=False) == [p]
        assert again.calls == 0 and len(server.requests) == 4
        again.close()


def run_script(script, tmp_path, **kwargs):
    sleeps = []
    with ScriptedServer(script) as url:
        judge = HttpJudge(url, "judge-model-x", cache_path=tmp_path / "c.jsonl", sleep=sleeps.append, workers=1,
                          **kwargs)
        try:
            return judge.prefer_second([TRIPLE], progress=False), sleeps, judge
        finally:
            judge.close()


def test_http_judge_sends_the_chat_completions_request(tmp_path):
    script = ScriptedServer([ok(completion_body([("m", math.log(0.9)), ("M", math.log(0.1))]))])
    with script as url:
        judge = HttpJudge(url, "gpt-judge", api_key="sk-abc", cache_path=None, sleep=lambda s: None)
        [p] = judge.prefer_second([TRIPLE], progress=False)
    assert p == pytest.approx(0.1 / 1.0)
    [request] = script.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-abc"
    sent = request["json"]
    assert sent["messages"] == [{"role": "system", "content": PAPER_SYSTEM}, {"role": "user", "content": PAPER_USER}]
    # configs.yaml's completions_kwargs, and alpaca_eval's openai_completions default top_p=1.0
    assert {k: v for k, v in sent.items() if k != "messages"} == {
        "model": "gpt-judge", "max_tokens": 1, "temperature": 1, "top_p": 1.0, "logprobs": True, "top_logprobs": 5}
    configs = (PROTOCOL_DIR / "configs.yaml").read_text()
    for line in ("max_tokens: 1", "temperature: 1 ", "logprobs: true", "top_logprobs: 5", 'numerator_token: "m"',
                 'denominator_tokens: ["m", "M"]', "is_binarize: false", 'fn_completion_parser: "logprob_parser"'):
        assert f"  {line}" in configs, line


def test_the_shipped_prompt_is_the_papers_file():
    shipped = (PROTOCOL_DIR / "alpaca_eval_clf.txt").read_bytes()
    assert hashlib.sha256(shipped).hexdigest() == "10f5ddeae97ecab62bac9ff14d83c1fd1ce075d79b1db5efd750d7f92d772c26"
    for name in ("alpaca_eval_clf.txt", "configs.yaml"):
        assert (PROTOCOL_DIR / name).read_bytes() == shared_data("x-alpacaeval", "judge", name).read_bytes()


def test_judge_messages_are_the_shipped_prompt_filled_as_alpaca_eval_fills_it():
    assert judge_messages(*TRIPLE) == [{"role": "system", "content": PAPER_SYSTEM},
                                       {"role": "user", "content": PAPER_USER}]
    # alpaca_eval fills by replacing the first occurrence of each field in turn, in the text filled so far:
    # an instruction that spells a later field's placeholder takes that output, and the slot keeps the literal
    user = judge_messages("Explain {output_1} and {output_2}.", "first", "second")[1]["content"]
    assert '"instruction": """Explain first and second.""",' in user
    assert '"output": """{output_1}"""' in user and '"output": """{output_2}"""' in user
    # surrounding whitespace of the filled prompt and of each message is stripped, as prompt_to_chatml does
    user = judge_messages("q", "a", "b")[1]["content"]
    assert user.startswith("I require a leaderboard") and user.endswith("## Best Model Identifier")


def test_http_judge_malformed_bodies_are_clear_errors(tmp_path):
    with pytest.raises(JudgeError, match="malformed response body \\(not JSON\\)"):
        run_script([(200, {}, b"<html>gateway</html>")], tmp_path)
    no_logprobs = {"choices": [{"message": {"role": "assistant", "content": "m"}}]}
    with pytest.raises(JudgeError, match="malformed response body.*logprobs"):
        run_script([ok(no_logprobs)], tmp_path)


def test_http_judge_gives_up_and_does_not_retry_client_errors(tmp_path):
    with pytest.raises(JudgeError, match="gave up after 3 attempts; last error: HTTP 503"):
        run_script([(503, {}, b"busy")] * 3, tmp_path, max_retries=2)
    with pytest.raises(JudgeError, match="HTTP 401: bad key"):
        run_script([(401, {}, b"bad key")], tmp_path)


def test_http_judge_without_m_or_M_among_the_top_tokens_has_no_verdict(tmp_path):
    # neither m nor M among the top log-probabilities: no verdict, whatever the sampled text says
    body = completion_body([("Output", -0.1), ("The", -3.0)], text="M")
    [p], _, _ = run_script([ok(body)], tmp_path)
    assert p is None
    body = completion_body([(" M", -0.1), ("mm", -3.0)])
    [p], _, _ = run_script([ok(body)], tmp_path / "spaced")
    assert p is None
    # one of the two present: the other has probability 0
    [p], _, _ = run_script([ok(completion_body([("M", -0.3), ("Output", -1.5)]))], tmp_path / "M")
    assert p == 1.0
    [p], _, _ = run_script([ok(completion_body([("The", -0.3), ("m", -1.5)]))], tmp_path / "m")
    assert p == 0.0


def test_logprob_preference_is_alpaca_eval_preference_minus_one():
    # alpaca_eval's own example answer (completion_parsers.logprob_parser): its preference is
    # 2 − p(m) / (p(m) + p(M)) with p = exp(logprob); the win rate counts preference − 1
    top = [("M", -0.017597131), ("m", -4.048847), ("Both", -14.908222), ("The", -15.705097), ("Based", -15.955097)]
    p_m, p_M = math.exp(-4.048847), math.exp(-0.017597131)
    assert logprob_preference(top) == pytest.approx((2 - p_m / (p_m + p_M)) - 1, rel=1e-12)
    # log-probabilities too small for exp(): p(m) / (p(m) + p(M)) = 1 / (1 + e) when logprob_M = logprob_m − 1
    assert logprob_preference([("m", -800.0), ("M", -801.0)]) == pytest.approx(1 - 1 / (1 + math.exp(-1)), rel=1e-12)
    assert logprob_preference([("m", -0.5)]) == 0.0 and logprob_preference([]) is None


# -----------------------------------------------------------------------------
# the local judge against transformers' logits


@pytest.fixture(scope="module")
def judge_dir(tiny_dir, tmp_path_factory):
    """The tiny checkpoint with a context of 1,024 tokens: the judge prompt alone is about 300."""
    folder = tmp_path_factory.mktemp("judge") / "llama3-1k"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    return folder


def test_local_judge_matches_transformers_and_gives_the_known_win_rate(judge_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from lidr.checkpoint import load

    model, tokenizer = load(judge_dir)
    triples = [
        ("Combien font 2 + 2 ?", "4", "Deux plus deux font quatre."),
        ("Nenne drei Farben.", "Rot, Grün und Blau sind drei Farben, die man oft sieht.", "Rot."),
        ("Write a haiku about rain.", "Rain taps the window", "Soft rain on the roof, grey sky, a quiet street."),
    ]
    hf = LlamaForCausalLM.from_pretrained(judge_dir, torch_dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(judge_dir)
    m_id, M_id = hf_tok.convert_tokens_to_ids(["m", "M"])

    def hf_prefer_second(triple):
        ids = hf_tok.apply_chat_template(judge_messages(*triple), add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
        probs = torch.softmax(logits.double(), -1)
        return (probs[M_id] / (probs[m_id] + probs[M_id])).item()

    expected = [hf_prefer_second(triple) for triple in triples]
    judge = LocalJudge(model, tokenizer, batch_size=3)  # one left-padded batch of three lengths
    got = judge.prefer_second(triples, progress=False)
    assert got == pytest.approx(expected, abs=1e-5)
    assert len({round(p, 4) for p in got}) == 3  # the model does have preferences here

    # win rate of "first" (the model's output) over "second" (the reference), random order per key
    pairs = [{"key": f"id{i}", "instruction": t[0], "first": t[1], "second": t[2]} for i, t in enumerate(triples)]
    results = judge_random_order(judge, pairs, progress=False)
    by_hand = []
    for pair, (instruction, first, second) in zip(pairs, triples):
        if order_is_swapped(pair["key"]):  # second shown as m, first as M: P(first better) = P(M better)
            by_hand.append(hf_prefer_second((instruction, second, first)))
        else:  # first shown as m
            by_hand.append(1 - hf_prefer_second((instruction, first, second)))
    assert any(order_is_swapped(p["key"]) for p in pairs) and not all(order_is_swapped(p["key"]) for p in pairs)
    assert [r["preference"] for r in results] == pytest.approx(by_hand, abs=1e-5)
    rate, se = win_rate([r["preference"] for r in results])
    assert rate == pytest.approx(100 * statistics.mean(by_hand), abs=1e-3)
    assert se == pytest.approx(100 * statistics.stdev(by_hand) / math.sqrt(3), abs=1e-3)


def test_local_judge_skips_prompts_longer_than_the_context(judge_dir):
    from lidr.checkpoint import load

    model, tokenizer = load(judge_dir)  # max_position_embeddings 1024
    long_output = "word " * 1000
    short = ("Say hi.", "Hi!", "Hello.")
    got = LocalJudge(model, tokenizer).prefer_second([short, ("Say hi.", long_output, "Hello.")], progress=False)
    assert got[0] is not None and got[1] is None


# -----------------------------------------------------------------------------
# orders and statistics with a judge whose answers are known


class LengthJudge:
    """Prefers the longer output: P(M better) = 0.9 when M is longer, else 0.3 (a bias towards m)."""

    name = "length"

    def __init__(self):
        self.calls = 0

    def prefer_second(self, triples, progress=True):
        self.calls += len(triples)
        return [0.9 if len(M) > len(m) else 0.3 for _, m, M in triples]

    def close(self):
        pass


def test_both_orders_and_random_order_by_hand():
    pairs = [{"key": "a", "instruction": "q", "first": "long answer", "second": "short"},
             {"key": "b", "instruction": "q", "first": "tiny", "second": "a longer answer"}]
    both = judge_both_orders(LengthJudge(), pairs)
    # pair a: first shown as m -> P(M=second better) = 0.3 -> first wins 0.7; swapped -> P(M=first) = 0.9
    assert both[0]["preference"] == pytest.approx((0.7 + 0.9) / 2)
    # pair b: first shown as m -> P(M better) = 0.9 -> first wins 0.1; swapped: M=first shorter -> 0.3
    assert both[1]["preference"] == pytest.approx((0.1 + 0.3) / 2)
    single = judge_random_order(LengthJudge(), pairs)
    for pair, result in zip(pairs, single):
        longer_first = len(pair["first"]) > len(pair["second"])
        if order_is_swapped(pair["key"]):  # first is M
            assert result["preference"] == (0.9 if longer_first else 0.3)
        else:  # first is m
            assert result["preference"] == pytest.approx(0.7 if longer_first else 0.1)


def test_win_rate_and_standard_error():
    rate, se = win_rate([1.0, 0.0, 0.5, 0.25])
    assert rate == pytest.approx(43.75)
    assert se == pytest.approx(100 * statistics.stdev([1.0, 0.0, 0.5, 0.25]) / 2)
    assert win_rate([]) == (None, None)
    assert win_rate([0.3]) == (pytest.approx(30.0), None)


# -----------------------------------------------------------------------------
# the commands on small files


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False))


def test_alpacaeval_judge_command_counts_drops_and_resumes(tmp_path):
    outputs, reference = tmp_path / "outputs", tmp_path / "reference"
    write_json(outputs / "de.json", [
        {"generator": "M1", "dataset": "d", "id": "1", "instruction": "Nenne eine Farbe.",
         "output": "Rot ist eine Farbe."},
        {"generator": "M1", "dataset": "d", "id": 2, "instruction": "Sag hallo.", "output": "Hallo"},
        {"generator": "M1", "dataset": "d", "id": "3", "instruction": "Zähle bis drei.", "output": "eins zwei drei"},
        {"generator": "M1", "dataset": "d", "id": "4", "instruction": "Anders formuliert?", "output": "x"},
        {"generator": "M1", "dataset": "d", "id": "5", "instruction": "Ohne Antwort"},
    ])
    write_json(reference / "de.json", [
        {"generator": "gpt-4", "dataset": "d", "id": "1", "instruction": "Nenne eine Farbe.", "output": "Blau."},
        {"generator": "gpt-4", "dataset": "d", "id": "2", "instruction": "Sag hallo.", "output": "Hallo! Wie geht's?"},
        {"generator": "gpt-4", "dataset": "d", "id": "3", "instruction": "Zähle bis drei.", "output": "1 2 3"},
        {"generator": "gpt-4", "dataset": "d", "id": "4", "instruction": "Eine andere Frage", "output": "y"},
        {"generator": "gpt-4", "dataset": "d", "id": "9", "instruction": "Nur hier", "output": "z"},
    ])
    judge = LengthJudge()
    out = tmp_path / "judged"
    summary = alpacaeval.judge_outputs(judge, outputs, reference, ["de"], out, both_orders=True, judge_name="length")
    s = summary["languages"]["de"]
    # ids 1 and 3: the model's output is longer -> (0.7 + 0.9) / 2 = 0.8; id 2: shorter -> (0.1 + 0.3) / 2 = 0.2
    assert s["n"] == 3 and s["win_rate"] == pytest.approx(100 * (0.8 + 0.2 + 0.8) / 3)
    assert s["se"] == pytest.approx(100 * statistics.stdev([0.8, 0.2, 0.8]) / math.sqrt(3))
    assert s["hard_win_rate"] == pytest.approx(100 * 2 / 3)
    assert (s["dropped_outputs"], s["instruction_mismatch"], s["no_output"], s["no_reference"]) == (1, 1, 1, 0)
    assert json.loads((out / "summary.json").read_text())["languages"]["de"]["win_rate"] == s["win_rate"]
    assert judge.calls == 6
    # a rerun judges nothing again and gives the same summary
    again = alpacaeval.judge_outputs(judge, outputs, reference, ["de"], out, both_orders=True, judge_name="length")
    assert judge.calls == 6 and again["languages"]["de"] == s
    # regenerated outputs under the same folder of judgements are refused, not mixed in
    data = json.loads((outputs / "de.json").read_text())
    data[0]["output"] = "Grün."
    write_json(outputs / "de.json", data)
    with pytest.raises(SystemExit, match=r"made from other inputs.*inputs\.outputs\.sha256"):
        alpacaeval.judge_outputs(judge, outputs, reference, ["de"], out, both_orders=True, judge_name="length")


def test_alpacaeval_matches_by_instruction_where_ids_are_missing(tmp_path):
    outputs, reference = tmp_path / "outputs", tmp_path / "reference"
    write_json(outputs / "en.json", [{"id": "1", "instruction": "Say hi.", "output": "Hi there, friend!"},
                                     {"id": "2", "instruction": "Count to two.", "output": "1 2"}])
    write_json(reference / "en.json", [{"instruction": "Count to two. ", "output": "One, two."},
                                       {"instruction": "Say hi.", "output": "Hi."},
                                       {"instruction": "Say hi.", "output": "duplicate"}])
    pairs, counts = alpacaeval.build_pairs(outputs / "en.json", reference / "en.json", "en")
    assert sorted((p["key"], p["first"], p["second"]) for p in pairs) == [
        ("1", "Hi there, friend!", "Hi."), ("2", "1 2", "One, two.")]
    assert counts["matched_by"] == "instruction" and counts["dropped_references"] == 1


def test_every_shared_reference_matches_its_prompts(tmp_path):
    prompts_dir = shared_data("x-alpacaeval", "prompts")
    reference_dir = shared_data("x-alpacaeval", "reference-gpt-4-turbo-2024-04-09")
    langs = sorted({p.stem for p in prompts_dir.glob("*.json")} & {p.stem for p in reference_dir.glob("*.json")})
    assert len(langs) >= 7
    for lang in langs:
        prompts = json.loads((prompts_dir / f"{lang}.json").read_text())
        write_json(tmp_path / f"{lang}.json", [{**p, "output": "x"} for p in prompts])
        pairs, counts = alpacaeval.build_pairs(tmp_path / f"{lang}.json", reference_dir / f"{lang}.json", lang)
        assert len(pairs) == 805, (lang, counts)
        assert counts["matched_by"] == ("instruction" if lang == "en" else "id")


def test_alpacaeval_generate_writes_model_outputs_and_resumes(tiny_dir, tmp_path, monkeypatch):
    import lidr.sampler
    from lidr.checkpoint import load
    from lidr.settings import Decoding

    model, tokenizer = load(tiny_dir)
    prompts = tmp_path / "prompts"
    write_json(prompts / "fr.json", [{"id": 1, "dataset": "helpful_base", "instruction": "Dis bonjour."},
                                     {"id": 2, "dataset": "koala", "instruction": "Compte jusqu'à trois."},
                                     {"id": 3, "instruction": ""}])
    decoding = Decoding(max_new_tokens=6, repetition_penalty=1.1)
    seen_prompts = []
    real_generate, real_completions = lidr.sampler.generate, lidr.sampler.completions

    def recording_completions(model, tokenizer, prompts, *args, **kwargs):
        seen_prompts.extend(prompts)
        return real_completions(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(lidr.sampler, "completions", recording_completions)
    out = tmp_path / "out"
    summary = alpacaeval.generate_outputs(model, tokenizer, prompts, ["fr"], out, decoding, 2, "Sys.", "M0")
    rows = json.loads((out / "fr.json").read_text())
    assert [r["id"] for r in rows] == ["1", "2"]
    assert all(set(r) == {"generator", "dataset", "id", "instruction", "output"} for r in rows)
    assert rows[0]["generator"] == "M0" and rows[1]["dataset"] == "koala"
    assert seen_prompts[0] == tokenizer.encode_chat([{"role": "system", "content": "Sys."},
                                                     {"role": "user", "content": "Dis bonjour."}])
    monkeypatch.setattr(lidr.sampler, "completions", real_completions)  # generate collects completions
    direct = real_generate(model, tokenizer, seen_prompts, decoding)
    assert [r["output"] for r in rows] == [c.text.strip() for c in direct]
    assert summary["languages"]["fr"]["dropped_prompts"] == 1 and summary["languages"]["fr"]["n"] == 2
    # rerun: nothing left to generate
    seen_prompts.clear()
    alpacaeval.generate_outputs(model, tokenizer, prompts, ["fr"], out, decoding, 2, "Sys.", "M0")
    assert seen_prompts == []
    assert json.loads((out / "fr.json").read_text()) == rows


def test_agreement_samples_per_language_and_counts(tmp_path):
    rows = [{"id": i, "lang": "es", "prompt": f"p{i}", "chosen": "una respuesta larga", "rejected": "corta"}
            for i in range(6)]
    rows += [{"id": i, "lang": "en", "prompt": f"q{i}", "chosen": "short", "rejected": "a longer answer"}
             for i in range(2)]
    lines = [json.dumps(r) for r in rows] + ['{"lang": "es", "prompt": "x"}', "not json"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    judge = LengthJudge()
    summary = agreement.run(judge, pairs, tmp_path / "agree", sample=4, seed=0, both_orders=True, judge_name="length")
    es, en = summary["languages"]["es"], summary["languages"]["en"]
    assert (es["n"], es["pairs_available"]) == (4, 6) and (en["n"], en["pairs_available"]) == (2, 2)
    assert es["agreement"] == pytest.approx(80.0) and en["agreement"] == pytest.approx(20.0)
    assert es["hard_agreement"] == 100.0 and en["hard_agreement"] == 0.0
    assert summary["dropped_rows"] == 2
    judged = [r["key"] for r in ResumableWriter(tmp_path / "agree" / "es.jsonl", key="key").rows]
    assert len(judged) == 4 and set(judged) <= {str(n) for n in range(1, 7)}


# -----------------------------------------------------------------------------
# a server that never answers, verdicts missing and tied, a judge run killed and resumed


def test_http_judge_names_a_server_that_accepts_and_never_answers(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held = []

    def accept_and_hold():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_hold, daemon=True).start()
    sleeps = []
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    judge = HttpJudge(url, "judge-model-x", timeout=0.2, max_retries=2, backoff=1.0, sleep=sleeps.append, workers=1)
    try:
        with pytest.raises(JudgeError, match=rf"{url}/chat/completions: gave up after 3 attempts; "
                                             r"last error: no answer within 0\.2 s"):
            judge.prefer_second([TRIPLE], progress=False)
    finally:
        listener.close()
    assert judge.calls == 3 and len(held) == 3 and sleeps == [1.0, 2.0]


class ScriptedJudge:
    """P(M better) looked up by the outputs shown as (m, M); None where the table has no entry."""

    name = "scripted"

    def __init__(self, table):
        self.table = table

    def prefer_second(self, triples, progress=True):
        return [self.table.get((m, M)) for _, m, M in triples]

    def close(self):
        pass


def test_items_without_a_verdict_are_left_out_of_n_and_ties_count_half(tmp_path):
    outputs, reference = tmp_path / "outputs", tmp_path / "reference"
    texts = {"1": ("win", "ref1"), "2": ("tie", "ref2"), "3": ("lose", "ref3"), "4": ("none", "ref4")}
    write_json(outputs / "es.json", [{"id": k, "instruction": f"q{k}", "output": o} for k, (o, _) in texts.items()])
    write_json(reference / "es.json", [{"id": k, "instruction": f"q{k}", "output": r} for k, (_, r) in texts.items()])
    # both orders: P(first better) = ((1 - P(M | first is m)) + P(M | first is M)) / 2
    table = {("win", "ref1"): 0.2, ("ref1", "win"): 0.8, ("tie", "ref2"): 0.7, ("ref2", "tie"): 0.7,
             ("lose", "ref3"): 0.9, ("ref3", "lose"): 0.1, ("none", "ref4"): None, ("ref4", "none"): 0.6}
    summary = alpacaeval.judge_outputs(ScriptedJudge(table), outputs, reference, ["es"], tmp_path / "judged",
                                       both_orders=True, judge_name="scripted")
    s = summary["languages"]["es"]
    preferences = [((1 - 0.2) + 0.8) / 2, ((1 - 0.7) + 0.7) / 2, ((1 - 0.9) + 0.1) / 2]  # 0.8, a tie, 0.1
    assert preferences[1] == 0.5 and (s["n"], s["no_verdict"]) == (3, 1)
    assert s["win_rate"] == pytest.approx(100 * statistics.mean(preferences))
    assert s["se"] == pytest.approx(100 * statistics.stdev(preferences) / math.sqrt(3))
    assert s["hard_win_rate"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)


class AnsweringServer:
    """A chat-completions server whose answer is a fixed function of the request's messages; with
    hold_after=k it answers k requests, then holds the next one without answering."""

    def __init__(self, hold_after=None):
        self.answered, self.hold_after = [], hold_after
        self.holding, self.release = threading.Event(), threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                digest = hashlib.sha256(json.dumps(body["messages"]).encode()).digest()
                if outer.hold_after is not None and len(outer.answered) >= outer.hold_after:
                    outer.holding.set()
                    outer.release.wait(30)
                    return
                p_M = 0.05 + 0.9 * digest[0] / 255
                payload = json.dumps(completion_body([("M", math.log(p_M)), ("m", math.log(1 - p_M))])).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                outer.answered.append(digest)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_judge_command_killed_mid_run_pays_no_request_twice(tmp_path):
    outputs, reference = tmp_path / "outputs", tmp_path / "reference"
    write_json(outputs / "fr.json", [{"id": str(i), "instruction": f"Question {i} ?", "output": f"Réponse {i}"}
                                     for i in range(4)])
    write_json(reference / "fr.json", [{"id": str(i), "instruction": f"Question {i} ?", "output": f"Ref {i}."}
                                       for i in range(4)])

    def command(url, run):
        return [sys.executable, "-m", "eval.alpacaeval", "judge", "--out", str(tmp_path / run), "--outputs",
                str(outputs), "--reference", str(reference), "--langs", "fr", "--judge", "http", "--judge-model",
                "judge-x", "--base-url", url, "--cache", str(tmp_path / f"{run}-cache.jsonl"), "--workers", "1",
                "--both-orders"]

    whole = AnsweringServer()
    subprocess.run(command(whole.url, "whole"), cwd=ROOT, check=True, capture_output=True)
    whole.close()
    assert len(whole.answered) == 8  # 4 pairs, both orders

    server = AnsweringServer(hold_after=5)
    proc = subprocess.Popen(command(server.url, "resumed"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert server.holding.wait(120), "the judge never sent its sixth request"
    proc.kill()  # killed with five answers received and a sixth request in flight
    proc.wait()
    server.hold_after = None
    subprocess.run(command(server.url, "resumed"), cwd=ROOT, check=True, capture_output=True)
    server.close()
    assert len(server.answered) == 8 and len(set(server.answered)) == 8  # every comparison answered once
    assert set(server.answered) == set(whole.answered)
    judged = "x-alpacaeval/judge-judge-x-both"
    for name in ("fr.jsonl", "summary.json"):
        assert (tmp_path / "resumed" / judged / name).read_text() == (tmp_path / "whole" / judged / name).read_text()


def test_alpacaeval_generate_refuses_other_prompts_and_counts_over_length_instructions(tiny_dir, tmp_path):
    from lidr.checkpoint import load
    from lidr.settings import Decoding

    model, tokenizer = load(tiny_dir)  # a context of 256 tokens
    prompts, other = tmp_path / "prompts", tmp_path / "other"
    write_json(prompts / "de.json", [{"id": 1, "instruction": "Sag hallo."},
                                     {"id": 2, "instruction": "Wort " * 300}])
    write_json(other / "de.json", [{"id": 1, "instruction": "Sag tschüss."}])
    out = tmp_path / "out"
    decoding = Decoding(max_new_tokens=4, repetition_penalty=1.0)
    summary = alpacaeval.generate_outputs(model, tokenizer, prompts, ["de"], out, decoding, 2, "Sys.", "M0")
    assert summary["languages"]["de"]["too_long"] == 1 and summary["languages"]["de"]["n"] == 1
    assert [r["id"] for r in json.loads((out / "de.json").read_text())] == ["1"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit, match=r"de\.jsonl: was made from other inputs.*inputs\.prompts\.path"):
        alpacaeval.generate_outputs(model, tokenizer, other, ["de"], out, decoding, 2, "Sys.", "M0")
    with pytest.raises(SystemExit, match=r"settings\.system: 'Sys\.' -> 'Other\.'"):
        alpacaeval.generate_outputs(model, tokenizer, prompts, ["de"], out, decoding, 2, "Other.", "M0")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a model_outputs.json this command did not write is left alone
    stray = tmp_path / "stray"
    write_json(stray / "de.json", [{"id": 1, "output": "mine"}])
    with pytest.raises(SystemExit, match=r"stray/de\.json: exists and was not written by eval\.alpacaeval generate"):
        alpacaeval.generate_outputs(model, tokenizer, prompts, ["de"], stray, decoding, 2, "Sys.", "M0")
    assert json.loads((stray / "de.json").read_text()) == [{"id": 1, "output": "mine"}]
