"""``llmft quickstart``: the whole context-extension job, offline on CPU, in a few minutes.

1. pre-train a tiny LLaMA at 128 tokens (``recipes/cpu/tiny_base.yaml``);
2. extend it x8 to 1024 tokens with linear Position Interpolation and fine-tune (``recipes/cpu/tiny_pi8x.yaml``);
3. reload the outputs with plain transformers and print held-out perplexity at 128..1024 tokens for the base
   (RoPE extrapolation), the base with PI but no training, and the fine-tuned extended model.

Writes ``OUT/ppl.md``, ``OUT/ppl.json`` and ``OUT/ppl_by_length.png``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from llmft.config import RopeConfig, load_recipe
from llmft.config.loading import shipped_path
from llmft.data.build import load_built
from llmft.eval.ppl import perplexity_by_length
from llmft.eval.report import plot_ppl, ppl_table
from llmft.model.rope import apply_rope_scaling
from llmft.train.loop import train

log = logging.getLogger(__name__)
BASE_RECIPE = "recipes/cpu/tiny_base.yaml"  # shipped with llmft: read from the installed package
EXT_RECIPE = "recipes/cpu/tiny_pi8x.yaml"
FAST_STEPS_SCALE = 0.05  # --fast: 5% of the steps (about a minute on 2 CPU cores)


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def quickstart(out: Path, steps_scale: float = 1.0, max_windows: int = 8) -> dict:
    """Run the demo from any directory (the recipes, model and books are read from the installed package); returns
    ``{column: {length: result}}``."""
    out = out.resolve()
    base_dir, ext_dir = out / "base", out / "extended"
    base = load_recipe(shipped_path(BASE_RECIPE), [f"checkpoint.dir={base_dir}"])
    base.train.max_steps = _scaled(base.train.max_steps, steps_scale)
    ext = load_recipe(shipped_path(EXT_RECIPE), [f"checkpoint.dir={ext_dir}", f"model.name={base_dir / 'final'}"])
    ext.train.max_steps = _scaled(ext.train.max_steps, steps_scale)
    print(f"[llmft] quickstart 1/3: pre-training a tiny base at {base.model.max_seq_len} tokens", flush=True)
    train(base)
    print(f"[llmft] quickstart 2/3: extending x{ext.model.rope.factor:g} to {ext.model.max_seq_len} tokens "
          "with linear Position Interpolation", flush=True)
    train(ext)

    print("[llmft] quickstart 3/3: held-out perplexity by context length", flush=True)
    val_tokens = load_built(ext_dir / "data").validation_tokens  # the held-out tail the extension run built
    lengths = [base.model.max_seq_len * 2**i for i in range(4)]  # 128 .. 1024
    pi_config = AutoConfig.from_pretrained(base_dir / "final")
    apply_rope_scaling(pi_config, RopeConfig(type="linear", factor=ext.model.rope.factor))
    models = {
        f"base ({base.model.max_seq_len})": AutoModelForCausalLM.from_pretrained(base_dir / "final"),
        "base + PI x8, no training": AutoModelForCausalLM.from_pretrained(base_dir / "final", config=pi_config),
        f"PI x8 fine-tuned ({ext.model.max_seq_len})": AutoModelForCausalLM.from_pretrained(ext_dir / "final"),
    }
    results = {name: perplexity_by_length(m, val_tokens, lengths, max_windows) for name, m in models.items()}
    table = ppl_table(results, ("ppl",), compare=False, length_format="{}")
    print("\nToken perplexity on held-out text (lower is better):\n\n" + table + "\n", flush=True)
    (out / "ppl.md").write_text(table + "\n")
    (out / "ppl.json").write_text(
        json.dumps({k: {str(n): r for n, r in v.items()} for k, v in results.items()}, indent=1)
    )
    plot_ppl(results, out / "ppl_by_length.png", metric="ppl", ylabel="token perplexity (held-out)", log_y=True,
             title="Context extension with Position Interpolation", trained_len=base.model.max_seq_len,
             trained_label="base training length")
    print(f"[llmft] wrote {out / 'ppl.md'}, {out / 'ppl.json'} and {out / 'ppl_by_length.png'}", flush=True)
    return results

