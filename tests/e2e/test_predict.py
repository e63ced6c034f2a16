"""--predict end to end: a finished one-process run (--debug) labels and translates under 1 and
2 processes (and the tensor plan), in input order, with the outputs the training run gives."""
import subprocess
import time

import numpy as np
import psutil
import pytest

from scripts.launchers import command, launch_env, one_process_run, run_script, REPO

pytestmark = pytest.mark.slow

COUNT = 7  # does not divide over 2 replicas, nor into batches of 2
BATCH = "--predict_batch=2"  # 4 batches: the replicas take 4 and 3 rows; the same batches on 1 process
TRAIN = ["--debug", "--log_every=50", "--checkpoint_every=0"]
BEAM = "--beam=3"  # the training run's decoding, and --predict's: beam search, split under tensor=2


@pytest.fixture(scope="module")
def translate_run(data_dir, tmp_path_factory):
    return one_process_run("translate", TRAIN + ["--steps=600", "--lr=3e-3", BEAM, f"--data_dir={data_dir}"],
                           tmp_path_factory.mktemp("translate"))


@pytest.fixture(scope="module")
def classify_run(data_dir, tmp_path_factory):
    return one_process_run("classify", TRAIN + ["--steps=100", f"--data_dir={data_dir}"],
                           tmp_path_factory.mktemp("classify"))


def predict(recipe: str, out_dir, args: list[str], *, launcher: str = "python", processes: int = 1,
            stdin: str | None = None) -> subprocess.CompletedProcess:
    """recipes/<recipe>.py --predict, its stdout and stderr apart; `stdin` is fed to the job."""
    argv = [str(REPO / "recipes" / f"{recipe}.py"), f"--out_dir={out_dir}", "--intra_op_threads=1", *args]
    if stdin is None:
        return run_script(argv[0], argv[1:], launcher=launcher, processes=processes, timeout=300)
    return subprocess.run(command(launcher, processes) + argv, cwd=REPO, env=launch_env(), input=stdin,
                          capture_output=True, text=True, timeout=300)


def printed_lines(done: subprocess.CompletedProcess) -> list[str]:
    """The lines the job printed on stdout, all from the chief (horovodrun tags each rank's)."""
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "[1,1]<stdout>" not in done.stdout, done.stdout[-2000:]
    return done.stdout.replace("[1,0]<stdout>:", "").splitlines()


@pytest.fixture(scope="module")
def held_out_lines(translate_run, tmp_path_factory):
    """A file of the first COUNT held-out sentences, and their translations by one process."""
    samples = translate_run.summary()["samples"][:COUNT]
    lines = tmp_path_factory.mktemp("lines") / "lines.txt"
    lines.write_text("".join(sample["en"] + "\n" for sample in samples))
    alone = printed_lines(predict("translate", translate_run.out_dir, [f"--predict={lines}", BATCH, BEAM]))
    return lines, alone, [sample["translation"] for sample in samples]


def test_one_process_translates_as_the_training_run_did(held_out_lines):
    _, alone, during_training = held_out_lines
    assert alone == during_training
    assert len(set(alone)) > 2, alone  # distinct outputs: their order is checked


@pytest.mark.parametrize("extra, from_stdin", [([], False), (["--plan=tensor=2"], True)], ids=["np2", "tensor2-stdin"])
def test_two_processes_translate_as_one(extra, from_stdin, translate_run, held_out_lines):
    lines, alone, _ = held_out_lines
    source = ["--predict=-"] if from_stdin else [f"--predict={lines}"]
    together = printed_lines(predict("translate", translate_run.out_dir, source + extra + [BATCH, BEAM],
                                     launcher="horovodrun", processes=2,
                                     stdin=lines.read_text() if from_stdin else None))
    assert together == alone


def test_a_line_longer_than_max_len_is_cut_and_said_so(translate_run, tmp_path):
    lines = tmp_path / "long.txt"
    lines.write_text("the house\n" + "the house is big and the garden is green " * 4 + "\n\n")
    done = predict("translate", translate_run.out_dir, [f"--predict={lines}"])
    assert len(printed_lines(done)) == 3
    assert "--predict: 1 of 3 lines are longer than the model's max_len=16 tokens" in done.stderr


@pytest.fixture(scope="module")
def test_images(classify_run, data_dir, tmp_path_factory):
    """The first COUNT held-out images as PNG files, and the labels the trained model gives them."""
    import tensorflow as tf
    from common.data.images import load_images
    from recipes.classify import load_trained
    images = load_images(data_dir=data_dir, dataset=None, debug=True).test_images[:COUNT]
    folder = tmp_path_factory.mktemp("images")
    for index, image in enumerate(images):
        tf.io.write_file(str(folder / f"{index:02d}.png"), tf.io.encode_png(image))
    (folder / "notes.txt").write_text("not an image\n")
    model, class_names = load_trained(str(classify_run.out_dir))
    probabilities = tf.nn.softmax(model(images, training=False)).numpy()
    return folder, [(class_names[best], row[best]) for row, best in zip(probabilities, probabilities.argmax(-1))]


@pytest.fixture(scope="module")
def labelled_alone(classify_run, test_images):
    """The lines one process prints for the folder of test images."""
    return printed_lines(predict("classify", classify_run.out_dir, [f"--predict={test_images[0]}", BATCH]))


def test_one_process_labels_as_the_trained_model_does(test_images, labelled_alone):
    folder, expected = test_images
    rows = [line.split("\t") for line in labelled_alone]
    assert [path for path, _, _ in rows] == [str(folder / f"{index:02d}.png") for index in range(COUNT)]
    assert [name for _, name, _ in rows] == [name for name, _ in expected]
    np.testing.assert_allclose([float(p) for _, _, p in rows], [p for _, p in expected], atol=1e-4)
    assert len({name for name, _ in expected}) > 1, expected


def test_two_processes_label_as_one(classify_run, test_images, labelled_alone):
    together = printed_lines(predict("classify", classify_run.out_dir, [f"--predict={test_images[0]}", BATCH],
                                     launcher="horovodrun", processes=2))
    assert together == labelled_alone


def test_one_image_file_on_two_processes(classify_run, test_images, labelled_alone):
    # Fewer rows (batches) than replicas: the second replica's share is empty.
    image = test_images[0] / "00.png"
    together = printed_lines(predict("classify", classify_run.out_dir, [f"--predict={image}"],
                                     launcher="horovodrun", processes=2))
    assert together == labelled_alone[:1]


def test_no_lines_on_two_processes_print_nothing(translate_run):
    done = predict("translate", translate_run.out_dir, ["--predict=-"], launcher="horovodrun", processes=2, stdin="")
    assert printed_lines(done) == []


def left_running(marker: str) -> list[str]:
    """Command lines of this machine's processes that name `marker`."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if marker in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.parametrize("recipe, folder, message", [
    ("translate", "no_model", "error: no finished model in {out} (model.npz and summary.json): "
                              "train first with --out_dir={out}"),
    ("classify", "empty", "error: --predict: no PNG or JPEG files (.png, .jpg, .jpeg) in {empty}"),
    ("classify", "corrupt", "error: --predict: {empty}/b.png is not a PNG or JPEG image TensorFlow can decode"),
], ids=["no-finished-model", "no-images", "rank-1-cannot-decode"])
def test_bad_input_is_one_line_on_every_rank(recipe, folder, message, classify_run, test_images, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    if folder == "corrupt":  # one image a batch: rank 0 labels a.png and c.png, rank 1 meets b.png
        good = sorted(test_images[0].glob("*.png"))[0].read_bytes()
        for name, content in (("a.png", good), ("b.png", b"not a PNG"), ("c.png", good)):
            (empty / name).write_bytes(content)
    out = tmp_path / "no_model" if folder == "no_model" else classify_run.out_dir
    out.mkdir(exist_ok=True)
    start = time.perf_counter()
    done = predict(recipe, out, [f"--predict={empty}", "--predict_batch=1"], launcher="horovodrun", processes=2)
    seconds = time.perf_counter() - start
    assert done.returncode != 0
    assert seconds < 30, f"took {seconds:.0f} s"
    expected = message.format(out=out, empty=empty)
    output = done.stdout + done.stderr
    for rank in (0, 1):
        assert f"[1,{rank}]<stderr>:{expected}" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not left_running(str(empty)), left_running(str(empty))
