"""Export for serving: the trained model as a TensorFlow SavedModel that stock TensorFlow
loads and runs with `tf.saved_model.load` (or TF Serving), without importing this project.

A `.keras` file serves only the ConvNet (a functional model of Keras' own layers): the
Transformers are subclassed models of the project's layers, which Keras cannot save without
a `get_config` and cannot load without their classes. A SavedModel holds the traced graphs of
its endpoints and the weights only, for every recipe alike. Whatever plan trained the run,
the chief exports a one-process model holding the full weights (a tensor group of one adds no
collective to the graph), so the export runs on a single process anywhere.

`out_dir/saved_model/` holds one signature per endpoint; the first is also `serving_default`.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import keras
import tensorflow as tf

SAVED_MODEL = "saved_model"

Endpoint = tuple[Callable, list[tf.TensorSpec]]  # a function of tensors -> {output name: tensor}, its inputs


def write_saved_model(out_dir: Path, model: keras.Model, endpoints: dict[str, Endpoint]) -> Path:
    """Write `model`'s weights and `endpoints` (name -> (function, input specs)) to
    out_dir/saved_model; the first endpoint is also `serving_default`. Returns the folder."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, (function, input_signature) in endpoints.items():
        archive.add_endpoint(name, function, input_signature)
    path = Path(out_dir) / SAVED_MODEL
    archive.write_out(str(path), verbose=False)
    return path


def export_classifier(out_dir: Path, model: keras.Model, image_shape) -> Path:
    """Endpoint `classify`: uint8 images [batch, height, width, channels], as the data set
    stores them (the scaling is part of the model), -> `logits` and `probabilities`."""
    def classify(images):
        logits = model(images, training=False)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    images = tf.TensorSpec([None, *image_shape], tf.uint8, name="images")
    return write_saved_model(out_dir, model, {"classify": (classify, [images])})


def export_seq2seq(out_dir: Path, model: keras.Model, tokenizer, *, source_len: int, target_len: int) -> Path:
    """Endpoints of a model called on (source, target) batches that returns the logits
    predicting target[:, 1:] (a Seq2SeqTransformer, a CausalLM):
    - `generate`: `source` ids int32 [batch, source_len] (the text's ids, eos, then pad ids)
      -> `ids` int32 [batch, target_len], the greedy decoding without bos and eos, padded after
      the end with pad ids (SentencePiece's decode of a row is its text);
    - `logits`: `source` and `target` int32 [batch, target_len + 1] (bos first) -> `logits`
      [batch, target_len, vocabulary rows] (the rows are padded past the tokenizer's vocabulary).
    `tokenizer` (`common.data.subword.SubwordTokenizer`) gives the vocabulary size and special
    ids; its SentencePiece model travels with the export as saved_model/assets/subword.model.
    """
    source = tf.TensorSpec([None, source_len], tf.int32, name="source")
    target = tf.TensorSpec([None, target_len + 1], tf.int32, name="target")

    def generate(source_ids):
        def logits_at(tokens, t):
            return tf.gather(model((source_ids, tokens), training=False), t, axis=1)
        return {"ids": greedy_ids(logits_at, tf.shape(source_ids)[0], target_len, tokenizer)}

    def logits(source_ids, target_ids):
        return {"logits": model((source_ids, target_ids), training=False)}

    path = write_saved_model(out_dir, model, {"generate": (generate, [source]), "logits": (logits, [source, target])})
    shutil.copy(tokenizer.model_path, path / "assets" / "subword.model")
    return path


def export_trained_seq2seq(out_dir: Path, tokenizer, load_trained: Callable, *, source_len: int,
                           target_len: int) -> Path:
    """A sequence recipe's export, on the chief beside model.npz: its tokenizer as
    subword.model (which `load_trained(out_dir)` reads too), then `export_seq2seq` of the
    one-process model `load_trained` rebuilds from the full weights."""
    shutil.copy(tokenizer.model_path, Path(out_dir) / "subword.model")
    model, tokenizer = load_trained(str(out_dir))
    return export_seq2seq(out_dir, model, tokenizer, source_len=source_len, target_len=target_len)


def greedy_ids(logits_at: Callable, rows, length: int, tokenizer) -> tf.Tensor:
    """Greedy decoding in the graph, as `models.transformer.greedy_decode` does it eagerly: the
    decoder reads a [rows, length + 1] buffer (bos, the ids so far, pad), `logits_at(tokens, t)`
    gives position t's logits, and the loop ends once every row has an eos. Returns the ids
    after bos up to each row's first eos, padded with pad ids; ids past the vocabulary (padding
    rows of the output layer) become pad ids too, as the tokenizer ignores them."""
    bos, eos, pad = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    tokens = tf.concat([tf.fill([rows, 1], bos), tf.fill([rows, length], pad)], axis=1)
    ended = tf.zeros([rows], tf.bool)

    def unfinished(t, tokens, ended):
        return (t < length) & ~tf.reduce_all(ended)

    def next_token(t, tokens, ended):
        next_ids = tf.argmax(logits_at(tokens, t), axis=-1, output_type=tf.int32)
        at_next = tf.one_hot(t + 1, length + 1, dtype=tf.int32)[None, :]
        return t + 1, tokens * (1 - at_next) + next_ids[:, None] * at_next, ended | tf.equal(next_ids, eos)

    _, tokens, _ = tf.while_loop(unfinished, next_token, (tf.constant(0), tokens, ended))
    ids = tokens[:, 1:]
    before_eos = tf.equal(tf.cumsum(tf.cast(tf.equal(ids, eos), tf.int32), axis=1), 0)
    kept = before_eos & (ids < tokenizer.vocab_size) & tf.not_equal(ids, bos)
    return tf.where(kept, ids, pad)
