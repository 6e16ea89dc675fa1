"""Evaluation as in the LIDR paper: MGSM, X-AlpacaEval with a pluggable judge, reward agreement, reports.

Run each stage from the repository root as a module:

    python -m eval.mgsm --help          # MGSM / translated GSM8K: accuracy and off-target rate
    python -m eval.alpacaeval --help    # X-AlpacaEval: generate outputs, judge them against gpt-4-turbo's
    python -m eval.agreement --help     # how often a judge prefers LIDR's chosen answers
    python -m eval.report --help        # tables and bar charts comparing M0, M1, M2, ...

eval/judge.py holds the judges (an OpenAI-compatible endpoint, or a local lidr checkpoint) and the
win-rate statistics; eval/common.py the model loading and resumable generation they share.
"""
