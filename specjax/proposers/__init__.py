"""Drafters behind one interface (`base.Proposer`), looked up by method name."""

from __future__ import annotations

import dataclasses

from specjax.proposers.base import NoDraft, Proposer


BOUND_FIELDS = ("cfg", "sampling_cfg", "shares_cache", "head_proposer", "hidden", "layers", "vocab")  # set by Proposer.bind, not by users


def registry() -> dict[str, type[Proposer]]:
    from specjax.proposers.draft_model import DraftModel
    from specjax.proposers.eagle import Eagle
    from specjax.proposers.hybrid import Hybrid
    from specjax.proposers.lookahead import Lookahead
    from specjax.proposers.medusa import Medusa
    from specjax.proposers.ngram import NGRAM_PROPOSERS
    from specjax.proposers.pia import Pia
    from specjax.proposers.recycling import TokenRecycling
    from specjax.proposers.rest import Rest

    return {"ar": NoDraft, **NGRAM_PROPOSERS, "draft": DraftModel, "medusa": Medusa, "eagle": Eagle,
            "hybrid": Hybrid, "lookahead": Lookahead, "pia": Pia, "recycling": TokenRecycling, "rest": Rest}


def make_proposer(method: "str | Proposer", **options) -> Proposer:
    """Builds the proposer for `method` from its options (e.g. k=8, max_ngram=3); errors name the fix.
    A Proposer instance (e.g. the analysis oracle) is used as it is."""
    if isinstance(method, Proposer):
        if options:
            raise ValueError(f"options {', '.join(sorted(options))} go into the proposer instance, not generate()")
        return method
    methods = registry()
    if method not in methods:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(methods)}")
    cls = methods[method]
    fields = {f.name for f in dataclasses.fields(cls) if f.name not in BOUND_FIELDS}
    unknown = set(options) - fields
    if unknown:
        raise ValueError(
            f"method {method!r} does not take option(s) {', '.join(sorted(unknown))}; "
            f"its options are: {', '.join(sorted(fields)) or 'none'}"
        )
    if method == "ar" and options.get("k", 0) != 0:
        raise ValueError("method 'ar' drafts nothing: k must be 0")
    proposer = cls(**options)
    if proposer.k < 0:
        raise ValueError(f"k (draft length) must be >= 0, got {proposer.k}")
    return proposer
