"""Gradient compression on the wire: a compressor turns gradients into what is all-reduced
and back. Only lossless-in-range casts so far (`none`, `fp16`)."""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf


class NoCompression:
    def compress(self, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        return list(tensors)

    def decompress(self, wire: Sequence[tf.Tensor], originals: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        return list(wire)


class CastCompression(NoCompression):
    """Send floating-point gradients in a narrower float type; gradients should be
    normalised (mean-sized) before this, so that they stay in the type's range."""

    def __init__(self, wire_dtype: tf.DType):
        self.wire_dtype = wire_dtype

    def compress(self, tensors):
        return [tf.cast(t, self.wire_dtype) if t.dtype.is_floating else t for t in tensors]

    def decompress(self, wire, originals):
        return [tf.cast(w, o.dtype) for w, o in zip(wire, originals)]


def make_compressor(name: str) -> NoCompression:
    compressors = {"none": NoCompression(), "fp16": CastCompression(tf.float16)}
    return compressors[name]
