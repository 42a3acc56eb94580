"""A small kustomize renderer for the features k8s/ uses, so the manifests are checked without a kustomize binary.

Supported (with kustomize's semantics, cross-checked against ``kubectl kustomize`` when that is installed):
``resources`` (files and directories), ``components`` (``kind: Component``), ``patches`` (``path:`` or inline
``patch:``, strategic merge or JSON 6902, optional ``target``), ``namespace``, ``labels`` / ``commonLabels`` and
``images``. Anything else in a kustomization is an error, so a new feature cannot be silently ignored.

Order, as kustomize does it: accumulate ``resources``, then apply each component to the accumulated set, then the
kustomization's own transformers: patches, namespace, labels, images.

Example:
    >>> docs = render("k8s/overlays/gpu")  # doctest: +SKIP
    >>> sorted({d["kind"] for d in docs})  # doctest: +SKIP
    ['ConfigMap', 'Deployment', 'Job', ...]
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

_KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "patches",
    "namespace",
    "labels",
    "commonLabels",
    "images",
}
# Kinds kustomize does not namespace (the ones a manifest here could plausibly contain).
_CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
    "PriorityClass",
    "IngressClass",
}
# Strategic-merge keys of the list fields k8s/ patches (from the Kubernetes API's patchMergeKey tags). Lists not
# named here are replaced wholesale, as strategic merge does for lists without a merge key (e.g. tolerations).
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
}


class KustomizeError(ValueError):
    """A kustomization uses something this renderer does not support, or refers to something missing."""


def _kustomization_file(directory: Path) -> Path:
    for name in _KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def _load_docs(path: Path) -> list[Resource]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise KustomizeError(f"{path}: every document must be a Kubernetes object with kind and metadata")
    return docs


def _gvk(res: Resource) -> tuple[str, str]:
    api = str(res.get("apiVersion", ""))
    group = api.rsplit("/", 1)[0] if "/" in api else ""
    return group, str(res["kind"])


def resource_id(res: Resource) -> tuple[str, str, str, str]:
    """(group, kind, namespace, name): kustomize's identity of a resource."""
    group, kind = _gvk(res)
    meta = res.get("metadata", {})
    return group, kind, str(meta.get("namespace", "")), str(meta["name"])


def render(directory: str | Path) -> list[Resource]:
    """Render the kustomization in ``directory`` to a list of Kubernetes objects."""
    return _build(Path(directory).resolve(), inherited=None)


def _build(directory: Path, inherited: list[Resource] | None) -> list[Resource]:
    kfile = _kustomization_file(directory)
    spec = yaml.safe_load(kfile.read_text(encoding="utf-8")) or {}
    unknown = set(spec) - _SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported fields {sorted(unknown)}")
    kind = spec.get("kind", "Kustomization")
    if kind == "Component":
        if inherited is None:
            raise KustomizeError(f"{kfile}: a Component can only be used from `components:`")
        resources = inherited
    else:
        if inherited is not None:
            raise KustomizeError(f"{kfile}: `components:` must point at kind: Component")
        resources = []

    for entry in spec.get("resources", []) or []:
        target = (directory / entry).resolve()
        if target.is_dir():
            _add_all(resources, _build(target, inherited=None), kfile)
        elif target.is_file():
            _add_all(resources, _load_docs(target), kfile)
        else:
            raise KustomizeError(f"{kfile}: resource {entry!r} not found")
    for entry in spec.get("components", []) or []:
        resources = _build((directory / entry).resolve(), inherited=resources)

    for patch in spec.get("patches", []) or []:
        resources = _apply_patch_entry(resources, patch, directory, kfile)
    if spec.get("namespace"):
        _set_namespace(resources, str(spec["namespace"]))
    for entry in spec.get("labels", []) or []:
        _add_labels(
            resources,
            entry.get("pairs", {}),
            selectors=bool(entry.get("includeSelectors", False)),
            templates=bool(entry.get("includeTemplates", False)),
        )
    if spec.get("commonLabels"):
        _add_labels(resources, spec["commonLabels"], selectors=True, templates=True)
    for image in spec.get("images", []) or []:
        _set_images(resources, image)
    return resources


def _add_all(resources: list[Resource], new: list[Resource], kfile: Path) -> None:
    seen = {resource_id(r) for r in resources}
    for res in new:
        rid = resource_id(res)
        if rid in seen:
            raise KustomizeError(f"{kfile}: duplicate resource {rid}")
        seen.add(rid)
        resources.append(copy.deepcopy(res))


# ---- patches ----------------------------------------------------------------------------------------------


def _apply_patch_entry(
    resources: list[Resource], entry: dict[str, Any], directory: Path, kfile: Path
) -> list[Resource]:
    if "path" in entry:
        text = (directory / entry["path"]).read_text(encoding="utf-8")
    elif "patch" in entry:
        text = entry["patch"]
    else:
        raise KustomizeError(f"{kfile}: a patch needs `path` or `patch`")
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    target = entry.get("target")
    if len(docs) == 1 and isinstance(docs[0], list):
        if not target:
            raise KustomizeError(f"{kfile}: a JSON 6902 patch needs a `target`")
        matched = [r for r in resources if _matches(r, target)]
        if not matched:
            raise KustomizeError(f"{kfile}: patch target {target} matches no resource")
        for res in matched:
            for op in docs[0]:
                _json6902(res, op)
        return resources
    for doc in docs:
        if target:
            matched = [r for r in resources if _matches(r, target)]
        else:
            matched = [r for r in resources if _same_object(r, doc)]
        if not matched:
            raise KustomizeError(
                f"{kfile}: patch for {doc.get('kind')}/{doc['metadata'].get('name')} matches nothing"
            )
        if doc.get("$patch") == "delete":
            ids = {id(r) for r in matched}
            resources = [r for r in resources if id(r) not in ids]
            continue
        for res in matched:
            merged = _strategic_merge(res, {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")})
            res.clear()
            res.update(merged)
    return resources


def _same_object(res: Resource, patch: Resource) -> bool:
    # kustomize matches an untargeted strategic-merge patch by group/kind/name (and namespace when given).
    meta = patch.get("metadata", {})
    if _gvk(res) != _gvk(patch) or res["metadata"].get("name") != meta.get("name"):
        return False
    return "namespace" not in meta or res["metadata"].get("namespace") == meta["namespace"]


def _matches(res: Resource, target: dict[str, Any]) -> bool:
    group, kind = _gvk(res)
    version = str(res.get("apiVersion", "")).rsplit("/", 1)[-1]
    checks = {
        "group": group,
        "version": version,
        "kind": kind,
        "name": res["metadata"].get("name", ""),
        "namespace": res["metadata"].get("namespace", ""),
    }
    for key, actual in checks.items():
        # kustomize treats these fields as anchored regular expressions.
        if key in target and not re.fullmatch(str(target[key]), str(actual)):
            return False
    if "labelSelector" in target:
        labels = res["metadata"].get("labels", {}) or {}
        for term in str(target["labelSelector"]).split(","):
            k, _, v = term.partition("=")
            if labels.get(k.strip()) != v.strip():
                return False
    return True


def _strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    if isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        if not isinstance(base, dict):
            base = {}
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)  # null deletes a field in a strategic merge patch
            elif key in out:
                out[key] = _strategic_merge(out[key], value, key)
            else:
                out[key] = _strip_directives(copy.deepcopy(value))
        return out
    if isinstance(patch, list) and field in _MERGE_KEYS and isinstance(base, list):
        key = _MERGE_KEYS[field]
        out_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise KustomizeError(f"strategic merge: items of {field!r} need {key!r}")
            index = next((i for i, b in enumerate(out_list) if b.get(key) == item[key]), None)
            if item.get("$patch") == "delete":
                if index is not None:
                    del out_list[index]
            elif index is None:
                out_list.append(_strip_directives(copy.deepcopy(item)))
            else:
                out_list[index] = _strategic_merge(out_list[index], item, None)
        return out_list
    return copy.deepcopy(patch)


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _json6902(res: Resource, op: dict[str, Any]) -> None:
    parts = _pointer(op["path"])
    parent: Any = res
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    kind = op["op"]
    if kind in ("add", "replace"):
        value = copy.deepcopy(op["value"])
        if isinstance(parent, list):
            if last == "-":
                parent.append(value)
            elif kind == "add":
                parent.insert(int(last), value)
            else:
                parent[int(last)] = value
        else:
            if kind == "replace" and last not in parent:
                raise KustomizeError(f"JSON 6902 replace: {op['path']} does not exist")
            parent[last] = value
    elif kind == "remove":
        if isinstance(parent, list):
            del parent[int(last)]
        else:
            del parent[last]
    elif kind == "test":
        actual = parent[int(last)] if isinstance(parent, list) else parent[last]
        if actual != op["value"]:
            raise KustomizeError(f"JSON 6902 test failed at {op['path']}")
    else:
        raise KustomizeError(f"JSON 6902 op {kind!r} is not supported")


# ---- namespace, labels, images ----------------------------------------------------------------------------


def _set_namespace(resources: list[Resource], namespace: str) -> None:
    for res in resources:
        meta = res["metadata"]
        if res["kind"] == "Namespace":
            meta["name"] = namespace  # kustomize renames the Namespace object too
            continue
        if res["kind"] in _CLUSTER_SCOPED:
            continue
        old = meta.get("namespace")
        meta["namespace"] = namespace
        if res["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            for subject in res.get("subjects", []) or []:
                if subject.get("kind") == "ServiceAccount" and subject.get("namespace") in (None, old):
                    subject["namespace"] = namespace


def _pod_templates(res: Resource) -> list[dict[str, Any]]:
    spec = res.get("spec", {}) or {}
    if res["kind"] == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    template = spec.get("template")
    return [template] if isinstance(template, dict) else []


def _add_labels(resources: list[Resource], pairs: dict[str, Any], selectors: bool, templates: bool) -> None:
    labels = {str(k): str(v) for k, v in pairs.items()}
    for res in resources:
        res["metadata"].setdefault("labels", {}).update(labels)
        if templates or selectors:
            for template in _pod_templates(res):
                template.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
        if selectors:
            spec = res.get("spec", {}) or {}
            if res["kind"] == "Service":
                spec.setdefault("selector", {}).update(labels)
            elif isinstance(spec.get("selector"), dict):
                spec["selector"].setdefault("matchLabels", {}).update(labels)


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        image, tag = image[:colon], image[colon + 1 :]
    return image, tag, digest


def _containers(node: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found.extend(c for c in value if isinstance(c, dict))
            else:
                found.extend(_containers(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_containers(value))
    return found


def _set_images(resources: list[Resource], entry: dict[str, Any]) -> None:
    for res in resources:
        for container in _containers(res.get("spec")):
            name, tag, digest = _split_image(str(container.get("image", "")))
            if name != entry["name"]:
                continue
            name = entry.get("newName", name)
            if "digest" in entry:
                tag, digest = None, entry["digest"]
            elif "newTag" in entry:
                tag, digest = str(entry["newTag"]), None
            container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def main(argv: list[str]) -> int:
    """``python tests/k8s/kustomize_lite.py DIR`` prints the rendered YAML (like ``kustomize build DIR``)."""
    if len(argv) != 1:
        print("usage: kustomize_lite.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    print(yaml.safe_dump_all(render(argv[0]), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
