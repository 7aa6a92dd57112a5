"""Training SAEs of several seeds in one pass over a subject model's activations.

Every step takes one batch of activations (from the model, run once per batch, or from an
activation cache on disk) and trains every seed's SAE at every hookpoint on it. Seeds change
only the SAE initialisation: each seed's parameters come from its own `torch.Generator`,
and each seed's step runs the same operations on its own tensors whether it trains alone
or beside others, so seeds trained together are bit-identical to seeds trained separately.
Seeds are not stacked into batched (S, ...) tensors: bench/train.py measures one bmm over 4
stacked encoders against a loop of per-seed products at 29 vs 29 ms (1,152 latents) and
230 vs 229 ms (4,608 latents, one thread) on this 2-core CPU, so stacking buys nothing
here, and per-seed tensors make the equality hold by construction instead of depending on
how a BLAS splits a batched product. The expensive parts of the backward pass are sparse
instead (see `sae.architectures.sparse`). One Adam (fused, elementwise) covers all seeds.

Before training, inputs are scaled so their mean norm is sqrt(d_in) (one scale per
hookpoint, from the first batch; architectures' default coefficients assume it) and b_dec
starts at the geometric median of that batch. Checkpoints fold the scale away.

Output folder `OUT`:
    train_config.json                  the `TrainConfig` this run was started with
    train_state.safetensors            everything resume needs: parameters, Adam moments,
                                       dead-latent counters, input scales, step (written
                                       atomically; the one source of truth for resume)
    <hookpoint>/seed<N>/cfg.json       sparsify layout, refreshed at every checkpoint
    <hookpoint>/seed<N>/sae.safetensors
    <hookpoint>/seed<N>/metrics.jsonl  one line per log interval: FVU, L0, dead fraction, ...
    train_result.json                  final metrics per SAE, once finished
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sae.activation_cache import (
    ActivationCache,
    CacheDtype,
    build_activation_cache,
    read_manifest,
)
from sae.architectures import SaeConfig, SparseAutoencoder, auto_learning_rate, get_architecture
from sae.architectures.base import total_variance
from sae.checkpoint import save_sparsify, write_atomically
from sae.distributed import Device, ProcessGroup, process_device, process_group
from sae.errors import UserError
from sae.precision import Precision, compute_dtype

CONFIG_FILE = "train_config.json"
STATE_FILE = "train_state.safetensors"
RESULT_FILE = "train_result.json"
METRICS_FILE = "metrics.jsonl"


class TrainConfig(BaseModel):
    """Everything that decides the trained weights; saved beside them as train_config.json."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        default="smollm2", description="subject model: embedded name, folder or HF id"
    )
    hookpoints: list[str] = Field(
        default_factory=lambda: ["model.layers.6.mlp"], description="modules to capture"
    )
    dataset: str = Field(
        default="embedded", description="embedded, a .txt/.jsonl path or HF dataset"
    )
    chunk_len: int = Field(default=256, description="tokens per model forward sequence")
    max_tokens: int | None = Field(
        default=None, description="distinct dataset tokens to use (default all)"
    )
    data_seed: int = Field(default=0, description="seed of the data order")
    activation_cache: str | None = Field(
        default=None, description="train from this activation cache instead of running the model"
    )
    sae: SaeConfig = Field(default_factory=SaeConfig)
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2], description="seeds, all trained in one pass"
    )
    epochs: int = Field(default=1, description="passes over those tokens")
    batch_tokens: int = Field(default=1024, description="tokens per optimizer step")
    lr: float | None = Field(
        default=None, description="Adam learning rate (default 1e-3/sqrt(n_latents/2^14))"
    )
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # linear decay to zero over this last part of training
    dead_tokens: int = Field(
        default=200_000, description="tokens without firing before a latent is dead"
    )
    normalize_input: bool = True
    log_every: int = 10
    precision: Precision = Field(
        default="auto",
        description="dtype of the model forward and of the SAE encoder product that picks "
        "the active latents: auto (bfloat16 on a GPU, and where this CPU runs it faster), "
        "float32 or bfloat16; weights, gradients and the optimizer stay float32",
    )
    device: Device = Field(
        default="auto",
        description="where to train: auto (this process's GPU when torch sees CUDA, else "
        "the CPU), cpu or cuda; a run may resume on another device",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not self.seeds:
            raise UserError("no seeds given: pass e.g. --seeds 0,1,2")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds {self.seeds} repeat a seed: list each seed once")
        if any(seed < 0 for seed in self.seeds):
            raise UserError(f"seeds {self.seeds} include a negative seed: use seeds >= 0")
        if not self.hookpoints or len(set(self.hookpoints)) != len(self.hookpoints):
            raise UserError("hookpoints must be given, each once: pass --hookpoint NAME")
        for name, value, least in (
            ("epochs", self.epochs, 1),
            ("batch tokens", self.batch_tokens, 1),
            ("log interval", self.log_every, 1),
            ("dead-latent window", self.dead_tokens, 1),
            ("chunk length", self.chunk_len, 2),
        ):
            if value < least:
                raise UserError(f"{name} {value} is out of range: use at least {least}")
        if self.max_tokens is not None and self.max_tokens < self.chunk_len:
            raise UserError(
                f"--tokens {self.max_tokens} is less than one chunk ({self.chunk_len}): "
                "ask for more tokens"
            )
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"learning rate {self.lr} is out of range: use a positive number")
        if not 0 <= self.decay_fraction <= 1 or self.warmup_steps < 0:
            raise UserError("decay_fraction must lie in [0, 1] and warmup_steps be >= 0")
        if self.activation_cache is None and self.batch_tokens % self.chunk_len:
            raise UserError(
                f"--batch-tokens {self.batch_tokens} is not a multiple of the chunk length "
                f"{self.chunk_len}: batches are whole chunks when the model runs in the loop"
            )
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else auto_learning_rate(self.sae.n_latents)


@dataclass
class TrainProgress:
    """Reported after every step to `on_progress`."""

    step: int
    total_steps: int
    tokens: int
    total_tokens: int
    fvu: float  # mean over SAEs of the last logged values (nan before the first log)
    l0: float
    dead_fraction: float


@dataclass
class TrainedSae:
    hookpoint: str
    seed: int
    path: Path
    fvu: float
    l0: float
    dead_fraction: float


@dataclass
class TrainResult:
    out: Path
    step: int
    total_steps: int
    tokens: int
    tokens_per_epoch: int = 0
    start_step: int = 0  # > 0 when this call resumed a checkpoint
    interrupted: bool = False
    already_finished: bool = False
    seconds: float = 0.0  # time spent in training steps by this call
    tokens_trained: int = 0  # tokens trained by this call
    saes: list[TrainedSae] = field(default_factory=list)
    # The dtype `precision` resolved to on this machine (empty when nothing was trained).
    compute_dtype: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_trained / self.seconds if self.seconds > 0 else float("nan")


class ActivationSource(Protocol):
    """Batches of activations addressed by (epoch, index), so resume can jump to any step.
    `batch` gives this process's share of the batch (all of it in a single process);
    `first_batch` the whole first batch, which every process initialises from."""

    steps_per_epoch: int

    def widths(self) -> dict[str, int]: ...

    def first_batch(self) -> dict[str, torch.Tensor]: ...

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]: ...


def _check_divides(what: str, count: int, group: ProcessGroup) -> None:
    if count % group.world_size:
        raise UserError(
            f"{what} ({count:,}) does not divide among {group.world_size} processes: "
            f"choose a multiple of {group.world_size}"
        )


def epoch_order(n_items: int, data_seed: int, epoch: int) -> torch.Tensor:
    """The order items are visited in one epoch: fixed by (data seed, epoch)."""
    generator = torch.Generator().manual_seed(1_000_003 * data_seed + epoch)
    return torch.randperm(n_items, generator=generator)


class ModelSource:
    """Runs the subject model (stopped after the deepest hookpoint) on whole chunks."""

    def __init__(
        self, config: TrainConfig, home: Path, group: ProcessGroup, device: torch.device
    ) -> None:
        # Imported here: transformers takes seconds to import; cache-only runs skip it.
        from sae.data import load_chunks
        from sae.subject_model import load_model

        self.model, tokenizer = load_model(
            config.model, home, device=device, hookpoints=config.hookpoints
        )
        self.device = device
        self.low_precision = compute_dtype(config.precision, device.type) == torch.bfloat16
        self.chunks = load_chunks(
            config.dataset, tokenizer, config.chunk_len, config.max_tokens, config.data_seed
        )
        self.hookpoints = config.hookpoints
        self.data_seed = config.data_seed
        self.chunks_per_batch = config.batch_tokens // config.chunk_len
        _check_divides(
            "chunks per batch (batch tokens / chunk length)", self.chunks_per_batch, group
        )
        self.group = group
        self.steps_per_epoch = self.chunks.shape[0] // self.chunks_per_batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"dataset has {self.chunks.numel():,} tokens, fewer than one batch of "
                f"{config.batch_tokens:,}: lower --batch-tokens or give more data"
            )
        self._order: tuple[int, torch.Tensor] | None = None
        self._first: dict[str, torch.Tensor] | None = None

    def first_batch(self) -> dict[str, torch.Tensor]:
        # Kept: it gives the widths and the initial statistics, and training starts with it;
        # computing it once saves a forward pass.
        if self._first is None:
            self._first = self._capture(0, 0, ProcessGroup())
        return self._first

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        if (epoch, index) == (0, 0):
            # Whole chunks per process, so the share of tokens is the share of chunks.
            return {name: self.group.shard(rows) for name, rows in self.first_batch().items()}
        return self._capture(epoch, index, self.group)

    def _capture(self, epoch: int, index: int, group: ProcessGroup) -> dict[str, torch.Tensor]:
        from sae.subject_model import capture_activations

        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.chunks.shape[0], self.data_seed, epoch))
        start = index * self.chunks_per_batch
        ids = self.chunks[group.shard(self._order[1][start : start + self.chunks_per_batch])]
        ids = ids.to(self.device)
        # bfloat16 autocast runs the model's matrix products on the bfloat16 units; the
        # activations it gives differ from float32's by about 0.6% (relative norm).
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.low_precision):
            captured = capture_activations(self.model, ids, self.hookpoints)
        return {name: tensor.flatten(0, 1).float() for name, tensor in captured.items()}

    def widths(self) -> dict[str, int]:
        return {name: int(tensor.shape[1]) for name, tensor in self.first_batch().items()}


class CacheSource:
    """Reads random token batches from an activation cache; each epoch is a permutation."""

    def __init__(
        self,
        config: TrainConfig,
        cache: ActivationCache,
        group: ProcessGroup,
        device: torch.device,
    ) -> None:
        cache.check_hookpoints(config.hookpoints)
        _check_divides("batch tokens", config.batch_tokens, group)
        self.group = group
        self.device = device
        self.cache = cache
        self.hookpoints = config.hookpoints
        self.data_seed = config.data_seed
        self.batch_tokens = config.batch_tokens
        self.steps_per_epoch = cache.n_tokens // config.batch_tokens
        if self.steps_per_epoch == 0:
            raise UserError(
                f"activation cache has {cache.n_tokens:,} tokens, fewer than one batch of "
                f"{config.batch_tokens:,}: lower --batch-tokens"
            )
        self._order: tuple[int, torch.Tensor] | None = None

    def widths(self) -> dict[str, int]:
        return {name: self.cache.width(name) for name in self.hookpoints}

    def first_batch(self) -> dict[str, torch.Tensor]:
        return self._read(0, 0, ProcessGroup())

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        return self._read(epoch, index, self.group)

    def _read(self, epoch: int, index: int, group: ProcessGroup) -> dict[str, torch.Tensor]:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.cache.n_tokens, self.data_seed, epoch))
        start = index * self.batch_tokens
        rows = group.shard(self._order[1][start : start + self.batch_tokens].sort().values)
        return {name: self.cache.read(name, rows).to(self.device) for name in self.hookpoints}


def config_from_cache(folder: Path, **fields: Any) -> TrainConfig:
    """A config that trains from an activation cache; model, dataset and chunking come from
    the cache's manifest, hookpoints default to all of the cache's."""
    manifest = read_manifest(Path(folder))
    if manifest is None:
        raise UserError(
            f"{folder} is not an activation cache (no manifest.json): build one with "
            "`autointerp cache-activations`"
        )
    return TrainConfig(
        activation_cache=str(folder),
        model=manifest.model,
        dataset=manifest.dataset,
        chunk_len=manifest.chunk_len,
        max_tokens=manifest.max_tokens,
        data_seed=manifest.data_seed,
        **{"hookpoints": list(manifest.hookpoints), **fields},
    )


def cache_activations(
    config: TrainConfig,
    folder: Path,
    home: Path,
    dtype: CacheDtype = "float16",
    on_progress: Callable[[int, int], None] | None = None,
) -> ActivationCache:
    """Cache in `folder` the activations `config` trains on: its model, hookpoints, dataset,
    tokens, chunking and data order (resumable, like `build_activation_cache`)."""
    return build_activation_cache(
        folder,
        config.model,
        config.hookpoints,
        home,
        dataset=config.dataset,
        chunk_len=config.chunk_len,
        max_tokens=config.max_tokens,
        data_seed=config.data_seed,
        dtype=dtype,
        on_progress=on_progress,
    )


def open_source(
    config: TrainConfig, home: Path, group: ProcessGroup, device: torch.device
) -> ActivationSource:
    if config.activation_cache is None:
        return ModelSource(config, home, group, device)
    cache = ActivationCache(Path(config.activation_cache))
    cache.check_source(
        config.model,
        config.dataset,
        config.chunk_len,
        config.max_tokens,
        config.data_seed,
        config.hookpoints,
    )
    return CacheSource(config, cache, group, device)


def geometric_median(points: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Point minimising the summed distance to `points` (Weiszfeld's iteration)."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        converged = (updated - median).norm() <= 1e-6 * median.norm().clamp_min(1e-12)
        median = updated
        if converged:
            break
    return median


def learning_rate_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last `decay_fraction`."""
    factor = 1.0
    if config.warmup_steps > 0:
        factor = min(factor, (step + 1) / config.warmup_steps)
    decay_steps = config.decay_fraction * total_steps
    if decay_steps > 0:
        factor = min(factor, (total_steps - step) / decay_steps)
    return config.learning_rate * factor


@dataclass
class _SeedRun:
    """One SAE being trained, with its dead-latent counters and metrics since the last log."""

    hookpoint: str
    seed: int
    sae: SparseAutoencoder
    tokens_since_fired: torch.Tensor
    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    @property
    def key(self) -> str:
        return f"{self.hookpoint}/seed{self.seed}"

    def dead_fraction(self, dead_tokens: int) -> float:
        return float((self.tokens_since_fired >= dead_tokens).float().mean())


def sae_folder(out: Path, hookpoint: str, seed: int) -> Path:
    return out / hookpoint / f"seed{seed}"


@contextmanager
def _stop_requests() -> Iterator[Callable[[], bool]]:
    """While active, the first Ctrl-C only asks the loop to checkpoint and stop at the next
    step boundary (a step cut in half would leave parameters and Adam state out of step);
    a second Ctrl-C interrupts at once, losing only the work since the last checkpoint."""
    requested = False

    def handler(_signum: int, _frame: object) -> None:
        nonlocal requested
        if requested:
            raise KeyboardInterrupt
        requested = True

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: requested
    finally:
        signal.signal(signal.SIGINT, previous)


def _shown(value: object) -> str:
    # Lists printed without brackets: the CLI prints errors as rich markup.
    return ", ".join(map(str, value)) if isinstance(value, list) else repr(value)


def _config_differences(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    """What differs between a saved run's config and this one, the device aside (a run may
    resume on another device)."""
    old = {**saved.model_dump(exclude={"sae", "device"}), **saved.sae.model_dump()}
    new = {**wanted.model_dump(exclude={"sae", "device"}), **wanted.sae.model_dump()}
    return [
        f"{key} {_shown(old.get(key))} -> {_shown(value)}"
        for key, value in new.items()
        if old.get(key) != value
    ]


def _read_saved_config(out: Path) -> TrainConfig | None:
    path = out / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        # Runs saved before `precision` existed ran in float32.
        if isinstance(saved, dict):
            saved.setdefault("precision", "float32")
        return TrainConfig.model_validate(saved)
    except (OSError, ValueError) as error:
        raise UserError(
            f"{path} is unreadable ({str(error).splitlines()[0]}): use another --out"
        ) from None


@dataclass
class _SavedState:
    tensors: dict[str, torch.Tensor]
    step: int
    widths: dict[str, int]


def _read_state(out: Path) -> _SavedState | None:
    path = out / STATE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})["state"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        return _SavedState(tensors, int(meta["step"]), dict(meta["widths"]))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise UserError(
            f"checkpoint {path} is corrupt or truncated ({str(error).splitlines()[0]}): "
            "delete it to start over, or use another --out"
        ) from None


class _Trainer:
    def __init__(
        self,
        config: TrainConfig,
        out: Path,
        source: ActivationSource,
        widths: dict[str, int],
        saved: _SavedState | None,
        group: ProcessGroup,
        device: torch.device,
    ) -> None:
        self.config = config
        self.group = group
        self.device = device
        self.out = out
        self.source = source
        self.total_steps = source.steps_per_epoch * config.epochs
        architecture = get_architecture(config.sae.architecture)
        self.runs = [
            _SeedRun(
                hookpoint,
                seed,
                # Initialised on the CPU from the seed's generator, then moved: a seed starts
                # from the same parameters on every device.
                architecture(widths[hookpoint], config.sae, seed).to(device),
                torch.zeros(config.sae.n_latents, dtype=torch.int64, device=device),
            )
            for hookpoint in config.hookpoints
            for seed in config.seeds
        ]
        self.compute_dtype = compute_dtype(config.precision, device.type)
        for run in self.runs:
            run.sae.selection_dtype = self.compute_dtype
        self.optimizer = torch.optim.Adam(
            [parameter for run in self.runs for parameter in run.sae.parameters()],
            lr=config.learning_rate,
            # One pass per element instead of several; elementwise, so still per-seed exact.
            fused=True,
        )
        self.scales: dict[str, torch.Tensor] = {}
        self.step = 0
        self.latest: dict[str, dict[str, float]] = {}
        if saved is None:
            self._initialise_from_data()
        else:
            self._load(saved)

    def _initialise_from_data(self) -> None:
        first = self.source.first_batch()
        for hookpoint in self.config.hookpoints:
            x = first[hookpoint]
            scale = 1.0
            if self.config.normalize_input:
                scale = math.sqrt(x.shape[1]) / float(x.norm(dim=1).mean().clamp_min(1e-12))
            self.scales[hookpoint] = torch.tensor(scale, dtype=torch.float32, device=self.device)
            b_dec = geometric_median(x * self.scales[hookpoint])
            for run in self.runs:
                if run.hookpoint == hookpoint:
                    with torch.no_grad():
                        run.sae.b_dec.copy_(b_dec)
                    run.sae.initialise_from_data(x * self.scales[hookpoint])

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"{name}/input_scale": scale for name, scale in self.scales.items()}
        for run in self.runs:
            for name, tensor in run.sae.state_dict().items():
                tensors[f"{run.key}/module/{name}"] = tensor
            for name, parameter in run.sae.named_parameters():
                for slot, value in self.optimizer.state.get(parameter, {}).items():
                    tensors[f"{run.key}/adam/{name}/{slot}"] = value
            tensors[f"{run.key}/tokens_since_fired"] = run.tokens_since_fired
        return tensors

    def _load(self, saved: _SavedState) -> None:
        tensors = {key: value.to(self.device) for key, value in saved.tensors.items()}
        try:
            self.scales = {name: tensors[f"{name}/input_scale"] for name in self.config.hookpoints}
            for run in self.runs:
                prefix = f"{run.key}/module/"
                run.sae.load_state_dict(
                    {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                )
                for name, parameter in run.sae.named_parameters():
                    slots = f"{run.key}/adam/{name}/"
                    state = {k[len(slots) :]: v for k, v in tensors.items() if k.startswith(slots)}
                    if state:
                        self.optimizer.state[parameter] = state
                run.tokens_since_fired = tensors[f"{run.key}/tokens_since_fired"].clone()
        except (KeyError, RuntimeError) as error:
            raise UserError(
                f"checkpoint {self.out / STATE_FILE} does not fit this run "
                f"({str(error).splitlines()[0]}): delete it or use another --out"
            ) from None
        self.step = saved.step

    def train_step(self) -> None:
        config = self.config
        epoch, index = divmod(self.step, self.source.steps_per_epoch)
        batch = self.source.batch(epoch, index)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate_at(config, self.step, self.total_steps)
        progress = self.step / self.total_steps
        for hookpoint in config.hookpoints:
            x = batch[hookpoint] * self.scales[hookpoint]
            n_tokens = x.shape[0] * self.group.world_size
            variance = self._variance(x)
            for run in self.runs:
                if run.hookpoint != hookpoint:
                    continue
                dead = run.tokens_since_fired >= config.dead_tokens
                output = run.sae.step(x, variance, dead, progress)
                # One backward per seed: each seed's graph is freed before the next is built.
                output.loss.backward()
                run.tokens_since_fired += n_tokens
                run.tokens_since_fired[self._fired_anywhere(output.fired)] = 0
                for name, value in (
                    ("fvu", output.fvu),
                    ("l0", output.l0),
                    ("auxiliary_loss", output.auxiliary_loss),
                ):
                    run.sums[name] = run.sums.get(name, 0.0) + value
                run.steps += 1
        self._average_gradients()
        for run in self.runs:
            run.sae.remove_parallel_gradient()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for run in self.runs:
            run.sae.normalise_decoder()
        self.step += 1

    def _variance(self, x: torch.Tensor) -> torch.Tensor:
        """The FVU denominator for this process's share x of the batch. Each process's loss
        sums squared errors over its own tokens only, so it divides by the whole batch's
        variance over the number of processes: the mean of the processes' gradients is then
        the whole batch's gradient, as is the mean of their per-token penalties'."""
        if not self.group.is_distributed:
            return total_variance(x)
        sums = self.group.sum(torch.cat([x.sum(dim=0), x.new_tensor([x.shape[0]])]))
        spread = self.group.sum((x - sums[:-1] / sums[-1]).pow(2).sum().reshape(1))
        return spread[0].clamp_min(1e-12) / self.group.world_size

    def _fired_anywhere(self, fired: torch.Tensor) -> torch.Tensor:
        if not self.group.is_distributed:
            return fired
        return self.group.sum(fired.to(torch.int32)) > 0

    def _average_gradients(self) -> None:
        """Every SAE's gradients averaged over the processes, in place, one all-reduce per
        parameter (DDP's job, done by hand: the seeds' SAEs are plain modules trained by one
        optimizer). In place, not through one flat copy: at 131,072 latents of d = 4,096 the
        gradients of 4 seeds take 16 GiB."""
        if not self.group.is_distributed:
            return
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                self.group.average(parameter.grad)

    def log(self) -> None:
        """Append one metrics line per SAE covering the steps since the last log (their
        mean over the processes; the main process writes)."""
        tokens = self.step * self.config.batch_tokens
        for run in self.runs:
            if run.steps == 0:
                continue
            names = sorted(run.sums)
            sums = torch.tensor([run.sums[name] for name in names], dtype=torch.float64)
            means = self.group.average(sums)
            line = {
                "step": self.step,
                "tokens": tokens,
                "epoch": (self.step - 1) // self.source.steps_per_epoch,
                **{name: float(mean) / run.steps for name, mean in zip(names, means, strict=True)},
                "dead_fraction": run.dead_fraction(self.config.dead_tokens),
                "lr": self.optimizer.param_groups[0]["lr"],
                "time": time.time(),
            }
            self.latest[run.key] = line
            run.sums, run.steps = {}, 0
            if not self.group.is_main:
                continue
            folder = sae_folder(self.out, run.hookpoint, run.seed)
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / METRICS_FILE, "a") as handle:
                handle.write(json.dumps(line) + "\n")

    def checkpoint(self) -> None:
        self.log()
        if self.group.is_main:
            self._write_checkpoint()
        # No process goes on (or exits, or resumes) before the checkpoint is on disk.
        self.group.barrier()

    def _write_checkpoint(self) -> None:
        tensors = {k: v.detach().to("cpu", copy=True) for k, v in self._state_tensors().items()}
        meta = {"state": json.dumps({"step": self.step, "widths": self.widths()})}
        write_atomically(
            self.out / STATE_FILE, lambda path: save_file(tensors, str(path), metadata=meta)
        )
        for run in self.runs:
            weights = run.sae.export(float(self.scales[run.hookpoint]))
            weights.cfg["hookpoint"] = run.hookpoint
            weights.cfg["seed"] = run.seed
            weights.cfg["tokens_trained"] = self.step * self.config.batch_tokens
            save_sparsify(sae_folder(self.out, run.hookpoint, run.seed), weights)

    def widths(self) -> dict[str, int]:
        return {run.hookpoint: run.sae.d_in for run in self.runs}

    def progress(self) -> TrainProgress:
        def mean(name: str) -> float:
            values = [line[name] for line in self.latest.values()]
            return sum(values) / len(values) if values else float("nan")

        return TrainProgress(
            step=self.step,
            total_steps=self.total_steps,
            tokens=self.step * self.config.batch_tokens,
            total_tokens=self.total_steps * self.config.batch_tokens,
            fvu=mean("fvu"),
            l0=mean("l0"),
            dead_fraction=mean("dead_fraction"),
        )


def _truncate_metrics(out: Path, config: TrainConfig, step: int) -> None:
    """Drop metric lines logged after the checkpoint being resumed (they will be redone)."""
    for hookpoint in config.hookpoints:
        for seed in config.seeds:
            path = sae_folder(out, hookpoint, seed) / METRICS_FILE
            if not path.is_file():
                continue
            lines = path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
            if len(kept) != len(lines):
                text = "".join(line + "\n" for line in kept)
                write_atomically(path, lambda target, text=text: target.write_text(text))


def _final_metrics(path: Path, total_steps: int) -> dict[str, float]:
    """Mean of the metric lines of the last tenth of training (at least the last line)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        return {"fvu": float("nan"), "l0": float("nan"), "dead_fraction": float("nan")}
    tail = [line for line in lines if line["step"] > 0.9 * total_steps] or lines[-1:]
    return {
        name: sum(line[name] for line in tail) / len(tail)
        for name in ("fvu", "l0", "dead_fraction")
    }


def _result(out: Path, config: TrainConfig, step: int, total_steps: int) -> list[TrainedSae]:
    saes = []
    for hookpoint in config.hookpoints:
        for seed in config.seeds:
            folder = sae_folder(out, hookpoint, seed)
            metrics = _final_metrics(folder / METRICS_FILE, total_steps)
            saes.append(TrainedSae(hookpoint, seed, folder, **metrics))
    return saes


def _write_result(out: Path, result: TrainResult) -> None:
    data: dict[str, Any] = {
        "steps": result.step,
        "tokens": result.tokens,
        "compute_dtype": result.compute_dtype,
        "saes": [
            {
                "hookpoint": sae.hookpoint,
                "seed": sae.seed,
                "path": str(sae.path.relative_to(out)),
                "fvu": sae.fvu,
                "l0": sae.l0,
                "dead_fraction": sae.dead_fraction,
            }
            for sae in result.saes
        ],
    }
    text = json.dumps(data, indent=2) + "\n"
    write_atomically(out / RESULT_FILE, lambda path: path.write_text(text))


def train(
    config: TrainConfig,
    out: Path,
    home: Path,
    on_progress: Callable[[TrainProgress], None] | None = None,
    stop_after_steps: int | None = None,
    checkpoint_seconds: float = 300.0,
) -> TrainResult:
    """Train (or resume training) every seed's SAE at every hookpoint; write OUT as above.

    Resumes from OUT's checkpoint when OUT holds a run with the same config. Ctrl-C (or
    `stop_after_steps` steps in this call) saves a checkpoint and returns with
    `interrupted=True`; a checkpoint is also written every `checkpoint_seconds`.
    All checks (config, checkpoint, data, widths) happen before anything is written.

    Under torchrun, each process trains on its share of every batch (data parallel, gradients
    averaged, the same global batch as one process); rank 0 writes, every rank resumes from
    the same checkpoint, and Ctrl-C stops them all at the same step.
    """
    out = Path(out)
    group = process_group()
    saved_config = _read_saved_config(out)
    changes = "; ".join(_config_differences(saved_config, config)) if saved_config else ""
    if changes:
        raise UserError(
            f"{out} holds a run with a different config ({changes}): use another --out, or "
            "delete that folder to start over"
        )
    saved = _read_state(out) if saved_config is not None else None
    device = process_device(config.device)
    source = open_source(config, home, group, device)
    widths = source.widths()
    if saved is not None and saved.widths != widths:
        raise UserError(
            f"checkpoint in {out} has d_in {saved.widths} but the activations have "
            f"{widths}: the data or model changed; use another --out"
        )
    total_steps = source.steps_per_epoch * config.epochs
    batch_tokens = config.batch_tokens
    if saved is not None and saved.step >= total_steps:
        return TrainResult(
            out,
            saved.step,
            total_steps,
            saved.step * batch_tokens,
            tokens_per_epoch=source.steps_per_epoch * batch_tokens,
            start_step=saved.step,
            already_finished=True,
            saes=_result(out, config, saved.step, total_steps),
        )
    trainer = _Trainer(config, out, source, widths, saved, group, device)
    # Every process has read the saved config and state before the main one writes.
    group.barrier()
    if group.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if saved_config is None:
            text = config.model_dump_json(indent=2) + "\n"
            write_atomically(out / CONFIG_FILE, lambda path: path.write_text(text))
        _truncate_metrics(out, config, trainer.step)

    start_step = trainer.step
    started = time.perf_counter()
    last_checkpoint = started
    interrupted = False
    with _stop_requests() as stop_requested:
        while trainer.step < total_steps:
            if group.any(stop_requested()) or (
                stop_after_steps is not None and trainer.step - start_step >= stop_after_steps
            ):
                interrupted = True
                break
            trainer.train_step()
            if trainer.step % config.log_every == 0:
                trainer.log()
            if on_progress is not None:
                on_progress(trainer.progress())
            # The main process's clock decides, so all processes checkpoint at the same step.
            due = time.perf_counter() - last_checkpoint >= checkpoint_seconds
            if group.any(due and group.is_main):
                trainer.checkpoint()
                last_checkpoint = time.perf_counter()
        if device.type == "cuda":
            # The GPU runs behind the loop: the time counts its queued steps too.
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        trainer.checkpoint()
    result = TrainResult(
        out,
        trainer.step,
        total_steps,
        trainer.step * batch_tokens,
        tokens_per_epoch=source.steps_per_epoch * batch_tokens,
        start_step=start_step,
        interrupted=interrupted,
        seconds=seconds,
        tokens_trained=(trainer.step - start_step) * batch_tokens,
        saes=_result(out, config, trainer.step, total_steps),
        compute_dtype=str(trainer.compute_dtype).removeprefix("torch."),
    )
    if not interrupted and group.is_main:
        _write_result(out, result)
    group.barrier()
    return result
