"""English -> German translation with a Transformer encoder-decoder, data parallel.

Trains on sentence pairs from the FreeDict English-German dictionary (Debian package
dict-freedict-eng-deu) with a subword vocabulary learned from the training split, decodes the
held-out test split greedily, and reports BLEU (sacrebleu).

    horovodrun -np 2 python recipes/translate.py                # the demo: minutes on 2 CPU cores
    mpirun -np 2 python recipes/translate.py --debug            # same with Open MPI's launcher
    python recipes/translate.py --backend=mirrored              # one process, 2 logical CPU devices
    python recipes/translate.py --steps=20 --deterministic      # one process
    horovodrun -np 8 -H a:4,b:4 python recipes/translate.py --dataset=wmt14_translate/de-en \
        --data_dir=/shared/tfds --max_len=64 --d_model=512 --ff_dim=2048 --heads=8 --layers=6
"""
from __future__ import annotations

import dataclasses
import shutil

import keras
import numpy as np
import sacrebleu
import tensorflow as tf
from keras import layers, ops

from common import launch
from common.compression import make_compressor
from common.config import TrainConfig, flag
from common.data.freedict import DEFAULT_SOURCE
from common.data.pipeline import shard_rows, sharded_batches, unshard_rows
from common.data.translation import load_translation
from common.loop import train
from common.plans.data import WarmupCosine, make_train_step, scaled_lr


@dataclasses.dataclass(frozen=True)
class TranslateConfig(TrainConfig):
    steps: int = flag(1200, "optimizer steps to train")
    global_batch_size: int = flag(128, "sentence pairs per optimizer step, over all ranks")
    lr: float = flag(2e-3, "peak learning rate")
    warmup_steps: int = flag(100, "linear learning-rate warm-up steps")
    log_every: int = flag(50, "steps between metrics lines")
    checkpoint_every: int = flag(500, "steps between checkpoints; 0 = only at the end")
    vocab_size: int = flag(4000, "joint English+German subword vocabulary size")
    max_len: int = flag(24, "longest sentence in subword tokens (longer training pairs are dropped)")
    d_model: int = flag(128, "model width")
    heads: int = flag(4, "attention heads")
    layers: int = flag(2, "encoder layers (and as many decoder layers)")
    ff_dim: int = flag(512, "feed-forward width")
    dropout: float = flag(0.1, "dropout rate (0 under --deterministic)")
    max_test: int = flag(1000, "held-out sentences translated for BLEU; 0 = all")
    samples: int = flag(5, "sample translations printed at the end")
    freedict_file: str = flag(DEFAULT_SOURCE, "the FreeDict dictionary the embedded data is made from")

    DEBUG = {"steps": 20, "global_batch_size": 16, "log_every": 1, "checkpoint_every": 10,
             "warmup_steps": 5, "vocab_size": 500, "max_len": 16, "d_model": 32, "heads": 2,
             "layers": 1, "ff_dim": 64, "max_test": 64, "samples": 3}

    def validate(self):
        super().validate()
        if self.d_model % self.heads:
            raise launch.ConfigError(f"--d_model={self.d_model} must be a multiple of --heads={self.heads}")


# ------------------------------------------------------------------------------------ model
@keras.saving.register_keras_serializable(package="translate")
class PositionalEmbedding(layers.Layer):
    """Token embedding scaled by sqrt(width), plus a learned position embedding."""

    def __init__(self, vocab_size, max_len, width, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.max_len, self.width = vocab_size, max_len, width
        self.tokens = layers.Embedding(vocab_size, width)
        self.positions = layers.Embedding(max_len, width)

    def call(self, ids):
        positions = ops.arange(ops.shape(ids)[1])
        return self.tokens(ids) * (self.width ** 0.5) + self.positions(positions)[None]

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "max_len": self.max_len,
                "width": self.width}


def attention_mask(query_ids, key_ids, causal=False):
    """[batch, query, key] booleans: key is not padding (and not in the future)."""
    mask = ops.not_equal(key_ids, 0)[:, None, :] & ops.ones_like(query_ids, dtype="bool")[:, :, None]
    if causal:
        length = ops.shape(query_ids)[1]
        mask = mask & (ops.arange(length)[:, None] >= ops.arange(length)[None, :])[None]
    return mask


@keras.saving.register_keras_serializable(package="translate")
class TransformerBlock(layers.Layer):
    """Pre-norm block: self-attention, optional cross-attention over the encoder, MLP."""

    def __init__(self, width, heads, ff_dim, dropout, cross, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads, self.ff_dim, self.dropout, self.cross = width, heads, ff_dim, dropout, cross
        self.self_attention = layers.MultiHeadAttention(heads, width // heads, dropout=dropout)
        self.cross_attention = layers.MultiHeadAttention(heads, width // heads, dropout=dropout) if cross else None
        self.norms = [layers.LayerNormalization(epsilon=1e-6) for _ in range(3 if cross else 2)]
        self.mlp = keras.Sequential([layers.Dense(ff_dim, activation="gelu"), layers.Dense(width)])
        self.drop = layers.Dropout(dropout)

    def call(self, inputs, training=False):
        x, ids = inputs[0], inputs[1]
        h = self.norms[0](x)
        x = x + self.drop(self.self_attention(h, h, attention_mask=attention_mask(ids, ids, causal=self.cross),
                                              training=training), training=training)
        if self.cross:
            memory, source_ids = inputs[2], inputs[3]
            h = self.norms[1](x)
            x = x + self.drop(self.cross_attention(h, memory, attention_mask=attention_mask(ids, source_ids),
                                                   training=training), training=training)
        return x + self.drop(self.mlp(self.norms[-1](x)), training=training)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads, "ff_dim": self.ff_dim,
                "dropout": self.dropout, "cross": self.cross}


def build_models(cfg: TranslateConfig, vocab_size: int):
    """(encoder, decoder, full model): the full model trains, the halves decode."""
    dropout = 0.0 if cfg.deterministic else cfg.dropout
    embed = PositionalEmbedding(vocab_size, cfg.max_len, cfg.d_model, name="embedding")
    source = keras.Input((cfg.max_len,), dtype="int32", name="source")
    x = embed(source)
    for i in range(cfg.layers):
        x = TransformerBlock(cfg.d_model, cfg.heads, cfg.ff_dim, dropout, False, name=f"encoder_{i}")([x, source])
    encoder = keras.Model(source, layers.LayerNormalization(epsilon=1e-6, name="encoder_norm")(x), name="encoder")

    target = keras.Input((cfg.max_len,), dtype="int32", name="target_in")
    memory = keras.Input((cfg.max_len, cfg.d_model), name="memory")
    source_ids = keras.Input((cfg.max_len,), dtype="int32", name="source_ids")
    y = embed(target)
    for i in range(cfg.layers):
        block = TransformerBlock(cfg.d_model, cfg.heads, cfg.ff_dim, dropout, True, name=f"decoder_{i}")
        y = block([y, target, memory, source_ids])
    logits = layers.Dense(vocab_size, name="logits")(layers.LayerNormalization(epsilon=1e-6, name="decoder_norm")(y))
    decoder = keras.Model([target, memory, source_ids], logits, name="decoder")

    model = keras.Model([source, target], decoder([target, encoder(source), source]), name="translator")
    return encoder, decoder, model


def loss_sums(model, batch, training):
    """Summed token cross-entropy and correct tokens over non-padding target tokens."""
    source, target = batch
    labels = target[:, 1:]
    logits = model([source, target[:, :-1]], training=training)
    weights = tf.cast(labels != 0, tf.float32)
    losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
    return tf.reduce_sum(losses * weights), tf.reduce_sum(weights), {"token_accuracy": tf.reduce_sum(correct * weights)}


# ---------------------------------------------------------------------------------- decoding
def greedy_translate(encoder, decoder, source: np.ndarray, bos: int, eos: int, batch_size: int = 256) -> list[list[int]]:
    """Token ids of the greedy translation of each source row (without bos/eos)."""
    max_len = source.shape[1]
    decode = tf.function(lambda t, m, s: decoder([t, m, s], training=False))
    results = []
    for start in range(0, len(source), batch_size):
        src = tf.constant(source[start:start + batch_size])
        memory = encoder(src, training=False)
        tokens = np.zeros(src.shape, np.int32)
        tokens[:, 0] = bos
        out = np.zeros(src.shape, np.int32)
        for t in range(max_len):
            out[:, t] = np.argmax(decode(tf.constant(tokens), memory, src)[:, t].numpy(), axis=-1)
            if t + 1 < max_len:
                tokens[:, t + 1] = out[:, t]
            if (out[:, :t + 1] == eos).any(axis=1).all():
                break
        results.extend(list(row[:list(row).index(eos)] if eos in row else row) for row in out)
    return results


def evaluate(run, data, encoder, decoder, max_test: int) -> dict:
    """BLEU of greedy translations; each process decodes an interleaved share of the test set."""
    count = len(data.test_src) if not max_test else min(max_test, len(data.test_src))
    shards, index = run.dist.num_processes, run.dist.process_rank
    mine = greedy_translate(encoder, decoder, np.stack(shard_rows(data.test_src[:count], shards, index)),
                            data.tokenizer.bos_id, data.tokenizer.eos_id)
    hypotheses = unshard_rows(run.dist.gather_objects([data.tokenizer.decode(ids) for ids in mine]))
    references = data.test_tgt_text[:count]
    bleu = sacrebleu.corpus_bleu(hypotheses, [references])
    samples = [{"en": s, "reference": r, "translation": h}
               for s, r, h in zip(data.test_src_text, references, hypotheses)]
    return {"bleu": round(bleu.score, 2), "bleu_detail": str(bleu),
            "test_sentences": count, "samples": samples[:10]}


# -------------------------------------------------------------------------------------- main
@launch.guarded
def main():
    run = launch.start(TranslateConfig, "translate")
    cfg, dist = run.config, run.dist
    data = load_translation(data_dir=run.data_dir, dataset=cfg.dataset or None, debug=cfg.debug,
                            max_len=cfg.max_len, vocab_size=cfg.vocab_size, source_path=cfg.freedict_file)
    with dist.model_scope(cfg.seed):
        encoder, decoder, model = build_models(cfg, data.tokenizer.vocab_size)
        peak = scaled_lr(cfg.lr, cfg.global_batch_size, cfg.lr_reference_batch, cfg.lr_scaling)
        optimizer = keras.optimizers.Adam(WarmupCosine(peak, cfg.warmup_steps, cfg.steps), global_clipnorm=1.0)
    train_step = make_train_step(dist, model, optimizer, loss_sums, cfg.accum_steps, make_compressor(cfg.compression))

    def make_batches(start_step):
        # Horovod: each process reads its interleaved shard of the same shuffled stream.
        return sharded_batches((data.train_src, data.train_tgt), batch_size=run.process_batch_size,
                               num_shards=dist.num_processes, shard_index=dist.process_rank,
                               seed=cfg.seed, skip_batches=start_step)

    def export(out_dir):
        model.save(out_dir / "model.keras")
        shutil.copy(data.tokenizer.model_path, out_dir / "subword.model")

    summary = train(cfg, dist, model=model, optimizer=optimizer, train_step=train_step,
                    make_batches=make_batches, evaluate=lambda: evaluate(run, data, encoder, decoder, cfg.max_test),
                    export=export, out_dir=run.out_dir)
    if dist.is_chief:
        print(f"BLEU = {summary['bleu']:.2f} on {summary['test_sentences']} held-out sentences "
              f"({summary['world_size']} replicas, final loss {summary['final_loss']:.4f})")
        for sample in summary["samples"][:cfg.samples]:
            print(f"  EN  {sample['en']}\n  REF {sample['reference']}\n  OUT {sample['translation']}")


if __name__ == "__main__":
    main()
