"""Evaluation as in the LIDR paper: MGSM, X-AlpacaEval with a pluggable judge, reward agreement, reports.

Run each stage as a module, from the repository root or, once lidr is installed (`pip install -e .`
or `pip install .`, which installs this package beside lidr), from any folder:

    python -m eval.mgsm --help          # MGSM / translated GSM8K: accuracy and off-target rate
    python -m eval.alpacaeval --help    # X-AlpacaEval: generate outputs, judge them against gpt-4-turbo's
    python -m eval.agreement --help     # how often a judge prefers LIDR's chosen answers
    python -m eval.report --help        # tables and bar charts comparing M0, M1, M2, ...

eval/judge.py holds the judges (an OpenAI-compatible endpoint, or a local lidr checkpoint) and the
win-rate statistics; eval/weighted_alpaca_eval_gpt4_turbo_multilingual/ the paper's judge prompt
(package data); eval/common.py the model loading and resumable generation they share.
"""
