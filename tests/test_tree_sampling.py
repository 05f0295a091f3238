"""End-to-end losslessness of the model-free tree drafters under sampling: thousands of branches of one
prompt, sampled with a drafter and without, give the same distribution of tokens at the positions
verification produced (a two-sample chi-square test per position)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from scipy.stats import chi2_contingency

import specjax
from specjax.datastore import build_datastore, save_datastore

PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7]
ROWS, NEW = 3000, 4


def _sample(model, prompt: tuple[int, ...], method: str = "ar", seed: int = 1, **options) -> list[list[int]]:
    return specjax.generate(model, [list(prompt)], method, num_samples=ROWS, max_new_tokens=NEW, eos_token_ids=(),
                            temperature=1.0, seed=seed, **options)


@pytest.fixture(scope="module")
def reference(tiny_model):
    """ar's samples per prompt (computed once each)."""
    return functools.lru_cache(maxsize=None)(lambda prompt: _sample(tiny_model, prompt).tokens)


def _counts(tokens: list[list[int]], pos: int, vocab: int) -> np.ndarray:
    return np.bincount([t[pos] for t in tokens], minlength=vocab)


@pytest.mark.parametrize("method, min_accepted", [("rest", 1.15), ("pia", 1.005), ("recycling", 1.02)])
def test_tree_drafts_keep_the_sampling_distribution(tiny_model, reference, method, min_accepted, tmp_path):
    # drafts the sampled text often agrees with, so that verification really decides tokens: REST's store
    # and PIA's prompt hold a few of the model's own samples after the prompt (at temperature 1 this random
    # model's text rarely repeats: 1.27 / 1.01 / 1.05 tokens per forward measured)
    own = [PROMPT[-3:] + t for t in reference(tuple(PROMPT))[:300]]
    prompt, options = PROMPT, {}
    if method == "rest":
        path = tmp_path / "store"
        save_datastore(build_datastore(own, vocab_size=tiny_model.config.vocab_size), path)
        options = {"datastore": str(path)}
    elif method == "pia":
        prompt, options = PROMPT + sum(own[:8], []) + PROMPT, {"capacity": 512}
    ref = reference(tuple(prompt))
    out = _sample(tiny_model, tuple(prompt), method, seed=2, **options)
    assert out.stats["mean_accepted_tokens"] > min_accepted
    # deterministic drafts are judged by the target's own draw at each position: ar's tokens, exactly
    assert out.tokens == _sample(tiny_model, tuple(prompt), seed=2).tokens
    vocab = tiny_model.config.vocab_size
    for pos in range(1, NEW):  # position 0 is sampled by the prefill, the rest by tree verification
        table = np.stack([_counts(ref, pos, vocab), _counts(out.tokens, pos, vocab)])
        table = table[:, table.sum(axis=0) > 0]
        p = chi2_contingency(table)[1]
        assert p > 1e-3, (method, pos, p)
