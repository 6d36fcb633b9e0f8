"""Question templates that turn a query into the user instruction (LISA's lists, without the [SEG] token).

LENS keeps the MLLM frozen and reads its attention to the question, so the instruction only has to ask for a
segmentation: there is no answer template and no special token. The strings here carry no chat markup and no
image placeholder; each backbone adapter wraps them in its own chat template.

The first template of each list is the one LISA evaluates with, so ``rng=None`` (evaluation) reproduces
LISA's evaluation prompts; training draws among all of them, as LISA does.
"""

from __future__ import annotations

import random

# Short queries (class names, referring expressions). "{class_name}" is the query.
SHORT_QUESTION_TEMPLATES: tuple[str, ...] = (
    "What is {class_name} in this image? Please output segmentation mask.",
    "Can you segment the {class_name} in this image?",
    "Please segment the {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
)

# Long queries (ReasonSeg sentences). "{sent}" is the whole sentence, kept as written.
LONG_QUESTION_TEMPLATES: tuple[str, ...] = (
    "{sent} Please output segmentation mask.",
    "{sent} Please respond with segmentation mask.",
)

_ARTICLE = "the "
_SENTENCE_END = ".?!"


def format_question(query: str, is_sentence: bool, rng: random.Random | None = None) -> str:
    """The user instruction asking the MLLM to segment ``query``.

    Arguments:
        query: a class phrase or referring expression (``is_sentence=False``) or a ReasonSeg sentence.
        is_sentence: picks the long-query templates, as LISA does for ReasonSeg's long queries.
        rng: draws the template (training); ``None`` takes the first one, so evaluation is deterministic.

    Returns:
        The instruction text, without chat markup or image placeholder.
    """
    query = query.strip()
    if not query:
        raise ValueError("format_question: empty query")
    templates = LONG_QUESTION_TEMPLATES if is_sentence else SHORT_QUESTION_TEMPLATES
    template = templates[0] if rng is None else rng.choice(templates)
    if is_sentence:
        # Keep "... Please output ..." a new sentence even when the query has no final punctuation.
        sentence = query if query[-1] in _SENTENCE_END else query + "."
        return template.format(sent=sentence)
    if f"{_ARTICLE}{{class_name}}" in template and query.lower().startswith(_ARTICLE):
        # Part phrases already carry an article ("the head of the dog"): avoid "segment the the head".
        query = query[len(_ARTICLE) :]
    return template.format(class_name=query)
