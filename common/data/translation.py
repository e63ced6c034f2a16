"""English->German translation data as padded id arrays, identical in every process."""
from common.data.freedict import DEFAULT_SOURCE, FreedictEngDeu, check_source
from common.data.seq2seq import Seq2SeqData, load_seq2seq, open_builder

TranslationData = Seq2SeqData  # train_src [n, max_len], train_tgt [n, max_len + 1]


def load_translation(*, data_dir: str, dataset: str | None, debug: bool, max_len: int,
                     vocab_size: int, source_path: str = DEFAULT_SOURCE,
                     max_test: int | None = None) -> TranslationData:
    """Loads English->German pairs, preparing the embedded data set if needed.

    `dataset=None` selects the FreeDict dictionary (its `debug` config if `debug`);
    otherwise `dataset` names a public TFDS translation data set with `en` and `de`
    features, which must already be prepared in `data_dir` (DataError otherwise).
    The subword vocabulary is trained on the train split only; pairs with a side
    longer than `max_len` tokens with eos are dropped from the training arrays.
    """
    if dataset is None:
        check_source(source_path)
    builder, tokenizer_dir = open_builder(data_dir, dataset, FreedictEngDeu,
                                          "debug" if debug else "sentences",
                                          source_path=source_path)
    return load_seq2seq(builder, "en", "de", tokenizer_dir=tokenizer_dir, max_src_len=max_len,
                        max_tgt_len=max_len, vocab_size=vocab_size, max_test=max_test)
