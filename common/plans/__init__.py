"""Parallel plans: each a few small functions over `common.dist.Dist`."""
