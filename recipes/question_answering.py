"""Extractive question answering with a Transformer encoder, data and tensor parallel.

The encoder reads [question; eos; passage] and scores every passage token as the answer's
start and as its end; the answer is the best-scoring span (end >= start, at most
--max_answer_len tokens). Trains on cloze questions over passages of WordNet entries (Debian
package wordnet-base; `common/data/qa.py` says how they are made) and reports SQuAD v1.1
exact match and F1 on the held-out passages, beside the trivial baseline that answers every
question with the passage's first sentence.

    horovodrun -np 2 python recipes/question_answering.py --intra_op_threads=1   # the demo
    horovodrun -np 2 python recipes/question_answering.py --plan=tensor=2
    python recipes/question_answering.py --debug --deterministic                # one process
    horovodrun -np 8 -H a:4,b:4 python recipes/question_answering.py --dataset=squad --data_dir=/shared/tfds \\
        --max_len=384 --max_question_len=64 --max_answer_len=30 --vocab_size=16000 --layers=6 --d_model=256
"""
from __future__ import annotations

import dataclasses

from common.config import TransformerConfig, flag, parse_or_exit
from common.data.qa import DEFAULT_WORDNET_DIR
from common.errors import ConfigError
from common.startup import load_tensorflow


@dataclasses.dataclass(frozen=True)
class QAConfig(TransformerConfig):
    steps: int = flag(1500, "optimizer steps to train")
    global_batch_size: int = flag(64, "questions per optimizer step, over all ranks")
    lr: float = flag(1e-3, "peak learning rate")
    warmup_steps: int = flag(100, "linear learning-rate warm-up steps")
    log_every: int = flag(50, "steps between metrics lines")
    checkpoint_every: int = flag(500, "steps between checkpoints; 0 = only at the end")
    vocab_size: int = flag(4000, "subword vocabulary size, learned from the training questions and passages")
    max_len: int = flag(128, "tokens of a row: question, eos, passage (its end cut off)")
    max_question_len: int = flag(32, "question tokens kept (its start)")
    max_answer_len: int = flag(8, "longest answer predicted, in tokens")
    max_test: int = flag(0, "held-out questions answered; 0 = all")
    samples: int = flag(3, "sample answers printed at the end")
    wordnet_dir: str = flag(DEFAULT_WORDNET_DIR, "the WordNet data files the embedded data is made from")

    DEBUG = {"steps": 20, "global_batch_size": 16, "log_every": 1, "checkpoint_every": 10, "warmup_steps": 5,
             "vocab_size": 500, "max_len": 96, "d_model": 32, "heads": 2, "layers": 1, "ff_dim": 64,
             "max_test": 64}

    def validate(self):
        super().validate()
        if self.max_test < 0:
            raise ConfigError(f"--max_test must be >= 0, got {self.max_test}")
        if not 0 < self.max_question_len < self.max_len - 1 or self.max_answer_len <= 0:
            raise ConfigError(f"--max_question_len must be between 1 and --max_len - 2 and --max_answer_len positive, "
                              f"got {self.max_question_len}, {self.max_len} and {self.max_answer_len}")


if __name__ == "__main__":
    parse_or_exit(QAConfig)  # a bad flag fails here, in a moment, before TensorFlow loads
    load_tensorflow()  # without its start-up lines

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from common import api  # noqa: E402
from common.data.qa import QAData, load_qa  # noqa: E402
from common.data.subword import SubwordTokenizer  # noqa: E402
from common.dist import Group  # noqa: E402
from common.metrics import squad_scores  # noqa: E402
from common.models.span import best_spans, build_span_encoder, span_loss_sums  # noqa: E402
from common.models.transformer import TransformerSize  # noqa: E402

EVAL_BATCH = 128


def answerer(model, data: QAData, max_answer_len: int):
    """`answer(indices)`: the predicted answer texts of those held-out questions."""
    def answer(indices):
        start_logits, end_logits = model(data.test_ids[indices], training=False)
        spans = best_spans(start_logits.numpy(), end_logits.numpy(), max_answer_len)
        return [data.test_questions[i].span_text(start, end) for i, (start, end) in zip(indices, spans)]
    return answer


def evaluate(run, data: QAData, model) -> dict:
    """Exact match and F1 of the predicted spans and of the first-sentence baseline; the held-out
    loss and position accuracies over the questions whose answer fits the row."""
    questions = data.test_questions
    fits = data.test_starts >= 0
    scores = api.held_out_metrics(run.dist, model, span_loss_sums,
                                  (data.test_ids[fits], data.test_starts[fits], data.test_ends[fits]))
    predictions = api.gathered_outputs(run.dist, answerer(model, data, run.config.max_answer_len),
                                       list(range(len(questions))), EVAL_BATCH)
    references = [question.answers for question in questions]
    baseline = squad_scores([question.first_sentence() for question in questions], references)
    samples = [{"question": q.question, "passage": q.context, "answers": q.answers, "prediction": p}
               for q, p in zip(questions[:10], predictions)]
    return {**squad_scores(predictions, references), "baseline_exact_match": baseline["exact_match"],
            "baseline_f1": baseline["f1"], **scores, "test_questions": len(questions), "samples": samples}


def model_size(cfg: QAConfig, vocab_size: int) -> TransformerSize:
    return TransformerSize.of(cfg, vocab_size, cfg.max_len)


def load_trained(out_dir: str):
    """The exported model of a finished run (any plan), on one process, without dropout, and
    its tokenizer."""
    saved = api.load_saved(QAConfig, out_dir)
    tokenizer = SubwordTokenizer(str(Path(out_dir) / "subword.model"))
    size = dataclasses.replace(model_size(saved, tokenizer.vocab_size), dropout=0.0)
    model = build_span_encoder(size, Group((0,), 0))
    api.load_weights(model, Path(out_dir) / "model.npz")
    return model, tokenizer


@api.guarded
def main():
    run = api.start(QAConfig, "question_answering", axes=("data", "tensor"))
    cfg = run.config
    data = load_qa(data_dir=run.data_dir, dataset=cfg.dataset or None, debug=cfg.debug, max_len=cfg.max_len,
                   max_question_len=cfg.max_question_len, vocab_size=cfg.vocab_size, max_test=cfg.max_test or None,
                   wordnet_dir=cfg.wordnet_dir)
    size = model_size(cfg, data.tokenizer.vocab_size)
    run.check_model_fits(layers=size.layers, heads=size.heads, ff_dim=size.ff_dim, vocab_size=size.vocab_size)
    with run.model_scope():
        model = build_span_encoder(size, run.dist.tensor)  # tensor=N: blocks and embedding split over N ranks
        optimizer = api.make_optimizer(cfg)
    step = api.make_step(run, model, optimizer, span_loss_sums)
    summary = api.train(run, model, optimizer, step, (data.train_ids, data.train_starts, data.train_ends),
                        evaluate=lambda: evaluate(run, data, model),
                        export=lambda out_dir: shutil.copy(data.tokenizer.model_path, out_dir / "subword.model"))
    if run.dist.is_chief:
        print(f"exact match = {summary['exact_match']:.2f}, F1 = {summary['f1']:.2f} on {summary['test_questions']} "
              f"held-out questions (first-sentence baseline: exact match {summary['baseline_exact_match']:.2f}, "
              f"F1 {summary['baseline_f1']:.2f}; {summary['world_size']} replicas, final loss "
              f"{summary['final_loss']:.4f})")
        for sample in summary["samples"][:cfg.samples]:
            print(f"  Q    {sample['question']}\n  P    {sample['passage']}\n"
                  f"  REF  {' | '.join(sample['answers'])}\n  OUT  {sample['prediction']}")


if __name__ == "__main__":
    main()
