"""A GPT-style language model: a decoder-only Transformer pretrained on running English text,
on data, tensor and pipeline plans and any two or three of them.

Trains next-token prediction on the King James Bible (Debian `bible-kjv-text`; held-out books
are the test split), reports the held-out perplexity beside unigram and bigram baselines on the
same split and subword tokens, and samples continuations of held-out prompts (temperature and
top-k, seeded: the same text under every plan).

    horovodrun -np 2 python recipes/language_model.py
    horovodrun -np 8 python recipes/language_model.py --plan=data=2,tensor=2,pipeline=2,microbatches=2
    horovodrun -np 2 python recipes/language_model.py --plan=tensor=2,recompute --dropout=0  # recompute blocks
    python recipes/language_model.py --precision=bf16     # bfloat16 compute, float32 weights and optimizer
Pipeline plans need an MPI launch (horovodrun without --gloo, mpirun, srun with PMIx).
"""
from __future__ import annotations

import dataclasses

from common.config import TransformerConfig, flag, parse_or_exit
from common.data.kjv import DEFAULT_SOURCE, check_source
from common.errors import ConfigError, RecipeError, exit_with
from common.mesh import parse_plan
from common.startup import load_tensorflow


@dataclasses.dataclass(frozen=True)
class LanguageModelConfig(TransformerConfig):
    steps: int = flag(1200, "optimizer steps to train")
    global_batch_size: int = flag(32, "rows of --seq_len tokens per optimizer step, over all ranks")
    lr: float = flag(2e-3, "peak learning rate")
    warmup_steps: int = flag(100, "linear learning-rate warm-up steps")
    log_every: int = flag(100, "steps between metrics lines")
    checkpoint_every: int = flag(400, "steps between checkpoints; 0 = only at the end")
    layers: int = flag(4, "Transformer blocks (what pipeline stages divide)")
    seq_len: int = flag(128, "tokens a row of training text holds (the model's context)")
    precision: str = flag("fp32", "fp32, or bf16: bfloat16 compute, float32 weights, optimizer state and loss",
                          choices=("fp32", "bf16"))
    source_path: str = flag("", "the bible-kjv-text data file; empty: where Debian installs it")
    samples: int = flag(3, "held-out prompts whose sampled continuations are printed and saved")
    prompt_len: int = flag(16, "tokens of a held-out row that prompt a sample")
    sample_len: int = flag(40, "tokens sampled after each prompt")
    temperature: float = flag(0.8, "sampling temperature")
    top_k: int = flag(40, "sample among this many most likely tokens; 0 = all")

    DEBUG = {"steps": 20, "global_batch_size": 16, "log_every": 1, "checkpoint_every": 10, "warmup_steps": 5,
             "vocab_size": 500, "seq_len": 32, "d_model": 32, "heads": 2, "layers": 2, "ff_dim": 64,
             "samples": 2, "prompt_len": 8, "sample_len": 12}

    def validate(self):
        super().validate()
        if self.prompt_len < 1 or self.sample_len < 1 or self.prompt_len + self.sample_len > self.seq_len:
            raise ConfigError(f"--prompt_len={self.prompt_len} and --sample_len={self.sample_len} must be positive "
                              f"and fit --seq_len={self.seq_len} together")
        if self.temperature <= 0 or self.top_k < 0:
            raise ConfigError("--temperature must be positive and --top_k >= 0")


def check_inputs(config: LanguageModelConfig) -> None:
    """RecipeError if the text package is missing, or if recomputation would redraw dropout
    masks (block recompute runs each block's forward again in the backward pass)."""
    check_source(config.source_path or DEFAULT_SOURCE)
    if parse_plan(config.plan).recompute and config.dropout and not config.deterministic:
        raise ConfigError("--plan=...,recompute runs each forward twice, drawing new dropout masks: "
                          "add --dropout=0 (or --deterministic)")


if __name__ == "__main__":
    try:  # a bad flag or a missing text package fails here, in a moment, before TensorFlow loads
        check_inputs(parse_or_exit(LanguageModelConfig))
    except RecipeError as error:
        exit_with(error)
    load_tensorflow()  # without its start-up lines

import math  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from common import api  # noqa: E402
from common.data.subword import SubwordTokenizer  # noqa: E402
from common.data.text_corpus import load_language_model  # noqa: E402
from common.dist import Group  # noqa: E402
from common.models.ngram import bigram_perplexity, unigram_perplexity  # noqa: E402
from common.models.transformer import (CausalLM, TransformerSize, sample_continuations,  # noqa: E402
                                       sequence_loss_sums, token_loss)
from common.plans import pipeline  # noqa: E402

EVAL_BATCH = 32  # held-out rows per forward: fixed, so every plan scores the same batches


def with_prefix(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows as the (prefix, tokens) batches a CausalLM reads; a plain language model's prefix is empty."""
    return np.zeros((len(rows), 0), np.int32), rows


def held_out_perplexity(run, forward, test: np.ndarray) -> dict:
    """exp(mean token cross-entropy) over the held-out rows, scored by all ranks together
    through the plan's `forward` (the last pipeline stage's losses reach every rank)."""
    def row_losses(rows):
        prefix, tokens = with_prefix(np.stack(rows))
        losses = forward((tf.constant(prefix), tf.constant(tokens)),
                         lambda logits: sequence_loss_sums(logits, tokens[:, 1:], run.dist.tensor), tf.float32)
        return list(losses.numpy())

    total = float(np.sum(api.gathered_outputs(run.dist, row_losses, list(test), batch_size=EVAL_BATCH)))
    count = int(np.count_nonzero(test[:, 1:]))
    return {"test_loss": total / count, "test_perplexity": math.exp(total / count), "test_tokens": count}


def samples(run, forward, size: TransformerSize, tokenizer: SubwordTokenizer, test: np.ndarray) -> list[dict]:
    """Sampled continuations of the first --prompt_len tokens of evenly spaced held-out rows."""
    cfg = run.config
    rows = test[np.linspace(0, len(test) - 1, cfg.samples).astype(int)]
    prompts, references = rows[:, :cfg.prompt_len], rows[:, cfg.prompt_len:cfg.prompt_len + cfg.sample_len]
    drawn = sample_continuations(forward, size, run.dist.tensor, prompts, cfg.sample_len, temperature=cfg.temperature,
                                 top_k=cfg.top_k, seed=cfg.seed)
    return [{"prompt": tokenizer.decode(list(prompt)), "continuation": tokenizer.decode(ids),
             "reference": tokenizer.decode(list(reference))}
            for prompt, ids, reference in zip(prompts, drawn, references)]


def baselines(data) -> dict:
    vocab = data.tokenizer.vocab_size
    return {"unigram_perplexity": unigram_perplexity(data.train, data.test, vocab),
            "bigram_perplexity": bigram_perplexity(data.train, data.test, vocab),
            "bigram_smoothing": "interpolated Kneser-Ney, discount 0.75; unigram: add-one"}


def build_lm(cfg: LanguageModelConfig, size: TransformerSize, group: Group, recompute: bool = False) -> CausalLM:
    """The LM of `size`, split over the tensor group `group`, its weights built."""
    lm = CausalLM(size, group, source_len=0, recompute=recompute, name="lm")
    lm(with_prefix(np.zeros((1, cfg.seq_len + 1), np.int32)))
    return lm


def set_precision(precision: str) -> None:
    """bf16: Keras' mixed_bfloat16 policy for every layer built after this (bfloat16 compute,
    float32 variables, so the optimizer and the gradient all-reduce see float32)."""
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16" if precision == "bf16" else "float32")


@api.guarded
def main():
    run = api.start(LanguageModelConfig, "language_model", axes=("data", "tensor", "pipeline"))
    cfg = run.config
    check_inputs(cfg)
    data = load_language_model(data_dir=run.data_dir, debug=cfg.debug, seq_len=cfg.seq_len,
                               vocab_size=cfg.vocab_size, source_path=cfg.source_path or DEFAULT_SOURCE)
    size = TransformerSize.of(cfg, data.tokenizer.vocab_size, cfg.seq_len)
    run.check_model_fits(layers=size.layers, heads=size.heads, ff_dim=size.ff_dim, vocab_size=size.vocab_size)
    set_precision(cfg.precision)
    with run.model_scope():
        # Every rank draws every weight, as one process would; pipeline plans recompute whole stages.
        lm = build_lm(cfg, size, run.dist.tensor, recompute=run.plan.recompute and run.plan.pipeline == 1)
        model = pipeline.cut(lm, run.dist)
        optimizer = api.make_optimizer(cfg)
    step = api.make_step(run, model, optimizer, token_loss(run.dist.tensor))
    forward = pipeline.make_forward(run, model)

    def evaluate():
        return {**held_out_perplexity(run, forward, data.test), **baselines(data),
                "samples": samples(run, forward, size, data.tokenizer, data.test)}

    summary = api.train(run, model, optimizer, step, with_prefix(data.train), evaluate=evaluate,
                        export=lambda out_dir: shutil.copyfile(data.tokenizer.model_path, Path(out_dir) / "subword.model"))
    if run.dist.is_chief:
        print(f"held-out perplexity {summary['test_perplexity']:.2f} (unigram {summary['unigram_perplexity']:.1f}, "
              f"bigram {summary['bigram_perplexity']:.1f}) over {summary['test_tokens']} tokens of unseen books "
              f"(plan {run.plan}, precision {cfg.precision}, final loss {summary['final_loss']:.4f})")
        for sample in summary["samples"][:cfg.samples]:
            print(f"  PROMPT {sample['prompt']}\n  MODEL  {sample['continuation']}\n  TEXT   {sample['reference']}")


if __name__ == "__main__":
    main()
