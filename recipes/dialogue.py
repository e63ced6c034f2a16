"""A response model for open conversation: a decoder-only Transformer over [context; response],
data and tensor parallel.

Trains on real conversations (the Chit Chat Challenge set, PyPI chitchat-dataset): the last
turns of a conversation -> the next turn, the loss on the response only. Reports the held-out
perplexity of the responses of unseen conversations beside unigram and bigram baselines of the
responses alone (the same tokens), and prints greedy replies to held-out contexts. `--chat`
talks to a finished run. The plans are data and tensor (pipeline stages would hold no whole
model for the held-out perplexity).

    horovodrun -np 2 python recipes/dialogue.py --intra_op_threads=1
    horovodrun -np 2 python recipes/dialogue.py --plan=tensor=2
    python recipes/dialogue.py --chat                       # then type; an empty line starts anew
    printf 'hi!\\nwhat do you do for fun?\\n' | python recipes/dialogue.py --chat --out_dir=runs/dialogue
"""
from __future__ import annotations

import dataclasses

from common.config import TransformerConfig, flag, parse_or_exit
from common.startup import load_tensorflow


@dataclasses.dataclass(frozen=True)
class DialogueConfig(TransformerConfig):
    steps: int = flag(800, "optimizer steps to train")
    global_batch_size: int = flag(64, "context/response pairs per optimizer step, over all ranks")
    lr: float = flag(2e-3, "peak learning rate")
    warmup_steps: int = flag(100, "linear learning-rate warm-up steps")
    log_every: int = flag(50, "steps between metrics lines")
    checkpoint_every: int = flag(500, "steps between checkpoints; 0 = only at the end")
    context_len: int = flag(64, "context length in subword tokens (its last tokens are kept)")
    response_len: int = flag(32, "response length in subword tokens (longer training responses are dropped)")
    max_test: int = flag(2000, "held-out pairs scored for perplexity; 0 = all")
    dropout: float = flag(0.0, "dropout rate (under an epoch of training, none is needed)")
    samples: int = flag(5, "replies to held-out contexts printed at the end")
    chat: bool = flag(False, "talk to the finished run in --out_dir on one process: each line of standard input "
                      "is a turn, each reply one line of output; an empty line starts a new conversation")

    DEBUG = {"steps": 20, "global_batch_size": 16, "log_every": 1, "checkpoint_every": 10, "warmup_steps": 5,
             "vocab_size": 500, "context_len": 24, "response_len": 16, "d_model": 32, "heads": 2, "layers": 2,
             "ff_dim": 64, "max_test": 64, "samples": 2}


if __name__ == "__main__":
    parse_or_exit(DialogueConfig)  # a bad flag fails here, in a moment, before TensorFlow loads
    load_tensorflow()  # without its start-up lines

import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from common import api, inference  # noqa: E402
from common.data.chitchat import CONTEXT_TURNS, context_row, load_dialogue  # noqa: E402
from common.data.subword import SubwordTokenizer  # noqa: E402
from common.dist import Group  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from common.export import export_trained_seq2seq  # noqa: E402
from common.models.ngram import bigram_perplexity, unigram_perplexity  # noqa: E402
from common.models.transformer import CausalLM, TransformerSize, greedy_decode, token_loss  # noqa: E402
from common.plans.pipeline import make_forward  # noqa: E402


def build_lm(size: TransformerSize, group: Group, context_len: int) -> CausalLM:
    """The LM of `size` (max_len: context and response) split over the tensor group `group`, its weights built."""
    lm = CausalLM(size, group, context_len, name="lm")
    lm((np.zeros((1, context_len), np.int32), np.zeros((1, size.max_len - context_len + 1), np.int32)))
    return lm


def load_trained(out_dir: str):
    """The model of a finished run (any plan), on one process, without dropout, and its tokenizer."""
    cfg = api.load_saved(DialogueConfig, out_dir)
    tokenizer = SubwordTokenizer(str(Path(out_dir) / "subword.model"))
    size = TransformerSize.of(cfg, tokenizer.vocab_size, cfg.context_len + cfg.response_len)
    lm = build_lm(dataclasses.replace(size, dropout=0.0), Group((0,), 0), cfg.context_len)
    api.load_weights(lm, Path(out_dir) / "model.npz")
    return lm, tokenizer


def responder(run, forward, tokenizer: SubwordTokenizer, response_len: int):
    """`respond(rows)`: the greedy replies (texts) to a batch of context id rows."""
    def respond(rows):
        ids = greedy_decode(forward, run.dist.tensor, np.stack(rows), response_len, tokenizer.bos_id, tokenizer.eos_id)
        return [tokenizer.decode(row) for row in ids]
    return respond


def baselines(data, count: int) -> dict:
    """The perplexity of count-based models of the training responses (no context) on the
    first `count` test responses: the same tokens the model scores."""
    rows = (data.train_response, data.test_response[:count], data.tokenizer.vocab_size)
    return {"unigram_perplexity": unigram_perplexity(*rows), "bigram_perplexity": bigram_perplexity(*rows)}


def evaluate(run, data, model, forward, count: int, baseline: dict) -> dict:
    """Held-out loss and perplexity of the first `count` test responses given their contexts,
    beside the baselines', and greedy replies to `--samples` contexts spread over them."""
    scores = api.held_out_metrics(run.dist, model, token_loss(run.dist.tensor),
                                  (data.test_context[:count], data.test_response[:count]))
    picked = np.linspace(0, count - 1, min(run.config.samples, count)).astype(int).tolist()
    replies = api.gathered_outputs(run.dist, responder(run, forward, data.tokenizer, run.config.response_len),
                                   data.test_context[picked])
    samples = [{"context": data.test_context_text[i], "reference": data.test_response_text[i], "reply": reply}
               for i, reply in zip(picked, replies)]
    return {**scores, "test_perplexity": math.exp(scores["test_loss"]), **baseline,
            "test_pairs": count, "test_response_tokens": int((data.test_response[:count, 1:] != 0).sum()),
            "samples": samples}


def chat(run) -> None:
    """--chat: the finished run in --out_dir answers each line of standard input, remembering
    the last turns (its own replies too) as the training contexts do."""
    if run.dist.num_processes > 1:
        raise ConfigError(f"--chat reads standard input on one process, not {run.dist.num_processes}: "
                          f"run python recipes/dialogue.py --chat --out_dir={run.out_dir}")
    out_dir = inference.finished_run(run.dist, run.out_dir)
    lm, tokenizer = load_trained(str(out_dir))
    context_len = lm.source_len
    respond = responder(run, make_forward(run, lm), tokenizer, lm.size.max_len - context_len)
    if sys.stdin.isatty():
        print("type a turn and Enter; an empty line starts a new conversation; Ctrl-D ends", file=sys.stderr)
    history: list[str] = []
    for line in sys.stdin:
        turn = " ".join(line.split())
        if not turn:
            history = []
            continue
        history = (history + [turn])[-CONTEXT_TURNS:]
        reply = respond([np.array(context_row(tokenizer, history, context_len), np.int32)])[0]
        print(reply, flush=True)
        history = (history + [reply])[-CONTEXT_TURNS:] if reply.strip() else history


@api.guarded
def main():
    run = api.start(DialogueConfig, "dialogue", axes=("data", "tensor"))
    cfg = run.config
    if cfg.chat:
        return chat(run)
    data = load_dialogue(data_dir=run.data_dir, dataset=cfg.dataset or None, debug=cfg.debug,
                         context_len=cfg.context_len, response_len=cfg.response_len, vocab_size=cfg.vocab_size)
    size = TransformerSize.of(cfg, data.tokenizer.vocab_size, cfg.context_len + cfg.response_len)
    run.check_model_fits(layers=size.layers, heads=size.heads, ff_dim=size.ff_dim, vocab_size=size.vocab_size)
    with run.model_scope():
        model = build_lm(size, run.dist.tensor, cfg.context_len)  # tensor=N: every layer split over N ranks
        optimizer = api.make_optimizer(cfg)
    step = api.make_step(run, model, optimizer, token_loss(run.dist.tensor))
    forward = make_forward(run, model)
    count = min(cfg.max_test or len(data.test_context), len(data.test_context))
    baseline = baselines(data, count)

    summary = api.train(run, model, optimizer, step, (data.train_context, data.train_response),
                        evaluate=lambda: evaluate(run, data, model, forward, count, baseline),
                        export=lambda out_dir: export_trained_seq2seq(out_dir, data.tokenizer, load_trained,
                                                                       source_len=cfg.context_len,
                                                                       target_len=cfg.response_len))
    if run.dist.is_chief:
        print(f"held-out perplexity {summary['test_perplexity']:.1f} (unigram {summary['unigram_perplexity']:.1f}, "
              f"bigram {summary['bigram_perplexity']:.1f}) "
              f"on the responses of {summary['test_pairs']} pairs of unseen conversations "
              f"(plan {run.plan}, final loss {summary['final_loss']:.4f})")
        for sample in summary["samples"]:
            print("  " + "\n  ".join(f"CTX {turn}" for turn in sample["context"]))
            print(f"  REF {sample['reference']}\n  OUT {sample['reply']}")


if __name__ == "__main__":
    main()
