"""The latent browser's web app (Starlette, Jinja2 templates with autoescape, served by uvicorn).

Pages, each at a stable URL that can be shared:

    /                                       the runs in the store
    /runs/RUN                               pairs, presence, the figures
    /runs/RUN/latents?seed=&status=...      the latent list: filters, sort, search, pages
    /runs/RUN/latents/SEED/INDEX            one latent and its partners in every other seed
    /runs/RUN/compare?a=&b=&step=           two seeds' matched latents side by side

`hookpoint` and `campaign` are query parameters of every run page (default: the run's first
hookpoint, the newest campaign with scores). Every read goes through a read-only store
(`service.ui.readonly`); the app never writes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from sae.errors import UserError
from service.config import UIConfig
from service.store.engine import Store
from service.store.models import Run
from service.ui import data, plots
from service.ui.data import Cache, ListQuery, NotFound

STATIC = Path(__file__).resolve().parent / "static"
Tokenize = Callable[[list[int]], list[str]]


def _number(value: float | int | None, digits: int = 3) -> str:
    """A number for a page; undefined values show as an em dash, never as 0."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, int) or digits == 0:
        return f"{value:,.0f}"
    if value != 0 and abs(value) < 10 ** -(digits - 1):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def _float(request: Request, name: str) -> float | None:
    text = request.query_params.get(name, "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError as error:
        raise HTTPException(400, f"{name} must be a number, not {text!r}") from error


def _int(request: Request, name: str, default: int | None = None) -> int | None:
    text = request.query_params.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError as error:
        raise HTTPException(400, f"{name} must be a whole number, not {text!r}") from error


class TokenText:
    """Each token's text, fast: every id decoded alone once and remembered. A window whose
    pieces do not add up to its decoded text (a character split over byte-level tokens, a
    tokenizer that drops a word's leading space when decoding one token) is decoded by
    `token_strings`, one prefix at a time, as `autointerp show` does."""

    def __init__(self, tokenizer: Any, exact: Callable[[Any, list[int]], list[str]]) -> None:
        self.tokenizer = tokenizer
        self.exact = exact
        self.pieces: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> list[str]:
        missing = [i for i in set(ids) if i not in self.pieces]
        if missing:
            decoded = self.tokenizer.batch_decode([[i] for i in missing], skip_special_tokens=True)
            self.pieces.update(zip(missing, decoded, strict=True))
        pieces = [self.pieces[i] for i in ids]
        if "".join(pieces) == self.tokenizer.decode(ids, skip_special_tokens=True):
            return pieces
        return self.exact(self.tokenizer, ids)


class Browser:
    """The app's state: the store, the config, the latent-table cache and the tokenizers."""

    def __init__(self, store: Store, config: UIConfig, tokenizer: Callable[[str], Any]) -> None:
        self.store = store
        self.config = config
        self.cache = Cache(config.cached_saes * 2)
        self._load_tokenizer = tokenizer
        self._tokenizers: dict[str, Tokenize] = {}
        self._lock = threading.Lock()
        environment = Environment(loader=PackageLoader("service.ui", "templates"), autoescape=True)
        environment.filters["number"] = _number
        environment.globals["quote"] = lambda text: quote(str(text), safe="")
        self.templates = Jinja2Templates(env=environment)

    def tokens(self, subject_model: str) -> Tokenize:
        """Token ids -> their text under the run's subject model; ids in angle brackets when
        its tokenizer cannot be loaded here (the page says so)."""
        with self._lock:
            if subject_model not in self._tokenizers:
                from sae.token_text import token_strings

                try:
                    loaded = self._load_tokenizer(subject_model)
                except (OSError, UserError, ValueError):
                    self._tokenizers[subject_model] = lambda ids: [f"⟨{i}⟩" for i in ids]
                else:
                    self._tokenizers[subject_model] = TokenText(loaded, token_strings)
            return self._tokenizers[subject_model]

    # -- helpers --------------------------------------------------------------------------

    def _render(self, request: Request, template: str, **context: Any) -> HTMLResponse:
        response = self.templates.TemplateResponse(request, template, context)
        assert isinstance(response, HTMLResponse)
        return response

    def _run_context(
        self, request: Request, session: Session
    ) -> tuple[Run, str, list[Any], Any, dict[str, Any]]:
        run, saes = data.run_and_saes(session, request.path_params["run"])
        hookpoint, group = data.pick_hookpoint(saes, request.query_params.get("hookpoint"))
        campaign = data.choose_campaign(self.cache, session, run, _int(request, "campaign"))
        keep = {
            name: request.query_params[name]
            for name in ("hookpoint", "campaign")
            if request.query_params.get(name)
        }
        base = f"/runs/{quote(run.name, safe='')}"

        def link(path: str = "", **params: Any) -> str:
            merged = {**keep, **{k: v for k, v in params.items() if v is not None and v != ""}}
            return base + path + (f"?{urlencode(merged)}" if merged else "")

        context = {
            "run": run,
            "hookpoint": hookpoint,
            "hookpoints": sorted({sae.hookpoint for sae in saes}),
            "seeds": [sae.seed for sae in group],
            "campaign": campaign,
            "link": link,
        }
        return run, hookpoint, group, campaign, context

    # -- pages ----------------------------------------------------------------------------

    def index(self, request: Request) -> Response:
        if self.config.run is not None:
            return RedirectResponse(f"/runs/{quote(self.config.run, safe='')}")
        with self.store.read_session() as session:
            runs = session.scalars(select(Run).order_by(Run.created_at)).all()
        return self._render(request, "index.html", runs=runs)

    def run_page(self, request: Request) -> Response:
        with self.store.read_session() as session:
            run, hookpoint, group, campaign, context = self._run_context(request, session)
            summary = data.run_summary(self.cache, session, group)
        link = context["link"]
        figures = _run_figures(summary, link, self.config.plot_points)
        return self._render(request, "run.html", summary=summary, figures=figures, **context)

    def latent_list(self, request: Request) -> Response:
        params = request.query_params
        alone = tuple(int(s) for s in params.get("alone", "").split(",") if s.strip().isdigit())
        sort = params.get("sort", "index")
        if sort not in data.SORTS:
            raise HTTPException(400, f"sort must be one of {', '.join(data.SORTS)}")
        query = ListQuery(
            seed=_int(request, "seed"),
            status=params["status"] if params.get("status") in ("shared", "specific") else "",
            presence=_int(request, "presence"),
            freq_min=_float(request, "freq_min"),
            freq_max=_float(request, "freq_max"),
            score=params.get("score", ""),
            score_min=_float(request, "score_min"),
            score_max=_float(request, "score_max"),
            search=params.get("q", "").strip(),
            alone=alone,
            sort=sort,
            descending=params.get("order") == "desc",
            page=_int(request, "page", 1) or 1,
        )
        with self.store.read_session() as session:
            run, hookpoint, group, campaign, context = self._run_context(request, session)
            page = data.list_latents(
                self.cache,
                session,
                group,
                campaign.id if campaign is not None else None,
                query,
                self.config.page_size,
            )
        filters = {k: v for k, v in params.items() if k not in ("page",)}
        return self._render(
            request, "latents.html", page=page, query=query, filters=filters, **context
        )

    def latent(self, request: Request) -> Response:
        seed = int(request.path_params["seed"])
        index = int(request.path_params["index"])
        with self.store.read_session() as session:
            run, hookpoint, group, campaign, context = self._run_context(request, session)
            view = data.latent_page(
                self.cache,
                session,
                run,
                group,
                seed,
                index,
                campaign,
                self.tokens(run.subject_model),
                self.config.partner_contexts,
            )
        counts, edges = view.histogram
        histogram = plots.bars(
            "Activations of this latent's stored windows (tokens where it fires)",
            "activation",
            "tokens",
            [
                plots.Bar(
                    f"{edges[i]:.2g}" if i % 4 == 0 else "",
                    count,
                    "#windows",
                    f"{count} tokens with activation {edges[i]:.3g} to {edges[i + 1]:.3g}",
                )
                for i, count in enumerate(counts)
            ],
        )
        return self._render(request, "latent.html", view=view, histogram=histogram, **context)

    def compare(self, request: Request) -> Response:
        with self.store.read_session() as session:
            run, hookpoint, group, campaign, context = self._run_context(request, session)
            seeds = sorted(sae.seed for sae in group)
            if len(seeds) < 2:
                raise NotFound("comparing needs two seeds at this hookpoint")
            view = data.compare_page(
                self.cache,
                session,
                group,
                _int(request, "a", seeds[0]) or 0,
                _int(request, "b", seeds[1]) or 0,
                _int(request, "step", 0) or 0,
                campaign.id if campaign is not None else None,
                self.tokens(run.subject_model),
                self.config.partner_contexts,
            )
        return self._render(request, "compare.html", view=view, **context)


def _run_figures(summary: data.RunSummary, link: Any, limit: int) -> list[Any]:
    figures = []
    for table in summary.tables:
        for other, pair in sorted(table.pairs.items()):
            if other < table.seed:
                continue
            chosen = data.sample(table.n_latents, limit)
            points = [
                plots.Point(
                    float(pair.cos_decoder[i]),
                    float(pair.cos_encoder[i]),
                    0 if pair.agree[i] else 1,
                    link(f"/latents/{table.seed}/{i}"),
                    f"seed {table.seed} latent {i}: decoder {pair.cos_decoder[i]:.3f}, "
                    f"encoder {pair.cos_encoder[i]:.3f}",
                )
                for i in chosen
            ]
            figures.append(
                plots.scatter(
                    f"Seed {table.seed} into seed {other}: decoder vs encoder cosine",
                    "decoder cosine",
                    "encoder cosine",
                    points,
                    ["assignments agree", "assignments differ"],
                )
            )
    for seed, fractions in summary.alone.items():
        others = sorted(next(t for t in summary.tables if t.seed == seed).pairs)
        figures.append(
            plots.bars(
                f"Only in seed {seed}, against the number of other seeds",
                "other seeds compared",
                "fraction of latents",
                [
                    plots.Bar(
                        str(n),
                        fraction,
                        link("/latents", seed=seed, alone=",".join(map(str, others[:n]))),
                        f"{fraction:.1%} of seed {seed}'s latents are shared with none of "
                        f"seeds {', '.join(map(str, others[:n]))}",
                    )
                    for n, fraction in enumerate(fractions, start=1)
                ],
            )
        )
    points = []
    for color, table in enumerate(summary.tables[: len(plots.COLORS)]):
        for i in data.sample(table.n_latents, limit // max(len(summary.tables), 1)):
            points.append(
                plots.Point(
                    float(table.firing_frequency[i]),
                    float(table.best_cosine[i]),
                    color,
                    link(f"/latents/{table.seed}/{i}"),
                    f"seed {table.seed} latent {i}: frequency {table.firing_frequency[i]:.2e}, "
                    f"best partner cosine {table.best_cosine[i]:.3f}",
                )
            )
    figures.append(
        plots.scatter(
            "Matched similarity against firing frequency",
            "firing frequency",
            "best decoder cosine to a partner",
            points,
            [f"seed {table.seed}" for table in summary.tables[: len(plots.COLORS)]],
            log_x=True,
        )
    )
    return figures


def create_app(store: Store, config: UIConfig, tokenizer: Callable[[str], Any]) -> Starlette:
    """The app over `store`; `tokenizer` loads a subject model's tokenizer by name."""
    browser = Browser(store, config, tokenizer)

    async def error(request: Request, exc: Exception) -> Response:
        status = 404 if isinstance(exc, NotFound) else 400
        if isinstance(exc, HTTPException):
            status, message = exc.status_code, str(exc.detail)
        else:
            message = str(exc)
        return browser.templates.TemplateResponse(
            request, "error.html", {"message": message}, status_code=status
        )

    return Starlette(
        routes=[
            Route("/", browser.index),
            Route("/runs/{run}", browser.run_page),
            Route("/runs/{run}/latents", browser.latent_list),
            Route("/runs/{run}/latents/{seed:int}/{index:int}", browser.latent),
            Route("/runs/{run}/compare", browser.compare),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={UserError: error, HTTPException: error},
    )
