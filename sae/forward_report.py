"""What stopping the forward pass early saves (`autointerp demo`): the subject model runs on
the embedded corpus twice, whole and stopped after the hookpoint, and the report compares
the speed and checks that the captured activations are identical."""

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sae.data import load_chunks
from sae.subject_model import capture_activations, load_model


@dataclass
class ForwardReport:
    model: str
    hookpoint: str
    n_tokens: int
    d_model: int
    tokens_per_s_full: float
    tokens_per_s_truncated: float
    identical: bool
    mean_norm: float
    top_tokens: list[tuple[str, float]]

    @property
    def speedup(self) -> float:
        return self.tokens_per_s_truncated / self.tokens_per_s_full


def run_forward_report(
    model_name: str,
    home: Path,
    hookpoint: str,
    n_chunks: int = 16,
    chunk_len: int = 128,
    batch_size: int = 8,
) -> ForwardReport:
    """Time the full and the truncated forward pass over the same chunks and compare them."""
    model, tokenizer = load_model(model_name, home)
    chunks = load_chunks("embedded", tokenizer, chunk_len, max_tokens=n_chunks * chunk_len)
    batches = chunks.split(batch_size)
    timings: dict[bool, float] = {}
    outputs: dict[bool, list[torch.Tensor]] = {}
    for stop_early in (False, True):
        start = time.perf_counter()
        outputs[stop_early] = [
            capture_activations(model, batch, [hookpoint], stop_early)[hookpoint]
            for batch in batches
        ]
        timings[stop_early] = time.perf_counter() - start
    activations = torch.cat(outputs[True]).flatten(0, 1)
    norms = activations.norm(dim=-1)
    ids = chunks.flatten()
    top = norms.topk(5)
    top_tokens = [
        (str(tokenizer.decode([int(ids[i])])), float(value))
        for value, i in zip(top.values, top.indices, strict=True)
    ]
    n_tokens = chunks.numel()
    return ForwardReport(
        model=model_name,
        hookpoint=hookpoint,
        n_tokens=n_tokens,
        d_model=activations.shape[-1],
        tokens_per_s_full=n_tokens / timings[False],
        tokens_per_s_truncated=n_tokens / timings[True],
        identical=all(
            torch.equal(a, b) for a, b in zip(outputs[False], outputs[True], strict=True)
        ),
        mean_norm=float(norms.mean()),
        top_tokens=top_tokens,
    )
