"""Python function source -> first sentence of its docstring, as a TFDS builder.

A code-summarization set (in the manner of CodeSearchNet) made offline from the
standard library sources of the running Python, so the recipes can train a
summarization model on machines without network. For every function and method
outside the library's tests, idlelib and lib2to3:

* the source side is its code with every docstring removed (its own and those of
  nested functions and classes) and comments dropped, as one whitespace-normalised
  line (`ast.unparse` output, so the text depends on the Python version);
* the target side is the first sentence of the docstring's first paragraph.

Functions are skipped whose summary has fewer than MIN_SUMMARY_WORDS words or is a
call signature (`tell() -> int.`, `D.keys() -> a set-like object ...`, the style of
builtins' docstrings), or whose body is only a placeholder (`pass`, `...`,
`raise NotImplementedError`).
Functions are deduplicated by code, keeping the first in sorted file order, and
the test split is chosen by a hash of the qualified name (`module.Class.method`).
"""
import ast
import copy
import hashlib
import os
import re
import sys
import sysconfig
import warnings

import tensorflow_datasets as tfds

from common.data.tfds_io import DataError

STDLIB_DIR = sysconfig.get_paths()["stdlib"]
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
SKIPPED_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"})
TEST_PER_MILLE = 30
MIN_SUMMARY_WORDS = 3
DEBUG_TRAIN, DEBUG_TEST = 2000, 150

_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# A full stop, question or exclamation mark before a space or the end, except in e.g./i.e.
_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)[.?!](?=\s|$)")
_SIGNATURE = re.compile(r"[\w.]+\(")


def check_source(stdlib_dir: str) -> None:
    """Raises DataError unless `stdlib_dir` holds the library's .py sources."""
    if not os.path.isfile(os.path.join(stdlib_dir, "os.py")):
        raise DataError(
            f"Python {PYTHON_VERSION} standard library sources not found in {stdlib_dir} "
            f"(no os.py): install them (Debian: apt-get install libpython{PYTHON_VERSION}-stdlib) "
            "or run with a Python that ships its .py files")


def source_files(stdlib_dir: str) -> list[str]:
    """Paths of the library's .py files relative to `stdlib_dir`, in sorted walk order."""
    paths = []
    for folder, subfolders, names in os.walk(stdlib_dir):
        subfolders[:] = sorted(name for name in subfolders if name not in SKIPPED_DIRS)
        relative = os.path.relpath(folder, stdlib_dir)
        paths.extend(os.path.normpath(os.path.join(relative, name))
                     for name in sorted(names) if name.endswith(".py"))
    return paths


def module_name(relative_path: str) -> str:
    """Dotted module name of a source path: `email/mime/text.py` -> `email.mime.text`."""
    parts = relative_path[:-len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def summary(docstring: str) -> str:
    """First sentence of the first paragraph, on one line."""
    paragraph = " ".join(_PARAGRAPH_BREAK.split(docstring.strip(), maxsplit=1)[0].split())
    end = _SENTENCE_END.search(paragraph)
    return paragraph[:end.end()] if end else paragraph


def _is_placeholder(statement: ast.stmt) -> bool:
    """`pass`, a bare constant such as `...`, or `raise NotImplementedError[(...)]`."""
    if isinstance(statement, ast.Pass):
        return True
    if isinstance(statement, ast.Expr):
        return isinstance(statement.value, ast.Constant)
    if isinstance(statement, ast.Raise) and statement.exc is not None:
        raised = statement.exc.func if isinstance(statement.exc, ast.Call) else statement.exc
        return isinstance(raised, ast.Name) and raised.id == "NotImplementedError"
    return False


def _drop_docstrings(function: ast.AST) -> ast.AST:
    """A copy of `function` without the docstrings of it and of its nested definitions."""
    stripped = copy.deepcopy(function)
    for node in ast.walk(stripped):
        if isinstance(node, _DEFINITIONS) and ast.get_docstring(node, clean=False) is not None:
            node.body = node.body[1:] or [ast.Pass()]
    return stripped


def code_text(function: ast.AST) -> str:
    """Source of `function` without docstrings or comments, as one line."""
    return " ".join(ast.unparse(_drop_docstrings(function)).split())


def _functions(node: ast.AST, prefix: str):
    """(qualified name, node) of each function and method under `node`, nested ones too."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _DEFINITIONS):
            name = f"{prefix}.{child.name}"
            if not isinstance(child, ast.ClassDef):
                yield name, child
            yield from _functions(child, name)
        else:
            yield from _functions(child, prefix)  # Definitions inside `if`, `try`, ...


def example(function: ast.AST) -> tuple[str, str] | None:
    """(code, summary) of a function, or None where it does not qualify."""
    docstring = ast.get_docstring(function)
    if not docstring or all(_is_placeholder(statement) for statement in function.body[1:]):
        return None
    target = summary(docstring)
    if len(target.split()) < MIN_SUMMARY_WORDS or _SIGNATURE.match(target):
        return None
    return code_text(function), target


def _parse(path: str) -> ast.Module | None:
    """Syntax tree of a file, or None for the rare file that is not valid Python."""
    with open(path, "rb") as handle:
        source = handle.read()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # invalid escapes in old modules
            return ast.parse(source)
    except (SyntaxError, ValueError):
        return None


def all_examples(stdlib_dir: str) -> list[tuple[str, str, str]]:
    """(qualified name, code, summary) of every qualifying function, deduplicated by code."""
    seen, examples = set(), []
    for relative_path in source_files(stdlib_dir):
        tree = _parse(os.path.join(stdlib_dir, relative_path))
        if tree is None:
            continue
        for name, function in _functions(tree, module_name(relative_path)):
            pair = example(function)
            if pair and pair[0] not in seen:
                seen.add(pair[0])
                examples.append((name, *pair))
    return examples


def _hash(qualified_name: str) -> int:
    return int.from_bytes(hashlib.sha256(qualified_name.encode()).digest()[:8], "big")


def is_test(qualified_name: str) -> bool:
    """Stable split assignment: a function name always lands in the same split."""
    return _hash(qualified_name) % 1000 < TEST_PER_MILLE


def function_examples(stdlib_dir: str) -> dict[str, list[tuple[str, str, str]]]:
    """The `functions` set, by split, in sorted file order."""
    splits = {"train": [], "test": []}
    for item in all_examples(stdlib_dir):
        splits["test" if is_test(item[0]) else "train"].append(item)
    return splits


def debug_examples(stdlib_dir: str) -> dict[str, list[tuple[str, str, str]]]:
    """A small, fixed sample of the `functions` set, spread over the whole library."""
    sizes = {"train": DEBUG_TRAIN, "test": DEBUG_TEST}
    return {split: sorted(items, key=lambda item: _hash(item[0]))[:sizes[split]]
            for split, items in function_examples(stdlib_dir).items()}


class PythonDocstrings(tfds.core.GeneratorBasedBuilder):
    """Python functions and the first sentence of their docstrings (code summarization)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Functions of the standard library outside its tests."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name="functions", description="Every qualifying function and method."),
        tfds.core.BuilderConfig(
            name="debug",
            description=f"Up to {DEBUG_TRAIN} train and {DEBUG_TEST} test pairs of `functions`."),
    ]
    DEFAULT_CONFIG_NAME = "functions"

    def __init__(self, *, stdlib_dir: str = STDLIB_DIR, **kwargs):
        self._stdlib_dir = stdlib_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(f"Functions of the Python {PYTHON_VERSION} standard library and the "
                         "first sentence of their docstrings; the data differ between "
                         "Python versions."),
            features=tfds.features.FeaturesDict(
                {"code": tfds.features.Text(), "summary": tfds.features.Text()}),
            supervised_keys=("code", "summary"),
            homepage="https://docs.python.org/3/library/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is read from the local standard library.
        check_source(self._stdlib_dir)
        select = debug_examples if self.builder_config.name == "debug" else function_examples
        return {split: self._generate_examples(items)
                for split, items in select(self._stdlib_dir).items()}

    def _generate_examples(self, items):
        for number, (_, code, target) in enumerate(items):
            yield number, {"code": code, "summary": target}
