"""Text helpers the scorers share: sentences, word tokens, content words, numbers. Pure, no models.

Written for answers and for the index's chunks, which are scrubbed: a redaction token such as
`[PERSON]` or `[PERSON:7f3a9c01]` is not a word of the text (its hex digest is not a number).
"""

from __future__ import annotations

import re
import string

# Redaction tokens of the batch pipeline (typed or keyed-hash) and placeholders of the request path.
SCRUBBED = re.compile(r"\[[A-Z][A-Z0-9_]*(?::[0-9a-f]{4,64})?\]|<[A-Z][A-Z0-9_]*_\d+>")
CITATION_MARK = re.compile(r"\[\d+(?:\s*[,;-]\s*\d+)*\]")  # "[1]", "[1, 3]": what RAG answers cite with

_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "dr.", "mr.", "mrs.", "ms.", "no.", "approx.", "u.s.", "st.")
# Within a line, a sentence ends at . ! ? followed by space and a capital, digit, quote or bracket.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_LIST_NUMBER = re.compile(r"\d{1,2}[.)]")
_LIST_MARK = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)]|#{1,6})\s+")
_WORD = re.compile(r"[a-z0-9]+(?:[.,][0-9]+)*")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w])|(?<![\w.])\d+(?=[a-z%])")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def _listed(text: str) -> list[str]:
    return text.split()


STOPWORDS = frozenset(_listed("""
a about above after again all also am an and any are as at be because been before being below between both but by
can could did do does doing down during each either few for from further get gets got had has have having he her
here hers herself him himself his how i if in into is it its itself just let like may me might more most must my
myself of off on once only or other our ours ourselves out over own per please same shall she should so some such
than that the their theirs them themselves then there these they this those through to too under until up upon us
very via was we were what when where which while who whom whose why will with within would yes you your yours
yourself yourselves one ones thing things way ways
"""))
# Negation cues (apostrophes are dropped from words: "doesn't" is "doesnt"). Not content words themselves:
# whether a claim and its evidence agree on negation is checked apart (negated_words).
NEGATIONS = frozenset(_listed("""
not no never cannot none nobody nothing neither nor dont doesnt didnt isnt arent wasnt werent cant couldnt wont
wouldnt shouldnt hasnt havent hadnt mustnt neednt
"""))
NEGATION_SCOPE = 3  # content words after a cue, in its clause, that it negates
_CLAUSE = re.compile(r"[,;:!?()\n]|\.(?!\d)")
# Number words a paraphrase may use for digits the source wrote ("thirty days" for "30 days").
# "one" is left out: far more often a pronoun ("the one you bought") than a count.
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(_listed(
    "two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"), start=2)} | {
    "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "ninety": "90", "hundred": "100", "dozen": "12"}


def unscrubbed(text: str) -> str:
    """The text without redaction tokens, placeholders and citation marks (none of them are words)."""
    return CITATION_MARK.sub(" ", SCRUBBED.sub(" ", text))


def sentences(text: str) -> list[str]:
    """Sentences and list items of `text`, without list marks; abbreviations do not end a sentence."""
    out: list[str] = []
    for line in text.splitlines():  # a line ends a sentence: headings, list items, table rows
        for n, piece in enumerate(_SENTENCE_END.split(_LIST_MARK.sub("", line))):
            piece = piece.strip()
            if not piece or _LIST_NUMBER.fullmatch(piece):  # "1." of an inline list: numbering, not a sentence
                continue
            if n and out and out[-1].lower().endswith(_ABBREVIATIONS):
                out[-1] = f"{out[-1]} {piece}"
            else:
                out.append(piece)
    return out


def words(text: str) -> list[str]:
    """Lowercase word tokens (numbers keep their decimal point: "4.99"), redaction tokens left out."""
    return _WORD.findall(unscrubbed(text).lower().replace("\u2019", "'").replace("'", ""))


def stem(word: str) -> str:
    """A light suffix stripper, so "refunds", "refunded", "refunding" and "refund" meet (and "charge", "charged")."""
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith(("ies", "ied")) and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ing", "ed", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def content_words(text: str) -> list[str]:
    """Stemmed words that carry content: stopwords out, number words as digits."""
    return [stem(_NUMBER_WORDS.get(w, w)) for w in words(text) if w not in STOPWORDS and w not in NEGATIONS]


def negated_words(text: str) -> tuple[bool, set[str]]:
    """Whether `text` negates anything, and the content words in the scope of its negations."""
    found, scoped = False, set()
    for clause in _CLAUSE.split(unscrubbed(text)):
        ws = words(clause)
        for i, w in enumerate(ws):
            if w in NEGATIONS:
                found = True
                scoped.update(content_words(" ".join(ws[i + 1:]))[:NEGATION_SCOPE])
    return found, scoped


def numbers(text: str) -> set[str]:
    """Numbers written in `text` as digits or number words, normalised ("07" -> "7", "10,000" -> "10000")."""
    clean = "\n".join(_LIST_MARK.sub("", line) for line in unscrubbed(text).lower().splitlines())  # "3. Open": no 3
    found = {_number(m.group(0)) for m in _NUMBER.finditer(clean)}
    found |= {_NUMBER_WORDS[w] for w in re.findall(r"[a-z]+", clean) if w in _NUMBER_WORDS}
    return found - {""}


def _number(raw: str) -> str:
    raw = raw.replace(",", "") if re.fullmatch(r"\d{1,3}(?:,\d{3})+", raw) else raw.replace(",", ".")
    try:
        value = float(raw)
    except ValueError:
        return raw
    return str(int(value)) if value.is_integer() else str(value)


def squad_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: lowercase, punctuation and articles removed, whitespace split."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split()
