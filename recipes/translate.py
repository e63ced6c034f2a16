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
import json
import shutil
from pathlib import Path

import keras
import numpy as np

from common import launch
from common.compression import make_compressor
from common.config import flag
from common.data.freedict import DEFAULT_SOURCE
from common.data.pipeline import shard_rows, sharded_batches, unshard_rows
from common.data.subword import SubwordTokenizer
from common.data.translation import load_translation
from common.dist import Group
from common.loop import held_out_metrics, train
from common.metrics import bleu
from common.models.transformer import (GreedyDecoder, Seq2SeqTransformer, TransformerConfig, build_transformer,
                                       loss_sums)
from common.plans.data import WarmupCosine, make_train_step, scaled_lr
from common.state import variable_names


@dataclasses.dataclass(frozen=True)
class TranslateConfig(TransformerConfig):
    steps: int = flag(1200, "optimizer steps to train")
    global_batch_size: int = flag(128, "sentence pairs per optimizer step, over all ranks")
    lr: float = flag(2e-3, "peak learning rate")
    warmup_steps: int = flag(100, "linear learning-rate warm-up steps")
    log_every: int = flag(50, "steps between metrics lines")
    checkpoint_every: int = flag(500, "steps between checkpoints; 0 = only at the end")
    vocab_size: int = flag(4000, "joint English+German subword vocabulary size")
    layers: int = flag(2, "encoder layers (and as many decoder layers)")
    max_len: int = flag(16, "longest sentence in subword tokens (longer training pairs are dropped)")
    max_test: int = flag(1000, "held-out sentences translated for BLEU; 0 = all")
    samples: int = flag(5, "sample translations printed at the end")
    freedict_file: str = flag(DEFAULT_SOURCE, "the FreeDict dictionary the embedded data is made from")

    DEBUG = {"steps": 20, "global_batch_size": 16, "log_every": 1, "checkpoint_every": 10,
             "warmup_steps": 5, "vocab_size": 500, "max_len": 16, "d_model": 32, "heads": 2,
             "layers": 1, "ff_dim": 64, "max_test": 64, "samples": 3}


def evaluate(run, data, decoder: GreedyDecoder, max_test: int) -> dict:
    """BLEU of greedy translations, and the held-out loss and token accuracy with the reference
    as decoder input. Each data-parallel rank decodes an interleaved share of the test set (the
    ranks of a tensor group decode the same share together)."""
    dist = run.dist
    count = len(data.test_src) if not max_test else min(max_test, len(data.test_src))
    scores = held_out_metrics(dist, decoder.model, loss_sums, (data.test_src[:count], data.test_tgt[:count]))
    mine = decoder(np.stack(shard_rows(data.test_src[:count], dist.input_shards, dist.coords["data"])))
    per_process = dist.gather_objects((dist.coords, [data.tokenizer.decode(ids) for ids in mine]))
    shares = [texts for coords, texts in per_process if coords["tensor"] == 0]
    hypotheses = unshard_rows(shares)
    references = data.test_tgt_text[:count]
    samples = [{"en": s, "reference": r, "translation": h}
               for s, r, h in zip(data.test_src_text, references, hypotheses)]
    return {**bleu(hypotheses, references), **scores, "test_sentences": count, "samples": samples[:10]}


def load_trained(out_dir: str) -> tuple[Seq2SeqTransformer, SubwordTokenizer]:
    """The exported model of a finished run (any plan), on one process, and its tokenizer."""
    out = Path(out_dir)
    cfg = TranslateConfig(**{k: v for k, v in json.loads((out / "config.json").read_text()).items()
                             if k in {f.name for f in dataclasses.fields(TranslateConfig)}})
    tokenizer = SubwordTokenizer(str(out / "subword.model"))
    model = build_transformer(cfg.transformer_size(tokenizer.vocab_size, cfg.max_len), Group((0,), 0))
    with np.load(out / "model.npz") as weights:
        for name, v in zip(variable_names(model.variables), model.variables):
            v.assign(weights[name])
    return model, tokenizer


# -------------------------------------------------------------------------------------- main
@launch.guarded
def main():
    run = launch.start(TranslateConfig, "translate", axes=("data", "tensor"))
    cfg, dist = run.config, run.dist
    data = load_translation(data_dir=run.data_dir, dataset=cfg.dataset or None, debug=cfg.debug,
                            max_len=cfg.max_len, vocab_size=cfg.vocab_size, source_path=cfg.freedict_file)
    size = cfg.transformer_size(data.tokenizer.vocab_size, cfg.max_len)
    run.check_model_fits(layers=size.layers, heads=size.heads, ff_dim=size.ff_dim, vocab_size=size.vocab_size)
    with dist.model_scope(cfg.seed):
        model = build_transformer(size, dist.group("tensor"))
        peak = scaled_lr(cfg.lr, cfg.global_batch_size, cfg.lr_reference_batch, cfg.lr_scaling)
        optimizer = keras.optimizers.Adam(WarmupCosine(peak, cfg.warmup_steps, cfg.steps))
    decoder = GreedyDecoder(model, data.tokenizer.bos_id, data.tokenizer.eos_id)
    train_step = make_train_step(dist, model, optimizer, loss_sums, cfg.accum_steps, make_compressor(cfg.compression),
                                 cfg.clip_norm)

    def make_batches(start_step):
        # Horovod: each process reads its interleaved shard of the same shuffled stream.
        return sharded_batches((data.train_src, data.train_tgt), batch_size=run.process_batch_size,
                               num_shards=dist.input_shards, shard_index=dist.coords["data"],
                               seed=cfg.seed, skip_batches=start_step)

    def export(out_dir, weights):
        np.savez(out_dir / "model.npz", **weights)  # full tensors: reload with load_trained()
        shutil.copy(data.tokenizer.model_path, out_dir / "subword.model")

    summary = train(cfg, dist, model=model, optimizer=optimizer, train_step=train_step,
                    make_batches=make_batches, evaluate=lambda: evaluate(run, data, decoder, cfg.max_test),
                    export=export, out_dir=run.out_dir)
    if dist.is_chief:
        print(f"BLEU = {summary['bleu']:.2f} on {summary['test_sentences']} held-out sentences "
              f"({summary['world_size']} replicas, final loss {summary['final_loss']:.4f})")
        for sample in summary["samples"][:cfg.samples]:
            print(f"  EN  {sample['en']}\n  REF {sample['reference']}\n  OUT {sample['translation']}")


if __name__ == "__main__":
    main()
