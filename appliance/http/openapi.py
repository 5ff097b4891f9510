"""The HTTP API's OpenAPI schema, as checked in at docs/openapi.json (a test compares the two).

    python -m appliance.http.openapi --out docs/openapi.json    # write it
    python -m appliance.http.openapi                             # print it
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from appliance.http.api import create_app
from appliance.http.review_routes import review_router


def schema_text() -> str:
    """The schema as the file holds it: JSON, keys sorted, two-space indent, a final newline. With the review
    queue's routes (a station with `review.enabled = true`, the default, serves them)."""
    return json.dumps(create_app(None, [review_router(None)]).openapi(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.http.openapi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the schema here (default: standard output)")
    args = parser.parse_args(argv)
    text = schema_text()
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
