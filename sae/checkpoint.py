"""SAE checkpoints on disk: the EleutherAI sparsify layout (native) and the SAELens layout.

sparsify layout, one folder per SAE (e.g. `OUT/<hookpoint>/seed<N>/`):
    cfg.json           d_in, num_latents, k, ... plus our keys (architecture, l1_coefficient, ...)
    sae.safetensors    encoder.weight (n_latents, d_in), encoder.bias (n_latents,),
                       W_dec (n_latents, d_in), b_dec (d_in,), optional threshold (n_latents,)

SAELens layout:
    cfg.json                 d_in, d_sae, architecture, ...
    sae_weights.safetensors  W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec,
                             optional threshold (d_sae,)

Both load into one in-memory form, `SaeWeights`. Saving is atomic per file: each file is
written to a temporary name, flushed to disk and renamed over the old one, the weights before
the config, so an interrupted save leaves the previous complete file in place rather than a
truncated one; `load_sae` checks that the config and the tensor shapes agree, which catches the
one mixed state an interruption between the two renames can leave.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae.errors import UserError

SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"

# SAELens names the plain ReLU SAE "standard"; other architecture names are shared.
_TO_SAELENS_ARCH = {"relu": "standard"}
_FROM_SAELENS_ARCH = {value: key for key, value in _TO_SAELENS_ARCH.items()}


@dataclass
class SaeWeights:
    """The tensors of one SAE in sparsify's orientation, plus its config dictionary.

    `threshold` holds JumpReLU's per-latent thresholds and is None for other architectures.
    """

    encoder_weight: torch.Tensor
    encoder_bias: torch.Tensor
    W_dec: torch.Tensor  # noqa: N815 - the name every SAE codebase uses
    b_dec: torch.Tensor
    cfg: dict[str, Any] = field(default_factory=dict)
    threshold: torch.Tensor | None = None

    @property
    def n_latents(self) -> int:
        return int(self.encoder_weight.shape[0])

    def to(self, device: torch.device) -> SaeWeights:
        """The same weights on `device`."""
        threshold = None if self.threshold is None else self.threshold.to(device)
        return replace(
            self,
            encoder_weight=self.encoder_weight.to(device),
            encoder_bias=self.encoder_bias.to(device),
            W_dec=self.W_dec.to(device),
            b_dec=self.b_dec.to(device),
            threshold=threshold,
        )

    @property
    def d_in(self) -> int:
        return int(self.encoder_weight.shape[1])

    def shape_problem(self) -> str | None:
        """Describe the first inconsistent tensor shape, or None when all shapes agree."""
        if self.encoder_weight.ndim != 2:
            return f"encoder weight has shape {tuple(self.encoder_weight.shape)}, expected 2-D"
        n, d = self.encoder_weight.shape
        expected = {
            "encoder bias": (self.encoder_bias, (n,)),
            "W_dec": (self.W_dec, (n, d)),
            "b_dec": (self.b_dec, (d,)),
        }
        if self.threshold is not None:
            expected["threshold"] = (self.threshold, (n,))
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                return (
                    f"{name} has shape {tuple(tensor.shape)} but the encoder weight "
                    f"({n} latents, d_in {d}) implies {shape}"
                )
        return None


def _check_savable(weights: SaeWeights) -> None:
    problem = weights.shape_problem()
    if problem is not None:
        raise ValueError(f"refusing to save an inconsistent SAE: {problem}")


def _fsync_dir(folder: Path) -> None:
    # Makes the renames themselves durable; not every platform can open a directory.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(target: Path, write: Callable[..., object]) -> None:
    """Call `write(temp_path)`, flush it to disk, then rename it over `target`.

    A crash leaves either the old `target` or the new one, never a partial file; the trainer
    uses it for its own state files too."""
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    temp = Path(temp_name)
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _config_text(data: dict[str, Any]) -> str:
    # Serialised before anything is written, so an unserialisable config touches no file.
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _write_text(target: Path, text: str) -> None:
    write_atomically(target, lambda path: path.write_text(text))


def _write_tensors(target: Path, tensors: dict[str, torch.Tensor]) -> None:
    # safetensors needs contiguous CPU tensors that own their memory.
    ready = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    write_atomically(target, lambda path: save_file(ready, str(path)))


def save_sparsify(folder: Path, weights: SaeWeights) -> None:
    """Write `weights` as `folder/cfg.json` + `folder/sae.safetensors` (sparsify layout)."""
    _check_savable(weights)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "encoder.weight": weights.encoder_weight,
        "encoder.bias": weights.encoder_bias,
        "W_dec": weights.W_dec,
        "b_dec": weights.b_dec,
    }
    if weights.threshold is not None:
        tensors["threshold"] = weights.threshold
    cfg = _config_text({**weights.cfg, "d_in": weights.d_in, "num_latents": weights.n_latents})
    _write_tensors(folder / SPARSIFY_WEIGHTS, tensors)
    _write_text(folder / CONFIG, cfg)
    _fsync_dir(folder)


def save_saelens(folder: Path, weights: SaeWeights) -> None:
    """Write `weights` as `folder/cfg.json` + `folder/sae_weights.safetensors` (SAELens)."""
    _check_savable(weights)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W_enc": weights.encoder_weight.T,
        "b_enc": weights.encoder_bias,
        "W_dec": weights.W_dec,
        "b_dec": weights.b_dec,
    }
    if weights.threshold is not None:
        tensors["threshold"] = weights.threshold
    arch = str(weights.cfg.get("architecture", "relu"))
    cfg = _config_text(
        {
            **weights.cfg,
            "architecture": _TO_SAELENS_ARCH.get(arch, arch),
            "d_in": weights.d_in,
            "d_sae": weights.n_latents,
            "dtype": str(weights.W_dec.dtype).removeprefix("torch."),
        }
    )
    _write_tensors(folder / SAELENS_WEIGHTS, tensors)
    _write_text(folder / CONFIG, cfg)
    _fsync_dir(folder)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(
            f"{path} is missing: an SAE checkpoint folder needs cfg.json beside its weights"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(
            f"{path} is not readable JSON ({error}); re-save or re-train this checkpoint"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds {type(data).__name__}, not a JSON object; re-save it")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise UserError(
            f"{path} is corrupt or truncated ({error}); re-save or re-train this checkpoint"
        ) from None


def _require(tensors: dict[str, torch.Tensor], keys: list[str], path: Path) -> None:
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise UserError(
            f"{path} lacks tensor(s) {', '.join(missing)} (has {', '.join(sorted(tensors))}); "
            "it is not a complete SAE checkpoint"
        )


def _check_loaded(weights: SaeWeights, path: Path, count_keys: tuple[str, ...]) -> SaeWeights:
    problem = weights.shape_problem()
    if problem is not None:
        raise UserError(f"{path}: {problem}; the checkpoint is inconsistent, re-save it")
    config_path = path.parent / CONFIG
    stated = {"d_in": weights.cfg.get("d_in")}
    for key in count_keys:
        stated[key] = weights.cfg.get(key)
    actual = {"d_in": weights.d_in, **{key: weights.n_latents for key in count_keys}}
    for key, value in stated.items():
        # sparsify writes num_latents 0 when the size comes from expansion_factor.
        if value in (None, 0):
            continue
        if value != actual[key]:
            raise UserError(
                f"{config_path} says {key}={value} but {path.name} has {actual[key]}; "
                "the config and weights come from different saves, re-save the checkpoint"
            )
    return weights


def _load_sparsify(folder: Path) -> SaeWeights:
    path = folder / SPARSIFY_WEIGHTS
    cfg = _read_config(folder / CONFIG)
    tensors = _read_tensors(path)
    _require(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], path)
    weights = SaeWeights(
        encoder_weight=tensors["encoder.weight"],
        encoder_bias=tensors["encoder.bias"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        cfg=cfg,
        threshold=tensors.get("threshold"),
    )
    return _check_loaded(weights, path, ("num_latents",))


def _load_saelens(folder: Path) -> SaeWeights:
    path = folder / SAELENS_WEIGHTS
    cfg = _read_config(folder / CONFIG)
    tensors = _read_tensors(path)
    _require(tensors, ["W_enc", "b_enc", "W_dec", "b_dec"], path)
    if tensors["W_enc"].ndim != 2:
        raise UserError(f"{path}: W_enc has shape {tuple(tensors['W_enc'].shape)}, expected 2-D")
    arch = cfg.get("architecture")
    if isinstance(arch, str):
        cfg = {**cfg, "architecture": _FROM_SAELENS_ARCH.get(arch, arch)}
    weights = SaeWeights(
        encoder_weight=tensors["W_enc"].T.contiguous(),
        encoder_bias=tensors["b_enc"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        cfg=cfg,
        threshold=tensors.get("threshold"),
    )
    return _check_loaded(weights, path, ("d_sae",))


def load_sae(folder: Path) -> SaeWeights:
    """Load an SAE checkpoint folder in sparsify or SAELens layout (detected by file name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"SAE checkpoint folder {folder} does not exist; check the path")
    if (folder / SPARSIFY_WEIGHTS).is_file():
        return _load_sparsify(folder)
    if (folder / SAELENS_WEIGHTS).is_file():
        return _load_saelens(folder)
    inner = sorted(p.name for p in folder.iterdir() if p.is_dir())
    hint = f" (it has sub-folders {', '.join(inner[:5])}: point at one of them)" if inner else ""
    raise UserError(
        f"{folder} holds neither {SPARSIFY_WEIGHTS} (sparsify) nor {SAELENS_WEIGHTS} (SAELens)"
        f"{hint}; pass an SAE checkpoint folder"
    )
