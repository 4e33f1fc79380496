"""Every train_*.py is train_full.py plus its method: outside the docstring and the METHOD regions,
the text must be identical, so `diff train_full.py train_<method>.py` shows the method alone. The restart
(refactorization, optimizer reset, lr recovery) is one text in every script that restarts."""
import os
import re
import sys

import pytest

from conftest import ROOT, SCRIPTS

REGION = re.compile(r"# --- METHOD: begin ---\n.*?# --- METHOD: end ---\n", re.S)
RESTART = re.compile(r"# --- RESTART: begin ---\n.*?# --- RESTART: end ---\n", re.S)
VARIANT = re.compile(r"# --- VARIANT: begin ---\n.*?# --- VARIANT: end ---\n", re.S)
REST = re.compile(r"# --- REST: begin ---\n.*?# --- REST: end ---\n", re.S)


def skeleton(script):
    """The script without its docstring and METHOD regions, and how many regions it has."""
    text = open(os.path.join(ROOT, script)).read()
    assert text.startswith('"""\n')
    body = text[text.index('"""', 3) + 3:]
    return re.sub(r"\n *" + REGION.pattern, "\n", body, flags=re.S), len(REGION.findall(body))


def test_the_methods():
    assert SCRIPTS == ["train_apollo.py", "train_fira.py", "train_full.py", "train_galore.py",
                       "train_lowrank_refactor.py", "train_muon.py", "train_relora.py", "train_sltrain.py",
                       "train_stable_spam.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_skeleton_is_identical_to_train_full(script):
    reference, n_ref = skeleton("train_full.py")
    text, n = skeleton(script)
    # full-rank AdamW has two (its flags, its optimizer); a method may add the lr of the step and a per-step hook
    assert n_ref == 2 and 2 <= n <= 4
    assert text == reference


def test_restart_is_one_text():
    regions = {s: RESTART.findall(open(os.path.join(ROOT, s)).read()) for s in SCRIPTS}
    restarting = {s: r for s, r in regions.items() if r}
    assert sorted(restarting) == ["train_lowrank_refactor.py", "train_sltrain.py"]
    first = next(iter(restarting.values()))
    assert len(first) == 5  # the flags; refactorize, reset, recovery; their setup; the lr of the step; the hook
    assert all(r == first for r in restarting.values())


def test_variant_is_one_text():
    """A script of two methods reads --variant, the method, the same way."""
    regions = {s: VARIANT.findall(open(os.path.join(ROOT, s)).read()) for s in SCRIPTS}
    assert {s: len(r) for s, r in regions.items() if r} == {"train_apollo.py": 1, "train_stable_spam.py": 1}
    assert regions["train_apollo.py"] == regions["train_stable_spam.py"]


def test_galore_and_fira_step_the_unprojected_parameters_as_one_text():
    """The embedding, head and norms take the same batched AdamW step in both (APOLLO's decays the weights first)."""
    regions = {s: REST.findall(open(os.path.join(ROOT, s)).read()) for s in SCRIPTS}
    assert {s: len(r) for s, r in regions.items() if r} == {"train_fira.py": 1, "train_galore.py": 1}
    assert regions["train_fira.py"] == regions["train_galore.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_lines_are_short_and_help_strings_distinct(script):
    text = open(os.path.join(ROOT, script)).read()
    assert max(len(line) for line in text.splitlines()) <= 120
    helps = re.findall(r'help="([^"]*)"', text)
    assert len(helps) == len(set(helps))


def test_plumbing_knows_no_method():
    """plumbing.py holds what every script needs and no method: no method's name, nor its flags, appear in it."""
    from model import BENCH_ROWS, METHODS
    text = open(os.path.join(ROOT, "plumbing.py")).read()
    names = set(METHODS) | set(BENCH_ROWS) | {"low-rank", "low rank", "restart", "projector", "merge", "adapter"}
    flags = {k for m in METHODS.values() for k in m if k not in ("script", "lr")}
    found = [w for w in names if re.search(rf"\b{re.escape(w)}\b", text.lower())]
    found += [f for f in flags if re.search(rf"args\.{f}\b|[\"']{f}[\"']|--{f.replace('_', '-')}\b", text)]
    assert not found


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_the_method_defaults_at_a_size(script):
    """`--size 350m --help` prints every method setting's default at 350m, as model.METHODS gives it."""
    from conftest import run
    from model import METHODS, method_defaults
    method = next(m for m, spec in METHODS.items() if spec["script"] == script)
    help_text = " ".join(run([sys.executable, script, "--size", "350m", "--help"]).stdout.split())
    for key, value in method_defaults(method, "350m").items():
        flag = "--" + key.replace("_", "-")
        # the flag's own help text, up to the next flag, ends with its default
        own = rf"{re.escape(flag)} \S+ (?:(?! --[a-z]).)*?\(default: {re.escape(str(value))}\)"
        assert re.search(own, help_text), (flag, value)
