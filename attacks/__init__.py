"""Spurious-cue audit and cue-word attacks from Safety Mirage.

CLIs: ``python -m attacks.audit DATA.json``, ``python -m attacks.rewrite IN OUT --attack ...`` and
``python -m attacks.benchmark_attack --train TRAIN.json --benchmark BENCH.json`` (any benchmark's attack files).
Names are imported lazily so ``python -m attacks.audit`` does not import itself twice
(runpy warns when the package pre-imports the module it is about to run). The audit
function is ``attacks.audit.audit``: the name ``attacks.audit`` is the submodule.
"""
import importlib

_WHERE = {
    "cue_table": "audit", "first_ngram": "audit", "first_word": "audit",
    "iter_instructions": "records", "load_records": "records", "looks_like_refusal": "records",
    "attack_benchmark": "benchmark_attack", "strongest_cue": "rewrite",
    "KShotAttack": "rewrite", "OneWordAttack": "rewrite", "OverPrudenceRewrite": "rewrite",
    "mine_cues": "rewrite", "prepend_word": "rewrite", "replace_first_word": "rewrite",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
