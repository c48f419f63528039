"""Class selections: the tokens of ``--classes`` / ``--full-res`` resolved against one scan's scores (numpy only).

A selection is a list of tokens, unioned in first-come order:

* ``all`` -- every class; ``none`` -- nothing;
* ``positive`` -- the classes whose probability is at or above the threshold, highest score first;
* ``top-K`` -- the K highest scores;
* a label, or an integer model-output index.

The command line, the pipeline, the batch runner and the viewer all resolve classes here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .errors import InputError

__all__ = ["depends_on_scores", "find_class", "select_classes"]

def depends_on_scores(spec: Sequence[str | int] | None) -> bool:
    """True when resolving ``spec`` needs every class's score (``all``, ``positive``, ``top-K``; ``None`` = all), so
    every output must be explained before the selection is known."""
    if spec is None:
        return True
    return any(str(t).strip() in ("all", "positive") or str(t).strip().startswith("top-") for t in spec)


def find_class(token: str | int, labels: Sequence[str], indices: Sequence[int] | None = None) -> int | None:
    """Position of the class named by ``token`` -- its label, or its model-output index -- in ``labels``
    (``indices[p]`` is the output index of ``labels[p]``; default ``p``); None when no class matches."""
    idx = list(range(len(labels))) if indices is None else list(indices)
    t = str(token).strip()
    return next((p for p, (lab, i) in enumerate(zip(labels, idx)) if t in (lab, str(i))), None)


def _top(scores: np.ndarray) -> list[int]:
    """Class indices by decreasing score."""
    return [int(i) for i in np.argsort(-np.asarray(scores))]


def _token(
    t: str, scores: np.ndarray, probabilities: np.ndarray, labels: Sequence[str], threshold: float, what: str
) -> list[int]:
    """The classes one token selects (InputError naming ``what`` for an unknown or malformed token)."""
    if t == "all":
        return list(range(len(labels)))
    if t == "none":
        return []
    if t == "positive":
        return [i for i in _top(scores) if probabilities[i] >= threshold]
    if t.startswith("top-"):
        try:
            k = int(t[4:])
        except ValueError:
            raise InputError(f"{what}: bad token {t!r} (use top-K with an integer K)") from None
        return _top(scores)[: max(k, 0)]
    if t in labels:
        return [list(labels).index(t)]
    if t.lstrip("-").isdigit():
        i = int(t)
        if not 0 <= i < len(labels):
            raise InputError(f"{what}: index {i} out of range (0..{len(labels) - 1})")
        return [i]
    raise InputError(f"{what}: unknown class {t!r} (labels: {', '.join(labels[:6])}, ...)")


def _union(groups: Iterable[list[int]]) -> list[int]:
    out: list[int] = []
    for group in groups:
        out += [i for i in group if i not in out]
    return out


def select_classes(
    spec: Sequence[str | int] | None,
    scores: np.ndarray,
    probabilities: np.ndarray,
    labels: Sequence[str],
    threshold: float,
    what: str = "--classes",
) -> list[int]:
    """Resolve a class selection against one scan's scores.

    Args:
        spec: tokens (see the module docstring); ``None`` means all classes.
        scores: ``[M]`` raw scores of all M outputs; probabilities: ``[M]``.
        labels: the M class names; threshold: probability at or above which a class is positive.
        what: the option named in error messages.

    Returns:
        class indices, unioned in first-come order.
    """
    if spec is None:
        return list(range(len(labels)))
    return _union(_token(str(tok).strip(), scores, probabilities, labels, threshold, what) for tok in spec)
