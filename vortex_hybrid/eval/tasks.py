"""RULER-style long-context tasks, generated locally and deterministically from a seed.

Tasks (`TASKS`): `passkey` (one number in the haystack); needle in a haystack `niah_single` (one
key -> number needle), `niah_multikey` (several needles with different keys, one asked),
`niah_multivalue` (one key with several numbers, all asked), `niah_multiquery` (several keys, all
asked); `vt` (variable tracking: chains "VAR A = 1234567.", "VAR B = VAR A.", ...; the answer is
every variable of the asked chain); `cwe` (common-word extraction: a list of made-up words where
ten words occur much more often than the rest; the answer is those ten).

The haystack (`HAYSTACKS`) is repeated original prose (`essay`) or repeated filler sentences
(`noise`); `cwe` has no haystack (its list grows instead). Keys are word pairs ("silver-falcon"),
values distinct 7-digit numbers, variable names distinct 5-letter capitals; neither the haystacks
nor the fixed text contain digits, so each niah/passkey value occurs exactly once in a prompt.
A sample's haystack is the longest whose rendered prompt (`render`) fits in `context_tokens`.
"""

from __future__ import annotations

import dataclasses
import random
import re
import zlib
from typing import Callable

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt",
         "cwe")

_ESSAY = """\
Most towns grow around water, and the oldest streets still bend the way the river once did. People
who walk those streets rarely notice the curve, yet it shapes where they meet and trade. A market
needs a place where strangers can stop without blocking anyone else. Bridges were expensive, so the
first crossing decided which bank would become rich. Over time the poorer bank filled with
workshops, because rent there was cheap and noise was tolerated. Those workshops trained the people
who later built the machines that made the rich bank richer. Nobody planned this exchange, but every
generation relied on it.

Learning a craft works in much the same way as learning to read a city. At first every tool feels
strange, and each mistake seems to need its own explanation. After enough repetition the hands
remember what the mind has stopped checking. A carpenter can judge a board by its sound, and a baker
knows the dough by its weight. Such knowledge is hard to write down, which is why apprentices still
watch their teachers closely. Books help, but they describe the finished result more often than the
messy path toward it. The messy path is where most of the understanding is actually earned.

Gardens teach patience in a quieter voice than workshops do. A seed planted in early spring gives no
sign of progress for weeks. Then one morning a pale shoot appears, and the gardener forgets the long
wait. Weeds, on the other hand, arrive without invitation and grow twice as fast. Good gardeners
learn to pull them while they are small and the soil is still damp. The same habit serves anyone who
maintains something large and slowly changing. Small problems that are fixed early rarely become
emergencies later.

Libraries are another kind of garden, tended by people who expect no quick harvest. A librarian may
shelve a book that nobody opens for years. When a curious reader finally finds it, the wait becomes
worthwhile in a single afternoon. Good collections therefore keep some things that seem useless
today. Usefulness is often a matter of timing rather than of quality.

Trains changed the rhythm of ordinary life more than most inventions did. Before them, each town
kept its own time by the position of the sun. Timetables forced neighbouring towns to agree on a
single clock. That agreement now feels natural, although it was argued over for many years. Habits
that once seemed artificial tend to become invisible once everyone shares them.

Weather shapes conversation in every country, though the complaints differ. In wet places people
talk about the rain the way others talk about an old relative. In dry places a single cloud can
become the main news of the day. Either way, the sky gives strangers a safe subject to begin with.

Maps always leave something out, and the choice of what to omit is the real work. A map for sailors
shows depths and rocks but ignores the names of shops. A map for tourists does the opposite and
would sink a boat within an hour. Every useful summary is a map of this kind, honest only about its
purpose.

Cooking for a crowd is mostly a problem of timing and of washing up. The recipe matters less than
knowing which dish can wait and which cannot. Experienced cooks clean as they go, so the kitchen
never reaches a state of chaos.

Music practice rewards slowness in a way that surprises beginners. Playing a passage slowly and
correctly builds speed faster than playing it quickly and badly. The fingers learn whatever they
repeat, including the mistakes.

Friendship, too, is built from small repeated acts rather than from grand gestures. A short letter
sent regularly keeps a bond alive better than a long visit once a decade. In the end most lasting
things are made of ordinary moments carefully kept.
"""
_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

HAYSTACKS = {name: tuple(re.split(r"(?<=\.) ", " ".join(text.split()))) for name, text in
             (("essay", _ESSAY), ("noise", _NOISE))}     # name -> its sentences

_ADJECTIVES = ("silver", "amber", "quiet", "rapid", "golden", "hidden", "frozen", "scarlet",
               "gentle", "bright", "hollow", "crimson", "distant", "wooden", "narrow", "velvet",
               "brave", "copper", "misty", "lucky", "polar", "rusty", "solemn", "tidal")
_NOUNS = ("falcon", "river", "lantern", "meadow", "harbor", "compass", "orchard", "glacier",
          "pebble", "thistle", "beacon", "canyon", "feather", "violin", "walrus", "anchor",
          "cedar", "comet", "prairie", "saddle", "tunnel", "kettle", "marble", "otter")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

_NEEDLES = 4                 # needles of niah_multikey / niah_multiquery, values of niah_multivalue
_VT_CHAINS, _VT_HOPS = 2, 4  # vt: the asked chain and distractors; assignments after the first
_CWE_TOP, _CWE_RARE_FREQ, _CWE_COMMON_MAX = 10, 3, 30

_NIAH_HEAD = ("A long text follows. Some special magic numbers are hidden in it; memorize them, "
              "because I will ask you about them afterwards.")
_NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."


@dataclasses.dataclass
class Sample:
    """One prompt: the user message, the text the assistant turn starts with, and the strings a
    correct answer contains. `depth` is where the asked needle sits in the haystack (0 = start,
    1 = end; recorded but unused by `cwe`)."""

    task: str
    prompt_text: str
    answer_prefix: str
    answers: list[str]
    context_tokens: int
    seed: int
    depth: float


def render(sample: Sample, tokenizer, chat: bool) -> list[int]:
    """Token ids of the prompt: the chat template around `prompt_text` with the generation prompt,
    then `answer_prefix`; without `chat`, BOS (if any) + prompt_text + " " + answer_prefix."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt_text}],
                                             tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text + sample.answer_prefix, add_special_tokens=False))
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return bos + list(tokenizer.encode(sample.prompt_text + " " + sample.answer_prefix,
                                       add_special_tokens=False))


def score(sample: Sample, generated_text: str) -> float:
    """Fraction of `sample.answers` found in `generated_text`, ignoring case (RULER's
    string_match_all)."""
    text = generated_text.lower()
    return sum(answer.lower() in text for answer in sample.answers) / len(sample.answers)


def make_sample(task: str, tokenizer, context_tokens: int, seed: int, depth: float | None = None,
                haystack: str = "essay", chat: bool = True) -> Sample:
    """The sample of `task` for `seed`, its haystack (cwe: its word list) as long as whole
    sentences (words) allow with `render(sample, tokenizer, chat)` at most `context_tokens` tokens;
    render it with the same `chat`. `depth` defaults to one drawn from the seed; cwe ignores
    `depth` and `haystack`."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown: allowed are {', '.join(TASKS)}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack={haystack!r} is unknown: allowed are {', '.join(HAYSTACKS)}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} must lie in [0, 1]")
    rng = random.Random(seed)
    depth = rng.random() if depth is None else float(depth)
    if task == "cwe":
        answers, prefix, build = _cwe(rng)
    elif task == "vt":
        answers, prefix, build = _vt(rng, depth, HAYSTACKS[haystack])
    else:
        answers, prefix, build = _niah(task, rng, depth, HAYSTACKS[haystack])

    def sample(n: int) -> Sample:
        return Sample(task, build(n), prefix, answers, context_tokens, seed, depth)

    def length(n: int) -> int:
        return len(render(sample(n), tokenizer, chat))

    need = length(0)
    if need > context_tokens:
        raise ValueError(f"context_tokens={context_tokens} is too small for {task!r}: "
                         f"it needs at least {need}")
    return sample(largest_fitting(length, context_tokens, need))


def largest_fitting(length: Callable[[int], int], limit: int, length0: int) -> int:
    """The largest n >= 0 with length(n) <= limit, for a nondecreasing length (a prompt's tokens
    for n haystack sentences or words; length(0) = length0 <= limit). Each call renders and
    tokenizes a whole prompt, so the calls are few: doubling only while the prompt is short, then
    secant steps on length's near-linear growth to within a sentence or two of the limit, then a
    gallop and a bisection around that (the answer of a plain doubling and bisection: tested)."""
    lo, len_lo, hi = 0, length0, None            # length(lo) <= limit < length(hi)
    n = 1
    while True:
        ln = length(n)
        if ln > limit:
            hi = n
            break
        lo, len_lo = n, ln
        if ln * 8 > limit:                       # long enough for a slope
            break
        n *= 2
    if hi is None and lo > 0 and len_lo > length0:
        slope = (len_lo - length0) / lo
        for _ in range(3):                       # secant: aim just below the limit
            guess = lo + max(1, int((limit - len_lo) / slope))
            lg = length(guess)
            if lg > limit:
                hi = guess
                break
            if lg > len_lo:
                slope = (lg - len_lo) / (guess - lo)
            lo, len_lo = guess, lg
            if limit - lg < slope:               # within a sentence of the limit
                break
    step = 1
    while hi is None:                            # gallop up from lo
        if length(lo + step) > limit:
            hi = lo + step
        else:
            lo, step = lo + step, 2 * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if length(mid) <= limit else (lo, mid)
    return lo


def make_suite(tasks, tokenizer, context_tokens: int, samples: int, seed: int,
               chat: bool = True, haystack: str = "essay") -> list[Sample]:
    """`samples` samples of each task in `tasks`, in that order: depths spread evenly over [0, 1]
    (0.5 for one sample), seeds derived from `seed`, the task and the sample's index."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples={samples!r} must be a positive integer")
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError(f"tasks={tasks!r} is empty: allowed are {', '.join(TASKS)}")
    return [make_sample(task, tokenizer, context_tokens, zlib.crc32(f"{seed}/{task}/{i}".encode()),
                        depth=i / (samples - 1) if samples > 1 else 0.5, haystack=haystack,
                        chat=chat)
            for task in tasks for i in range(samples)]


def _haystack(sentences: tuple[str, ...], offset: int, needles: list[tuple[float, str]]
              ) -> Callable[[int], str]:
    """n -> n sentences taken cyclically from `offset`, each needle (depth, sentence) inserted
    before sentence round(depth * n); needles of equal depth keep their order."""
    def build(n: int) -> str:
        body = [sentences[(offset + i) % len(sentences)] for i in range(n)]
        for _, (depth, needle) in sorted(enumerate(needles), key=lambda e: (e[1][0], e[0]),
                                         reverse=True):
            body.insert(round(depth * n), needle)
        return " ".join(body)
    return build


def _numbers(rng: random.Random, count: int) -> list[str]:
    return [str(v) for v in rng.sample(range(1_000_000, 10_000_000), count)]


def _niah(task, rng, depth, sentences):
    """passkey and the niah tasks: (answers, answer_prefix, n -> prompt_text)."""
    values = _numbers(rng, _NEEDLES)
    keys = [f"{a}-{b}" for a, b in rng.sample([(a, b) for a in _ADJECTIVES for b in _NOUNS],
                                              _NEEDLES)]
    depths = [depth] + [rng.random() for _ in range(_NEEDLES - 1)]
    offset = rng.randrange(len(sentences))
    if task == "passkey":
        head = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize "
                "it; I will ask you for it afterwards.")
        needles = [(depth, f"The pass key is {values[0]}. Remember it.")]
        question, prefix, answers = "What is the pass key?", "The pass key is", values[:1]
    elif task in ("niah_single", "niah_multikey"):
        count = 1 if task == "niah_single" else _NEEDLES
        head, answers = _NIAH_HEAD, values[:1]
        needles = [(d, _NIAH_NEEDLE.format(key=k, value=v))
                   for d, k, v in zip(depths[:count], keys, values)]
        question = (f"What is the special magic number for {keys[0]} mentioned in the provided "
                    "text?")
        prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
    else:
        asked = keys[:1] if task == "niah_multivalue" else keys
        head, answers = _NIAH_HEAD, values
        needles = [(d, _NIAH_NEEDLE.format(key=asked[i % len(asked)], value=v))
                   for i, (d, v) in enumerate(zip(depths, values))]
        named = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + f" and {asked[-1]}"
        question = (f"What are all the special magic numbers for {named} mentioned in the "
                    "provided text?")
        prefix = f"The special magic numbers for {named} mentioned in the provided text are"
    body = _haystack(sentences, offset, needles)
    return answers, prefix, lambda n: f"{head}\n\n{body(n)}\n\n{question}"


def _vt(rng, depth, sentences):
    """Variable tracking: _VT_CHAINS chains of _VT_HOPS + 1 variables; the first chain, its first
    assignment at `depth` and the rest after it, is asked."""
    values = _numbers(rng, _VT_CHAINS)
    names: list[str] = []
    while len(names) < _VT_CHAINS * (_VT_HOPS + 1):
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names and "VAR" not in name:
            names.append(name)
    needles = []
    for c, value in enumerate(values):
        chain = names[c * (_VT_HOPS + 1):(c + 1) * (_VT_HOPS + 1)]
        start = depth if c == 0 else rng.random()
        depths = [start] + sorted(rng.uniform(start, 1.0) for _ in range(_VT_HOPS))
        sources = [value] + [f"VAR {name}" for name in chain[:-1]]
        needles += [(d, f"VAR {name} = {src}.") for d, name, src in zip(depths, chain, sources)]
    answers = names[:_VT_HOPS + 1]
    head = "Memorize and track the chains of variable assignments hidden in the following text."
    question = (f"Question: Find all variables that are assigned the value {values[0]} in the "
                "text above.")
    prefix = (f"Answer: According to the chains of variable assignments in the text above, "
              f"{len(answers)} variables are assigned the value {values[0]}, they are:")
    body = _haystack(sentences, rng.randrange(len(sentences)), needles)
    return answers, prefix, lambda n: f"{head}\n\n{body(n)}\n\n{question}"


def _cwe(rng):
    """Common-word extraction over made-up words of three syllables (so no word contains another):
    for n, _CWE_TOP common words and n rare ones (_CWE_RARE_FREQ times each); each common word
    occurs as often as the rare ones together share among _CWE_TOP, but at least twice as often as
    a rare word and at most _CWE_COMMON_MAX times."""
    words: list[str] = []
    seen: set[str] = set()
    order = rng.getrandbits(64)      # seeds each list's shuffle

    def word(i: int) -> str:         # the i-th distinct word of this sample
        while len(words) <= i:
            w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3))
            if w not in seen:
                seen.add(w)
                words.append(w)
        return words[i]

    answers = [word(i) for i in range(_CWE_TOP)]
    head = "Below is a list of words. Some words in it occur much more often than the others."
    question = (f"Question: What are the {_CWE_TOP} most common words in the list above? "
                "Answer with the words only.")
    prefix = f"Answer: The {_CWE_TOP} most common words in the list are:"

    def build(n: int) -> str:
        rare = [word(_CWE_TOP + i) for i in range(n)]
        common = min(_CWE_COMMON_MAX,
                     max(2 * _CWE_RARE_FREQ, len(rare) * _CWE_RARE_FREQ // _CWE_TOP))
        items = answers * common + rare * _CWE_RARE_FREQ
        random.Random(f"{order}/{n}").shuffle(items)
        return f"{head}\n\n{', '.join(items)}\n\n{question}"

    return answers, prefix, build
