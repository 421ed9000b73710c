"""Reading run folders: the one place that knows the layout of results/RUN.

Used by scripts/plot.py, scripts/summarize.py and scripts/sweep.py.
"""

import json
import os
from dataclasses import dataclass, field


@dataclass
class Run:
    path: str
    config: dict
    metrics: list[dict]
    summary: dict | None = None
    env: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.get("name", os.path.basename(self.path))

    @property
    def optimizer(self) -> str:
        return self.config.get("optimizer_name", "?")

    @property
    def rank(self):
        opt = self.config.get("optimizer", {})
        if "rank" in opt:
            return opt["rank"]
        return (opt.get("group_params") or {}).get("rank")

    @property
    def label(self) -> str:
        """Legend text: optimizer, plus the rank for low-rank optimizers."""
        return self.optimizer if self.rank is None else f"{self.optimizer} r={self.rank}"

    def series(self, y: str, x: str = "step") -> tuple[list, list]:
        rows = [m for m in self.metrics if y in m and x in m and m[y] is not None]
        return [m[x] for m in rows], [m[y] for m in rows]

    @property
    def finished(self) -> bool:
        return (self.summary is not None and self.summary.get("status", "finished") == "finished"
                and self.summary.get("steps") == self.config.get("train", {}).get("steps"))


class RunReadError(FileNotFoundError):
    """A run file that cannot be read; one line naming it (a FileNotFoundError, so the scripts that
    report missing folders report it the same way)."""


def read_jsonl(path: str) -> list[dict]:
    """The records of a .jsonl file; lines that are not JSON objects (cut short by a kill, not
    UTF-8, or anything else) are skipped, as a resume drops them."""
    rows = []
    if os.path.exists(path):
        with open(path, "rb") as f:
            for raw in f:
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError):
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunReadError(f"{path} is unreadable: {(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
    if not isinstance(data, dict):
        raise RunReadError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_run(path: str) -> Run:
    config = _read_json(os.path.join(path, "config.json"))
    if config is None:
        raise FileNotFoundError(f"{path} is not a run folder (no config.json)")
    return Run(path=path, config=config, metrics=read_jsonl(os.path.join(path, "metrics.jsonl")),
               summary=_read_json(os.path.join(path, "summary.json")),
               env=_read_json(os.path.join(path, "env.json")) or {})


def find_runs(paths: list[str]) -> list[Run]:
    """Run folders named directly, or found one level below the given folders (a sweep's folder)."""
    runs = []
    for path in paths:
        if os.path.exists(os.path.join(path, "config.json")):
            runs.append(load_run(path))
        elif os.path.isdir(path):
            for entry in sorted(os.listdir(path)):
                if os.path.exists(os.path.join(path, entry, "config.json")):
                    runs.append(load_run(os.path.join(path, entry)))
        else:
            raise FileNotFoundError(f"no such results folder: {path}")
    return runs


def find_runs_or_report(paths: list[str]) -> list[Run] | None:
    """find_runs for a command line: None (after a one-line error on stderr) when nothing is found."""
    import sys

    try:
        runs = find_runs(paths)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if not runs:
        print(f"error: no runs found under {', '.join(paths)}", file=sys.stderr)
        return None
    return runs
