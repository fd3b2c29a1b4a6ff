"""A latent cache's `meta.json`: what it records, and the check that keeps a build out of a folder
holding something else.

The record names what the latents are of: the split, the data config of the data set (`target`/
`params`), its size, the latent kind, the first stage (`fingerprint`: kind, shape, codebook size,
checkpoint sha256) and the shard size. A build goes into a new or empty folder, or into one whose
record describes the same build (an interrupted build then resumes); any other folder is refused
before anything in it is touched. A field that an older `meta.json` lacks is unknown and not held
against it: such a folder is refused only on what it records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

META = "meta.json"
FORMAT = 2  # 2: split, dataset_size and skipped items recorded; `count` is the number of stored items
SHOWN_SKIPS = 100  # skipped items recorded with their reason in meta.json (all are counted)


def plain(value: Any) -> Any:
    """JSON's view of a value (tuples become lists), so a new record compares equal to a stored one."""
    return json.loads(json.dumps(value))


def describe_kind(kind: str) -> str:
    return "tokens" if kind == "tokens" else f"{kind} latents"


def read_meta(root: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(root) / META
    return json.loads(path.read_text()) if path.exists() else None


def write_meta(root: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Written to a temporary name and renamed: a kill never leaves a torn record."""
    tmp = Path(root) / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, Path(root) / META)


def identity(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a record says the cache holds; keys it does not know are absent (unknown)."""
    out = {k: meta[k] for k in ("split", "dataset", "shard_size") if meta.get(k) is not None}
    fingerprint = dict(meta.get("fingerprint") or {})
    kind = meta.get("latent_kind") or fingerprint.get("latent_kind")
    if kind is not None:
        out["latent_kind"] = kind
    fingerprint.pop("latent_kind", None)  # compared as latent_kind
    out["fingerprint"] = fingerprint
    size = meta.get("dataset_size", meta.get("count") if "format" not in meta else None)  # before format 2,
    if size is not None:  # count was the data set's size
        out["dataset_size"] = size
    return out


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def differences(held: Mapping[str, Any], wanted: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Phrases for what the folder holds and what the build wants, for each field known to both that differs.

    A field that follows from another is left out: another kind changes the shape, another split the
    data config and its size.
    """
    h: list[str] = []
    w: list[str] = []

    def known_and_differs(key: str) -> bool:
        return key in held and key in wanted and plain(held[key]) != plain(wanted[key])

    def add(phrase) -> None:
        h.append(phrase(held))
        w.append(phrase(wanted))

    if known_and_differs("latent_kind"):
        add(lambda m: describe_kind(m["latent_kind"]))
    else:
        fh, fw = held.get("fingerprint", {}), wanted.get("fingerprint", {})
        keys = [k for k in fh if k in fw and plain(fh[k]) != plain(fw[k])]
        if keys:
            add(lambda m: "latents of first stage " + ", ".join(f"{k}={m['fingerprint'][k]!r}" for k in keys))
    # the first of these that differs (each follows from the one before)
    for key, phrase in (("split", lambda m: f"the {m['split']} split"),
                        ("dataset", lambda m: f"data set {json.dumps(m['dataset'], sort_keys=True)}"),
                        ("dataset_size", lambda m: f"a data set of {m['dataset_size']} items")):
        if known_and_differs(key):
            add(phrase)
            break
    if known_and_differs("shard_size"):
        add(lambda m: f"shards of {m['shard_size']} items")
    return h, w


def _what(wanted: Mapping[str, Any]) -> str:
    return f"the {wanted['split']} split" if wanted.get("split") else "a latent cache"


def check_build_target(out: str | os.PathLike, wanted: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record of the same build already in `out` (None for a new or empty folder); raise ValueError,
    naming what differs, when `out` holds anything else."""
    out = Path(out)
    if not out.exists():
        return None
    if not out.is_dir():
        raise ValueError(f"{out} is a file; refusing to build {_what(wanted)} into it: choose another --out")
    if not (out / META).exists():
        names = sorted(p.name for p in out.iterdir())
        if not names:
            return None
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ValueError(f"{out} holds files that are not a latent cache ({shown}; no {META}); refusing to build "
                         f"{_what(wanted)} into it: choose another --out")
    try:
        held = json.loads((out / META).read_text())
        if not isinstance(held, dict) or "fingerprint" not in held:
            raise ValueError("no first-stage fingerprint")
    except ValueError as e:  # json.JSONDecodeError is one
        raise ValueError(f"{out / META} is not the record of a latent cache ({e}); refusing to build "
                         f"{_what(wanted)} into {out}: choose another --out") from None
    h, w = differences(identity(held), identity(wanted))
    if h:
        raise ValueError(f"{out} holds {_join(h)}; refusing to build {_join(w)} into it: choose another --out")
    return held


def skip_record(records: list[tuple[int, str, str]]) -> dict[str, Any]:
    """`count`, counts by reason, and the first SHOWN_SKIPS items as `{index, reason, detail}`."""
    records = sorted(records)
    reasons: dict[str, int] = {}
    for _, reason, _ in records:
        reasons[reason] = reasons.get(reason, 0) + 1
    return {"count": len(records), "reasons": dict(sorted(reasons.items())),
            "first": [{"index": i, "reason": r, "detail": d} for i, r, d in records[:SHOWN_SKIPS]]}


def summary(meta: Mapping[str, Any], shown: int = 10) -> str:
    """`N items, K skipped (reason: n, ...)`, then one line for each of the first `shown` skipped items."""
    skipped = meta.get("skipped") or {"count": 0}
    line = f"{meta.get('count')} items, {skipped['count']} skipped"
    if skipped["count"]:
        line += " (" + ", ".join(f"{r}: {n}" for r, n in skipped["reasons"].items()) + ")"
    rows = [f"  index {s['index']} ({s['reason']}): {s['detail']}" for s in skipped.get("first", [])[:shown]]
    if skipped["count"] > len(rows) and rows:
        rows.append(f"  ... {skipped['count'] - len(rows)} more (meta.json lists the first {SHOWN_SKIPS}; every "
                    "index missing from the shards' `index` was skipped)")
    return "\n".join([line, *rows])
