"""Every train_*.py is train_full.py plus its method: outside the docstring and the METHOD regions,
the text must be identical, so `diff train_full.py train_<method>.py` shows the method alone."""
import glob
import os
import re

import pytest

from conftest import ROOT

REGION = re.compile(r"# --- METHOD: begin ---\n.*?# --- METHOD: end ---\n", re.S)
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "train_*.py")))


def skeleton(script):
    text = open(os.path.join(ROOT, script)).read()
    assert text.startswith('"""\n')
    body = text[text.index('"""', 3) + 3:]  # drop the docstring
    return REGION.sub("# --- METHOD ---\n", body), len(REGION.findall(body))


def test_there_are_four_methods():
    assert SCRIPTS == ["train_fira.py", "train_full.py", "train_galore.py", "train_lowrank_refactor.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_skeleton_is_identical_to_train_full(script):
    reference, n_ref = skeleton("train_full.py")
    text, n = skeleton(script)
    assert n == n_ref == 4  # args, the method, the per-step hook, extra results
    assert text == reference


@pytest.mark.parametrize("script", SCRIPTS)
def test_lines_are_short_and_help_strings_distinct(script):
    text = open(os.path.join(ROOT, script)).read()
    assert max(len(line) for line in text.splitlines()) <= 120
    helps = re.findall(r'help="([^"]*)"', text)
    assert len(helps) == len(set(helps))
