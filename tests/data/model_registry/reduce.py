"""Reduce kubeflow/model-registry's api/openapi/model-registry.yaml to the paths lora-pipeline calls and the
schemas they reference (transitively), as JSON test data for the stand-in registry (tests/registry_standin.py).

    git show <rev>:api/openapi/model-registry.yaml | python reduce.py <rev> <tag> <api-version> > out.json

`api-version` renames the paths' version segment: the fetched upstream history holds no `v1` document, so
`v1` is the newest `v1alpha3` document under the prefix that the model-registry 0.3.18 client calls
(tests/test_registry_openapi.py checks those routes against the installed client).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

USED = (  # (path under the API prefix, methods)
    ("/registered_models", ("get", "post")),
    ("/registered_model", ("get",)),
    ("/model_version", ("get",)),
    ("/model_versions", ("post",)),
    ("/model_artifact", ("get",)),
    ("/model_versions/{modelversionId}/artifacts", ("get", "post")),
)


def refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node))
    return set()


def reduce(doc: dict, rev: str, tag: str, api: str) -> dict:
    src = doc["info"]["version"]
    paths = {}
    for path, methods in USED:
        full = doc["paths"][f"/api/model_registry/{src}{path}"]
        paths[f"/api/model_registry/{api}{path}"] = {m: full[m] for m in methods} | (
            {"parameters": full["parameters"]} if "parameters" in full else {}
        )
    kept: dict[str, dict] = {}
    todo = refs(paths)
    while todo:
        ref = todo.pop()
        section, name = ref.split("/")[-2:]
        if name in kept.setdefault(section, {}):
            continue
        kept[section][name] = doc["components"][section][name]
        todo |= refs(kept[section][name])
    source = f"github.com/kubeflow/model-registry {tag} ({rev}) api/openapi/model-registry.yaml"
    note = "" if api == src else f"; paths renamed {src} -> {api} (no upstream v1 document was available)"
    info = {**doc["info"], "version": api, "x-source": source + note, "x-reduced": "paths lora-pipeline calls"}
    return {"openapi": doc["openapi"], "info": info, "paths": paths, "components": kept}


if __name__ == "__main__":
    rev, tag, api = sys.argv[1:4]
    json.dump(reduce(yaml.safe_load(sys.stdin), rev, tag, api), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
