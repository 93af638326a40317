"""RULER-style task generators: every task fills its context (<= context_tokens, >= 85% of it) with
its answers present exactly once, deterministically from the seed; score() is string_match_all;
bad inputs raise one-line ValueErrors. The tokenizer is a byte-level BPE trained here, offline."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("transformers")

from conftest import test_seed  # noqa: E402
from tiny_models import tiny_tokenizer  # noqa: E402
from vortex_hybrid.eval import tasks  # noqa: E402
from vortex_hybrid.eval.tasks import TASKS, make_sample, make_suite, render, score  # noqa: E402

@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def check_answers(sample: tasks.Sample, text: str) -> None:
    """Each answer occurs exactly once where the task puts it (vt: one assignment per answer and
    one of the value); the answers are distinct."""
    assert len(set(sample.answers)) == len(sample.answers), sample.answers
    if sample.task == "cwe":
        counts = _word_counts(sample.prompt_text)
        rare = [n for w, n in counts.items() if w not in sample.answers]
        assert len(sample.answers) == 10 and set(sample.answers) <= set(counts)
        assert min(counts[a] for a in sample.answers) >= 2 * max(rare, default=1), counts
    elif sample.task == "vt":
        for name in sample.answers:
            assert text.count(f"VAR {name} = ") == 1, name
        value = re.search(r"assigned the value (\d+)", sample.prompt_text).group(1)
        assert text.count(f"= {value}.") == 1
    else:
        for value in sample.answers:
            assert re.fullmatch(r"\d{7}", value) and text.count(value) == 1, value


def _word_counts(prompt_text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for w in prompt_text.split("\n\n")[1].split(", "):
        counts[w] = counts.get(w, 0) + 1
    return counts


@pytest.mark.parametrize("context", [512, 2048, 4096])
@pytest.mark.parametrize("haystack", ["essay", "noise"])
@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("task", TASKS)
def test_sample_fills_context_with_answers_once(tok, task, context, haystack, chat):
    seed = test_seed()
    sample = make_sample(task, tok, context, seed, haystack=haystack, chat=chat)
    ids = render(sample, tok, chat)
    assert 0.85 * context <= len(ids) <= context, (len(ids), seed)
    assert ids[0] == tok.bos_token_id
    text = tok.decode(ids)
    assert text.endswith(sample.answer_prefix) and sample.prompt_text in text
    check_answers(sample, text)
    assert (sample.task, sample.context_tokens, sample.seed) == (task, context, seed)
    if task != "cwe":
        other, = set(tasks.HAYSTACKS) - {haystack}
        assert any(s in sample.prompt_text for s in tasks.HAYSTACKS[haystack])
        assert not any(s in sample.prompt_text for s in tasks.HAYSTACKS[other])


def test_plain_render_without_bos_and_chat_render_have_prefix():
    nobos = tiny_tokenizer(bos=False)
    sample = make_sample("niah_single", nobos, 1024, test_seed(), chat=False)
    ids = render(sample, nobos, chat=False)
    assert nobos.decode(ids) == sample.prompt_text + " " + sample.answer_prefix
    chat = nobos.decode(render(sample, nobos, chat=True))
    assert chat.startswith("<|user|>\n") and chat.endswith("<|assistant|>\n" + sample.answer_prefix)


@pytest.mark.parametrize("task", [t for t in TASKS if t != "cwe"])
def test_needle_depth_places_the_asked_needle(tok, task):
    first, last = (make_sample(task, tok, 2048, test_seed(), depth=d) for d in (0.0, 1.0))
    for sample, where in ((first, "start"), (last, "end")):
        body = sample.prompt_text.split("\n\n")[1]
        hit = body.find(sample.answers[0] if task != "vt" else f"VAR {sample.answers[0]} =")
        assert (hit < len(body) // 10) if where == "start" else (hit > len(body) * 9 // 10), where


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_sample_other_seed_other_answers(tok, task):
    seed = test_seed()
    a, b = (make_sample(task, tok, 2048, seed) for _ in range(2))
    assert a == b
    assert render(a, tok, True) == render(b, tok, True)
    other = make_sample(task, tok, 2048, seed + 1)
    assert set(other.answers).isdisjoint(a.answers) and other.prompt_text != a.prompt_text


def test_suite_spreads_depths_and_derives_seeds(tok):
    seed = test_seed()
    suite = make_suite(["passkey", "vt"], tok, 1024, samples=3, seed=seed, chat=True)
    assert [s.task for s in suite] == ["passkey"] * 3 + ["vt"] * 3
    assert [s.depth for s in suite] == [0.0, 0.5, 1.0] * 2
    assert len({s.seed for s in suite}) == 6
    again = make_sample("vt", tok, 1024, suite[4].seed, depth=suite[4].depth)
    assert again == suite[4] and make_suite(["vt"], tok, 1024, 3, seed, True) == suite[3:]
    assert make_suite(["cwe"], tok, 1024, 1, seed, False)[0].depth == 0.5


def test_score_is_fraction_of_answers_found(tok):
    one = make_sample("niah_single", tok, 1024, test_seed())
    many = make_sample("niah_multiquery", tok, 1024, test_seed())
    assert score(one, f" {one.answers[0]}.") == 1.0
    assert score(one, " 1234.") == 0.0
    assert score(many, " " + ", ".join(many.answers)) == 1.0
    assert score(many, f" {many.answers[0]} and {many.answers[2]}") == 0.5
    assert score(many, "none of them") == 0.0
    vt = make_sample("vt", tok, 1024, test_seed())
    assert score(vt, " ".join(vt.answers).lower()) == 1.0


@pytest.mark.parametrize("call,message", [
    (lambda t: make_sample("niah", t, 1024, 0),
     "task='niah' is unknown: allowed are passkey, niah_single, niah_multikey, niah_multivalue, "
     "niah_multiquery, vt, cwe"),
    (lambda t: make_sample("passkey", t, 1024, 0, haystack="pg"),
     "haystack='pg' is unknown: allowed are essay, noise"),
    (lambda t: make_sample("passkey", t, 1024, 0, depth=1.5), "depth=1.5 must lie in [0, 1]"),
    (lambda t: make_sample("niah_multiquery", t, 40, 0),
     "context_tokens=40 is too small for 'niah_multiquery': it needs at least "),
    (lambda t: make_sample("cwe", t, 100, 0),
     "context_tokens=100 is too small for 'cwe': it needs at least "),
    (lambda t: make_suite(["passkey"], t, 1024, 0, 0, True),
     "samples=0 must be a positive integer"),
    (lambda t: make_suite([], t, 1024, 1, 0, True), "tasks=() is empty: allowed are passkey"),
])
def test_bad_input_raises_one_line_naming_the_value(tok, call, message):
    with pytest.raises(ValueError) as err:
        call(tok)
    assert "\n" not in str(err.value) and str(err.value).startswith(message), str(err.value)


def test_minimum_context_named_in_the_error_is_enough(tok):
    with pytest.raises(ValueError, match=r"at least (\d+)") as err:
        make_sample("vt", tok, 40, test_seed())
    need = int(re.search(r"at least (\d+)", str(err.value)).group(1))
    sample = make_sample("vt", tok, need, test_seed())
    assert len(render(sample, tok, True)) == need


def plain_search(length, limit: int) -> int:
    """The search make_sample used before: doubling, then bisection."""
    lo, hi = 0, 1
    while length(hi) <= limit:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if length(mid) <= limit else (lo, mid)
    return lo


def test_the_fast_search_finds_what_doubling_and_bisection_find_in_fewer_calls():
    import random
    rng = random.Random(test_seed())
    for _ in range(300):
        base, steps = rng.randint(5, 200), [rng.choice([0, 9, 10, 11, 12, 25]) for _ in range(5000)]
        cum = [base]
        for s in steps:
            cum.append(cum[-1] + s)
        limit = rng.randint(base, cum[2000])
        calls = []

        def length(n):
            calls.append(n)
            return cum[n]
        got = tasks.largest_fitting(length, limit, base)
        fast = len(calls)
        calls.clear()
        assert got == plain_search(length, limit), (limit, base)
        assert fast <= len(calls) + 2


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "vt", "cwe"])
def test_real_prompts_are_the_plain_searchs_in_fewer_renders(tok, task, monkeypatch):
    real = tasks.render
    for context in (700, 2048, 6000):
        calls = []
        monkeypatch.setattr(tasks, "render", lambda *a: calls.append(1) or real(*a))
        fast = make_sample(task, tok, context, seed=7, chat=True)
        n_fast = len(calls)
        monkeypatch.setattr(tasks, "largest_fitting", lambda length, limit, _: plain_search(
            length, limit))
        calls.clear()
        assert make_sample(task, tok, context, seed=7, chat=True) == fast
        assert n_fast < len(calls) or context == 700, (n_fast, len(calls))
        monkeypatch.undo()
