"""Subject-model activations cached on disk once, then read memory-mapped for training
many epochs or many configurations without re-running the model.

A cache folder holds:
    manifest.json          `CacheManifest`: model, dataset, chunking, dtype, widths, progress
    tokens.npy             (n_chunks, chunk_len) int32 token ids, in the order trained on
    <hookpoint>.npy        (n_tokens, d) activations, row t = token t of the flattened chunks;
                           float16, or bfloat16 stored as its uint16 bit pattern (numpy has
                           no bfloat16)

Building is resumable: the activation files are preallocated, filled batch by batch, and the
manifest records how many tokens are on disk only after they were flushed; an interrupted
build continues from there when run again with the same arguments.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from numpy.lib.format import open_memmap
from pydantic import BaseModel, ValidationError

from sae.errors import UserError

MANIFEST = "manifest.json"
TOKENS = "tokens.npy"
CacheDtype = Literal["float16", "bfloat16"]
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class CacheManifest(BaseModel):
    """What a cache holds and how far its build got."""

    model: str
    dataset: str
    chunk_len: int
    max_tokens: int | None
    data_seed: int
    dtype: CacheDtype
    hookpoints: dict[str, int]  # hookpoint -> activation width
    n_chunks: int
    tokens_done: int = 0

    @property
    def n_tokens(self) -> int:
        return self.n_chunks * self.chunk_len

    @property
    def complete(self) -> bool:
        return self.tokens_done >= self.n_tokens

    def same_source(self, other: "CacheManifest") -> bool:
        keys = ("model", "dataset", "chunk_len", "max_tokens", "data_seed", "dtype", "hookpoints")
        return all(getattr(self, key) == getattr(other, key) for key in keys)


def activation_file(folder: Path, hookpoint: str) -> Path:
    return folder / f"{hookpoint}.npy"


def _write_manifest(folder: Path, manifest: CacheManifest) -> None:
    temp = folder / f".{MANIFEST}.tmp"
    temp.write_text(manifest.model_dump_json(indent=2) + "\n")
    os.replace(temp, folder / MANIFEST)


def read_manifest(folder: Path) -> CacheManifest | None:
    """The manifest of a cache folder, None when there is none; UserError when unreadable."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return CacheManifest.model_validate(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, ValidationError) as error:
        first = str(error).splitlines()[0]
        raise UserError(
            f"{path} is not a valid activation cache manifest ({first}): delete {folder} "
            "and build the cache again"
        ) from None


def _to_storage(activations: torch.Tensor, dtype: CacheDtype) -> np.ndarray:
    if dtype == "bfloat16":
        return activations.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if float(activations.abs().max()) > _FLOAT16_MAX:
        raise UserError(
            f"activations exceed the float16 range ({_FLOAT16_MAX:.0f}): "
            "build the cache with dtype bfloat16"
        )
    return activations.to(torch.float16).numpy()


def build_activation_cache(
    folder: Path,
    model_name: str,
    hookpoints: list[str],
    home: Path,
    dataset: str = "embedded",
    chunk_len: int = 256,
    max_tokens: int | None = None,
    data_seed: int = 0,
    dtype: CacheDtype = "float16",
    batch_chunks: int = 16,
    on_progress: Callable[[int, int], None] | None = None,
) -> "ActivationCache":
    """Run the model once over the dataset and store its activations at `hookpoints`.

    `on_progress(tokens_done, n_tokens)` is called after every batch. A complete cache with
    the same source is returned as is; an incomplete one is continued.
    """
    # Imported here: transformers takes seconds to import, and reading a cache needs none of it.
    from sae.data import load_chunks
    from sae.subject_model import capture_activations, load_model

    if not hookpoints:
        raise UserError("no hookpoint given: name at least one module to cache")
    folder = Path(folder)
    existing = read_manifest(folder)
    if existing is not None and existing.complete:
        cache = ActivationCache(folder)
        cache.check_source(model_name, dataset, chunk_len, max_tokens, data_seed, hookpoints)
        return cache
    model, tokenizer = load_model(model_name, home, hookpoints=hookpoints)
    chunks = load_chunks(dataset, tokenizer, chunk_len, max_tokens, data_seed)
    n_chunks = chunks.shape[0]

    def capture(start: int) -> dict[str, torch.Tensor]:
        captured = capture_activations(model, chunks[start : start + batch_chunks], hookpoints)
        return {name: tensor.flatten(0, 1).float() for name, tensor in captured.items()}

    first = capture(0)
    manifest = CacheManifest(
        model=model_name,
        dataset=dataset,
        chunk_len=chunk_len,
        max_tokens=max_tokens,
        data_seed=data_seed,
        dtype=dtype,
        hookpoints={name: int(first[name].shape[1]) for name in hookpoints},
        n_chunks=n_chunks,
    )
    if existing is not None and existing.same_source(manifest):
        manifest = existing
        files = {name: open_memmap(activation_file(folder, name), mode="r+") for name in hookpoints}
    elif existing is not None:
        raise UserError(
            f"{folder} holds an unfinished cache of a different source (model "
            f"{existing.model}, dataset {existing.dataset}, hookpoints "
            f"{', '.join(existing.hookpoints)}): use another folder or delete it"
        )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        storage = np.uint16 if dtype == "bfloat16" else np.float16
        files = {
            name: open_memmap(
                activation_file(folder, name),
                mode="w+",
                dtype=storage,
                shape=(manifest.n_tokens, width),
            )
            for name, width in manifest.hookpoints.items()
        }
        np.save(folder / TOKENS, chunks.numpy().astype(np.int32))
        _write_manifest(folder, manifest)

    start_chunk = manifest.tokens_done // chunk_len
    for start in range(start_chunk, n_chunks, batch_chunks):
        activations = first if start == 0 else capture(start)
        row = start * chunk_len
        for name, tensor in activations.items():
            files[name][row : row + tensor.shape[0]] = _to_storage(tensor, dtype)
            files[name].flush()
        # Recorded only once the rows are flushed, so a crash never claims unwritten tokens.
        manifest.tokens_done = row + activations[hookpoints[0]].shape[0]
        _write_manifest(folder, manifest)
        if on_progress is not None:
            on_progress(manifest.tokens_done, manifest.n_tokens)
    del files
    return ActivationCache(folder)


class ActivationCache:
    """A complete cache folder opened read-only with memory-mapped activation files."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise UserError(
                f"{self.folder} is not an activation cache (no {MANIFEST}): build one with "
                "`autointerp cache-activations`"
            )
        if not manifest.complete:
            raise UserError(
                f"activation cache {self.folder} is incomplete ({manifest.tokens_done:,} of "
                f"{manifest.n_tokens:,} tokens): run the same cache-activations command again"
            )
        self.manifest = manifest
        self._arrays: dict[str, np.ndarray] = {}
        for name, width in manifest.hookpoints.items():
            path = activation_file(self.folder, name)
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as error:
                raise UserError(
                    f"{path} is missing or corrupt ({error}): delete {self.folder} and "
                    "build the cache again"
                ) from None
            if array.shape != (manifest.n_tokens, width):
                raise UserError(
                    f"{path} has shape {array.shape}, the manifest says "
                    f"{(manifest.n_tokens, width)}: delete {self.folder} and rebuild it"
                )
            self._arrays[name] = array

    @property
    def n_tokens(self) -> int:
        return self.manifest.n_tokens

    @property
    def hookpoints(self) -> list[str]:
        return list(self.manifest.hookpoints)

    def width(self, hookpoint: str) -> int:
        return self.manifest.hookpoints[hookpoint]

    def check_hookpoints(self, hookpoints: list[str]) -> None:
        import difflib

        for name in hookpoints:
            if name not in self.manifest.hookpoints:
                close = difflib.get_close_matches(name, self.hookpoints, n=3, cutoff=0.5)
                hint = (
                    f"closest: {', '.join(close)}" if close else f"has {', '.join(self.hookpoints)}"
                )
                raise UserError(
                    f"activation cache {self.folder} has no hookpoint '{name}' ({hint})"
                )

    def check_source(
        self,
        model: str,
        dataset: str,
        chunk_len: int,
        max_tokens: int | None,
        data_seed: int,
        hookpoints: list[str],
    ) -> None:
        """UserError unless this cache was built from exactly this source."""
        m = self.manifest
        wanted = (model, dataset, chunk_len, max_tokens, data_seed)
        if (m.model, m.dataset, m.chunk_len, m.max_tokens, m.data_seed) != wanted:
            raise UserError(
                f"activation cache {self.folder} was built from model {m.model}, dataset "
                f"{m.dataset}, chunk_len {m.chunk_len}, max_tokens {m.max_tokens}, seed "
                f"{m.data_seed}: use another folder for a different source"
            )
        self.check_hookpoints(hookpoints)

    def read(self, hookpoint: str, token_indices: torch.Tensor) -> torch.Tensor:
        """Activations (len(indices), d) as float32; sorted indices read fastest."""
        rows = self._arrays[hookpoint][token_indices.numpy()]
        if self.manifest.dtype == "bfloat16":
            return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(rows).float()

    def tokens(self) -> torch.Tensor:
        """Token ids (n_chunks, chunk_len) int64, row-major in the activation files' order."""
        return torch.from_numpy(np.load(self.folder / TOKENS)).long()
