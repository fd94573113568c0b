"""(Re)write the committed JSON Schemas from the models.

python -m schemas.export          # rewrite schemas/jsonschema/*.json
python -m schemas.export --check  # exit 1 if the committed files differ (for CI)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import BaseModel

from schemas.models import (
    DeadLetterMeta,
    ErrorResult,
    SvdRequestJson,
    SvdRequestMeta,
    SvdResultBinaryMeta,
    SvdResultJson,
    SvdResultStored,
)

SCHEMA_DIR = Path(__file__).parent / "jsonschema"

# File name -> model. The names are referenced from asyncapi.yaml and docs/wire-format.md.
SCHEMAS: dict[str, type[BaseModel]] = {
    "svd-request.json": SvdRequestJson,
    "svd-request-meta.json": SvdRequestMeta,
    "svd-result.json": SvdResultJson,
    "svd-result-meta.json": SvdResultBinaryMeta,
    "svd-result-stored.json": SvdResultStored,
    "error-result.json": ErrorResult,
    "dead-letter-meta.json": DeadLetterMeta,
}


def render() -> dict[str, str]:
    out = {}
    for name, model in SCHEMAS.items():
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": "Generated from schemas/models.py by `python -m schemas.export`; do not edit.",
            **model.model_json_schema(mode="validation"),
        }
        out[name] = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
    return out


def stale(directory: Path = SCHEMA_DIR) -> list[str]:
    """Files that are missing, different, or no longer generated."""
    rendered = render()
    on_disk = {p.name for p in directory.glob("*.json")}
    changed = [
        name
        for name, text in rendered.items()
        if not (directory / name).is_file() or (directory / name).read_text("utf-8") != text
    ]
    return sorted(changed + sorted(on_disk - rendered.keys()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="only report drift")
    args = parser.parse_args(argv)
    if args.check:
        drift = stale()
        for name in drift:
            print(f"stale: {SCHEMA_DIR / name}")
        return 1 if drift else 0
    SCHEMA_DIR.mkdir(exist_ok=True)
    for path in SCHEMA_DIR.glob("*.json"):
        if path.name not in SCHEMAS:
            path.unlink()
    for name, text in render().items():
        (SCHEMA_DIR / name).write_text(text, "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
