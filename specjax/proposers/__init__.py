"""Drafters behind one interface (`base.Proposer`), looked up by method name.

A proposer registers itself where it is defined (`@register("name")`); `registry()` imports the
built-in modules once so that every method is known, in the order of the SpecTTS-Bench table's
families (plain decoding, n-gram copying, draft models and heads, trees, retrieval).
"""

from __future__ import annotations

import importlib

from specjax import validation
from specjax.proposers.base import NoDraft, Proposer, bound, option, option_fields, register, registered

__all__ = ["NoDraft", "Proposer", "bound", "make_proposer", "option", "option_fields", "register", "registry"]

BUILTIN = ("ngram", "draft_model", "medusa", "eagle", "hybrid", "lookahead", "pia", "recycling", "rest")


def registry() -> dict[str, type[Proposer]]:
    """Every method: the built-in ones, then any registered by user code, in registration order."""
    for module in BUILTIN:
        importlib.import_module(f"specjax.proposers.{module}")
    return registered()


def make_proposer(method: "str | Proposer", **options) -> Proposer:
    """Builds the proposer for `method` from its options (e.g. k=8, max_ngram=3); errors name the fix.
    A Proposer instance (e.g. the analysis oracle) is used as it is."""
    if isinstance(method, Proposer):
        if options:
            raise ValueError(f"options {', '.join(sorted(options))} go into the proposer instance, not generate()")
        return method
    methods = registry()
    if not isinstance(method, str):
        raise validation.InvalidType(f"method must be a method name or a Proposer, got {validation.given(method)}")
    if method not in methods:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(methods)}")
    cls = methods[method]
    options = validation.method_options(cls, method, options)  # known names, each of its field's type and range
    proposer = cls(**options)
    if proposer.k < 0:
        raise ValueError(f"k (draft length) must be >= 0, got {proposer.k}")
    return proposer
