#!/usr/bin/env python3
"""Rebuild ``segments-subset.json`` from a full copy of Klaviyo's OpenAPI document.

The simulator tests validate responses against the official schemas, so they need the
spec, but only a sliver of it: the operations in ``OPERATIONS`` below and every component
those operations reach through ``$ref``. Copying just that keeps the repository small and
keeps the tests independent of anything outside the checkout.

Usage (standard library only)::

    python3 tests/simulator/klaviyo_openapi/trim_spec.py FULL_SPEC.json [OUTPUT.json]

``FULL_SPEC.json`` is ``openapi/stable.json`` from github.com/klaviyo/openapi; OUTPUT
defaults to ``segments-subset.json`` beside this script. Kept values are copied unchanged
(operations whole, components whole), so the result is still a valid OpenAPI document.
When a test starts reading another operation, add it to ``OPERATIONS`` and rerun.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The (path, method) pairs the tests under tests/simulator read: response schemas for
# every one, and the request bodies of POST /api/segments and the two segment reports.
OPERATIONS: dict[str, tuple[str, ...]] = {
    "/api/segments": ("get", "post"),
    "/api/segments/{id}": ("get", "patch"),
    "/api/segments/{id}/profiles": ("get",),
    "/api/segments/{id}/relationships/profiles": ("get",),
    "/api/segments/{id}/relationships/tags": ("get",),
    "/api/segments/{id}/tags": ("get",),
    "/api/tags": ("get",),
    "/api/segment-series-reports": ("post",),
    "/api/segment-values-reports": ("post",),
}

# Keys of a path item that are not operations; kept because they apply to every operation.
PATH_ITEM_SHARED = ("summary", "description", "servers", "parameters")

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "segments-subset.json"


def refs_in(node: Any) -> Iterator[str]:
    """Every ``$ref`` string anywhere inside ``node``."""
    pending = [node]
    while pending:
        current = pending.pop()
        if isinstance(current, dict):
            ref = current.get("$ref")
            if isinstance(ref, str):
                yield ref
            pending.extend(current.values())
        elif isinstance(current, list):
            pending.extend(current)


def kept_paths(spec: dict[str, Any]) -> dict[str, Any]:
    """The chosen operations, in the source document's order; a missing one is an error
    because a test would then validate against nothing."""
    out: dict[str, Any] = {}
    for path, methods in OPERATIONS.items():
        item = spec["paths"].get(path)
        missing = [m for m in methods if item is None or m not in item]
        if missing:
            raise SystemExit(f"{path}: no {', '.join(missing)} in this spec")
    for path, item in spec["paths"].items():
        if path not in OPERATIONS:
            continue
        methods = OPERATIONS[path]
        out[path] = {
            key: value for key, value in item.items() if key in methods or key in PATH_ITEM_SHARED
        }
    return out


def reachable_components(spec: dict[str, Any], roots: Any) -> dict[str, set[str]]:
    """Names per components section reachable from ``roots``, following refs transitively."""
    components = spec.get("components", {})
    found: dict[str, set[str]] = {}
    pending = list(refs_in(roots))
    seen: set[str] = set()
    while pending:
        ref = pending.pop()
        if ref in seen:
            continue
        seen.add(ref)
        prefix, _, rest = ref.partition("#/components/")
        if prefix or not rest:
            raise SystemExit(f"cannot follow a $ref outside this document's components: {ref}")
        section, _, name = rest.partition("/")
        target = components.get(section, {}).get(name)
        if target is None:
            raise SystemExit(f"$ref to nothing: {ref}")
        found.setdefault(section, set()).add(name)
        pending.extend(refs_in(target))
    return found


def trim(spec: dict[str, Any]) -> dict[str, Any]:
    paths = kept_paths(spec)
    operations = [
        op for item in paths.values() for key, op in item.items() if key not in PATH_ITEM_SHARED
    ]
    wanted = reachable_components(spec, paths)

    # Security schemes are named in `security` lists, not reached through $ref.
    requirements = list(spec.get("security", []))
    for op in operations:
        requirements.extend(op.get("security", []))
    wanted.setdefault("securitySchemes", set()).update(
        name for requirement in requirements for name in requirement
    )

    components = {
        section: {name: value for name, value in entries.items() if name in wanted[section]}
        for section, entries in spec.get("components", {}).items()
        if wanted.get(section)
    }
    tag_names = {name for op in operations for name in op.get("tags", [])}
    out: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "paths":
            out[key] = paths
        elif key == "components":
            out[key] = components
        elif key == "tags":
            out[key] = [tag for tag in value if tag.get("name") in tag_names]
        else:
            out[key] = value  # openapi, info, servers, security, vendor extensions
    return out


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    source = Path(argv[1])
    target = Path(argv[2]) if len(argv) == 3 else DEFAULT_OUTPUT
    raw = source.read_bytes()
    spec = json.loads(raw)
    trimmed = trim(spec)
    target.write_text(json.dumps(trimmed, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    # What the README records, so a refresh can update it in one go.
    counts = {section: len(entries) for section, entries in trimmed["components"].items()}
    print(f"source  {source} sha256 {hashlib.sha256(raw).hexdigest()}")
    print(f"version {spec['info']['version']}")
    print(f"wrote   {target} ({target.stat().st_size:,} bytes)")
    print(f"kept    {sum(len(OPERATIONS[p]) for p in trimmed['paths'])} operations, {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
