"""Chat templates: how a conversation becomes tokens, for training (``format: chat`` data, loss on the assistant
turns) and for ``llmft chat``. Torch-free (the data build's tokenizer workers import it).

A conversation is rendered with the tokenizer's own chat template, or with a named one for a base model that has
none (:data:`TEMPLATES`). The trained part of a conversation is found by rendering: the assistant turn i spans, in
the rendered text, from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
``render(messages[:i + 1])`` (its content and the template's end of turn, e.g. ``<|im_end|>`` or EOS), and the
tokens whose characters start inside such a span are trained on.
"""

from __future__ import annotations

import numpy as np

from llmft.data.packing import Example


class ChatTemplateError(ValueError):
    """A template that does not exist, or a tokenizer without one and none named."""


# Named templates (Jinja, as transformers' apply_chat_template takes them) and the text that ends an assistant turn
TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
        "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}{{ m['content'] | trim }} [/INST]"
        "{% else %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}{% endfor %}"
    ),
}
TURN_ENDS = {"chatml": ("<|im_end|>",), "llama2": ("[INST]",)}
ROLES = ("system", "user", "assistant")


def chat_template(tokenizer, name: str | None) -> tuple[str | None, tuple[str, ...]]:
    """(the Jinja template to render with, or None for the tokenizer's own; the texts that end an assistant turn).

    Raises:
        ChatTemplateError: an unknown template name, or none given for a tokenizer without a chat template.
    """
    if name is not None:
        if name not in TEMPLATES:
            raise ChatTemplateError(f"--template: got {name!r}; expected one of {', '.join(TEMPLATES)}")
        return TEMPLATES[name], TURN_ENDS[name]
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("this model's tokenizer has no chat template (a base model). Fix: pass --template "
                              f"{' or --template '.join(TEMPLATES)}")
    return None, ()


def render(tokenizer, messages: list[dict], template: str | None, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation rendered with ``template`` (None: the tokenizer's own)."""
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_conversation(tokenizer, messages: list[dict], template: str | None, train_on: str = "all",
                        max_tokens: int | None = None) -> Example:
    """The conversation as one :class:`Example`, trained on its assistant turns (all, or the last), rendered with
    the named ``template`` (None: the tokenizer's own).

    A conversation longer than ``max_tokens`` keeps its whole turns: it is cut after the last assistant turn that
    fits (the turns after it are dropped).

    Raises:
        ChatTemplateError: no such template, or none named for a tokenizer without one, or a template that does not
            render the conversation as growing prefixes (each turn appended at the end), so that the assistant
            spans cannot be found.
    """
    template, _ = chat_template(tokenizer, template)
    prefix = [""]  # rendered text up to the end of turn i; for assistant turns also where they start
    spans = []  # (start, end) characters of each assistant turn
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = tokenizer.apply_chat_template(messages[:i], chat_template=template, tokenize=False,
                                                  add_generation_prompt=True) if i else ""
            end = tokenizer.apply_chat_template(messages[: i + 1], chat_template=template, tokenize=False)
            if not end.startswith(start) or not start.startswith(prefix[-1]):
                raise ChatTemplateError("the chat template does not render a conversation turn by turn (a later turn "
                                        "changes the text of an earlier one), so the assistant turns cannot be found")
            spans.append((len(start), len(end)))
            prefix.append(end)
    text = prefix[-1]
    if train_on == "last":
        spans = spans[-1:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = np.zeros(len(ids), dtype=bool)
    starts = np.array([s for s, _ in offsets])
    for s, e in spans:
        mask |= (starts >= s) & (starts < e)
    ends = [e for _, e in spans]
    n = len(ids)
    if max_tokens is not None and n > max_tokens:
        # the last assistant turn whose tokens all fit: cut right after it (if none does, the conversation stays
        # whole and packing splits it, as it splits any document longer than a row)
        fit = [int(np.searchsorted(starts, e)) for e in ends if np.searchsorted(starts, e) <= max_tokens]
        n = max(fit, default=n)
    return Example(np.asarray(ids[:n], dtype=np.int32), mask[:n])
