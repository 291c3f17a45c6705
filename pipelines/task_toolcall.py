"""The embedded tool-call task: English requests -> Python-style calls of a fixed catalog of five functions.

A problem is a request such as ``set a timer for 2 hours and 15 minutes for the pasta``; its gold response is
the call ``set_timer(minutes=135, label="pasta")`` followed by EOS. Requests come from templates with
paraphrases; an optional argument appears in the call only when the request mentions it; some requests need a
small transformation (durations -> minutes, ``7:30 pm`` -> ``"19:30"``, ``euros`` -> ``"eur"``, ``four`` -> 4);
some ask for several calls (``weather in paris and rome``), written as a Python list of calls::

    get_weather(city="paris", unit="fahrenheit")                       one call: a bare call
    [get_weather(city="paris"), get_weather(city="rome")]              parallel calls: a list, ", "-separated

Keyword arguments only, in signature order; strings double-quoted; integers and ``True`` as Python literals.

Each problem carries its reference in the BFCL "possible answer" layout (the ``tool_call`` grader's reference):
``[{"get_weather": {"city": ["paris"], "unit": ["", "celsius"]}}]``: one dict per expected call (order-free),
each argument with its acceptable values; ``""`` among them means the argument may be omitted (an optional
argument the request does not mention: omitted, or given its default).

:func:`check_response` is this task's local structural check with BFCL's AST-checker semantics (function name,
no unknown or missing required argument, value among the acceptable ones with the catalog's type, parallel calls
matched order-free); the bootstrap stage selects its teacher with it. The evaluate stage grades with
``pipelines.graders`` ``tool_call``, which reads the same reference.

The tokenizer is word-level over the task's closed vocabulary (every word of the templates, entities, function
and argument names, each also with a leading space), single digits, the space, ``", "`` and punctuation; see
:func:`build_tokenizer`.

Everything is deterministic from one integer seed.
"""

from __future__ import annotations

import ast
import itertools
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

__all__ = [
    "CATALOG",
    "MAX_NEW_TOKENS",
    "Param",
    "ToolCall",
    "ToolProblem",
    "ToolSplits",
    "build_tokenizer",
    "check_response",
    "iter_problems",
    "make_splits",
    "parse_calls",
    "render_calls",
    "sample_problem",
    "vocabulary",
]

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
SYMBOLS = (*"0123456789", " ", ", ", "(", ")", "[", "]", "=", '"', ",", ":")
"""Every non-word token: digits (numbers are spelled digit by digit), the space, ``", "``, the call punctuation."""

MAX_NEW_TOKENS = 64
"""Greedy/sampled response budget: the longest gold response of the generator is 49 tokens + EOS (100k draws;
the longest prompt is 33 tokens with its ``<s>``), plus slack for a wrong, longer answer."""
MAX_SEQUENCE_TOKENS = 128
"""``max_position_embeddings`` of the task's models: the longest prompt plus :data:`MAX_NEW_TOKENS` (97) fits
(the tests check it on the generator's longest draws)."""


# ------------------------------------------------------------------------------------------------- catalog
@dataclass(frozen=True)
class Param:
    """One argument of a catalog function: name, JSON-schema-like type, and whether it may be omitted.

    ``default`` is what the function assumes when an optional argument is omitted (``None``: no default value;
    giving such an argument is never implied by omitting it).
    """

    name: str
    type: str  # "string" | "integer" | "boolean"
    required: bool = True
    default: Any = None


CATALOG: dict[str, tuple[Param, ...]] = {
    "get_weather": (Param("city", "string"), Param("unit", "string", False, "celsius")),
    "convert_currency": (Param("amount", "integer"), Param("source", "string"), Param("target", "string")),
    "set_timer": (Param("minutes", "integer"), Param("label", "string", False)),
    "book_table": (Param("people", "integer"), Param("time", "string"), Param("restaurant", "string", False)),
    "play_music": (Param("artist", "string"), Param("shuffle", "boolean", False, False)),
}
"""The fixed function catalog (signature order = argument order of the gold calls)."""

CITIES = (
    "paris", "rome", "tokyo", "berlin", "madrid", "london", "oslo", "cairo", "lima", "dublin", "vienna",
    "prague", "lisbon", "boston", "sydney", "toronto", "chicago", "seoul", "athens", "delhi", "new york",
    "san francisco", "hong kong", "buenos aires", "cape town", "mexico city",
)  # fmt: skip
UNITS = ("celsius", "fahrenheit")
CURRENCIES = {
    "dollars": "usd", "euros": "eur", "pounds": "gbp", "yen": "jpy", "francs": "chf", "rupees": "inr",
    "pesos": "mxn",
}  # fmt: skip
LABELS = ("pasta", "oven", "tea", "laundry", "eggs", "rice", "pizza", "bread", "meeting", "call", "cake")
RESTAURANTS = (
    "luigi",
    "sakura",
    "bistro",
    "noma",
    "dragon",
    "olive",
    "marco",
    "zaika",
    "taverna",
    "brasserie",
)
ARTISTS = (
    "adele", "queen", "abba", "drake", "coldplay", "beyonce", "metallica", "shakira", "eminem", "rihanna",
    "daft punk", "pink floyd", "the beatles", "taylor swift", "bob marley", "miles davis",
)  # fmt: skip
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

WEATHER_TEMPLATES = (
    "what is the weather in {c}", "weather in {c}", "how is the weather in {c} today",
    "tell me the weather for {c}", "is it cold in {c}", "what is the forecast for {c}", "will it rain in {c}",
)  # fmt: skip
WEATHER_MULTI_TEMPLATES = (
    "what is the weather in {c}", "weather in {c}", "compare the weather in {c}", "tell me the weather for {c}",
    "what is the forecast for {c}",
)  # fmt: skip
UNIT_SUFFIXES = (" in {u}", " in degrees {u}", " using {u}")
CURRENCY_TEMPLATES = (
    "convert {a} {s} to {t}", "how much is {a} {s} in {t}", "change {a} {s} into {t}", "how many {t} is {a} {s}",
    "what is {a} {s} in {t}", "exchange {a} {s} for {t}",
)  # fmt: skip
CURRENCY_MULTI_TEMPLATES = ("convert {a} {s} to {t} and to {t2}", "how much is {a} {s} in {t} and in {t2}")
TIMER_TEMPLATES = (
    "set a timer for {d}", "timer for {d}", "start a timer for {d}", "remind me in {d}", "wake me up in {d}",
    "count down {d}",
)  # fmt: skip
TIMER_LABEL_TEMPLATES = (
    "set the {l} timer for {d}", "set a timer for {d} for the {l}", "remind me in {d} to check the {l}",
    "start a timer for {d} called {l}",
)  # fmt: skip
TABLE_TEMPLATES = (
    "book a table for {p} at {t}", "reserve a table for {p} at {t}", "table for {p} at {t} please",
    "i need a table for {p} at {t}",
)  # fmt: skip
TABLE_RESTAURANT_TEMPLATES = (
    "book a table at {r} for {p} at {t}", "reserve {r} for {p} at {t}", "get us a table at {r} for {p} at {t}",
    "book {r} at {t} for {p}",
)  # fmt: skip
MUSIC_TEMPLATES = (
    "play {a}", "play some {a}", "put on {a}", "i want to hear {a}", "play songs by {a}", "play music by {a}",
)  # fmt: skip
MUSIC_SHUFFLE_TEMPLATES = (
    "shuffle {a}",
    "play {a} on shuffle",
    "shuffle songs by {a}",
    "play some {a} shuffled",
)
JOINERS = (" and ", " and then ", " then ", " and also ")

SINGLE_SHARE = 0.6
"""Share of one-call requests; the rest ask for two or three calls (multi-city weather, one amount into two
currencies, or two requests to different functions joined by ``and``/``then``)."""


# -------------------------------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class ToolCall:
    """One call: function name and the arguments it passes, in signature order (omitted optionals absent)."""

    name: str
    args: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class ToolProblem:
    """One request with its gold calls.

    Attributes:
        prompt: the request, e.g. ``"weather in paris and rome in fahrenheit"``.
        calls: the gold calls, in the order the request names them.
        omittable: per call, the optional arguments the request does not mention (they may be omitted).
    """

    prompt: str
    calls: tuple[ToolCall, ...]
    omittable: tuple[tuple[str, ...], ...] = field(default=())

    @property
    def response(self) -> str:
        """The gold response without EOS (see :func:`render_calls`)."""
        return render_calls(self.calls)

    @property
    def reference(self) -> list[dict[str, dict[str, list[Any]]]]:
        """The BFCL possible answer: one ``{name: {arg: [acceptable values]}}`` per call (see module docstring)."""
        out = []
        for call, omittable in zip(self.calls, self.omittable, strict=True):
            given = dict(call.args)
            args: dict[str, list[Any]] = {}
            for p in CATALOG[call.name]:
                if p.name in given:
                    args[p.name] = [given[p.name]]
                elif p.name in omittable:
                    args[p.name] = [""] if p.default is None else ["", p.default]
            out.append({call.name: args})
        return out


@dataclass(frozen=True)
class ToolSplits:
    """Disjoint problem sets: ``train`` prompts (distillation), ``val`` (checkpoint choice), ``eval`` (held out)."""

    train: list[ToolProblem]
    val: list[ToolProblem]
    eval: list[ToolProblem]


def _literal(value: Any) -> str:
    if isinstance(value, int):  # bool included: True -> "True"
        return repr(value)
    if isinstance(value, str):
        return f'"{value}"'
    raise TypeError(f"unsupported argument value {value!r}")


def render_calls(calls: tuple[ToolCall, ...] | list[ToolCall]) -> str:
    """``f(a="x", b=2)`` for one call; ``[f(...), g(...)]`` for several (module docstring)."""
    text = [f"{c.name}({', '.join(f'{k}={_literal(v)}' for k, v in c.args)})" for c in calls]
    return text[0] if len(text) == 1 else "[" + ", ".join(text) + "]"


def _call(name: str, **args: Any) -> tuple[ToolCall, tuple[str, ...]]:
    """A call with ``args`` put in signature order (``None`` = not mentioned), and its omittable optionals."""
    spec = CATALOG[name]
    unknown = set(args) - {p.name for p in spec}
    if unknown:
        raise ValueError(f"{name}: unknown arguments {sorted(unknown)}")
    given = tuple((p.name, args[p.name]) for p in spec if args.get(p.name) is not None)
    omittable = tuple(p.name for p in spec if not p.required and args.get(p.name) is None)
    return ToolCall(name, given), omittable


Clause = tuple[str, list[tuple[ToolCall, tuple[str, ...]]]]


def _duration(rng: random.Random) -> tuple[str, int]:
    kind = rng.randrange(6)
    if kind == 0:
        m = rng.randint(2, 90)
        return f"{m} minutes", m
    if kind == 1:
        return rng.choice(("1 minute", "one minute")), 1
    if kind == 2:
        return rng.choice(("an hour", "1 hour", "one hour")), 60
    if kind == 3:
        h = rng.randint(2, 9)
        return f"{h} hours", 60 * h
    if kind == 4:
        h, m = rng.randint(1, 4), rng.randrange(5, 60, 5)
        return f"{h} {'hour' if h == 1 else 'hours'} and {m} minutes", 60 * h + m
    if rng.random() < 0.3:
        return "half an hour", 30
    h = rng.randint(1, 4)
    return f"{h} and a half hours", 60 * h + 30


def _clock(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        return "noon", "12:00"
    if kind == 1:
        h = rng.randint(7, 11)
        return f"{h} am", f"{h:02d}:00"
    h = rng.randint(1, 11)
    minute = "00" if kind == 2 else rng.choice(("15", "30", "45"))
    spoken = f"{h} pm" if kind == 2 else f"{h}:{minute} pm"
    return spoken, f"{h + 12}:{minute}"


def _people(rng: random.Random) -> tuple[str, int]:
    n = rng.randint(1, 12)
    if n <= 10 and rng.random() < 0.4:
        return NUMBER_WORDS[n - 1], n
    if n >= 2 and rng.random() < 0.5:
        return f"{n} people", n
    return str(n), n


def _weather(rng: random.Random) -> Clause:
    c = rng.choice(CITIES)
    text = rng.choice(WEATHER_TEMPLATES).format(c=c)
    unit = None
    if rng.random() < 0.4:
        unit = rng.choice(UNITS)
        text += rng.choice(UNIT_SUFFIXES).format(u=unit)
    return text, [_call("get_weather", city=c, unit=unit)]


def _weather_multi(rng: random.Random) -> Clause:
    cities = rng.sample(CITIES, 3 if rng.random() < 0.25 else 2)
    named = (
        f"{cities[0]} and {cities[1]}" if len(cities) == 2 else f"{cities[0]}, {cities[1]} and {cities[2]}"
    )
    if len(cities) == 2 and rng.random() < 0.3:
        named = f"{cities[0]} and in {cities[1]}"
    text = rng.choice(WEATHER_MULTI_TEMPLATES).format(c=named)
    unit = None
    if rng.random() < 0.4:
        unit = rng.choice(UNITS)
        text += rng.choice(UNIT_SUFFIXES).format(u=unit)
    return text, [_call("get_weather", city=c, unit=unit) for c in cities]


def _currency(rng: random.Random) -> Clause:
    s, t = rng.sample(sorted(CURRENCIES), 2)
    a = rng.randint(2, 999)
    text = rng.choice(CURRENCY_TEMPLATES).format(a=a, s=s, t=t)
    return text, [_call("convert_currency", amount=a, source=CURRENCIES[s], target=CURRENCIES[t])]


def _currency_multi(rng: random.Random) -> Clause:
    s, t, t2 = rng.sample(sorted(CURRENCIES), 3)
    a = rng.randint(2, 999)
    text = rng.choice(CURRENCY_MULTI_TEMPLATES).format(a=a, s=s, t=t, t2=t2)
    return text, [
        _call("convert_currency", amount=a, source=CURRENCIES[s], target=CURRENCIES[t]),
        _call("convert_currency", amount=a, source=CURRENCIES[s], target=CURRENCIES[t2]),
    ]


def _timer(rng: random.Random) -> Clause:
    d, minutes = _duration(rng)
    if rng.random() < 0.5:
        label = rng.choice(LABELS)
        return rng.choice(TIMER_LABEL_TEMPLATES).format(d=d, l=label), [
            _call("set_timer", minutes=minutes, label=label)
        ]
    return rng.choice(TIMER_TEMPLATES).format(d=d), [_call("set_timer", minutes=minutes)]


def _table(rng: random.Random) -> Clause:
    p_text, people = _people(rng)
    t_text, time = _clock(rng)
    if rng.random() < 0.5:
        r = rng.choice(RESTAURANTS)
        text = rng.choice(TABLE_RESTAURANT_TEMPLATES).format(r=r, p=p_text, t=t_text)
        return text, [_call("book_table", people=people, time=time, restaurant=r)]
    text = rng.choice(TABLE_TEMPLATES).format(p=p_text, t=t_text)
    return text, [_call("book_table", people=people, time=time)]


def _music(rng: random.Random) -> Clause:
    a = rng.choice(ARTISTS)
    if rng.random() < 0.4:
        return rng.choice(MUSIC_SHUFFLE_TEMPLATES).format(a=a), [_call("play_music", artist=a, shuffle=True)]
    return rng.choice(MUSIC_TEMPLATES).format(a=a), [_call("play_music", artist=a)]


SINGLE_CLAUSES: tuple[Callable[[random.Random], Clause], ...] = (_weather, _currency, _timer, _table, _music)


def _problem(text: str, calls: list[tuple[ToolCall, tuple[str, ...]]]) -> ToolProblem:
    return ToolProblem(prompt=text, calls=tuple(c for c, _ in calls), omittable=tuple(o for _, o in calls))


def sample_problem(rng: random.Random) -> ToolProblem:
    """Draw one problem: a single request (share :data:`SINGLE_SHARE`, the five functions uniform) or a parallel
    one (multi-city weather 30%, one amount into two currencies 20%, two requests to different functions 50%)."""
    if rng.random() < SINGLE_SHARE:
        return _problem(*rng.choice(SINGLE_CLAUSES)(rng))
    kind = rng.random()
    if kind < 0.3:
        return _problem(*_weather_multi(rng))
    if kind < 0.5:
        return _problem(*_currency_multi(rng))
    first, second = rng.sample(SINGLE_CLAUSES, 2)
    (t1, c1), (t2, c2) = first(rng), second(rng)
    return _problem(t1 + rng.choice(JOINERS) + t2, c1 + c2)


def iter_problems(seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> Iterator[ToolProblem]:
    """An endless deterministic stream of problems whose prompts are not in ``exclude`` (may repeat otherwise)."""
    rng = random.Random(seed)
    while True:
        p = sample_problem(rng)
        if p.prompt not in exclude:
            yield p


def make_splits(seed: int, num_train: int, num_val: int, num_eval: int) -> ToolSplits:
    """Draw ``num_eval`` + ``num_val`` + ``num_train`` distinct prompts from ``random.Random(seed)``.

    Eval is drawn first, then val, then train (like :func:`pipelines.task.make_splits`), so the held-out sets
    depend only on ``(seed, num_eval[, num_val])``. No prompt appears twice anywhere.

    Raises:
        ValueError: a size is not positive.
    """
    for name, n in (("num_train", num_train), ("num_val", num_val), ("num_eval", num_eval)):
        if n <= 0:
            raise ValueError(f"task.toolcall.{name} must be > 0, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    drawn: list[ToolProblem] = []
    while len(drawn) < num_eval + num_val + num_train:
        p = sample_problem(rng)
        if p.prompt not in seen:
            seen.add(p.prompt)
            drawn.append(p)
    return ToolSplits(
        eval=drawn[:num_eval], val=drawn[num_eval : num_eval + num_val], train=drawn[num_eval + num_val :]
    )


# ----------------------------------------------------------------------------------------------- tokenizer
_WORD_RE = re.compile(r"[A-Za-z_]+")


def vocabulary() -> list[str]:
    """Every word the generator can write (prompts and calls), sorted: the tokenizer's word entries."""
    texts: list[str] = [
        *CATALOG, *(p.name for ps in CATALOG.values() for p in ps), "True", "False", *CITIES, *UNITS,
        *CURRENCIES, *CURRENCIES.values(), *LABELS, *RESTAURANTS, *ARTISTS, *NUMBER_WORDS, *WEATHER_TEMPLATES,
        *WEATHER_MULTI_TEMPLATES, *UNIT_SUFFIXES, *CURRENCY_TEMPLATES, *CURRENCY_MULTI_TEMPLATES,
        *TIMER_TEMPLATES, *TIMER_LABEL_TEMPLATES, *TABLE_TEMPLATES, *TABLE_RESTAURANT_TEMPLATES,
        *MUSIC_TEMPLATES, *MUSIC_SHUFFLE_TEMPLATES, *JOINERS,
        "minute minutes hour hours an and a half one noon am pm people in",
    ]  # fmt: skip
    words: set[str] = set()
    for text in texts:
        words.update(_WORD_RE.findall(re.sub(r"\{[a-z0-9]+\}", " ", text)))
    return sorted(words)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The task tokenizer: ``<pad> <s> </s> <unk>``, :data:`SYMBOLS`, the words of :func:`vocabulary`, then the
    same words with a leading space (ids in that order).

    Pre-tokenization splits into words with their leading space if any (``" weather"``; ``get_weather`` is one
    token), single digits, ``", "``, single spaces and single punctuation characters; decoding fuses the pieces
    back, so ``decode(encode(x)) == x`` for every text the generator writes. A word carries its space so that a
    request costs one token per word, not two. ``tokenizer(text)`` prepends ``<s>``; padding side is left.
    """
    words = vocabulary()
    pieces = (*SPECIAL_TOKENS, *SYMBOLS, *words, *(" " + w for w in words))
    vocab = {tok: i for i, tok in enumerate(pieces)}
    tk = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.Split(
        Regex(r" ?[A-Za-z_]+|[0-9]|, |\s|[^A-Za-z0-9_\s]"), behavior="isolated"
    )
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    # Stock ``AutoTokenizer`` rebuilds a ``qwen2`` directory's vocabulary as ``Qwen2Tokenizer`` (Qwen's regex
    # split, byte-level, BPE without merges): the space becomes ``Ġ`` and every multi-character piece falls apart
    # (unknown ids). Added tokens are matched on the raw text before any pre-tokenizer, leftmost-longest, in both
    # pipelines, so declaring every multi-character piece (and the space) as a non-special added token gives the
    # same ids either way (pipelines/task.py does the same for `` `` and ``\\boxed{``); digits, punctuation and
    # one-letter words are printable ASCII, which byte-level maps to themselves. Ids and vocabulary are unchanged.
    added = [t for t in pieces[len(SPECIAL_TOKENS) :] if len(t) > 1 or t == " "]
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in added])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=MAX_SEQUENCE_TOKENS,
    )


# ------------------------------------------------------------------------------------------------- checking
class CallFormatError(ValueError):
    """A response that is not a Python-style call or list of calls with keyword literal arguments."""


def _func_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):  # BFCL names may be dotted (``math.hypot``)
        return f"{_func_name(node.value)}.{node.attr}"
    raise CallFormatError(f"not a function name: {ast.dump(node)[:60]}")


def parse_calls(response: str) -> list[tuple[str, dict[str, Any]]]:
    """The calls of a response: ``f(a=1)`` or ``[f(a=1), g(b="x")]`` -> ``[(name, {arg: value})]``.

    Parsed with :mod:`ast` (never evaluated); argument values must be literals (``ast.literal_eval``).

    Raises:
        CallFormatError: not parseable, not calls, positional or ``**`` arguments, a repeated keyword, or a
            non-literal value; the message says which.
    """
    try:
        tree = ast.parse(response.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:  # model output is hostile input
        raise CallFormatError(f"not a Python expression: {type(exc).__name__}") from None
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call):
            raise CallFormatError(f"not a call: {ast.unparse(node)[:60]!r}")
        if node.args:
            raise CallFormatError(f"{ast.unparse(node.func)}: positional arguments are not accepted")
        args: dict[str, Any] = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise CallFormatError(f"{ast.unparse(node.func)}: '**' arguments are not accepted")
            if kw.arg in args:
                raise CallFormatError(f"{ast.unparse(node.func)}: argument {kw.arg!r} given twice")
            try:
                args[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                raise CallFormatError(f"{kw.arg}: not a literal: {ast.unparse(kw.value)[:40]!r}") from None
        calls.append((_func_name(node.func), args))
    if not calls:
        raise CallFormatError("no call")
    return calls


def _standardize(s: str) -> str:
    """BFCL's string comparison: case-insensitive, ignoring spaces and ``,./-_*^``; ``'`` and ``"`` equal."""
    return re.sub(r"[ ,./\-_*^]", "", s).lower().replace("'", '"')


def _value_ok(value: Any, acceptable: list[Any]) -> bool:
    """``value`` among ``acceptable``: strings per :func:`_standardize`, anything else of the very same type
    (so ``True`` is not ``1``, ``"120"`` is not ``120`` and ``1.0`` is not an integer ``1``: BFCL's type check)."""
    for ok in acceptable:
        if ok == "":
            continue
        if isinstance(ok, str) and isinstance(value, str):
            if _standardize(ok) == _standardize(value):
                return True
        elif type(ok) is type(value) and ok == value:
            return True
    return False


def _match_one(name: str, args: dict[str, Any], expected: dict[str, dict[str, list[Any]]]) -> str | None:
    """Why the call does not match ``{name: {arg: acceptable}}``, or None when it does."""
    ((exp_name, exp_args),) = expected.items()
    if name != exp_name:
        return f"function {name!r}, expected {exp_name!r}"
    for arg, value in args.items():
        if arg not in exp_args:
            return f"{name}: unexpected argument {arg!r}"
        if not _value_ok(value, exp_args[arg]):
            return f"{name}: {arg}={value!r} not among {exp_args[arg]!r}"
    for arg, acceptable in exp_args.items():
        if arg not in args and "" not in acceptable:
            return f"{name}: missing required argument {arg!r}"
    return None


def check_response(response: str, reference: list[dict[str, dict[str, list[Any]]]]) -> tuple[bool, str]:
    """Whether ``response`` makes exactly the calls ``reference`` (BFCL possible answer) allows, and why not.

    Semantics of BFCL's AST checker: as many calls as reference dicts, matched order-free (each reference dict
    used once); per call the same function name, no argument outside the reference, every argument without
    ``""`` present, each value among the acceptable values and of their type (``True`` is not ``1``; strings
    compared case-insensitively, ignoring spaces and ``,./-_*^``).

    Returns:
        ``(correct, reason)``; ``reason`` is ``"ok"`` or what is wrong.
    """
    try:
        calls = parse_calls(response)
    except CallFormatError as exc:
        return False, f"format: {exc}"
    if len(calls) != len(reference):
        return False, f"{len(calls)} call(s), expected {len(reference)}"
    first_reason = ""
    for order in itertools.permutations(range(len(reference))):  # at most 3 calls: 6 orders
        reasons = [_match_one(*calls[i], reference[j]) for i, j in enumerate(order)]
        if not any(reasons):
            return True, "ok"
        first_reason = first_reason or next(r for r in reasons if r)
    return False, first_reason
