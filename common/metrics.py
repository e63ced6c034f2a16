"""Text-generation metrics on detokenized strings, computed with reference packages.

BLEU is sacrebleu's (tokenizer 13a, mixed case), and so is chrF (character 6-grams, beta 2,
no word n-grams: it credits a word half right, as a morphologically rich target needs);
ROUGE is Google's `rouge-score` (lowercased, alphanumeric tokens, Porter stemming as in the
CNN/DailyMail papers). The three take one reference per hypothesis and return scores in percent. Exact match and F1 of
extractive question answering follow SQuAD v1.1's evaluation script (any number of
references); that script ships as a file, not a package, so its few lines are written here.
"""
import collections
import re
import string

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


def chrf(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus chrF: {'chrf': score, 'chrf_signature': the settings and version}."""
    _check_pairs(hypotheses, references)
    metric = sacrebleu.CHRF()
    return {"chrf": metric.corpus_score(hypotheses, [references]).score, "chrf_signature": str(metric.get_signature())}


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


# ------------------------------------------------------------------ SQuAD v1.1 exact match and F1
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower case, no punctuation, no articles (a, an, the),
    single spaces."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_f1(prediction: str, reference: str) -> float:
    """Token-level F1 of two normalised answers: the harmonic mean of the precision and recall
    of their common tokens, counted with multiplicity."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """Exact match and F1 in percent as SQuAD v1.1's evaluation script defines them: each
    prediction scores its best over its references, then the mean over the questions."""
    if len(predictions) != len(references) or not references or not all(references):
        raise ValueError(f"need one prediction and at least one reference per question, got "
                         f"{len(predictions)} predictions for {len(references)} reference lists")
    exact = sum(max(normalize_answer(p) == normalize_answer(r) for r in refs)
                for p, refs in zip(predictions, references))
    f1 = sum(max(answer_f1(p, r) for r in refs) for p, refs in zip(predictions, references))
    return {"exact_match": 100 * exact / len(references), "f1": 100 * f1 / len(references)}
