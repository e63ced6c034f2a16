"""Abstractive summarization with a decoder-only Transformer: data, tensor and pipeline plans.

Trains on real pairs made offline: a Python function of the standard library -> the first
sentence of its docstring (or a prepared TFDS set such as cnn_dailymail), greedy-decodes the
held-out functions and reports ROUGE (rouge-score).

    horovodrun -np 2 python recipes/summarize.py --plan=pipeline=2,microbatches=4,schedule=1f1b
    horovodrun -np 2 python recipes/summarize.py --plan=tensor=2
    horovodrun -np 4 python recipes/summarize.py --plan=data=2,pipeline=2,microbatches=4
    python recipes/summarize.py                                    # one process
    mpirun -np 2 python recipes/summarize.py --plan=pipeline=2 --debug
Pipeline plans need an MPI launch (horovodrun without --gloo, mpirun, srun with PMIx).
"""
from __future__ import annotations

import dataclasses

from common.config import TransformerConfig, flag, parse_or_exit
from common.startup import load_tensorflow


@dataclasses.dataclass(frozen=True)
class SummarizeConfig(TransformerConfig):
    steps: int = flag(1500, "optimizer steps to train")
    global_batch_size: int = flag(32, "document/summary pairs per optimizer step, over all ranks")
    lr: float = flag(1e-3, "peak learning rate")
    warmup_steps: int = flag(100, "linear learning-rate warm-up steps")
    log_every: int = flag(50, "steps between metrics lines")
    checkpoint_every: int = flag(500, "steps between checkpoints; 0 = only at the end")
    layers: int = flag(4, "Transformer blocks (what pipeline stages divide)")
    source_len: int = flag(96, "document length in subword tokens (longer documents are cut)")
    summary_len: int = flag(24, "summary length in subword tokens (longer training pairs are dropped)")
    max_test: int = flag(200, "held-out documents summarised for ROUGE; 0 = all")
    samples: int = flag(3, "sample summaries printed at the end")

    DEBUG = {"steps": 20, "global_batch_size": 16, "log_every": 1, "checkpoint_every": 10, "warmup_steps": 5,
             "vocab_size": 500, "source_len": 32, "summary_len": 12, "d_model": 32, "heads": 2, "layers": 2,
             "ff_dim": 64, "max_test": 32, "samples": 2}


if __name__ == "__main__":
    parse_or_exit(SummarizeConfig)  # a bad flag fails here, in a moment, before TensorFlow loads
    load_tensorflow()  # without its start-up lines

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from common import api  # noqa: E402
from common.data.seq2seq import load_summarization  # noqa: E402
from common.data.subword import SubwordTokenizer  # noqa: E402
from common.dist import Group  # noqa: E402
from common.export import export_trained_seq2seq  # noqa: E402
from common.metrics import rouge  # noqa: E402
from common.models.transformer import CausalLM, TransformerSize, greedy_decode, token_loss  # noqa: E402
from common.plans import pipeline  # noqa: E402


def evaluate(run, data, forward, count: int) -> dict:
    """ROUGE of greedy summaries of the first `count` held-out documents, decoded by all ranks
    together; `forward` is the plan's (`plans.pipeline.make_forward`)."""
    tokenizer = data.tokenizer

    def summarize(rows):
        ids = greedy_decode(forward, run.dist.tensor, np.stack(rows), run.config.summary_len, tokenizer.bos_id,
                            tokenizer.eos_id)
        return [tokenizer.decode(row) for row in ids]

    hypotheses, references = api.gathered_outputs(run.dist, summarize, data.test_src[:count]), data.test_tgt_text[:count]
    samples = [{"document": d[:300], "reference": r, "summary": h}
               for d, r, h in zip(data.test_src_text, references, hypotheses)]
    return {**rouge(hypotheses, references), "test_documents": count, "samples": samples[:10]}


def build_lm(cfg: SummarizeConfig, size: TransformerSize, group: Group) -> CausalLM:
    """The LM of `size` over `cfg`'s lengths, split over the tensor group `group`, its weights built."""
    lm = CausalLM(size, group, cfg.source_len, name="lm")
    lm((np.zeros((1, cfg.source_len), np.int32), np.zeros((1, cfg.summary_len + 1), np.int32)))
    return lm


def load_trained(out_dir: str):
    """The model of a finished run (any plan), on one process, for inference, and its tokenizer.
    Without dropout layers: their seed generators' names are numbered per process, so would not
    match model.npz's in the process that trained the run."""
    cfg = api.load_saved(SummarizeConfig, out_dir)
    tokenizer = SubwordTokenizer(str(Path(out_dir) / "subword.model"))
    size = TransformerSize.of(cfg, tokenizer.vocab_size, cfg.source_len + cfg.summary_len)
    lm = build_lm(cfg, dataclasses.replace(size, dropout=0.0), Group((0,), 0))
    api.load_weights(lm, Path(out_dir) / "model.npz")
    return lm, tokenizer


@api.guarded
def main():
    run = api.start(SummarizeConfig, "summarize", axes=("data", "tensor", "pipeline"))
    cfg = run.config
    data = load_summarization(data_dir=run.data_dir, dataset=cfg.dataset or None, debug=cfg.debug,
                              max_src_len=cfg.source_len, max_tgt_len=cfg.summary_len, vocab_size=cfg.vocab_size)
    size = TransformerSize.of(cfg, data.tokenizer.vocab_size, cfg.source_len + cfg.summary_len)
    run.check_model_fits(layers=size.layers, heads=size.heads, ff_dim=size.ff_dim, vocab_size=size.vocab_size)
    with run.model_scope():
        # Every rank draws every weight, as one process would.
        lm = build_lm(cfg, size, run.dist.tensor)
        model = pipeline.cut(lm, run.dist)  # pipeline=N: this rank's stage of consecutive blocks
        optimizer = api.make_optimizer(cfg)
    step = api.make_step(run, model, optimizer, token_loss(run.dist.tensor))
    forward = pipeline.make_forward(run, model)
    count = min(cfg.max_test or len(data.test_src), len(data.test_src))

    summary = api.train(run, model, optimizer, step, (data.train_src, data.train_tgt),
                        evaluate=lambda: evaluate(run, data, forward, count),
                        export=lambda out_dir: export_trained_seq2seq(out_dir, data.tokenizer, load_trained,
                                                                       source_len=cfg.source_len,
                                                                       target_len=cfg.summary_len))
    if run.dist.is_chief:
        print(f"ROUGE-1/2/L = {summary['rouge1']:.1f}/{summary['rouge2']:.1f}/{summary['rougeL']:.1f} on "
              f"{summary['test_documents']} held-out documents (plan {run.plan}, final loss {summary['final_loss']:.4f})")
        for sample in summary["samples"][:cfg.samples]:
            print(f"  DOC {sample['document'][:120]}\n  REF {sample['reference']}\n  OUT {sample['summary']}")


if __name__ == "__main__":
    main()
