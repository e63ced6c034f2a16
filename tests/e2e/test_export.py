"""The SavedModel every recipe exports (common/export.py), trained on one process and under
data, tensor and pipeline plans, served by stock TensorFlow in a fresh process that cannot
import the project."""
import json
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from scripts.launchers import run_recipe

pytestmark = pytest.mark.slow

DETERMINISTIC = ["--debug", "--deterministic", "--steps=20", "--log_every=5", "--checkpoint_every=0"]

# Run with `python -I` (no PYTHONPATH, no script folder on sys.path): each job calls one
# signature of a SavedModel on arrays from an .npz and saves what it returns (strings as
# bytes arrays, which load without pickle). Importing the project (which the editable install
# would allow) or Horovod fails.
SERVE = """
import json, sys
class NotForServing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("common", "recipes", "scripts", "horovod"):
            raise ImportError(name + " must not be needed to serve the export")
sys.meta_path.insert(0, NotForServing())
import numpy as np, tensorflow as tf
for job in json.loads(sys.argv[1]):
    signature = tf.saved_model.load(job["saved_model"]).signatures[job["signature"]]
    with np.load(job["inputs"]) as inputs:
        outputs = signature(**{name: tf.constant(inputs[name]) for name in inputs.files})
    np.savez(job["outputs"], **{name: value.numpy().astype(bytes) if value.dtype == tf.string else value.numpy()
                                for name, value in outputs.items()})
"""


def trained(recipe, args, out_dir, data_dir, processes=2):
    launcher = "horovodrun" if processes > 1 else "python"
    result = run_recipe(recipe, DETERMINISTIC + [f"--data_dir={data_dir}", *args], out_dir, launcher=launcher,
                        processes=processes)
    assert result.returncode == 0, result.output[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """One finished run per recipe and plan, each with its saved_model/."""
    folder = tmp_path_factory.mktemp
    return {"translate-tensor2": trained("translate", ["--plan=tensor=2"], folder("translate-tensor2"), data_dir),
            "translate-single": trained("translate", [], folder("translate-single"), data_dir, processes=1),
            "classify-data2": trained("classify", ["--plan=data"], folder("classify-data2"), data_dir),
            "summarize-pipeline2": trained("summarize", ["--plan=pipeline=2,microbatches=2", "--max_test=16"],
                                           folder("summarize-pipeline2"), data_dir)}


@pytest.fixture(scope="module")
def held_out(data_dir):
    """The held-out inputs each run scored, as the recipes prepare them."""
    from common.data.images import load_images  # TensorFlow only now: collection stays fast
    from common.data.seq2seq import load_summarization, load_translation
    translation = load_translation(data_dir=data_dir, dataset=None, debug=True, max_len=16, vocab_size=500,
                                   corpus="bible")
    summaries = load_summarization(data_dir=data_dir, dataset=None, debug=True, max_src_len=32, max_tgt_len=12,
                                   vocab_size=500)
    images = load_images(data_dir=data_dir, dataset=None, debug=True)
    return {"translate": {"source": translation.test_src[:64], "target": translation.test_tgt[:64],
                          "references": translation.test_tgt_text[:64]},
            "classify": {"images": images.test_images[:200], "labels": images.test_labels[:200]},
            "summarize": {"source": summaries.test_src[:16], "target": summaries.test_tgt[:16]}}


@pytest.fixture(scope="module")
def served(runs, held_out, tmp_path_factory):
    """{(run, signature): outputs} of every run's export on the held-out inputs, from one fresh process."""
    folder = tmp_path_factory.mktemp("served")
    signatures = {"translate": {"generate": ["source"], "logits": ["source", "target"]},
                  "classify": {"serving_default": ["images"]},
                  "summarize": {"generate": ["source"], "logits": ["source", "target"]}}
    requests = {}
    for name, result in runs.items():
        recipe = name.split("-")[0]
        for signature, inputs in signatures[recipe].items():
            requests[name, signature] = (result.out_dir, {key: held_out[recipe][key] for key in inputs})
    return served_outputs(folder, requests)


def served_outputs(folder, requests) -> dict:
    """{key: outputs} for `requests` {key: (a run's out_dir, {input name: array})}, keys being
    (name, signature), each run's saved_model/ served by SERVE in one fresh process."""
    jobs = {}
    for (name, signature), (out_dir, arrays) in requests.items():
        stem = folder / f"{name}-{signature}"
        np.savez(f"{stem}-in.npz", **arrays)
        jobs[name, signature] = {"saved_model": str(out_dir / "saved_model"), "signature": signature,
                                 "inputs": f"{stem}-in.npz", "outputs": f"{stem}-out.npz"}
    done = subprocess.run([sys.executable, "-I", "-c", SERVE, json.dumps(list(jobs.values()))], cwd=folder,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {key: dict(np.load(job["outputs"])) for key, job in jobs.items()}


def decoded(result, ids):
    """Texts of generated id rows, by SentencePiece alone with the subword.model the export holds."""
    tokenizer = spm.SentencePieceProcessor(model_file=str(result.out_dir / "saved_model" / "assets" / "subword.model"))
    return [tokenizer.decode(row.tolist()) for row in ids]


@pytest.mark.parametrize("name", ["translate-tensor2", "translate-single"])
def test_the_export_translates_as_the_training_run_did(name, runs, served, held_out):
    from common.metrics import bleu
    summary = runs[name].summary()
    translations = decoded(runs[name], served[name, "generate"]["ids"])
    assert translations[:10] == [sample["translation"] for sample in summary["samples"]]
    assert bleu(translations, held_out["translate"]["references"])["bleu"] == pytest.approx(summary["bleu"], abs=1e-9)


def test_the_export_of_a_tensor_plan_holds_the_one_process_model(served):
    np.testing.assert_allclose(served["translate-tensor2", "logits"]["logits"],
                               served["translate-single", "logits"]["logits"], rtol=1e-4, atol=1e-4)


def test_the_export_classifies_raw_images_as_the_training_run_did(runs, served, held_out):
    from recipes.classify import load_trained
    outputs, labels = served["classify-data2", "serving_default"], held_out["classify"]["labels"]
    accuracy = np.mean(np.argmax(outputs["probabilities"], -1) == labels)
    assert accuracy == pytest.approx(runs["classify-data2"].summary()["test_accuracy"], abs=1e-6)
    model, _ = load_trained(str(runs["classify-data2"].out_dir))
    np.testing.assert_allclose(outputs["logits"], model(held_out["classify"]["images"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs["probabilities"].sum(-1), 1.0, rtol=1e-5)


def test_the_export_of_a_pipeline_run_summarizes_as_the_training_run_did(runs, served, held_out):
    from recipes.summarize import load_trained
    result = runs["summarize-pipeline2"]
    summaries = decoded(result, served["summarize-pipeline2", "generate"]["ids"])
    assert summaries[:10] == [sample["summary"] for sample in result.summary()["samples"]]
    model, _ = load_trained(str(result.out_dir))
    batch = (held_out["summarize"]["source"], held_out["summarize"]["target"])
    np.testing.assert_allclose(served["summarize-pipeline2", "logits"]["logits"], model(batch), rtol=1e-5, atol=1e-5)
