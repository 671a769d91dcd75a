"""Held-out answer metrics of a chat fine-tune, chosen by name (`evaluate.sft_metrics`): exact match and token F1
for question answering, ROUGE-1/2/L for summarization, BLEU and chrF for translation.

Design choice: the metric arithmetic is the well-kept libraries' own, never re-implemented here: `rouge_score`'s
RougeScorer (no stemming; the F-measure per example, averaged over examples) and
sacrebleu's `corpus_bleu` / `corpus_chrf` (default settings: 13a tokenization, exponential smoothing, chrF with
character n-grams up to 6 and β = 2) on the decoded texts. Exact match and token F1 stay SQuAD's
(lmcore.scoring). ROUGE, exact match and token F1 have a value per example (the predictions table's columns);
BLEU and chrF are corpus-level statistics, so they have only the corpus value. Exact match, token F1 and ROUGE
are on 0–1; BLEU and chrF keep sacrebleu's 0–100, the scale translation results are published on.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmcore.options import SFT_METRICS

ROUGE = ("rouge1", "rouge2", "rougeL")
CORPUS_ONLY = ("bleu", "chrf")


def _unknown(names: Sequence[str]) -> None:
    bad = [n for n in names if n not in SFT_METRICS]
    if bad:
        raise ValueError(f"unknown answer metric(s) {bad}; choose from {', '.join(SFT_METRICS)}")


def example_scores(predictions: Sequence[str], references: Sequence[str], names: Sequence[str]) -> list[dict]:
    """One {metric: value} per (prediction, reference) pair for the chosen metrics that have a per-example value,
    in the order of `names` (BLEU and chrF are left out: they are corpus statistics)."""
    from lmcore.scoring import exact_match, token_f1

    _unknown(names)
    rouge = [n for n in names if n in ROUGE]
    scorer = None
    if rouge:
        from rouge_score.rouge_scorer import RougeScorer

        scorer = RougeScorer(rouge, use_stemmer=False)
    rows = []
    for prediction, reference in zip(predictions, references, strict=True):
        row: dict[str, float] = {}
        scored = scorer.score(reference, prediction) if scorer else {}
        for name in names:
            if name == "exact_match":
                row[name] = exact_match(prediction, reference)
            elif name == "token_f1":
                row[name] = token_f1(prediction, reference)
            elif name in ROUGE:
                row[name] = float(scored[name].fmeasure)
        rows.append(row)
    return rows


def corpus_scores(
    predictions: Sequence[str], references: Sequence[str], names: Sequence[str], rows: Sequence[dict] | None = None
) -> dict[str, float]:
    """The chosen metrics over the whole set: the mean of the per-example values (exact match, token F1, ROUGE
    F-measure) and sacrebleu's corpus BLEU and chrF (0–100). `rows` reuses `example_scores`' output."""
    _unknown(names)
    if rows is None:
        rows = example_scores(predictions, references, names)
    n = max(1, len(references))
    scores = {name: sum(r[name] for r in rows) / n for name in names if name not in CORPUS_ONLY}
    if "bleu" in names or "chrf" in names:
        import sacrebleu

        hypotheses, refs = list(predictions), [list(references)]
        if "bleu" in names:
            scores["bleu"] = sacrebleu.corpus_bleu(hypotheses, refs).score
        if "chrf" in names:
            scores["chrf"] = sacrebleu.corpus_chrf(hypotheses, refs).score
    return {name: scores[name] for name in names}
