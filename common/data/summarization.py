"""Summarization data (document -> summary) as padded id arrays, identical in every process."""
from common.data.docstrings import STDLIB_DIR, PythonDocstrings, check_source
from common.data.seq2seq import Seq2SeqData, load_seq2seq, open_builder
from common.data.tfds_io import DataError


def _text_keys(builder) -> tuple[str, str]:
    """The (document, summary) feature names: the builder's supervised keys."""
    keys = builder.info.supervised_keys
    if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
        raise DataError(f"TFDS dataset {builder.name!r} has no (document, summary) supervised "
                        "keys: pass a summarization data set such as cnn_dailymail to --dataset")
    return keys


def load_summarization(*, data_dir: str, dataset: str | None, debug: bool, max_src_len: int,
                       max_tgt_len: int, vocab_size: int, max_test: int | None = None,
                       stdlib_dir: str = STDLIB_DIR) -> Seq2SeqData:
    """Loads document->summary pairs, preparing the embedded data set if needed.

    `dataset=None` selects Python functions -> docstring summaries of the standard
    library in `stdlib_dir` (the `debug` config if `debug`); otherwise `dataset`
    names a public TFDS summarization data set whose supervised keys are (document,
    summary), e.g. cnn_dailymail (article, highlights), which must already be
    prepared in `data_dir` (DataError otherwise). Documents are truncated to
    `max_src_len` tokens with eos, keeping their start; training pairs whose summary
    does not fit `max_tgt_len` tokens with eos are dropped.
    """
    if dataset is None:
        check_source(stdlib_dir)
    builder, tokenizer_dir = open_builder(data_dir, dataset, PythonDocstrings,
                                          "debug" if debug else "functions",
                                          stdlib_dir=stdlib_dir)
    return load_seq2seq(builder, *_text_keys(builder), tokenizer_dir=tokenizer_dir,
                        max_src_len=max_src_len, max_tgt_len=max_tgt_len,
                        vocab_size=vocab_size, max_test=max_test, truncate_sources=True)
