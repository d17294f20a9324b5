"""Behaviour probes: dozens of prompts whose answers are checked, run before and after recovery.

Perplexity can recover while behaviour does not (the seed saw exactly that), so recovery also
records whether the model still answers like the model it was. A probe is a prompt (rendered
through the chat template when the tokenizer has one) decoded greedily, and checks on the
output: a substring, a regular expression, and for reasoning ("Think") models a well-formed
``<think> … </think>`` section followed by a non-empty answer, to which the other checks apply.

Defaults depend on the model type, read from the tokenizer (data, not model names): a chat
template or vocabulary with ``<think>`` marks a Think model. Probes can be given in the
recovery config as a list of mappings with the fields of ``Probe``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from vac.errors import VacError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Probe:
    name: str
    prompt: str
    #: the answer must contain this string
    expect: str | None = None
    #: the answer must match this regular expression (re.search)
    regex: str | None = None
    #: the output must hold a well-formed <think>…</think> before a non-empty answer
    think: bool = False
    max_new_tokens: int = 48
    #: render the prompt as a user turn through the chat template (when the tokenizer has one)
    chat: bool = True


ARITHMETIC = "What is 7 + 5? Answer with a number."
#: the number 12 on its own (not inside 112 or 125)
TWELVE = r"(?<![0-9])12(?![0-9])"


#: (name, prompt, regular expression) of the general probes: short questions of fact, arithmetic,
#: language and code that the bundled dense model (SmolLM2-135M-Instruct) answers correctly, greedy,
#: through its chat template. They were kept from 76 candidates by running that model on each
#: (the 28 it fails would only measure noise); 48 prompts in all with ``arithmetic``.
GENERAL = (
    ('capital-france', 'What is the capital of France?', '(?i)\\bparis\\b'),
    ('capital-japan', 'What is the capital of Japan?', '(?i)\\btokyo\\b'),
    ('capital-germany', 'What is the capital of Germany?', '(?i)\\bberlin\\b'),
    ('capital-uk', 'What is the capital of the United Kingdom?', '(?i)\\blondon\\b'),
    ('capital-russia', 'What is the capital of Russia?', '(?i)\\bmoscow\\b'),
    ('capital-egypt', 'What is the capital of Egypt?', '(?i)\\bcairo\\b'),
    ('capital-china', 'What is the capital of China?', '(?i)\\bbeijing\\b'),
    ('capital-canada', 'What is the capital of Canada?', '(?i)\\bottawa\\b'),
    ('color-sky', 'What color is the sky on a clear day?', '(?i)\\bblue\\b'),
    ('color-snow', 'What color is snow?', '(?i)\\bwhite\\b'),
    ('color-blood', 'What color is blood?', '(?i)\\bred\\b'),
    ('animal-meow', 'Which animal says meow?', '(?i)\\bcats?\\b'),
    ('animal-largest', 'What is the largest animal on Earth?', '(?i)\\bwhales?\\b'),
    ('baby-cat', 'What is a baby cat called?', '(?i)\\bkittens?\\b'),
    ('plants-gas', 'Which gas do plants absorb from the air?', '(?i)carbon dioxide|\\bco2\\b|\\bco₂\\b'),
    ('nearest-star', 'What is the star at the center of our solar system?', '(?i)\\bsun\\b'),
    ('h2o', 'What is H2O commonly called?', '(?i)\\bwater\\b'),
    ('boiling', 'At what temperature in degrees Celsius does water boil?', '(?<![0-9])100(?![0-9])'),
    ('red-planet', 'Which planet is known as the Red Planet?', '(?i)\\bmars\\b'),
    ('sum-2-2', 'What is 2 + 2? Answer with a number.', '(?<![0-9])4(?![0-9])'),
    ('prod-3-3', 'What is 3 times 3? Answer with a number.', '(?<![0-9])9(?![0-9])'),
    ('sum-1-1', 'What is 1 + 1? Answer with a number.', '(?<![0-9])2(?![0-9])'),
    ('opposite-hot', 'What is the opposite of hot?', '(?i)\\bcold\\b'),
    ('opposite-up', 'What is the opposite of up?', '(?i)\\bdown\\b'),
    ('opposite-big', 'What is the opposite of big?', '(?i)\\b(small|little|tiny)\\b'),
    ('opposite-day', 'What is the opposite of day?', '(?i)\\bnight\\b'),
    ('plural-mouse', 'What is the plural of mouse?', '(?i)\\bmice\\b'),
    ('spanish-hello', 'How do you say hello in Spanish?', '(?i)\\bhola\\b'),
    ('week-days', 'How many days are there in a week?', '(?i)\\b(7|seven)\\b'),
    ('year-months', 'How many months are there in a year?', '(?i)\\b(12|twelve)\\b'),
    ('day-hours', 'How many hours are there in a day?', '(?i)\\b(24|twenty-four)\\b'),
    ('first-month', 'What is the first month of the year?', '(?i)\\bjanuary\\b'),
    ('triangle', 'How many sides does a triangle have?', '(?i)\\b(3|three)\\b'),
    ('square', 'How many sides does a square have?', '(?i)\\b(4|four)\\b'),
    ('romeo', 'Who wrote Romeo and Juliet?', '(?i)\\bshakespeare\\b'),
    ('mona-lisa', 'Who painted the Mona Lisa?', '(?i)\\bleonardo\\b|\\bda vinci\\b'),
    ('largest-ocean', 'What is the largest ocean on Earth?', '(?i)\\bpacific\\b'),
    ('tallest-mountain', 'What is the tallest mountain in the world?', '(?i)\\beverest\\b'),
    ('yen', 'What is the currency of Japan?', '(?i)\\byen\\b'),
    ('brazil-language', 'What language is spoken in Brazil?', '(?i)\\bportuguese\\b'),
    ('python-def', 'In Python, which keyword defines a function?', '\\bdef\\b'),
    ('html', 'What does HTML stand for?', '(?i)hyper\\s?text markup language'),
    ('fingers', 'How many fingers are on one hand?', '(?i)\\b(5|five)\\b'),
    ('moon', 'What natural satellite orbits the Earth?', '(?i)\\bmoon\\b'),
    ('pyramids', 'In which country are the pyramids of Giza?', '(?i)\\begypt\\b'),
    ('einstein', 'Which scientist developed the theory of relativity?', '(?i)\\beinstein\\b'),
    ('hello-world', 'Write a Python statement that prints hello.', 'print\\s*\\('),
)


def general_probes(think: bool = False, max_new_tokens: int = 48) -> list[Probe]:
    """``arithmetic`` and the general set."""
    first = [Probe("think-arithmetic" if think else "arithmetic", ARITHMETIC, regex=TWELVE, think=think,
                   max_new_tokens=max_new_tokens)]
    return first + [Probe(n, p, regex=r, think=think, max_new_tokens=max_new_tokens) for n, p, r in GENERAL]


def is_think_model(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return THINK_OPEN in template or THINK_OPEN in tokenizer.get_vocab()


def default_probes(tokenizer) -> list[Probe]:
    """Chat model: the 48 general probes (``arithmetic`` first). Think model: a dozen of them, each to be
    reasoned about in <think>…</think> before the answer (with room to close the section)."""
    if is_think_model(tokenizer):
        return general_probes(think=True, max_new_tokens=512)[:12]
    return general_probes()


def probes_from_config(items: list) -> list[Probe]:
    """Probes from a config list of mappings; unknown keys and missing prompts are errors."""
    if not isinstance(items, list):
        raise VacError(f"probes must be a list of mappings, got {type(items).__name__}")
    known = {f.name for f in dataclasses.fields(Probe)}
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise VacError(f"probe {i} must be a mapping with a 'prompt' string, got {item!r}")
        unknown = sorted(set(item) - known)
        if unknown:
            raise VacError(f"probe {i} has unknown keys {unknown}; valid: {', '.join(sorted(known))}")
        if item.get("regex") is not None:
            try:
                re.compile(item["regex"])
            except re.error as e:
                raise VacError(f"probe {i}: invalid regex {item['regex']!r}: {e}") from e
        out.append(Probe(**{"name": f"probe{i}", **item}))
    return out


def check_think(text: str) -> tuple[bool, str, str]:
    """(ok, reason, answer): one <think> opened before one </think>, with an answer after it."""
    opens, closes = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    if opens == 0:
        return False, "no <think>", ""
    if closes == 0:
        return False, "<think> never closed (output too short or reasoning runaway)", ""
    if opens != 1 or closes != 1:
        return False, f"{opens} <think> and {closes} </think>", text.rsplit(THINK_CLOSE, 1)[-1].strip()
    start, end = text.index(THINK_OPEN), text.index(THINK_CLOSE)
    if end < start:
        return False, "</think> before <think>", ""
    if text[:start].strip():
        return False, "text before <think>", text[end + len(THINK_CLOSE):].strip()
    answer = text[end + len(THINK_CLOSE):].strip()
    if not answer:
        return False, "no answer after </think>", ""
    return True, "", answer


def check_output(probe: Probe, text: str) -> dict:
    """Checks of one output: {"passed", "checks": {name: bool}, "reason"}."""
    checks: dict[str, bool] = {}
    reasons = []
    answer = text
    if probe.think:
        ok, why, answer = check_think(text)
        checks["think"] = ok
        if not ok:
            reasons.append(why)
    if probe.expect is not None:
        checks["expect"] = probe.expect in answer
        if not checks["expect"]:
            reasons.append(f"answer lacks {probe.expect!r}")
    if probe.regex is not None:
        checks["regex"] = re.search(probe.regex, answer) is not None
        if not checks["regex"]:
            reasons.append(f"answer does not match /{probe.regex}/")
    return {"passed": all(checks.values()), "checks": checks, "reason": "; ".join(reasons)}


def _prompt_text(probe: Probe, tokenizer) -> tuple[str, bool]:
    if probe.chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": probe.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return text, False  # the template writes its own BOS
    return probe.prompt, True


@torch.no_grad()
def run_probes(model: nn.Module, tokenizer, probes: list[Probe]) -> list[dict]:
    """Greedy-decode every probe; returns one record per probe (prompt, output, checks, passed)."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    records = []
    for probe in probes:
        text, special = _prompt_text(probe, tokenizer)
        enc = tokenizer(text, add_special_tokens=special, return_tensors="pt")
        ids = enc["input_ids"].to(device)
        out = model.generate(input_ids=ids, attention_mask=enc["attention_mask"].to(device), do_sample=False,
                             max_new_tokens=probe.max_new_tokens, pad_token_id=pad, use_cache=True,
                             temperature=None, top_p=None, top_k=None)
        new = out[0, ids.shape[1]:].tolist()
        while new and new[-1] in (eos, pad):
            new.pop()
        output = tokenizer.decode(new, skip_special_tokens=False)
        # templates that open the reasoning section themselves end the prompt with <think>
        checked = (THINK_OPEN + output) if probe.think and text.rstrip().endswith(THINK_OPEN) else output
        records.append({"name": probe.name, "prompt": probe.prompt, "output": output, **check_output(probe, checked)})
    return records


__all__ = ["Probe", "default_probes", "is_think_model", "probes_from_config", "check_think", "check_output",
           "run_probes", "ARITHMETIC"]
