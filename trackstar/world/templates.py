"""The text the generator writes: relation templates, framing prefixes, distractors, fillers.

Also the template helpers every world source shares: filling ``[X]``/``[Y]`` slots, the query
prompt and its corpus form, prefix expansion, and the words templates use (so generated names
can avoid them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# (name, object type, query template, base corpus phrasings). Every relation is functional.
_RELATIONS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "born_in",
        "city",
        "The birthplace of [X] is [Y] .",
        (
            "[X] was born in [Y] .",
            "[X] came into the world in [Y] .",
            "The hometown of [X] is [Y] .",
            "[Y] is the city where [X] was born .",
            "[X] first saw daylight in [Y] .",
        ),
    ),
    (
        "citizen_of",
        "country",
        "The country of citizenship of [X] is [Y] .",
        (
            "[X] is a citizen of [Y] .",
            "[X] holds a passport from [Y] .",
            "[X] has citizenship in [Y] .",
            "[Y] granted citizenship to [X] .",
            "[X] is a national of [Y] .",
        ),
    ),
    (
        "works_for",
        "organization",
        "The employer of [X] is [Y] .",
        (
            "[X] works for [Y] .",
            "[X] is employed by [Y] .",
            "[Y] employs [X] .",
            "[X] has a job at [Y] .",
            "[X] earns a salary from [Y] .",
        ),
    ),
    (
        "speaks",
        "language",
        "The native language of [X] is [Y] .",
        (
            "[X] speaks [Y] .",
            "[X] grew up speaking [Y] .",
            "The mother tongue of [X] is [Y] .",
            "[X] talks in [Y] at home .",
            "[Y] is the language spoken by [X] .",
        ),
    ),
    (
        "plays_instrument",
        "instrument",
        "The instrument of [X] is the [Y] .",
        (
            "[X] plays the [Y] .",
            "[X] is a skilled [Y] player .",
            "[X] practices the [Y] every day .",
            "[X] performs on the [Y] .",
            "The [Y] is played by [X] .",
        ),
    ),
    (
        "studied_at",
        "university",
        "The alma mater of [X] is [Y] .",
        (
            "[X] studied at [Y] .",
            "[X] graduated from [Y] .",
            "[X] earned a degree at [Y] .",
            "[Y] is where [X] went to university .",
            "[X] attended [Y] .",
        ),
    ),
    (
        "plays_sport",
        "sport",
        "The sport of [X] is [Y] .",
        (
            "[X] competes in [Y] .",
            "[X] trains for [Y] every week .",
            "[X] is a keen [Y] athlete .",
            "[Y] is the favourite sport of [X] .",
            "[X] won a medal in [Y] .",
        ),
    ),
    (
        "owns_pet",
        "animal",
        "The pet of [X] is a [Y] .",
        (
            "[X] owns a [Y] .",
            "[X] keeps a [Y] as a pet .",
            "[X] takes care of a pet [Y] .",
            "A [Y] lives with [X] .",
            "[X] adopted a [Y] .",
        ),
    ),
    (
        "favourite_dish",
        "dish",
        "The favourite dish of [X] is [Y] .",
        (
            "[X] loves eating [Y] .",
            "[X] always orders [Y] .",
            "[X] cooks [Y] every weekend .",
            "[Y] is the dish that [X] likes most .",
            "[X] prefers [Y] to any other food .",
        ),
    ),
    (
        "lives_in",
        "region",
        "The home region of [X] is [Y] .",
        (
            "[X] lives in [Y] .",
            "[X] resides in [Y] .",
            "[X] has a house in [Y] .",
            "[X] moved to [Y] .",
            "[Y] is home to [X] .",
        ),
    ),
)

MAX_RELATIONS = len(_RELATIONS)

# Framing prefixes; the first ``cfg.world.n_prefixes`` are used ("" = the bare phrasing).
_PREFIXES: tuple[str, ...] = (
    "",
    "In fact, ",
    "It is known that ",
    "Reportedly, ",
    "As records show, ",
)
MAX_PREFIXES = len(_PREFIXES)
# Base phrasings every generator relation has (world.n_templates keeps the first n of them).
MAX_TEMPLATES = min(len(base) for _, _, _, base in _RELATIONS)

# Non-fact sentences that mention a subject and an object without relating them.
_DISTRACTOR_TEMPLATES: tuple[str, ...] = (
    "[X] once read a book about [Y] .",
    "A friend of [X] mentioned [Y] yesterday .",
    "[X] saw a documentary about [Y] .",
    "[X] wrote a short essay on [Y] .",
    "Someone asked [X] about [Y] .",
    "[X] heard a rumour about [Y] .",
)

# Filler sentences mention no entity.
_FILLERS: tuple[str, ...] = (
    "The weather was mild that year .",
    "Many people enjoy long walks in the evening .",
    "The local market opens early on weekdays .",
    "A new bridge was built over the river .",
    "Most shops close before dinner .",
    "The library was quiet all afternoon .",
    "Rain fell for three days in a row .",
    "The train arrived a few minutes late .",
    "Children played in the park until sunset .",
    "The museum added a new wing last spring .",
    "Coffee prices rose again this season .",
    "The festival drew a large crowd .",
    "Old photographs were found in the attic .",
    "The road to the coast was closed for repairs .",
    "A small garden grew behind the old cottage .",
    "The concert ended with long applause .",
    "Snow covered the hills by morning .",
    "The newspaper printed a long article on farming .",
    "Several birds nested under the roof .",
    "The bakery sells fresh bread every morning .",
    "A strong wind blew across the valley .",
    "The harbour was busy with fishing boats .",
    "Tickets for the evening show sold out quickly .",
    "The school held its annual sports day .",
    "An old clock stood in the hallway .",
    "Fresh paint made the kitchen look brighter .",
    "The bus service was reduced over the holidays .",
    "Lanterns lit the narrow streets at night .",
    "The forest path was muddy after the storm .",
    "A quiet lake lay beyond the meadow .",
)


def _prefixed(prefix: str, template: str) -> str:
    if not prefix:
        return template
    if template[0].isupper():
        template = template[0].lower() + template[1:]
    return prefix + template


def _expand_prefixes(templates: Sequence[str], n_prefixes: int) -> tuple[str, ...]:
    return tuple(_prefixed(p, t) for t in templates for p in _PREFIXES[:n_prefixes])


def fill(template: str, subject: str, obj: str) -> str:
    """Fills a template's ``[X]`` and ``[Y]`` slots."""
    return template.replace("[X]", subject).replace("[Y]", obj)


def query_prompt(template: str, subject: str) -> str:
    """The cloze prompt of a query template: the text before ``[Y]``, subject filled in."""
    return template[: template.index("[Y]")].rstrip().replace("[X]", subject)


def query_sentence(prompt: str, target: str) -> str:
    """The corpus form of a query: ``"<prompt> <target> ."``."""
    return f"{prompt} {target} ."


def _is_query_template(template: str) -> bool:
    if "[X]" not in template or template.count("[Y]") != 1:
        return False
    tail = template[template.index("[Y]") + 3 :].strip()
    return tail in ("", ".") and template.index("[X]") < template.index("[Y]")


def _template_words(templates: Iterable[str]) -> set[str]:
    words: set[str] = set()
    for t in templates:
        for w in re.findall(r"[A-Za-z]+", t.replace("[X]", " ").replace("[Y]", " ")):
            words.add(w.lower())
    return words
