"""What a pipeline's code version covers (cohortseg.pipelines.code_version): the syntax tree, without
docstrings, of the code the pipeline runs. Each test edits a copy of the package and recomputes every
version there."""
import re
import shutil
from pathlib import Path

import pytest

from cohortseg.pipelines import REGISTRY, code_version

PKG = Path(__file__).resolve().parents[1] / "cohortseg"
NETS = "models/nets/deepwmh_torch.py"


@pytest.fixture
def edit(tmp_path):
    """edit(relpath, change) -> every pipeline's version in a fresh copy of the package with `change`
    (text -> text) applied to that file; edit() -> the versions of an unedited copy. The copy starts
    with the installed package's cache of parses (cached=False: without), keyed by each file's content."""
    copies = []
    installed = {p: code_version(p) for p in REGISTRY}  # writes the installed cache
    cache = next((PKG / "__pycache__").glob("code_digests.*.json"), None)

    def run(rel: str = "", change=None, cached=True) -> dict:
        copy = tmp_path / f"copy{len(copies)}" / "cohortseg"
        shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__", "*.css", "*.js", "*.html"))
        copies.append(copy)
        if cached and cache:
            (copy / "__pycache__").mkdir()
            shutil.copy(cache, copy / "__pycache__" / cache.name)
        if rel:
            path = copy / rel
            before = path.read_text()
            path.write_text(change(before))
            assert path.read_text() != before
        return {p: code_version(p, package=copy) for p in REGISTRY}

    run.installed = installed
    return run


def test_a_copy_parsed_afresh_has_the_installed_versions(edit):
    assert edit(cached=False) == edit.installed


def test_docstrings_comments_and_formatting_change_no_version(edit):
    def reword(text):
        text = text.replace('"""Keras builds of the four', '"""Keras builds (reworded) of the four', 1)
        text = re.sub(r'(def load_net\(.*\):\n\s+""")', r"\1Reworded. ", text, count=1)
        text = text.replace("\ndef load_card(", "\n# a new comment\n\n\ndef   load_card(", 1)
        return text.replace("def run_folds(folds, x, batch_size):", "def run_folds(folds,\n              x, batch_size):  # wrapped", 1)

    assert edit(NETS, reword) == edit()


def test_an_edit_of_the_deepwmh_nets_changes_the_pipelines_that_run_them_only(edit):
    before = edit()
    after = edit(NETS, lambda t: t + "\nEDITED = 1\n")
    changed = {p for p in REGISTRY if after[p] != before[p]}
    assert changed == {"wmh", "cmb", "brain_tissue"}  # all three may run the deepwmh_head card


@pytest.mark.parametrize("rel", ["training/train.py", "training/datasets.py", "training/bundle.py"])
def test_an_edit_of_training_changes_no_inference_pipeline(edit, rel):
    assert edit(rel, lambda t: t + "\nEDITED = 1\n") == edit()


def test_an_edit_of_a_pipeline_changes_that_pipeline_only(edit):
    before, after = edit(), edit("pipelines/sc_csa.py", lambda t: t + "\nEDITED = 1\n")
    assert {p for p in REGISTRY if after[p] != before[p]} == {"sc_csa"}
