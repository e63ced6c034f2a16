"""Text-generation metrics on detokenized strings, computed with reference packages.

BLEU is sacrebleu's (tokenizer 13a, mixed case); ROUGE is Google's `rouge-score`
(lowercased, alphanumeric tokens, Porter stemming as in the CNN/DailyMail papers).
Both take one reference per hypothesis and return scores in percent.
"""
import sacrebleu
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check_pairs(hypotheses: list[str], references: list[str]) -> None:
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"need one hypothesis per reference, got {len(hypotheses)} "
                         f"hypotheses for {len(references)} references")


def bleu(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU: {'bleu': score, 'bleu_detail': n-gram precisions and brevity
    penalty, 'bleu_signature': the settings and version, to quote with the score}."""
    _check_pairs(hypotheses, references)
    metric = sacrebleu.BLEU()
    result = metric.corpus_score(hypotheses, [references])
    return {"bleu": result.score, "bleu_detail": str(result),
            "bleu_signature": str(metric.get_signature())}


def rouge(hypotheses: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures over the pairs: {'rouge1': ...}."""
    _check_pairs(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hypothesis, reference in zip(hypotheses, references):
        scores = scorer.score(reference, hypothesis)  # (target, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100 * total / len(references) for name, total in totals.items()}
