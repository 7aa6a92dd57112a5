"""Streaming latent statistics and example windows, in memory that does not grow with N.

The token stream is cut into windows of W tokens (non-overlapping slices of each chunk). For
every latent of every SAE we keep, batch by batch:
- its firing count (tokens with activation > 0) and maximum activation;
- the K windows with the highest maximum activation, with per-token activations;
- a uniform sample of R firing windows (bottom-k sampling: each firing window draws a random
  priority and the R highest survive), with per-token activations, later split into
  activation-quantile bins;
- a uniform sample of windows where the latent never fires (their activations are all zero).
Priorities come from a generator seeded by (seed, batch index), so a run interrupted and
resumed from its last saved state gives exactly the result of one uninterrupted pass.

Every "keep the highest" is under one total order, (value descending, window id ascending),
so the kept windows are those of the whole stream whatever order its batches are folded in:
under torchrun each process folds every N-th batch and the main process folds the others'
trackers into its own, storing exactly what one process stores. The running state lives on
the device the activations come from (a GPU's, when the stage runs there); the priorities
are drawn on the CPU, so they are the same on every device.
"""

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from sae.distributed import ProcessGroup
from sae.errors import UserError

Encoder = Callable[[torch.Tensor], torch.Tensor]
Activations = Callable[[torch.Tensor], torch.Tensor]


class CacheConfig(BaseModel):
    """The latent cache stage: which tokens are read, and which windows each latent keeps.
    Saved beside the cache's output as cache_config.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int = Field(default=1_000_000, ge=1, description="tokens of the run's dataset to read")
    chunk_len: int = Field(default=256, ge=2, description="tokens per model forward sequence")
    window: int = Field(default=32, ge=1, description="tokens per example window")
    n_top: int = Field(default=20, ge=0, description="top-activating windows kept per latent")
    quantile_bins: int = Field(default=10, ge=1, description="activation-quantile bins per latent")
    per_quantile_bin: int = Field(default=5, ge=0, description="windows sampled from each bin")
    negatives: int = Field(default=20, ge=0, description="non-firing windows kept per latent")
    n_reservoir: int | None = Field(
        default=None,
        ge=1,
        description="firing windows sampled per latent before binning "
        "(default 4 x quantile_bins x per_quantile_bin, at least 20)",
    )
    batch_size: int = Field(default=8, ge=1, description="chunks per model forward batch")
    seed: int = Field(default=0, description="seed of the window sampling")

    @property
    def reservoir(self) -> int:
        """Firing windows sampled per latent: enough to fill every quantile bin four times."""
        if self.n_reservoir is not None:
            return self.n_reservoir
        return max(4 * self.quantile_bins * self.per_quantile_bin, 20)


@dataclass
class SaeWindows:
    """Every stored window of one SAE, flat: row i belongs to latent `latent[i]`."""

    latent: np.ndarray  # (M,) int64
    kind: list[str]  # "top" | "quantile" | "random"
    quantile_bin: np.ndarray  # (M,) int64, -1 when not a quantile sample
    rank: np.ndarray  # (M,) int64, order within (latent, kind, bin)
    token_ids: np.ndarray  # (M, W) int32
    activations: np.ndarray  # (M, W) float32

    def __len__(self) -> int:
        return len(self.kind)

    def batches(self, size: int) -> Iterator["SaeWindows"]:
        """The rows in consecutive slices of at most `size` rows (views, not copies)."""
        for first in range(0, len(self), size):
            last = first + size
            yield SaeWindows(
                latent=self.latent[first:last],
                kind=self.kind[first:last],
                quantile_bin=self.quantile_bin[first:last],
                rank=self.rank[first:last],
                token_ids=self.token_ids[first:last],
                activations=self.activations[first:last],
            )


@dataclass
class SaeLatentStats:
    n_tokens: int
    firing_count: np.ndarray  # (n_latents,) int64
    max_activation: np.ndarray  # (n_latents,) float32
    examples: SaeWindows = field(repr=False)

    @property
    def firing_frequency(self) -> np.ndarray:
        return self.firing_count / max(self.n_tokens, 1)


class _Tracker:
    """Running state for one SAE; every tensor is (n_latents, ...) and fixed in size."""

    def __init__(self, n_latents: int, config: CacheConfig, device: torch.device) -> None:
        w, top, reservoir = config.window, config.n_top, config.reservoir
        int64 = torch.int64
        self.firing_count = torch.zeros(n_latents, dtype=int64, device=device)
        self.max_activation = torch.zeros(n_latents, device=device)
        self.top_value = torch.zeros(n_latents, top, device=device)
        self.top_window = torch.full((n_latents, top), -1, dtype=int64, device=device)
        self.top_tokens = torch.zeros(n_latents, top, w, device=device)
        self.sample_key = torch.full((n_latents, reservoir), -1.0, device=device)
        self.sample_value = torch.zeros(n_latents, reservoir, device=device)
        self.sample_window = torch.full((n_latents, reservoir), -1, dtype=int64, device=device)
        self.sample_tokens = torch.zeros(n_latents, reservoir, w, device=device)
        self.negative_key = torch.full((n_latents, config.negatives), -1.0, device=device)
        self.negative_window = torch.full(
            (n_latents, config.negatives), -1, dtype=int64, device=device
        )

    def state(self) -> dict[str, torch.Tensor]:
        return dict(vars(self))

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in state.items():
            setattr(self, name, tensor)

    def absorb(self, other: "_Tracker") -> None:
        """Fold in a tracker of the same SAE that saw other batches of the same stream."""
        self.firing_count += other.firing_count
        self.max_activation = torch.maximum(self.max_activation, other.max_activation)
        self.top_value, self.top_window, self.top_tokens = _merge(
            self.top_value,
            self.top_window,
            self.top_tokens,
            other.top_value,
            other.top_window,
            other.top_tokens,
        )
        merged = _merge(
            self.sample_key,
            self.sample_window,
            self.sample_tokens,
            other.sample_key,
            other.sample_window,
            other.sample_tokens,
            extra=(self.sample_value, other.sample_value),
        )
        self.sample_key, self.sample_window, self.sample_tokens, self.sample_value = merged
        self.negative_key, self.negative_window = _merge_ids(
            self.negative_key, self.negative_window, other.negative_key, other.negative_window
        )

    def gather(self, group: ProcessGroup) -> None:
        """On the main process, absorb every other process's tracker (one at a time, so
        memory holds two trackers, not N); the others send theirs."""
        names = sorted(self.state())
        for rank in range(1, group.world_size):
            if group.rank == rank:
                for name in names:
                    group.send(getattr(self, name), to=0)
            elif group.is_main:
                other = _Tracker.__new__(_Tracker)
                other.load({name: group.receive(getattr(self, name), rank) for name in names})
                self.absorb(other)

    def update(
        self,
        latent_acts: torch.Tensor,
        window_ids: torch.Tensor,
        generator: torch.Generator,
    ) -> None:
        """Fold one batch in. latent_acts: (chunks, chunk_len, n_latents); window_ids: the
        ids of the batch's whole windows, in order."""
        # Every token counts for firing statistics, also those past the last whole window.
        self.firing_count += (latent_acts > 0).sum(dim=(0, 1))
        self.max_activation = torch.maximum(self.max_activation, latent_acts.amax(dim=(0, 1)))
        width = self.top_tokens.shape[2]
        used = (latent_acts.shape[1] // width) * width
        token_acts = latent_acts[:, :used].reshape(-1, width, latent_acts.shape[-1])
        window_max = token_acts.amax(dim=1)  # (n_windows, n_latents)
        per_latent = token_acts.permute(2, 0, 1)  # (n_latents, n_windows, W), a view
        values = window_max.T  # (n_latents, n_windows)
        fires = values > 0

        self.top_value, self.top_window, self.top_tokens = _merge(
            self.top_value, self.top_window, self.top_tokens, values, window_ids, per_latent
        )
        keys = torch.rand(values.shape, generator=generator).to(values.device)
        sample_keys = torch.where(fires, keys, -1.0)
        merged = _merge(
            self.sample_key,
            self.sample_window,
            self.sample_tokens,
            sample_keys,
            window_ids,
            per_latent,
            extra=(self.sample_value, values),
        )
        self.sample_key, self.sample_window, self.sample_tokens, self.sample_value = merged
        negative_keys = torch.where(fires, -1.0, keys)
        self.negative_key, self.negative_window = _merge_ids(
            self.negative_key, self.negative_window, negative_keys, window_ids
        )


def _select(
    kept: torch.Tensor,
    kept_window: torch.Tensor,
    incoming: torch.Tensor,
    incoming_window: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-|kept| of kept ++ incoming per row, ties going to the lower window id:
    (values, slot indices, from-incoming mask)."""
    size = kept.shape[1]
    values = torch.cat([kept, incoming], dim=1)
    windows = torch.cat([kept_window, incoming_window.expand(kept.shape[0], -1)], dim=1)
    # Two stable sorts make the order (value descending, window ascending).
    by_window = windows.argsort(dim=1, stable=True)
    by_value = values.gather(1, by_window).argsort(dim=1, descending=True, stable=True)
    slot = by_window.gather(1, by_value)[:, :size]
    return values.gather(1, slot), slot, slot >= size


def _merge_ids(
    kept_key: torch.Tensor, kept_window: torch.Tensor, key: torch.Tensor, window_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`window_ids`: (n_windows,) shared by every latent, or (n_latents, n_windows)."""
    window_ids = window_ids.expand(key.shape[0], -1)
    values, slot, incoming = _select(kept_key, kept_window, key, window_ids)
    size = kept_key.shape[1]
    old = kept_window.gather(1, slot.clamp(max=size - 1))
    new = window_ids.gather(1, (slot - size).clamp(min=0))
    return values, torch.where(incoming, new, old)


def _merge(
    kept_key: torch.Tensor,
    kept_window: torch.Tensor,
    kept_tokens: torch.Tensor,
    key: torch.Tensor,
    window_ids: torch.Tensor,
    per_latent: torch.Tensor,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Keep the highest keys per latent, carrying window ids, per-token activations and,
    optionally, one more per-window value along. `window_ids`: (n_windows,) shared by every
    latent, or (n_latents, n_windows)."""
    window_ids = window_ids.expand(key.shape[0], -1)
    values, slot, incoming = _select(kept_key, kept_window, key, window_ids)
    size = kept_key.shape[1]
    old_slot = slot.clamp(max=size - 1)
    new_slot = (slot - size).clamp(min=0)
    window = torch.where(incoming, window_ids.gather(1, new_slot), kept_window.gather(1, old_slot))
    width = kept_tokens.shape[2]
    old_tokens = kept_tokens.gather(1, old_slot.unsqueeze(-1).expand(-1, -1, width))
    new_tokens = per_latent.gather(1, new_slot.unsqueeze(-1).expand(-1, -1, width))
    tokens = torch.where(incoming.unsqueeze(-1), new_tokens, old_tokens)
    if extra is None:
        return values, window, tokens
    kept_extra, incoming_extra = extra
    carried = torch.where(
        incoming, incoming_extra.gather(1, new_slot), kept_extra.gather(1, old_slot)
    )
    return values, window, tokens, carried


def _examples(tracker: _Tracker, chunks: torch.Tensor, config: CacheConfig) -> SaeWindows:
    windows_per_chunk = chunks.shape[1] // config.window
    latents: list[int] = []
    kinds: list[str] = []
    bins: list[int] = []
    ranks: list[int] = []
    window_ids: list[int] = []
    token_rows: list[np.ndarray] = []

    def add(latent: int, kind: str, bin_: int, rank: int, window: int, acts: np.ndarray) -> None:
        latents.append(latent)
        kinds.append(kind)
        bins.append(bin_)
        ranks.append(rank)
        window_ids.append(window)
        token_rows.append(acts)

    top_value = tracker.top_value.cpu().numpy()
    top_window = tracker.top_window.cpu().numpy()
    top_tokens = tracker.top_tokens.cpu().numpy()
    sample_key = tracker.sample_key.cpu().numpy()
    sample_value = tracker.sample_value.cpu().numpy()
    sample_window = tracker.sample_window.cpu().numpy()
    sample_tokens = tracker.sample_tokens.cpu().numpy()
    negative_window = tracker.negative_window.cpu().numpy()
    negative_key = tracker.negative_key.cpu().numpy()
    zeros = np.zeros(config.window, dtype=np.float32)
    for latent in range(top_value.shape[0]):
        firing = top_value[latent] > 0
        top_set = set(top_window[latent][firing].tolist())
        for rank, slot in enumerate(np.flatnonzero(firing)):
            add(latent, "top", -1, rank, int(top_window[latent, slot]), top_tokens[latent, slot])
        sampled = np.flatnonzero(sample_key[latent] >= 0)  # ordered by random priority
        if sampled.size:
            values = sample_value[latent, sampled]
            edges = np.quantile(values, np.linspace(0, 1, config.quantile_bins + 1)[1:-1])
            bin_of = np.searchsorted(edges, values, side="right")
            for bin_ in range(config.quantile_bins):
                chosen = [
                    slot
                    for slot in sampled[bin_of == bin_]
                    if int(sample_window[latent, slot]) not in top_set
                ][: config.per_quantile_bin]
                for rank, slot in enumerate(chosen):
                    window = int(sample_window[latent, slot])
                    add(latent, "quantile", bin_, rank, window, sample_tokens[latent, slot])
        negatives = np.flatnonzero(negative_key[latent] >= 0)
        for rank, slot in enumerate(negatives):
            add(latent, "random", -1, rank, int(negative_window[latent, slot]), zeros)

    ids = np.asarray(window_ids, dtype=np.int64)
    chunk_index, offset = np.divmod(ids, windows_per_chunk)
    starts = offset * config.window
    flat = chunks.numpy()
    token_ids = (
        np.stack([flat[c, s : s + config.window] for c, s in zip(chunk_index, starts, strict=True)])
        if ids.size
        else np.zeros((0, config.window), dtype=np.int64)
    )
    return SaeWindows(
        latent=np.asarray(latents, dtype=np.int64),
        kind=kinds,
        quantile_bin=np.asarray(bins, dtype=np.int64),
        rank=np.asarray(ranks, dtype=np.int64),
        token_ids=token_ids.astype(np.int32),
        activations=np.stack(token_rows).astype(np.float32)
        if token_rows
        else np.zeros((0, config.window), dtype=np.float32),
    )


def collect_latent_stats(
    activations: Activations,
    encoders: list[Encoder],
    n_latents: list[int],
    chunks: torch.Tensor,
    config: CacheConfig,
    state_path: Path | None = None,
    save_every: int = 50,
    on_progress: Callable[[int, int], None] | None = None,
    group: ProcessGroup | None = None,
    device: torch.device | None = None,
) -> list[SaeLatentStats]:
    """One pass over `chunks` shared by every SAE of one hookpoint.

    `activations` maps token ids (B, L) to hookpoint activations (B, L, d); each encoder maps
    (N, d) activations to (N, n_latents) latent activations. With `state_path` the running
    state is saved every `save_every` batches and a later call resumes from it.
    `on_progress(tokens_done, total_tokens)` is called after every batch.
    With a `group` of N processes, each folds every N-th batch (resuming from its own state
    file) and the main process returns the whole stream's statistics; the others return [].
    The token ids go to `device` (default the CPU), where the activations and the running
    state are.
    """
    group = group or ProcessGroup()
    device = device or torch.device("cpu")
    if group.is_distributed and state_path is not None:
        state_path = state_path.with_name(
            f"{state_path.stem}-rank{group.rank}of{group.world_size}{state_path.suffix}"
        )
    n_chunks, chunk_len = chunks.shape
    if config.window > chunk_len:
        raise UserError(
            f"window of {config.window} tokens is longer than the chunk length {chunk_len}: "
            "use a shorter --window or longer chunks"
        )
    windows_per_chunk = chunk_len // config.window
    total_tokens = n_chunks * chunk_len
    trackers = [_Tracker(n, config, device) for n in n_latents]
    n_batches = -(-n_chunks // config.batch_size)
    start_batch = 0
    if state_path is not None and state_path.is_file():
        saved = torch.load(state_path, weights_only=True, map_location=device)
        if saved["n_latents"] != n_latents or saved["n_chunks"] != n_chunks:
            raise UserError(
                f"saved cache state {state_path} is for other SAEs or data: delete it to restart"
            )
        start_batch = int(saved["next_batch"])
        for tracker, state in zip(trackers, saved["trackers"], strict=True):
            tracker.load(state)
        if on_progress is not None:
            on_progress(min(start_batch * config.batch_size, n_chunks) * chunk_len, total_tokens)
    for batch_index in range(start_batch, n_batches):
        if batch_index % group.world_size != group.rank:
            continue
        batch = chunks[batch_index * config.batch_size : (batch_index + 1) * config.batch_size]
        hidden = activations(batch.to(device))
        flat = hidden.reshape(-1, hidden.shape[-1])
        first_window = batch_index * config.batch_size * windows_per_chunk
        window_ids = torch.arange(
            first_window, first_window + batch.shape[0] * windows_per_chunk, device=device
        )
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + batch_index)
        for tracker, encode in zip(trackers, encoders, strict=True):
            latent_acts = encode(flat).reshape(batch.shape[0], chunk_len, -1)
            tracker.update(latent_acts, window_ids, generator)
        if state_path is not None and (
            (batch_index // group.world_size + 1) % save_every == 0 and batch_index + 1 < n_batches
        ):
            _save_state(state_path, trackers, n_latents, n_chunks, batch_index + 1)
        if on_progress is not None:
            on_progress(
                min((batch_index + 1) * config.batch_size, n_chunks) * chunk_len, total_tokens
            )
    for tracker in trackers:
        tracker.gather(group)
    if not group.is_main:
        return []
    return [
        SaeLatentStats(
            n_tokens=total_tokens,
            firing_count=tracker.firing_count.cpu().numpy(),
            max_activation=tracker.max_activation.cpu().numpy(),
            examples=_examples(tracker, chunks, config),
        )
        for tracker in trackers
    ]


def _save_state(
    path: Path, trackers: list[_Tracker], n_latents: list[int], n_chunks: int, next_batch: int
) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(
        {
            "n_latents": n_latents,
            "n_chunks": n_chunks,
            "next_batch": next_batch,
            "trackers": [tracker.state() for tracker in trackers],
        },
        temporary,
    )
    os.replace(temporary, path)
