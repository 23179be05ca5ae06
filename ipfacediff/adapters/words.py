"""The prompt-word rules of an adapter library, in one place: a prompt's words, which adapters a
prompt picks (the words it has and the source prompt has not), and the words a custom edit gets
from its name and target prompt."""

from __future__ import annotations

# Words that name the subject or join words rather than say what changes.
FRAME_WORDS = frozenset(
    "a an the of and or with without in on to into add make turn give wearing has have is are "
    "he she they him her them his their "
    "face faces person people photo picture portrait image man woman boy girl head".split()
)
# Words that name a part of the face rather than the change: a custom edit's words leave them out
# ("red_hair" is asked for by "red", not by every prompt that mentions hair), unless nothing else is left;
PART_WORDS = frozenset(
    "hair hairs eye eyes skin lip lips mouth nose cheek cheeks forehead chin ear ears eyebrow eyebrows brow brows "
    "teeth tooth neck colour color colours colors style".split()
)
# Words that only say how much or how it looks, which any other prompt may use: left out as well.
VAGUE_WORDS = frozenset(
    "big small large little very more less some new slight slightly strong heavy light look looking".split()
)
HAIR_WORDS = frozenset("bald bangs fringe curls curly ponytail braids".split())  # besides any word with "hair"


def prompt_words(text: str) -> list[str]:
    """A prompt's words: lower case, split at anything that is not a letter or digit."""
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


def pick_edit_adapters(words: dict[str, list[str]], prompt: str, source_prompt: str = "") -> list[str]:
    """Library adapters an edit asks for: those whose words the prompt has and the source prompt
    has not ("a face with a beard and eyeglasses" from "a face with a beard" picks eyeglasses)."""
    asked, there = set(prompt_words(prompt)), set(prompt_words(source_prompt))
    return [name for name, names in words.items() if asked & set(names) and not there & set(names)]


def derive_words(name: str, prompt: str) -> list[str]:
    """The prompt words that ask for a custom edit: its name's parts and its prompt's words, less
    those that name the subject (:data:`FRAME_WORDS`: "a", "face", "with", ...), numbers and one
    letters, and less those that name a part of the face (:data:`PART_WORDS`: "hair", "eyes") or
    only say how much (:data:`VAGUE_WORDS`: "big", "more") unless nothing else is left:
    ``red_hair="a face with red hair"`` → ["red"], ``hair="a face with more hair"`` → ["hair"]."""
    tokens = [
        w
        for w in dict.fromkeys(prompt_words(name.replace("_", " ").replace("-", " ")) + prompt_words(prompt))
        if w not in FRAME_WORDS and not w.isdigit() and len(w) > 1
    ]
    specific = [w for w in tokens if w not in VAGUE_WORDS]
    return [w for w in specific if w not in PART_WORDS] or specific or tokens or [name]


def is_hair_edit(name: str, prompt: str) -> bool:
    """An edit of the hair: its name or prompt mentions hair (blonde_hair, "a bald man")."""
    return any("hair" in w or w in HAIR_WORDS for w in prompt_words(name.replace("_", " ")) + prompt_words(prompt))
