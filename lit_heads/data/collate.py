"""Tokenize examples into (input_ids, labels) and pad them into batches.

Batch contract (the module and the head scorer rely on it exactly): a dict with
  input_ids       [B, T] long
  attention_mask  [B, T] long, 1 on real tokens, 0 on padding
  labels          [B, T] long, -100 on prompt tokens and padding, token ids on response tokens
Padding is on the right, to the longest sample of the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from lit_heads.data.records import Example
from lit_heads.errors import ConfigError, DataError
from lit_heads.heads.lm_loss import IGNORE_INDEX  # the one definition: the loss skips what the collator marks

log = logging.getLogger(__name__)

_PROBE = "\u2063lit-heads-probe\u2063"  # text no real response contains, to find it in a rendering


def end_of_turn_text(tokenizer) -> str:
    """What the chat template writes right after an assistant message ('<|im_end|>' for SmolLM2).

    Found by rendering a probe conversation, so any template works without a per-model table; the
    trailing newline many templates add between turns is not part of it. Falls back to the EOS token.
    """
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - templates that reject this probe still have an EOS to fall back on
        rendered = ""
    after = rendered.split(_PROBE, 1)[1].rstrip() if _PROBE in rendered else ""
    if after:
        return after
    if tokenizer.eos_token is None:
        raise ConfigError("The tokenizer has neither an end-of-turn marker in its chat template nor an EOS token, so a "
                          "response cannot be terminated.")
    return tokenizer.eos_token


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("The tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token before "
                          "training.")
    return pad


def as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


class PromptEncoder:
    """Turns examples into token ids the same way for training and for generation prompts.

    With a chat template: prompt = template(messages, add_generation_prompt=True), response =
    response text + the template's end-of-turn marker. Without: prompt = text + "\\n" (tokenized with
    the tokenizer's own special tokens, e.g. BOS), response = response text + EOS.
    """

    def __init__(self, tokenizer, max_length: int = 256, use_chat_template: bool | None = None):
        if max_length < 2:
            raise ConfigError(f"max_length must be at least 2 (one prompt and one response token), got {max_length}.")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ConfigError(
                "use_chat_template=True but the tokenizer has no chat template. Set use_chat_template to null "
                "(use it when present) or false (plain 'prompt\\nresponse<eos>' text)."
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        if self.use_chat_template:
            self._end_ids = self._ids(end_of_turn_text(tokenizer))
        else:
            if tokenizer.eos_token_id is None:
                raise ConfigError("The tokenizer has no EOS token, so a response cannot be terminated; set "
                                  "tokenizer.eos_token.")
            self._end_ids = [tokenizer.eos_token_id]

    def _ids(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def prompt_text(self, example: Example) -> str:
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(as_messages(example.prompt), add_generation_prompt=True,
                                                      tokenize=False)
        if isinstance(example.prompt, str):
            return example.prompt + "\n"
        return "".join(f"{m['role']}: {m['content']}\n" for m in example.prompt)

    def prompt_ids(self, example: Example) -> list[int]:
        """Prompt token ids, ending with the generation prompt; never truncated."""
        # A rendered template already holds its special tokens (BOS included, for templates that
        # write it), so adding them again would double them.
        return self._ids(self.prompt_text(example), special=not self.use_chat_template)

    def response_ids(self, example: Example) -> list[int]:
        return self._ids(example.response) + self._end_ids

    def encode(self, example: Example, index: int | None = None) -> tuple[dict[str, list[int]], bool]:
        """({input_ids, labels}, truncated?). Truncation cuts the response end; a sample left with no
        response token raises DataError, since training on it would teach nothing and hide the problem."""
        prompt, response = self.prompt_ids(example), self.response_ids(example)
        room = self.max_length - len(prompt)
        if room <= 0:
            name = example.source or f"sample {index}"
            raise DataError(
                f"{name}: the prompt alone is {len(prompt)} tokens, so with max_length={self.max_length} no response "
                f"token is left to train on. Raise max_length (e.g. to {len(prompt) + len(response)}) or shorten that "
                "prompt."
            )
        truncated = len(response) > room
        response = response[:room]
        return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}, truncated

    def encode_all(self, examples: list[Example], split: str = "train") -> tuple[list[dict[str, list[int]]], int]:
        """Encode every example; returns (samples, number truncated) and logs a warning naming the count."""
        encoded, truncated, longest = [], 0, 0
        for i, example in enumerate(examples):
            sample, cut = self.encode(example, i)
            encoded.append(sample)
            truncated += cut
            if cut:
                longest = max(longest, len(self.prompt_ids(example)) + len(self.response_ids(example)))
        if truncated:
            log.warning(
                "%d of %d %s samples were longer than max_length=%d and lost the end of their response; "
                "the longest needs %d tokens: raise max_length to keep them whole.",
                truncated, len(examples), split, self.max_length, longest,
            )
        return encoded, truncated


@dataclass
class SFTCollator:
    """Pads a list of encoded samples into the batch contract above (picklable, for worker processes)."""

    pad_token_id: int

    def __call__(self, samples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids = [torch.tensor(s["input_ids"], dtype=torch.long) for s in samples]
        labels = [torch.tensor(s["labels"], dtype=torch.long) for s in samples]
        return {
            "input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": pad_sequence([torch.ones_like(t) for t in ids], batch_first=True, padding_value=0),
            "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        }
