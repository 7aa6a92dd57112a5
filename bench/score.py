"""Explain-and-score throughput against a real vLLM server, beside a naive loop.

Both modes explain planted latents (known rules on windows of the embedded corpus) and score
each explanation with detection and fuzzing on 20 held-out windows per scorer (10 activating,
10 not), with the same prompts and model:

- pipeline: `examples_per_request` windows per scoring request, every latent's requests in
  flight at once (bounded by the client's semaphore), detection and fuzzing concurrently;
- naive: one request at a time, one window per request, one latent after another.

Printed per mode: latents explained+scored per hour, LLM requests per latent, prompt tokens
per scored window, the server's generated tokens/s over the run (vLLM's
`vllm:generation_tokens_total` counter), parse failures; then the pipeline/naive ratio.
Each run draws new latents and seeds (print with --seed to repeat one), and the two modes
different ones, so that no mode finds its prompts in the server's prefix cache from before.

    python bench/score.py [--llm-url URL] [--latents 8] [--naive-latents 2]

Without --llm-url it starts vLLM from .venv-vllm (about two minutes) and stops it after.
"""

# The sys.path fix below must run before the imports:
# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/score.py`, this folder comes first on sys.path, where bench/queue.py
# would shadow the standard library's `queue` (which torch imports).
HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]

import argparse
import asyncio
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from sae.data import load_chunks
from service.latent_examples import LatentExamples, load_tokenizer
from service.llm.base import LLMConfig
from service.llm.openai_client import OpenAIClient
from service.llm.serve import free_port, running_server
from service.pipeline import LatentResult, explain_and_score
from service.planted import RULES, plant, to_latent_examples
from service.score_config import ScoreConfig
from service.settings import get_settings

GENERATED = "vllm:generation_tokens_total"


@dataclass
class ModeResult:
    name: str
    latents: int
    seconds: float
    results: list[LatentResult]
    server_generated: float | None

    @property
    def per_hour(self) -> float:
        return self.latents / self.seconds * 3600

    @property
    def requests(self) -> int:
        return sum(len(r.calls) for r in self.results)

    @property
    def scored_windows(self) -> int:
        return sum(s.n_examples for r in self.results for s in r.scores)

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens or 0 for r in self.results for c in r.calls)

    @property
    def scoring_prompt_tokens(self) -> int:
        return sum(c.prompt_tokens or 0 for r in self.results for s in r.scores for c in s.calls)

    @property
    def parse_failures(self) -> tuple[int, int]:
        return (
            sum(r.n_parse_failures for r in self.results),
            sum(r.n_answers for r in self.results),
        )


async def run_mode(
    name: str,
    url: str,
    latents: list[LatentExamples],
    config: ScoreConfig,
    concurrency: int,
    sequential: bool,
) -> ModeResult:
    client = OpenAIClient(LLMConfig(urls=[url], max_concurrency=concurrency))
    try:
        await client.check()
        before = await client.server_metric(GENERATED)
        started = time.monotonic()
        if sequential:
            results = [await explain_and_score(latent, config, client) for latent in latents]
        else:
            results = list(
                await asyncio.gather(
                    *(explain_and_score(latent, config, client) for latent in latents)
                )
            )
        seconds = time.monotonic() - started
        after = await client.server_metric(GENERATED)
    finally:
        await client.aclose()
    generated = after - before if before is not None and after is not None else None
    return ModeResult(name, len(latents), seconds, results, generated)


def planted(tokenizer: Any, n: int, offset: int) -> list[LatentExamples]:
    windows = load_chunks("embedded", tokenizer, chunk_len=32, max_tokens=60_000).numpy()
    names = sorted(RULES)
    return [
        to_latent_examples(
            plant(RULES[names[i % len(names)]], windows, tokenizer, seed=offset + i),
            tokenizer,
            latent_id=offset + i,
        )
        for i in range(n)
    ]


def report(mode: ModeResult) -> None:
    failures, answers = mode.parse_failures
    generated = (
        f"{mode.server_generated / mode.seconds:.1f}" if mode.server_generated is not None else "-"
    )
    print(
        f"{mode.name:>8}: {mode.latents} latents in {mode.seconds:.1f} s = "
        f"{mode.per_hour:.0f} latents/h | {mode.requests / mode.latents:.1f} requests/latent | "
        f"{mode.scoring_prompt_tokens / max(mode.scored_windows, 1):.0f} prompt tokens per "
        f"scored window ({mode.prompt_tokens / mode.latents:.0f} per latent) | server "
        f"{generated} generated tokens/s | parse failures {failures}/{answers}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-url", help="a running OpenAI-compatible server (default: start)")
    parser.add_argument("--latents", type=int, default=8, help="latents in the pipeline run")
    parser.add_argument("--naive-latents", type=int, default=2, help="latents in the naive run")
    parser.add_argument("--examples-per-request", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=64, help="pipeline requests in flight")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    args = parser.parse_args()

    home = get_settings().home
    tokenizer = load_tokenizer("smollm2", home)
    # The LLM path only: the token baseline, embedding scorer and control are not timed here.
    llm_only = ScoreConfig(
        explainers=["llm"], scorers=["detection", "fuzzing"], shuffled_control=False
    )
    pipeline_config = llm_only.model_copy(
        update={"examples_per_request": args.examples_per_request, "seed": 2 * args.seed + 1}
    )
    naive_config = llm_only.model_copy(update={"examples_per_request": 1, "seed": 2 * args.seed})
    with ExitStack() as stack:
        url = args.llm_url
        if url is None:
            print("starting vLLM (about two minutes on CPU)...", flush=True)
            url = stack.enter_context(running_server("smollm2", home, port=free_port())).url
        print(
            f"server {url}; seed {args.seed}; 20 windows per scorer (10 activating, 10 not), "
            "detection + fuzzing",
            flush=True,
        )
        naive_latents = planted(tokenizer, args.naive_latents, 2 * args.seed * 100)
        naive = asyncio.run(run_mode("naive", url, naive_latents, naive_config, 1, True))
        report(naive)
        pipeline = asyncio.run(
            run_mode(
                "pipeline",
                url,
                planted(tokenizer, args.latents, (2 * args.seed + 1) * 100),
                pipeline_config,
                args.concurrency,
                False,
            )
        )
        report(pipeline)
    speedup = pipeline.per_hour / naive.per_hour
    fewer_requests = (naive.requests / naive.latents) / (pipeline.requests / pipeline.latents)
    naive_tokens = naive.scoring_prompt_tokens / max(naive.scored_windows, 1)
    pipeline_tokens = pipeline.scoring_prompt_tokens / max(pipeline.scored_windows, 1)
    print(
        f"pipeline / naive: {speedup:.1f}x latents per hour (target >= 5x), "
        f"{fewer_requests:.1f}x fewer requests per latent, "
        f"{naive_tokens / pipeline_tokens:.1f}x fewer prompt tokens per scored window"
    )


if __name__ == "__main__":
    main()
