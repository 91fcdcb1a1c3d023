"""Hostile files for all five readers: code never runs, nothing hangs or blows up, every refusal is one line.

The cases and the runner are in ``hostile.py`` (shared with
``benchmarks/hostile_sweep.py``, which runs the whole sweep and writes its
results). The default run takes a sample that covers every reader and every
kind of attack; ``-m slow`` runs all of them (more than 1,000 variants).
"""

import collections

import pytest

import hostile


def failures(results):
    return [f"{r['id']} [{r['side']}] {r['what']}: {'; '.join(r['problems'])}" for r in results if r["problems"]]


def run(tmp_path_factory, full):
    workdir = tmp_path_factory.mktemp("hostile")
    cases = hostile.build_cases(workdir, full=full)
    real = hostile.subprocess_sample(cases, per_reader=1 if not full else 12)
    return cases, hostile.run_cases(workdir, cases, jobs=2, subprocesses=real)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return run(tmp_path_factory, full=False)


def test_the_sample_covers_every_reader_and_both_sides(sample):
    cases, results = sample
    readers = collections.Counter(c.reader for c in cases)
    assert set(readers) == {"archive", "export", "bench", "checkpoint", "report"}, readers
    sides = collections.Counter((r["reader"], r["side"]) for r in results)
    for reader in readers:
        assert sides[reader, "library"] == readers[reader]
        if reader != "checkpoint":           # load_checkpoint has no command of its own
            assert sides[reader, "command"] == readers[reader]
            assert sides[reader, "subprocess"] >= 1     # the installed console script itself
    assert len(cases) >= 40


@pytest.mark.parametrize("reader", ["archive", "export", "bench", "checkpoint", "report"])
def test_hostile_sample_keeps_every_promise(sample, reader):
    _, results = sample
    bad = failures(r for r in results if r["reader"] == reader)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("reader", ["bench", "checkpoint", "report"])
def test_refusals_say_what_is_wrong(sample, reader):
    _, results = sample
    for r in results:
        if r["reader"] == reader and r["kind"] == "refuse" and not r["problems"]:
            assert r["message"].strip(), r


@pytest.mark.slow
def test_full_hostile_sweep(tmp_path_factory):
    cases, results = run(tmp_path_factory, full=True)
    assert len(cases) >= 1000
    bad = failures(results)
    assert not bad, f"{len(bad)} of {len(results)} runs broke a promise:\n" + "\n".join(bad[:50])
