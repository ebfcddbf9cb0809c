"""Prints the gcloud commands that create what firestore.indexes.json describes.

    python3 deploy/index_commands.py deploy/firestore.indexes.json \
        --project P [--database D] [--collection tasks]

One command per line, shell-quoted: the composite indexes, the single-field
index exemptions (fieldOverrides: every single-field index no query needs,
see docs/reports/capacity.md), and the TTL policy that expires request-id markers
(<collection>-requests.expire_time). deploy.sh runs them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def _group(name: str, collection: str) -> str:
    """The file names the default collection, tasks (and tasks-requests for
    the request-id markers); a deployment may use another."""
    return collection + name.removeprefix("tasks") if name.startswith("tasks") else name


def commands(doc: dict, project: str, database: str, collection: str) -> list[list[str]]:
    scope = ["--project", project, "--database", database]
    out: list[list[str]] = []
    for index in doc["indexes"]:
        group = _group(index["collectionGroup"], collection)
        cmd = [
            "gcloud", "firestore", "indexes", "composite", "create",
            f"--collection-group={group}",
            f"--query-scope={index['queryScope'].lower()}",
        ]
        for field in index["fields"]:
            if "arrayConfig" in field:
                config = f"field-path={field['fieldPath']},array-config={field['arrayConfig'].lower()}"
            else:
                config = f"field-path={field['fieldPath']},order={field['order'].lower()}"
            cmd.append(f"--field-config={config}")
        out.append([*cmd, "--async", *scope])
    for override in doc.get("fieldOverrides", []):
        group = _group(override["collectionGroup"], collection)
        if override["indexes"]:
            raise SystemExit("only index exemptions (indexes: []) are supported")
        out.append([
            "gcloud", "firestore", "indexes", "fields", "update", override["fieldPath"],
            f"--collection-group={group}", "--disable-indexes", "--async", *scope,
        ])
    out.append([
        "gcloud", "firestore", "fields", "ttls", "update", "expire_time",
        f"--collection-group={collection}-requests", "--enable-ttl", "--async", *scope,
    ])
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("indexes")
    parser.add_argument("--project", required=True)
    parser.add_argument("--database", default="(default)")
    parser.add_argument("--collection", default="tasks")
    args = parser.parse_args()
    with open(args.indexes) as f:
        doc = json.load(f)
    for cmd in commands(doc, args.project, args.database, args.collection):
        print(shlex.join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
