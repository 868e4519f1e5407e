"""The demo's prompt set and its gold judge: short questions whose answers a program can check,
each asking for a one-word (or one-number) answer, so a good response is correct *and* short."""

from __future__ import annotations

import re

_ONE_WORD = {
    "What color is a ripe banana?": ["yellow"],
    "What color is grass?": ["green"],
    "What color is the sky on a clear day?": ["blue"],
    "What is the opposite of hot?": ["cold"],
    "What is the opposite of up?": ["down"],
    "What is the capital of France?": ["paris"],
    "What is the capital of Italy?": ["rome"],
    "What is the capital of Japan?": ["tokyo"],
    "What animal says moo?": ["cow", "cows"],
    "What animal barks?": ["dog", "dogs"],
    "What do bees make?": ["honey"],
    "What is frozen water called?": ["ice"],
    "Which planet do we live on?": ["earth"],
    "What is the largest ocean on Earth?": ["pacific"],
    "What gas do plants absorb from the air?": ["co2", "carbon"],
    "How many legs does a spider have?": ["8", "eight"],
}
_SUMS = [(2, 3), (4, 4), (7, 5), (6, 9), (12, 8), (15, 6), (9, 9), (20, 13), (3, 14), (11, 11),
         (8, 7), (5, 16), (30, 12), (25, 25), (17, 4), (13, 19)]

TASKS: dict[str, list[str]] = {f"{q} Answer with one word.": answers for q, answers in _ONE_WORD.items()}
TASKS.update({f"What is {a} + {b}? Answer with just the number.": [str(a + b)] for a, b in _SUMS})
PROMPTS: list[str] = list(TASKS)
BRIEF_WORDS = 3  # a response this short or shorter counts as following the instruction


def words(response: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", response.lower())


def gold_reward(prompt: str, response: str) -> float:
    """In [0, 1]: 0 unless an accepted answer appears among the response's words; then 1 for a
    response of at most BRIEF_WORDS words, decaying as BRIEF_WORDS / n_words for longer ones
    (the instruction asked for one word)."""
    found = words(response)
    if not set(TASKS[prompt]) & set(found):
        return 0.0
    return min(1.0, BRIEF_WORDS / len(found))


def _text(message_or_text) -> str:
    """The text of a TRL prompt or completion: a string, or the last message of a list."""
    if isinstance(message_or_text, str):
        return message_or_text
    return message_or_text[-1]["content"]


def _question(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return [m for m in prompt if m["role"] == "user"][-1]["content"]


def gold_reward_func(prompts, completions, **kwargs) -> list[float]:
    """gold_reward in TRL's reward-function form: the demo's judge (logged, never optimised)."""
    return [gold_reward(_question(p), _text(c)) for p, c in zip(prompts, completions)]
