"""The harness's command-line tools, run from the repo root as modules: `python -m scripts.sweep ...`
(the repo root is then on sys.path, so they import the harness without path edits)."""
