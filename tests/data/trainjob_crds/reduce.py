"""Reduce a Kubeflow Trainer TrainJob CRD to what the stand-in API server validates against.

Source: github.com/kubeflow/trainer, manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml at a release tag.
Kept: the CRD's name, group and each version's openAPIV3Schema, with every `description` removed (prose only;
no type, property, enum or requirement is dropped), as compact JSON with the source in an annotation.
Usage: python reduce.py CRD.yaml TAG COMMIT > trainjobs-TAG.json
"""

import json
import sys

import yaml


def _strip(node: object) -> object:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def main(path: str, tag: str, commit: str) -> None:
    with open(path) as f:
        crd = yaml.safe_load(f)
    versions = [{"name": v["name"], "served": v["served"], "storage": v["storage"],
                 "schema": {"openAPIV3Schema": _strip(v["schema"]["openAPIV3Schema"])}}
                for v in crd["spec"]["versions"]]  # fmt: skip
    source = f"github.com/kubeflow/trainer manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml {tag} {commit}"
    reduced = {
        "apiVersion": crd["apiVersion"],
        "kind": crd["kind"],
        "metadata": {"name": crd["metadata"]["name"], "annotations": {"source": source}},
        "spec": {"group": crd["spec"]["group"], "names": crd["spec"]["names"], "scope": crd["spec"]["scope"],
                 "versions": versions},
    }  # fmt: skip
    sys.stdout.write(json.dumps(reduced, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
