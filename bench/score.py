"""Explain-and-score throughput against a real vLLM server, beside a naive loop.

Both modes explain planted latents (known rules on windows of the embedded corpus) and score
each explanation with detection and fuzzing on 20 held-out windows per scorer (10 activating,
10 not), with the same prompts and model:

- pipeline: `examples_per_request` windows per scoring request, every latent's requests in
  flight at once (bounded by the client's semaphore), detection and fuzzing concurrently;
- naive: one request at a time, one window per request, one latent after another.

Two job configs, each timed in both modes:
- "llm only": the LLM explainer alone, no control;
- "with controls": what `autointerp score` does by default (without the in-process embedding
  scorer): the LLM explainer and the token baseline, and the shuffled control (each latent
  also scored with another latent's explanations), so every held-out window is scored under
  four explanations. Scoring prompts put the windows before the explanation, so the server's
  prefix cache computes a latent's windows once for all its explanations.

Printed per mode: latents explained+scored per hour, LLM requests per latent, prompt tokens
per scored window, the server's generated tokens/s over the run (vLLM's
`vllm:generation_tokens_total` counter) and its prefix-cache hit rate, parse failures; then
the pipeline/naive ratio. Each run draws new latents and seeds (print with --seed to repeat
one), and each mode different ones, so that no mode finds its prompts in the server's prefix
cache from before.

    python -m bench.score [--llm-url URL] [--latents 8] [--naive-latents 2] [--precision auto]

Without --llm-url it starts vLLM from .venv-vllm (about two minutes) and stops it after.

    python -m bench.score --explain-calls [--latents 24]

counts instead, through the store and the worker and with no LLM (the token baseline
explains, the embedding scorer scores, each latent also scored with a shuffled control's
explanation), how many explanations are made per latent: with an LLM explainer each is one
explain request.

    python -m bench.score --in-process [--requests 8]

times the in-process (transformers) backend on the scoring requests the pipeline makes for
one planted latent (detection and fuzzing, 10 windows per request, JSON schema, logprobs,
greedy): generated tokens/s with the requests sent one at a time in float32 without the
prefix cache (the backend before both), one at a time with the defaults (the prefix cache,
and bfloat16 where this CPU multiplies it faster), then all at once (decoded in batches of
`LLMConfig.max_batch`), and the ratios. Every mode feeds the tokens a schema forces without
a step of their own.
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
import json
import os
import time
from collections.abc import Awaitable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, get_args

from sae.data import load_chunks
from sae.precision import Precision
from sae.subject_model import load_tokenizer
from service.cache.windows import LatentExamples
from service.config import LLMConfig, ScoreConfig, get_settings
from service.config.llm import DEFAULT_MAX_BATCH, DEFAULT_PREFIX_CACHE_TOKENS
from service.llm.base import CallRecord, Completion, LLMClient, Message, SamplingParams
from service.llm.openai_client import OpenAIClient
from service.llm.serve import free_port, running_server, serving_dtype
from service.scoring.pipeline import LatentResult, explain_and_score
from service.scoring.planted import RULES, plant, to_latent_examples

GENERATED = "vllm:generation_tokens_total"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
COUNTERS = (GENERATED, PREFIX_QUERIES, PREFIX_HITS)


@dataclass
class ModeResult:
    name: str
    latents: int
    seconds: float
    results: list[LatentResult]
    counters: dict[str, float | None]

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

    def rate(self, counter: str) -> str:
        value = self.counters[counter]
        return "-" if value is None else f"{value / self.seconds:.1f}"

    @property
    def prefix_hit_rate(self) -> str:
        hits, queries = self.counters[PREFIX_HITS], self.counters[PREFIX_QUERIES]
        return "-" if hits is None or not queries else f"{hits / queries:.0%}"


async def run_mode(
    name: str,
    url: str,
    latents: list[LatentExamples],
    config: ScoreConfig,
    concurrency: int,
    sequential: bool,
) -> ModeResult:
    """Explain and score every latent; latent i's shuffled control is latent i + 1."""
    client = OpenAIClient(LLMConfig(urls=[url], max_concurrency=concurrency))
    controls = latents[1:] + latents[:1]

    def job(index: int) -> Awaitable[LatentResult]:
        return explain_and_score(latents[index], config, client, controls[index])

    try:
        await client.check()
        before = {counter: await client.server_metric(counter) for counter in COUNTERS}
        started = time.monotonic()
        if sequential:
            results = [await job(index) for index in range(len(latents))]
        else:
            results = list(await asyncio.gather(*(job(index) for index in range(len(latents)))))
        seconds = time.monotonic() - started
        after = {counter: await client.server_metric(counter) for counter in COUNTERS}
    finally:
        await client.aclose()
    counters = {
        counter: None
        if before[counter] is None or after[counter] is None
        else after[counter] - before[counter]  # type: ignore[operator]
        for counter in COUNTERS
    }
    return ModeResult(name, len(latents), seconds, results, counters)


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
    print(
        f"{mode.name:>8}: {mode.latents} latents in {mode.seconds:.1f} s = "
        f"{mode.per_hour:.0f} latents/h | {mode.requests / mode.latents:.1f} requests/latent | "
        f"{mode.scoring_prompt_tokens / max(mode.scored_windows, 1):.0f} prompt tokens per "
        f"scored window ({mode.prompt_tokens / mode.latents:.0f} per latent) | server "
        f"{mode.rate(GENERATED)} generated tokens/s, prefix cache hits "
        f"{mode.prefix_hit_rate} | parse failures {failures}/{answers}",
        flush=True,
    )


CONFIGS = {
    "llm only": ScoreConfig(
        explainers=["llm"], scorers=["detection", "fuzzing"], shuffled_control=False
    ),
    "with controls": ScoreConfig(
        explainers=["llm", "token_baseline"],
        scorers=["detection", "fuzzing"],
        shuffled_control=True,
    ),
}


def compare(
    name: str, config: ScoreConfig, url: str, tokenizer: Any, args: argparse.Namespace, offset: int
) -> None:
    """Time one job config naively and through the pipeline, and print the ratios."""
    print(f"-- {name}: explainers {config.explainers}, shuffled control {config.shuffled_control}")
    naive_config = config.model_copy(update={"examples_per_request": 1, "seed": offset})
    pipeline_config = config.model_copy(
        update={"examples_per_request": args.examples_per_request, "seed": offset + 1}
    )
    naive_latents = planted(tokenizer, args.naive_latents, offset * 100)
    naive = asyncio.run(run_mode("naive", url, naive_latents, naive_config, 1, True))
    report(naive)
    pipeline_latents = planted(tokenizer, args.latents, (offset + 1) * 100)
    pipeline = asyncio.run(
        run_mode("pipeline", url, pipeline_latents, pipeline_config, args.concurrency, False)
    )
    report(pipeline)
    speedup = pipeline.per_hour / naive.per_hour
    fewer_requests = (naive.requests / naive.latents) / (pipeline.requests / pipeline.latents)
    naive_tokens = naive.scoring_prompt_tokens / max(naive.scored_windows, 1)
    pipeline_tokens = pipeline.scoring_prompt_tokens / max(pipeline.scored_windows, 1)
    print(
        f"{name}, pipeline / naive: {speedup:.1f}x latents per hour (target >= 5x), "
        f"{fewer_requests:.1f}x fewer requests per latent, "
        f"{naive_tokens / pipeline_tokens:.1f}x fewer prompt tokens per scored window",
        flush=True,
    )


def explanations_per_latent(tokenizer: Any, home: Path, n_latents: int) -> float:
    """Explanations made per latent when every latent of a planted run is scored with a
    shuffled control, through a SQLite store and the worker (no LLM asked)."""
    import tempfile

    from sqlalchemy import func, select

    from service.scoring.worker import ScoreWorkers
    from service.store.engine import open_store, upgrade
    from service.store.models import Explanation
    from tests.planted_store import LLM_FREE_JOB, queue_jobs, store_planted_run

    windows = load_chunks("embedded", tokenizer, chunk_len=32, max_tokens=60_000).numpy()
    rules = [list(RULES)[index % len(RULES)] for index in range(n_latents)]
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/bench.db"
        upgrade(url)
        store = open_store(url)
        latents = store_planted_run(store, tokenizer, windows, rules)
        with store.session() as session, session.begin():
            queue_jobs(session, latents, "explain", LLM_FREE_JOB | {"shuffled_control": True})
        never_asked = OpenAIClient(LLMConfig(urls=[f"http://127.0.0.1:{free_port()}/v1"]))
        asyncio.run(ScoreWorkers(store, never_asked, home, workers=4, poll_seconds=0.05).run())
        with store.read_session() as session:
            made = session.scalar(select(func.count()).select_from(Explanation)) or 0
        store.dispose()
    return made / n_latents


class PromptRecorder(LLMClient):
    """Keeps the requests the pipeline makes and answers each in the asked-for JSON, so that
    the scoring requests exist without an LLM."""

    model = "recorder"
    backend = "recorder"
    enforces_json_schema = True

    def __init__(self) -> None:
        self.requests: list[tuple[list[Message], SamplingParams]] = []

    async def check(self) -> None:
        pass

    async def chat(self, messages: list[Message], params: SamplingParams) -> Completion:
        self.requests.append((messages, params))
        answers = (params.json_schema or {}).get("properties", {}).get("answers")
        if answers is None:
            text = json.dumps({"explanation": "the marked word"})
        else:
            text = json.dumps({"answers": [0] * answers["minItems"]})
        return Completion(text, None, "stop", [CallRecord(self.model, "none", 0.0)])


def scoring_requests(tokenizer: Any, seed: int) -> list[tuple[list[Message], SamplingParams]]:
    """The detection and fuzzing requests `autointerp score` makes for one planted latent
    (with its controls), in the order it makes them."""
    latents = planted(tokenizer, 2, seed)
    recorder = PromptRecorder()
    asyncio.run(explain_and_score(latents[0], CONFIGS["with controls"], recorder, latents[1]))
    return [
        (messages, params)
        for messages, params in recorder.requests
        if "answers" in (params.json_schema or {}).get("properties", {})
    ]


@dataclass
class Timed:
    generated: int
    seconds: float
    prefill_seconds: float

    @property
    def rate(self) -> float:
        return self.generated / self.seconds

    @property
    def decode_rate(self) -> float:
        return self.generated / (self.seconds - self.prefill_seconds)


# (label, precision, prefix cache size in tokens, requests sent together)
IN_PROCESS_MODES: tuple[tuple[str, Precision, int, bool], ...] = (
    ("one at a time, float32, no prefix cache", "float32", 0, False),
    ("one at a time", "auto", DEFAULT_PREFIX_CACHE_TOKENS, False),
    ("all at once", "auto", DEFAULT_PREFIX_CACHE_TOKENS, True),
)


def in_process_rates(
    requests: list[tuple[list[Message], SamplingParams]], home: Path, max_batch: int
) -> list[Timed]:
    """Generated tokens/s of the in-process backend in each of IN_PROCESS_MODES, each on a
    fresh client (an empty prefix cache); with the seconds spent prefilling (forward passes
    over a prompt: those without an attention mask)."""
    import torch

    from sae.precision import compute_dtype
    from sae.subject_model import load_model
    from service.llm.transformers_client import TransformersClient

    models = {
        precision: load_model("smollm2", home, compute_dtype(precision))
        for precision in ("float32", "auto")
    }
    prefill = [0.0]

    def started(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        kwargs["_bench_started"] = time.monotonic()

    def ended(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        started = kwargs.pop("_bench_started")
        if kwargs.get("attention_mask") is None:
            prefill[0] += time.monotonic() - started

    async def timed(precision: Precision, prefix_cache_tokens: int, together: bool) -> Timed:
        client = TransformersClient(
            "smollm2",
            home,
            loaded=models[precision],
            max_batch=max_batch,
            prefix_cache_tokens=prefix_cache_tokens,
        )
        # Warm up on a prompt that shares nothing with the timed ones: the first request
        # compiles the JSON schema's grammar.
        warm = requests[0][1].model_copy(update={"max_tokens": 2})
        await client.chat([{"role": "user", "content": "hi"}], warm)
        prefill[0] = 0.0
        begun = time.monotonic()
        if together:
            answers = await asyncio.gather(*(client.chat(m, p) for m, p in requests))
        else:
            answers = [await client.chat(m, p) for m, p in requests]
        seconds = time.monotonic() - begun
        return Timed(sum(a.completion_tokens for a in answers), seconds, prefill[0])

    hooks = [
        hook
        for model, _ in models.values()
        for hook in (
            model.register_forward_pre_hook(started, with_kwargs=True),
            model.register_forward_hook(ended, with_kwargs=True),
        )
    ]
    try:
        print(
            f"in-process smollm2 (auto precision: {models['auto'][0].dtype}, "
            f"{torch.get_num_threads()} torch threads), max_batch {max_batch}; load average "
            f"{os.getloadavg()[0]:.2f} before",
            flush=True,
        )
        return [asyncio.run(timed(*mode[1:])) for mode in IN_PROCESS_MODES]
    finally:
        for hook in hooks:
            hook.remove()


def in_process(home: Path, n_requests: int, max_batch: int, seed: int) -> None:
    tokenizer = load_tokenizer("smollm2", home)
    requests = scoring_requests(tokenizer, seed)[:n_requests]
    encoded = [
        tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True)
        for messages, _ in requests
    ]
    lengths = [len(prompt["input_ids"]) for prompt in encoded]
    print(
        f"{len(requests)} scoring requests of one planted latent (seed {seed}): prompts of "
        f"{min(lengths)}-{max(lengths)} tokens, at most {requests[0][1].max_tokens} generated",
        flush=True,
    )
    rates = in_process_rates(requests, home, max_batch)
    for (name, *_), timed in zip(IN_PROCESS_MODES, rates, strict=True):
        print(
            f"{name:>30}: {timed.generated} tokens in {timed.seconds:.1f} s = "
            f"{timed.rate:.1f} generated tokens/s ({timed.prefill_seconds:.1f} s prefilling)",
            flush=True,
        )
    plain, alone, together = rates
    print(
        f"all {len(requests)} at once / one at a time in float32 without a prefix cache: "
        f"{together.rate / plain.rate:.1f}x generated tokens/s (target >= 5x); / one at a "
        f"time with it: {together.rate / alone.rate:.1f}x; decoding alone (prefill time left "
        f"out) {together.decode_rate / plain.decode_rate:.1f}x ({plain.decode_rate:.1f} -> "
        f"{together.decode_rate:.1f} tokens/s); load average {os.getloadavg()[0]:.2f} after",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-url", help="a running OpenAI-compatible server (default: start)")
    parser.add_argument("--latents", type=int, default=8, help="latents in the pipeline run")
    parser.add_argument("--naive-latents", type=int, default=2, help="latents in the naive run")
    parser.add_argument("--examples-per-request", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=64, help="pipeline requests in flight")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}"
    )
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument(
        "--explain-calls", action="store_true", help="count explanations per latent, no LLM"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="time the in-process backend's batches"
    )
    parser.add_argument("--requests", type=int, default=8, help="in-process: requests timed")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    parser.add_argument(
        "--precision",
        choices=get_args(Precision),
        default="auto",
        help="the started vLLM server's dtype (auto: as `autointerp llm serve` picks it)",
    )
    args = parser.parse_args()
    if args.in_process:
        in_process(get_settings().home, args.requests, args.max_batch, args.seed)
        return
    if args.explain_calls:
        home = get_settings().home
        per_latent = explanations_per_latent(load_tokenizer("smollm2", home), home, args.latents)
        print(
            f"{args.latents} latents with a shuffled control: {per_latent:.2f} explanations "
            "made per latent (one explain request each with an LLM explainer)"
        )
        return
    names = [name.strip() for name in args.configs.split(",")]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")

    home = get_settings().home
    tokenizer = load_tokenizer("smollm2", home)
    with ExitStack() as stack:
        url = args.llm_url
        if url is None:
            print(f"starting vLLM in {serving_dtype(args.precision)} (about two minutes on CPU)...")
            server = running_server("smollm2", home, port=free_port(), precision=args.precision)
            url = stack.enter_context(server).url
        print(
            f"server {url}; seed {args.seed}; 20 windows per scorer (10 activating, 10 not), "
            "detection + fuzzing",
            flush=True,
        )
        for number, name in enumerate(names):
            compare(name, CONFIGS[name], url, tokenizer, args, 2 * (args.seed + 10 * number))


if __name__ == "__main__":
    main()
