"""The SQL store: everything the study learns, and the job queue that workers share.

`engine` opens a store by URL (SQLite or PostgreSQL) and migrates it; `models` holds the
tables; `runs` records runs, SAEs, latents and their statistics; `matches` stores matchings
and reads them back in either direction; `windows` is the example windows' byte format;
`scores` reads the newest explanations and scores; `queue` is the job queue; `sampling`
chooses the latents to queue; `query` runs users' read-only SQL.
"""

from service.store.engine import Store, open_store, upgrade

__all__ = ["Store", "open_store", "upgrade"]
