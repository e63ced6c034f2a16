"""Gradient compression: a compressor owns how (already normalised) gradients cross the wire.

`reduce(grads, dist)` returns the sum over replicas of `grads`, computed through whatever
smaller representation the compressor sends. Gradients arrive divided by the global weight
count (mean-sized), so narrower float types stay in range.
"""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf


class NoCompression:
    """Full-precision sum in one fused all-reduce."""

    def reduce(self, grads: Sequence[tf.Tensor], dist) -> list[tf.Tensor]:
        return dist.sum_across_replicas(grads)


class CastCompression(NoCompression):
    """Send floating-point gradients in a narrower float type, sum, cast back."""

    def __init__(self, wire_dtype: tf.DType):
        self.wire_dtype = wire_dtype

    def reduce(self, grads, dist):
        wire = [tf.cast(g, self.wire_dtype) for g in grads]
        return [tf.cast(s, g.dtype) for s, g in zip(dist.sum_across_replicas(wire), grads)]


def make_compressor(name: str) -> NoCompression:
    compressors = {"none": NoCompression(), "fp16": CastCompression(tf.float16)}
    return compressors[name]
