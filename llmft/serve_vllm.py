"""Batch generation with vLLM: ``llmft generate --input F --engine vllm``, where vLLM is installed (CUDA GPUs).

vLLM reads the checkpoint's config.json, RoPE scaling included (the config llmft exports with the model), so a
PI/YaRN-extended model is served at its extended context. It serves merged checkpoints: an adapter directory is
refused with the ``llmft merge`` command that makes one. Never required: the transformers path
(:func:`llmft.generate.generate_file`) does the same work everywhere; this module is imported only when asked for.
Not exercised in CI (no GPU there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmft.generate import GenerationError, Sampling, _records


def generate_file_vllm(model: str, src: Path, dst: Path, s: Sampling, on_error: str, dtype: str) -> dict:
    """:func:`llmft.generate.generate_file` on vLLM: the valid records in one ``LLM.generate`` call.

    Raises:
        GenerationError: an adapter directory (merge it first), an unreadable input, or a bad line with
            ``on_error`` "stop" (nothing is generated then).
    """
    from vllm import LLM, SamplingParams

    path = Path(model).expanduser()
    if (path / "final").is_dir() and not (path / "config.json").is_file():
        path = path / "final"
    if (path / "adapter_config.json").is_file():
        raise GenerationError(f"--engine vllm: {path} is an adapter; vLLM serves merged checkpoints here. Fix: llmft "
                              f"merge --base BASE --adapter {path} --out {path}-merged, then --model {path}-merged")
    if not src.is_file():
        raise GenerationError(f"--input: {src} is not a file")
    records, bad = [], []
    for number, record, problem in _records(src):
        if record is None:
            if on_error == "stop":
                raise GenerationError(f"{src}:{number}: {problem}. Stopped (--on-error stop) before generating")
            bad.append((number, problem))
        else:
            records.append((number, record))
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    llm = LLM(model=str(path) if path.exists() else model, dtype=dtype, seed=s.seed,
              max_model_len=config.get("max_position_embeddings"))
    params = SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
                            repetition_penalty=s.repetition_penalty, max_tokens=s.max_new_tokens,
                            stop=list(s.stop) or None, seed=s.seed)
    outputs = llm.generate([r["prompt"] for _, r in records], params)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    new_tokens = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for (number, record), out in zip(records, outputs, strict=True):
            o = out.outputs[0]
            new_tokens += len(o.token_ids)
            f.write(json.dumps({"id": record.get("id", number), "completion": o.text, "finish": o.finish_reason,
                                "prompt_tokens": len(out.prompt_token_ids), "new_tokens": len(o.token_ids)},
                               ensure_ascii=False) + "\n")
    os.replace(tmp, dst)
    return {"done": len(records), "bad": bad, "new_tokens": new_tokens}
