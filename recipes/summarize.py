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
import shutil

import keras
import numpy as np
import tensorflow as tf

from common import launch
from common.compression import make_compressor
from common.config import flag
from common.data.pipeline import shard_rows, sharded_batches, unshard_rows
from common.data.summarization import load_summarization
from common.errors import ConfigError
from common.loop import train
from common.metrics import rouge
from common.models.transformer import (CausalLM, LMStage, TransformerConfig, TransformerSize, lm_forward,
                                       lm_loss_sums, lm_sequence)
from common.plans.data import WarmupCosine, make_train_step, scaled_lr
from common.plans.mesh import split_layers
from common.plans.pipeline import PipelineRunner, Stage, activation_bytes, make_pipeline_train_step
from common.plans.tensor import shard_axes, vocab_parallel_argmax

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


def build_model(run, size: TransformerSize):
    """The whole LM (every rank draws all initial weights, so every plan starts from the
    one-process weights), then, under a pipeline plan, only this rank's stage of it."""
    lm = CausalLM(size, run.dist.group("tensor"), run.config.source_len, name="lm")
    lm(tf.zeros((1, size.max_len), tf.int32))
    stages = run.dist.group("pipeline")
    if stages.size == 1:
        return lm
    costs = [sum(int(np.prod(v.shape)) for v in block.weights) for block in lm.blocks]
    blocks = split_layers(costs, stages.size)[stages.index]
    stage = LMStage(lm, blocks, first=stages.index == 0, last=stages.index == stages.size - 1, name="lm")
    stage(tf.zeros((1, size.max_len), tf.int32), None if stage.first else tf.zeros((1, size.max_len, size.width)))
    return stage


def lm_loss(model, batch, training):
    ids, labels = lm_sequence(batch)
    return lm_loss_sums(model(ids, training=training), labels, model.group)


def make_step(run, model, optimizer):
    """The data-parallel step, or the pipeline schedule's step when the plan has stages."""
    cfg, dist = run.config, run.dist
    compressor = make_compressor(cfg.compression)
    if dist.group("pipeline").size == 1:
        return make_train_step(dist, model, optimizer, lm_loss, cfg.accum_steps, compressor, cfg.clip_norm), None
    if cfg.accum_steps > 1:
        raise ConfigError("pipeline plans accumulate over micro-batches: use --plan=...,microbatches=N "
                          "instead of --accum_steps")
    forward = tf.function(lambda x, batch, training: lm_forward(model, lm_sequence(batch)[0], x, training))
    stage = Stage(forward=lambda x, batch, training: forward(x, batch, training),
                  loss=lambda logits, batch: lm_loss_sums(logits, lm_sequence(batch)[1], model.group),
                  variables=model.trainable_variables,
                  activation_shape=lambda batch: (batch[0].shape[0], model.size.max_len, model.size.width),
                  metric_names=("loss", "token_accuracy"))
    runner = PipelineRunner(dist, stage, run.plan.schedule, run.plan.recompute)
    split = shard_axes(model)
    step = make_pipeline_train_step(dist, runner, optimizer, run.plan.microbatches,
                                    lambda batch: tf.reduce_sum(tf.cast(lm_sequence(batch)[1] != 0, tf.float32)),
                                    compressor, cfg.clip_norm, [id(v) in split for v in model.trainable_variables])
    return step, runner


def generate(run, model, runner, source: np.ndarray, bos: int, eos: int, summary_len: int) -> list[list[int]]:
    """Greedy summaries. All ranks of a tensor or pipeline group decode the same rows together:
    the vocabulary-split argmax and the pipeline's forward pass are collectives."""
    pipeline = run.dist.group("pipeline")
    logits_of = tf.function(lambda batch: model(lm_sequence(batch)[0])) if runner is None else runner.infer
    target = np.zeros((len(source), summary_len + 1), np.int32)
    target[:, 0] = bos
    for t in range(summary_len):
        logits = logits_of((tf.constant(source), tf.constant(target)))
        best = vocab_parallel_argmax(logits[:, t], model.group) if logits is not None else tf.zeros(len(source), tf.int32)
        target[:, t + 1] = pipeline.sum([best])[0].numpy()  # from the last stage to every stage
        if (target[:, 1:t + 2] == eos).any(axis=1).all():
            break
    return [list(row[1:list(row).index(eos)]) if eos in row else list(row[1:]) for row in target]


def evaluate(run, data, model, runner, max_test: int) -> dict:
    dist, cfg = run.dist, run.config
    count = len(data.test_src) if not max_test else min(max_test, len(data.test_src))
    mine = generate(run, model, runner, np.stack(shard_rows(data.test_src[:count], dist.input_shards, dist.coords["data"])),
                    data.tokenizer.bos_id, data.tokenizer.eos_id, cfg.summary_len)
    per_process = dist.gather_objects((dist.coords, [data.tokenizer.decode(ids) for ids in mine]))
    shares = [texts for coords, texts in per_process if coords["tensor"] == 0 and coords["pipeline"] == 0]
    hypotheses, references = unshard_rows(shares), data.test_tgt_text[:count]
    samples = [{"document": d[:300], "reference": r, "summary": h}
               for d, r, h in zip(data.test_src_text, references, hypotheses)]
    memory = {} if runner is None else {
        "pipeline_peak_in_flight": runner.peak_in_flight,
        "activation_bytes_per_microbatch": activation_bytes(
            (run.process_batch_size // run.plan.microbatches, model.size.max_len, model.size.width))}
    return {**rouge(hypotheses, references), "test_documents": count, "samples": samples[:10], **memory}


@launch.guarded
def main():
    run = launch.start(SummarizeConfig, "summarize")
    cfg, dist = run.config, run.dist
    data = load_summarization(data_dir=run.data_dir, dataset=cfg.dataset or None, debug=cfg.debug,
                              max_src_len=cfg.source_len, max_tgt_len=cfg.summary_len, vocab_size=cfg.vocab_size)
    size = cfg.transformer_size(data.tokenizer.vocab_size, cfg.source_len + cfg.summary_len)
    run.check_model_fits(layers=size.layers, heads=size.heads, ff_dim=size.ff_dim, vocab_size=size.vocab_size)
    with dist.model_scope(cfg.seed):
        model = build_model(run, size)
        peak = scaled_lr(cfg.lr, cfg.global_batch_size, cfg.lr_reference_batch, cfg.lr_scaling)
        optimizer = keras.optimizers.Adam(WarmupCosine(peak, cfg.warmup_steps, cfg.steps))
    train_step, runner = make_step(run, model, optimizer)

    def make_batches(start_step):
        # Each data-parallel rank (all stages and tensor ranks of it alike) reads one shard.
        return sharded_batches((data.train_src, data.train_tgt), batch_size=run.process_batch_size,
                               num_shards=dist.input_shards, shard_index=dist.coords["data"],
                               seed=cfg.seed, skip_batches=start_step)

    def export(out_dir, weights):
        np.savez(out_dir / "model.npz", **weights)  # full tensors, whatever the plan
        shutil.copy(data.tokenizer.model_path, out_dir / "subword.model")

    summary = train(cfg, dist, model=model, optimizer=optimizer, train_step=train_step, make_batches=make_batches,
                    evaluate=lambda: evaluate(run, data, model, runner, cfg.max_test), export=export,
                    out_dir=run.out_dir)
    if dist.is_chief:
        print(f"ROUGE-1/2/L = {summary['rouge1']:.1f}/{summary['rouge2']:.1f}/{summary['rougeL']:.1f} on "
              f"{summary['test_documents']} held-out documents (plan {run.plan}, final loss {summary['final_loss']:.4f})")
        for sample in summary["samples"][:cfg.samples]:
            print(f"  DOC {sample['document'][:120]}\n  REF {sample['reference']}\n  OUT {sample['summary']}")


if __name__ == "__main__":
    main()
