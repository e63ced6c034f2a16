"""English -> Spanish translation with a Transformer encoder-decoder, data and tensor parallel.

Trains on Bible verses, the World English Bible against the Reina-Valera 1909 aligned by verse
(Debian's SWORD modules, `common.data.bible`), with a subword vocabulary learned from the train
split; translates the held-out verses (whole chapters no training verse comes from, those that
fit --max_len tokens whole) by beam search, and reports BLEU and chrF (sacrebleu).
`--corpus=freedict` trains English -> German on pairs of the FreeDict dictionary instead.

    horovodrun -np 2 python recipes/translate.py                # the demo: minutes on 2 CPU cores
    mpirun -np 2 python recipes/translate.py --debug            # same with Open MPI's launcher
    horovodrun -np 2 python recipes/translate.py --plan=tensor=2
    python recipes/translate.py --backend=mirrored              # one process, 2 logical CPU devices
    python recipes/translate.py --steps=20 --deterministic      # one process
    horovodrun -np 2 python recipes/translate.py --corpus=freedict --max_len=16 --vocab_size=4000
    horovodrun -np 2 python recipes/translate.py --predict=lines.txt --plan=tensor=2   # the run in --out_dir
    horovodrun -np 8 -H a:4,b:4 python recipes/translate.py --dataset=wmt14_translate/de-en \
        --data_dir=/shared/tfds --max_len=64 --d_model=512 --ff_dim=2048 --heads=8 --layers=6
"""
from __future__ import annotations

import dataclasses

from common.config import TransformerConfig, flag, parse_or_exit
from common.data import bible, freedict
from common.data.freedict import DEFAULT_SOURCE
from common.errors import ConfigError, RecipeError, exit_with
from common.startup import load_tensorflow

CORPORA = ("bible", "freedict")


@dataclasses.dataclass(frozen=True)
class TranslateConfig(TransformerConfig):
    steps: int = flag(1000, "optimizer steps to train")
    global_batch_size: int = flag(64, "sentence pairs per optimizer step, over all ranks")
    lr: float = flag(2e-3, "peak learning rate")
    warmup_steps: int = flag(100, "linear learning-rate warm-up steps")
    log_every: int = flag(50, "steps between metrics lines")
    checkpoint_every: int = flag(500, "steps between checkpoints; 0 = only at the end")
    vocab_size: int = flag(8000, "joint source+target subword vocabulary size")
    layers: int = flag(2, "encoder layers (and as many decoder layers)")
    max_len: int = flag(48, "longest sentence in subword tokens (longer training pairs are dropped, and so are "
                             "held-out Bible verses)")
    max_test: int = flag(1000, "held-out sentences translated for BLEU; 0 = all")
    samples: int = flag(5, "sample translations printed at the end")
    corpus: str = flag("bible", "embedded data: bible (English->Spanish Bible verses) or freedict "
                       "(English->German dictionary pairs)")
    freedict_file: str = flag(DEFAULT_SOURCE, "--corpus=freedict: the FreeDict dictionary the data is made from")
    beam: int = flag(4, "beam width of the decoding; 1 = greedy")
    length_penalty: float = flag(0.6, "beam search's length penalty alpha (GNMT's): 0 = none, more = longer outputs")
    predict: str = flag("", "translate each line of this file (- = standard input) with the finished run in "
                        "--out_dir instead of training; the chief prints one translation a line")
    predict_batch: int = flag(64, "--predict: sentences each replica decodes at a time; 0 = all of its share")

    DEBUG = {"steps": 20, "global_batch_size": 16, "log_every": 1, "checkpoint_every": 10,
             "warmup_steps": 5, "vocab_size": 500, "max_len": 16, "d_model": 32, "heads": 2,
             "layers": 1, "ff_dim": 64, "max_test": 64, "samples": 3, "beam": 1}

    def validate(self):
        super().validate()
        if self.corpus not in CORPORA:
            raise ConfigError(f"--corpus must be one of {', '.join(CORPORA)}, got {self.corpus!r}")
        if self.beam < 1:
            raise ConfigError(f"--beam must be >= 1 (1 = greedy), got {self.beam}")
        if self.predict_batch < 0:
            raise ConfigError(f"--predict_batch must be >= 0, got {self.predict_batch}")


def check_corpus(config: TranslateConfig) -> None:
    """Exits with one line naming the package to install if the embedded corpus to train on
    cannot be read: at once, on every rank, before Horovod starts and the model is built."""
    if config.predict or config.dataset:
        return
    try:
        if config.corpus == "bible":
            bible.check_tools(bible.ENGLISH, bible.SPANISH)
        else:
            freedict.check_source(config.freedict_file)
    except RecipeError as error:
        exit_with(error)


if __name__ == "__main__":
    check_corpus(parse_or_exit(TranslateConfig))  # bad flags and a missing package fail here, in a moment
    load_tensorflow()  # without its start-up lines

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

from common import api, inference  # noqa: E402
from common.data.subword import SubwordTokenizer  # noqa: E402
from common.data.seq2seq import load_translation  # noqa: E402
from common.dist import Group  # noqa: E402
from common.export import export_trained_seq2seq  # noqa: E402
from common.metrics import bleu, chrf  # noqa: E402
from common.models.beam import beam_decode  # noqa: E402
from common.models.transformer import TransformerSize, build_transformer, greedy_decode, token_loss  # noqa: E402
from common.plans.pipeline import make_forward  # noqa: E402


def translator(run, forward, tokenizer: SubwordTokenizer, max_len: int):
    """`translate(rows)`: the translations (texts) of a batch of source id rows, by beam search
    of --beam hypotheses (greedy for 1)."""
    cfg = run.config

    def translate(rows):
        args = forward, run.dist.tensor, np.stack(rows), max_len, tokenizer.bos_id, tokenizer.eos_id
        ids = greedy_decode(*args) if cfg.beam == 1 else beam_decode(*args, cfg.beam, cfg.length_penalty)
        return [tokenizer.decode(row) for row in ids]
    return translate


def evaluate(run, data, model, forward, count: int) -> dict:
    """BLEU and chrF of translations of the first `count` held-out sentences, and the held-out
    loss and token accuracy with the reference as decoder input, scored by all ranks together."""
    scores = api.held_out_metrics(run.dist, model, token_loss(run.dist.tensor), (data.test_src[:count], data.test_tgt[:count]))
    translate = translator(run, forward, data.tokenizer, run.config.max_len)
    hypotheses, references = api.gathered_outputs(run.dist, translate, data.test_src[:count]), data.test_tgt_text[:count]
    samples = [{"en": s, "reference": r, "translation": h}
               for s, r, h in zip(data.test_src_text, references, hypotheses)]
    return {**bleu(hypotheses, references), **chrf(hypotheses, references), **scores, "test_sentences": count,
            "samples": samples[:10]}


def load_trained(out_dir: str):
    """The exported model of a finished run (any plan), on one process, for inference, and its
    tokenizer. Without dropout layers: their seed generators' names are numbered per process,
    so would not match model.npz's in the process that trained the run."""
    size, tokenizer = trained_size(out_dir)
    model = build_transformer(size, Group((0,), 0))
    api.load_weights(model, Path(out_dir) / "model.npz")
    return model, tokenizer


def trained_size(out_dir) -> tuple[TransformerSize, SubwordTokenizer]:
    """The model size of the finished run in `out_dir`, without dropout, and its tokenizer."""
    saved = api.load_saved(TranslateConfig, out_dir)
    tokenizer = SubwordTokenizer(str(Path(out_dir) / "subword.model"))
    return dataclasses.replace(TransformerSize.of(saved, tokenizer.vocab_size, saved.max_len), dropout=0.0), tokenizer


def source_rows(tokenizer: SubwordTokenizer, lines: list[str], max_len: int) -> np.ndarray:
    """int32 [len(lines), max_len]: each line's ids and eos, padded, as the held-out sources;
    a line longer than max_len - 1 tokens keeps its start (stderr says how many were cut)."""
    ids = tokenizer.encode(lines)
    cut = sum(len(row) >= max_len for row in ids)
    if cut:
        print(f"--predict: {cut} of {len(lines)} lines are longer than the model's max_len={max_len} tokens "
              f"with eos: each is translated from its first {max_len - 1} tokens", file=sys.stderr)
    return keras.utils.pad_sequences([row[:max_len - 1] + [tokenizer.eos_id] for row in ids], maxlen=max_len,
                                     dtype="int32", padding="post")


def predict(run) -> None:
    """--predict: the finished run in --out_dir (its config.json and subword.model), split by
    the current --plan, translates each input line; the chief prints them in input order."""
    out_dir = inference.finished_run(run.dist, run.out_dir)
    size, tokenizer = trained_size(out_dir)
    run.check_model_fits(layers=size.layers, heads=size.heads, ff_dim=size.ff_dim, vocab_size=size.vocab_size)
    with run.model_scope():
        model = build_transformer(size, run.dist.tensor)
    inference.load_finished(run.dist, model, out_dir)
    lines = inference.chief_lines(run.dist, run.config.predict)
    sources = source_rows(tokenizer, lines, size.max_len) if run.dist.is_chief else None
    translate = translator(run, make_forward(run, model), tokenizer, size.max_len)
    translations = inference.predictions(run.dist, translate, run.dist.broadcast_object(sources),
                                         run.config.predict_batch, "sentences")
    if run.dist.is_chief:
        print("\n".join(translations), end="\n" if translations else "")


@api.guarded
def main():
    run = api.start(TranslateConfig, "translate", axes=("data", "tensor"))
    cfg = run.config
    if cfg.predict:
        return predict(run)
    data = load_translation(data_dir=run.data_dir, dataset=cfg.dataset or None, debug=cfg.debug,
                            max_len=cfg.max_len, vocab_size=cfg.vocab_size, corpus=cfg.corpus,
                            source_path=cfg.freedict_file)
    size = TransformerSize.of(cfg, data.tokenizer.vocab_size, cfg.max_len)
    run.check_model_fits(layers=size.layers, heads=size.heads, ff_dim=size.ff_dim, vocab_size=size.vocab_size)
    with run.model_scope():
        model = build_transformer(size, run.dist.tensor)  # tensor=N: every layer split over N ranks
        optimizer = api.make_optimizer(cfg)
    step = api.make_step(run, model, optimizer, token_loss(run.dist.tensor))
    forward = make_forward(run, model)  # inference through the same plan
    count = min(cfg.max_test or len(data.test_src), len(data.test_src))

    summary = api.train(run, model, optimizer, step, (data.train_src, data.train_tgt),
                        evaluate=lambda: evaluate(run, data, model, forward, count),
                        export=lambda out_dir: export_trained_seq2seq(out_dir, data.tokenizer, load_trained,
                                                                       source_len=cfg.max_len, target_len=cfg.max_len))
    if run.dist.is_chief:
        print(f"BLEU = {summary['bleu']:.2f}, chrF = {summary['chrf']:.2f} on {summary['test_sentences']} held-out sentences "
              f"({summary['world_size']} replicas, final loss {summary['final_loss']:.4f})")
        for sample in summary["samples"][:cfg.samples]:
            print(f"  EN  {sample['en']}\n  REF {sample['reference']}\n  OUT {sample['translation']}")


if __name__ == "__main__":
    main()
