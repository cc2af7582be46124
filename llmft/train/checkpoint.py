"""Checkpoints: a Hugging Face export that reloads anywhere, plus the state that resumes training.

Layout of a run directory::

    RUN/
      recipe.yaml                     resolved recipe of the run
      metrics.jsonl                   one JSON line per logged step
      checkpoints/step-00000100/
        model/                        config.json (RoPE parameters, new max length), model.safetensors, tokenizer
                                      (method: lora: adapter_config.json + adapter_model.safetensors instead of
                                      model.safetensors; config.json is the RoPE-scaled base config)
        state/                        trainer.json (step, tokens, data position), rng-rank*.pt, and
                                      model.safetensors (fp32 master weights; LoRA: the trainable ones only)
                                      + optimizer.pt + scheduler.pt
                                      (single process) or a DeepSpeed checkpoint (deepspeed/)
        manifest.json                 written last: files, sizes and SHA-256; a directory without it is
                                      incomplete, one whose files do not match it is damaged and skipped
      final/                          the HF export after the last step

A checkpoint is written to ``checkpoints/.tmp-step-*``, fsynced, given its manifest and only then renamed into
place, so a crash at any moment leaves either the previous checkpoints or a complete new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(OSError):
    """A checkpoint could not be written (no space, a read-only or missing directory); earlier ones are intact."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(ckpt: Path, step: int) -> None:
    """Record every file with its size and SHA-256; written after all other files are synced."""
    files = {
        str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    tmp = ckpt / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.rename(ckpt / MANIFEST)


def _listed(manifest: dict) -> dict[str, dict]:
    # manifests written before hashes were added list sizes only
    return {f: (v if isinstance(v, dict) else {"size": v}) for f, v in manifest["files"].items()}


def is_complete(ckpt: Path) -> bool:
    """A checkpoint is complete when its manifest exists and every listed file has the listed size (cheap: used
    for rotation; resume uses :func:`verify`)."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        return all((ckpt / f).stat().st_size == v["size"] for f, v in _listed(manifest).items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def verify(ckpt: Path) -> str | None:
    """None when every file listed in the manifest has its size and SHA-256; else what is wrong."""
    if not is_complete(ckpt):
        return "no manifest, or a file is missing or has the wrong size"
    for name, v in _listed(json.loads((ckpt / MANIFEST).read_text())).items():
        if "sha256" in v and _sha256(ckpt / name) != v["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step directory, oldest first (complete or not)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_complete(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run that verifies (sizes and hashes), or None; a newer one that does not is
    skipped with a warning."""
    for _, path in reversed(list_checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        if (path / MANIFEST).is_file():  # a published checkpoint that went bad (an unpublished one never is)
            log.warning("checkpoint %s is damaged (%s): resuming from an older one", path, problem)
    return None


def finished(recipe) -> bool:
    """Whether ``recipe``'s run directory holds the final model of a run of this very recipe: its ``final/`` is
    published only after the last step, and its ``recipe.yaml`` (written at the start) is this recipe's. A stage of
    a multi-stage driver that is finished need not run again (rerun, training would redo the steps after the last
    checkpoint)."""
    from llmft.config.recipe import recipe_to_yaml

    run_dir = Path(recipe.checkpoint.dir)
    written = run_dir / "recipe.yaml"
    return ((run_dir / "final" / "config.json").is_file() and written.is_file()
            and written.read_text() == recipe_to_yaml(recipe))


def staging_dir(run_dir: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (any leftover is removed)."""
    tmp = Path(run_dir) / "checkpoints" / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, step: int, keep_last: int) -> Path:
    """fsync, write the manifest, rename ``tmp`` into place and drop checkpoints beyond ``keep_last``.

    Rotation only deletes older checkpoints after the new one is complete, so a good one always remains.
    """
    _fsync_tree(tmp)
    write_manifest(tmp, step)
    final = tmp.parent / step_dir_name(step)
    if final.exists():  # an incomplete leftover of the same step
        shutil.rmtree(final)
    tmp.rename(final)
    fd = os.open(tmp.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    complete = [p for _, p in list_checkpoints(tmp.parent.parent) if is_complete(p)]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:  # checkpoints written before NumPy's state was saved have none
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trainer_state(state_dir: Path, trainer: dict, rank: int) -> None:
    """trainer.json (rank 0) and this rank's RNG state."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (state_dir / "trainer.json").write_text(json.dumps(trainer, indent=1))
    torch.save(rng_state(), state_dir / f"rng-rank{rank}.pt")


def load_trainer_state(state_dir: Path, rank: int) -> dict:
    """Read trainer.json and restore this rank's RNG state (if that rank saved one)."""
    trainer = json.loads((state_dir / "trainer.json").read_text())
    rng_file = state_dir / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return trainer


def export_hf(out_dir: Path, model, state_dict: dict, tokenizer, dtype: torch.dtype) -> None:
    """Save a Hugging Face checkpoint (safetensors) that ``from_pretrained`` reloads with no llmft code."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().to("cpu", dtype) for k, v in state_dict.items()}
    config = model.config
    config.dtype = dtype
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
