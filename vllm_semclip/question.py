"""Recover the question each image is asked about, from the prompt's token ids.

vLLM hands a multimodal processor token ids, not text, and the chat template has
already wrapped the user's words in role markers and special tokens. ψ must see
only the user's words of the turn that holds the image ("What is the colour of the
triangle?"), not "USER:" or "<image>".

The role markers are learned from the model's own chat template, by rendering
sentinel conversations and reading what surrounds the sentinels, so the same code
serves LLaVA-1.5's ``USER: … ASSISTANT:`` and, say, Llama-3's header tokens. A
tokenizer without a chat template falls back to LLaVA-1.5's markers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_S1, _S2, _S3 = "\ue000SEMCLIP1\ue000", "\ue000SEMCLIP2\ue000", "\ue000SEMCLIP3\ue000"
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class TurnMarkers:
    """Text that opens a user turn and text that opens the assistant's reply."""

    user: str = "USER:"
    assistant: str = "ASSISTANT:"


def _render(tokenizer, messages: list[dict], as_list: bool) -> str:
    if as_list:
        messages = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _common_suffix(a: str, b: str) -> str:
    """The longest common suffix that starts on a token boundary in both strings.

    A bare common suffix can begin inside the previous turn's closing tag
    (``<s><|start…`` and ``<|eot_id|><|start…`` share ``><|start…``).
    """
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    while n > 0 and not (_boundary(a, len(a) - n) and _boundary(b, len(b) - n)):
        n -= 1
    return a[len(a) - n:]


def _boundary(s: str, i: int) -> bool:
    if i == 0 or s[i - 1].isspace():
        return True
    return s[i - 1] in ">]" and s[i] in "<["


def learn_turn_markers(tokenizer) -> TurnMarkers:
    """Read the user-turn and assistant-turn openers off the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return TurnMarkers()
    for as_list in (False, True):
        try:
            single = _render(tokenizer, [{"role": "user", "content": _S1}], as_list)
            multi = _render(
                tokenizer,
                [
                    {"role": "user", "content": _S1},
                    {"role": "assistant", "content": _S2},
                    {"role": "user", "content": _S3},
                ],
                as_list,
            )
        except Exception:  # templates differ in what content they accept
            continue
        if _S1 not in single or _S2 not in multi or _S3 not in multi:
            continue
        pre = single[: single.index(_S1)]
        post = single[single.index(_S1) + len(_S1):]
        between = multi[multi.index(_S2) + len(_S2): multi.index(_S3)]
        user = _common_suffix(pre, between).strip()
        assistant = post.strip()
        if user and assistant:
            return TurnMarkers(user=user, assistant=assistant)
    return TurnMarkers()


class QuestionExtractor:
    """Maps a prompt's token ids to one question per image placeholder."""

    def __init__(self, tokenizer, image_token: str, markers: TurnMarkers | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.markers = markers or learn_turn_markers(tokenizer)
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        specials.add(image_token)
        self._strip = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True) if s))

    def __call__(self, prompt_ids: list[int], num_images: int) -> list[str]:
        """The user's words of the turn holding each image ('' when the turn has none)."""
        text = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        positions = [m.start() for m in re.finditer(re.escape(self.image_token), text)]
        if len(positions) != num_images:
            # Placeholders we cannot locate one by one: every image gets the prompt's words.
            return [self._clean(text)] * num_images
        return [self._clean(self._turn_text(text, pos)) for pos in positions]

    def _turn_text(self, text: str, pos: int) -> str:
        start = text.rfind(self.markers.user, 0, pos)
        start = 0 if start < 0 else start + len(self.markers.user)
        end = text.find(self.markers.assistant, pos)
        end = len(text) if end < 0 else end
        return text[start:end]

    def _clean(self, text: str) -> str:
        return _SPACE.sub(" ", self._strip.sub(" ", text)).strip()
