"""HELM's prompts: in-context examples drawn cycling through the labels, each example's block (with lettered options for
joint multiple choice), and the prompt fitted to the model's context."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from itertools import cycle

from llmft.config.eval import ScenarioSpec
from llmft.eval.helm.scenarios import TRAIN, Instance


def sample_examples(train: list[Instance], k: int, seed: int) -> list[Instance]:
    """HELM's ``InContextLearningAdapter.sample_examples``: k train instances, balanced over labels.

    Labels (first correct reference) are ordered by frequency, ties shuffled; one instance is drawn per label in
    turn until k are drawn; instances without a correct reference fill the rest. Same ``random`` calls as HELM.
    """
    rnd = random.Random(seed)
    n = min(len(train), k)
    unlabeled: list[Instance] = []
    by_label: dict[str, list[Instance]] = defaultdict(list)
    for inst in train:
        golds = inst.golds
        if golds:
            by_label[golds[0]].append(inst)
        else:
            unlabeled.append(inst)
    counts: dict[int, list[str]] = defaultdict(list)
    for label, items in sorted(by_label.items()):
        counts[len(items)].append(label)
    labels: list[str] = []
    for count in sorted(counts, reverse=True):
        rnd.shuffle(counts[count])
        labels.extend(counts[count])
    examples: list[Instance] = []
    for label in cycle(labels) if labels else ():
        if n == 0 or not label or not any(by_label.values()):  # HELM stops at an empty label; loops forever when
            break  # every labeled instance is used and unlabeled ones are still needed, so stop there instead
        items = by_label[label]
        if items:
            examples.append(items.pop(rnd.randrange(len(items))))
            n -= 1
    return examples + rnd.sample(unlabeled, min(n, len(unlabeled)))


def _option_prefix(prefix: str, i: int) -> str:
    """HELM's MultipleChoiceJointAdapter.get_reference_prefix: "A. " -> "C. " for i = 2."""
    char = prefix.lstrip()[0]
    return prefix.replace(char, chr(ord(char) + i))


def example_block(spec: ScenarioSpec, inst: Instance, include_output: bool, reference_index: int | None = None) -> str:
    """One example of the prompt, as HELM's adapter for ``spec.method`` writes it.

    Args:
        spec: the scenario.
        inst: the instance.
        include_output: write the answer (in-context examples, and the option scored by the separate methods);
            otherwise end with ``output_prefix.rstrip()`` for the model to continue.
        reference_index: the option (separate methods) or passage (ranking) this block is about.
    """
    head = spec.input_prefix + inst.input + spec.input_suffix
    if spec.method == "ranking_binary":
        indices = range(len(inst.references)) if inst.split == TRAIN else [reference_index]
        blocks = []
        for i in indices:
            ref = inst.references[i]
            text = spec.reference_prefix + ref.text + spec.reference_suffix + head
            if include_output:
                text += spec.output_prefix + ("Yes" if ref.correct else "No") + spec.output_suffix
            else:
                text += spec.output_prefix.rstrip()
            blocks.append(text)
        return spec.instance_prefix.join(blocks)
    if spec.method == "multiple_choice_joint":
        output = "n/a"
        for i, ref in enumerate(inst.references):
            head += _option_prefix(spec.reference_prefix, i) + ref.text + spec.reference_suffix
            if ref.correct and output == "n/a":
                output = _option_prefix(spec.reference_prefix.lstrip()[0], i)
    elif reference_index is not None:
        output = inst.references[reference_index].text
    else:
        output = inst.golds[0] if inst.golds else "n/a"
    if include_output:
        return head + spec.output_prefix + output + spec.output_suffix
    return head + spec.output_prefix.rstrip()


@dataclass
class Prompt:
    """A prompt fitted to the context window."""

    text: str
    input_ids: list[int]
    num_train_instances: int  # in-context examples kept
    num_dropped: int  # in-context examples dropped to fit
    truncated: bool  # cut from the right after dropping every example


def build_prompt(spec: ScenarioSpec, tokenizer, instructions: str, train_blocks: list[str], eval_block: str,
                 max_length: int, completion_tokens: int) -> Prompt:
    """Join the blocks HELM's way and make the prompt fit ``max_length`` tokens with ``completion_tokens`` to spare.

    Drops in-context examples from the end, one at a time, then truncates from the right
    (HELM's ``_make_prompt_fit`` and ``truncate_from_right``).

    Raises:
        ValueError: ``completion_tokens`` leaves no room for a prompt.
    """
    budget = max_length - completion_tokens
    if budget < 1:
        raise ValueError(f"{spec.name}: max_tokens {completion_tokens} does not fit a {max_length}-token context; "
                         "use a model with a longer context or leave this scenario out")
    blocks = list(train_blocks)
    while True:
        text = spec.instance_prefix.join(([instructions] if instructions else []) + blocks + [eval_block])
        ids = tokenizer(text).input_ids
        if len(ids) <= budget:
            return Prompt(text, ids, len(blocks), len(train_blocks) - len(blocks), False)
        if not blocks:
            ids = ids[:budget]
            return Prompt(tokenizer.decode(ids, skip_special_tokens=True), ids, 0, len(train_blocks), True)
        blocks.pop()
