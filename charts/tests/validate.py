#!/usr/bin/env python3
"""Offline strict schema validation of Kubernetes objects (what `helm template` renders).

Usage: charts/tests/validate.py [--kubernetes-version 1.35] [--crds DIR] [FILE ...]
       charts/tests/validate.py --check

Reads multi-document YAML from the FILEs (`-` or none: stdin) and validates every object, with
unknown fields as errors:

* Kubernetes' own kinds against the schemas that the PyPI package `kubernetes-validate` bundles,
  in its strict variant (`v<version>-local-strict`: `additionalProperties: false` everywhere).
  We target Kubernetes 1.35: the schemas used are the newest bundled version <= the requested
  one, v1.35.0 with the pinned kubernetes-validate 1.37.0 (it bundles v1.25.0 .. v1.37.0).
* The kinds whose CRDs ship in charts/base/crds (Gateway API, Istio security) against the CRD's
  `openAPIV3Schema` for the object's version, made strict the way kube-apiserver's strict field
  validation is (a field the structural schema would prune is an error), with `metadata` checked
  against Kubernetes' ObjectMeta. CEL rules (`x-kubernetes-validations`) and list-map key
  uniqueness are not evaluated here (a kube-apiserver does that).
* Any other kind is an error: there is no schema to check it against.

Prints one line per error, `ERROR <kind>/<namespace>/<name> (<helm source>): <field path>:
<message>`, then a summary line; exits 1 on any error, 2 on unreadable input, 3 when
kubernetes-validate is not installed. Nothing is fetched: every `$ref` resolves inside the
bundled schemas, and a retrieval of anything else is refused.

kubernetes-validate is found in the directory scripts/install-deps installs it into
(/opt/weft/python/kubernetes-validate-<version>), or in $WEFT_KUBERNETES_VALIDATE_DIR.
`--check` only reports whether it is there (exit 0, or 3).
"""

import argparse
import copy
import glob
import os
import re
import sys

# Keep in step with kv_version in scripts/install-deps.
KUBERNETES_VALIDATE_VERSION = "1.37.0"
DEFAULT_DIR = "/opt/weft/python/kubernetes-validate-" + KUBERNETES_VALIDATE_VERSION
# The Kubernetes release Weft targets; the schemas are the newest bundled ones not newer.
TARGET_KUBERNETES = "1.35"
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CRDS = os.path.join(HERE, "..", "base", "crds")
OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

EXIT_INVALID, EXIT_INPUT, EXIT_MISSING = 1, 2, 3

validator_dir = os.environ.get("WEFT_KUBERNETES_VALIDATE_DIR") or DEFAULT_DIR


def _import_validator():
    if not os.path.isdir(os.path.join(validator_dir, "kubernetes_validate")):
        return "kubernetes-validate is not installed at %s (run scripts/install-deps, or set " \
            "WEFT_KUBERNETES_VALIDATE_DIR)" % validator_dir
    sys.path.insert(0, validator_dir)
    try:
        global jsonschema, yaml, referencing, kv_utils, kv_version
        import jsonschema
        import referencing
        import yaml
        import kubernetes_validate.utils as kv_utils
        from kubernetes_validate.version import __version__ as kv_version
    except ImportError as err:
        return "kubernetes-validate at %s does not import: %s" % (validator_dir, err)
    return None


def _refuse_retrieval(uri):
    raise LookupError("refusing to fetch %s: validation is offline" % uri)


def _major_minor(version):
    m = re.match(r"^v?(\d+)\.(\d+)", version)
    if not m:
        raise SystemExit("validate.py: bad Kubernetes version %r" % version)
    return int(m.group(1)), int(m.group(2))


def schema_version(wanted):
    """The newest schema version kubernetes-validate bundles that is not newer than `wanted`."""
    bundled = sorted(set(kv_utils.all_versions()), key=_major_minor)
    fits = [v for v in bundled if _major_minor(v) <= _major_minor(wanted)]
    if not fits:
        raise SystemExit("validate.py: kubernetes-validate %s bundles no schema <= %s (it has %s)"
                         % (kv_version, wanted, ", ".join(bundled)))
    return fits[-1]


def fmt_path(parts):
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += "[%d]" % part
        else:
            out += ("." if out else "") + str(part)
    return out or "(root)"


def error_lines(validator, instance, prefix=()):
    """(field path, message) for every error, one per unknown field."""
    for err in sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.path]):
        path = list(prefix) + list(err.absolute_path)
        if err.validator == "additionalProperties" and err.validator_value is False \
                and isinstance(err.instance, dict):
            known = set(err.schema.get("properties", {}))
            patterns = list(err.schema.get("patternProperties", {}))
            extra = [k for k in err.instance
                     if k not in known and not any(re.search(p, str(k)) for p in patterns)]
            for key in sorted(extra, key=str):
                yield fmt_path(path + [key]), "unknown field %r" % key
            if extra:
                continue
        yield fmt_path(path), err.message


class Kubernetes:
    """The strict schemas kubernetes-validate bundles for one Kubernetes version."""

    def __init__(self, version):
        self.version = version
        self.dir = "kubernetes-json-schema/v%s-local-strict" % version
        defs = kv_utils.schema_contents(self.dir + "/_definitions.json", version)
        self.registry = referencing.Registry(retrieve=_refuse_retrieval).with_resource(
            defs["$id"], referencing.Resource.from_contents(defs))
        self.cache = {}

    def validator(self, api_version, kind):
        """A validator for the kind, or None when no schema is bundled for it."""
        key = (api_version, kind)
        if key not in self.cache:
            # As kubernetes_validate.utils.validate names them: rbac.authorization.k8s.io/v1 ->
            # rbac-v1, apps/v1 -> apps-v1, v1 -> v1.
            group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
            try:
                schema = kv_utils.schema_contents(
                    "%s/%s-%s.json" % (self.dir, kind.lower(), group_version), self.version)
            except FileNotFoundError:
                schema = None
            if schema is not None and api_version not in schema.get("properties", {}).get(
                    "apiVersion", {}).get("enum", [api_version]):
                schema = None  # the file name drops the domain: apps.example.com/v1 -> apps-v1
            self.cache[key] = None if schema is None else jsonschema.Draft202012Validator(
                schema, registry=self.registry.with_resource(
                    schema["$id"], referencing.Resource.from_contents(schema)))
        return self.cache[key]

    def object_meta(self):
        if "meta" not in self.cache:
            self.cache["meta"] = jsonschema.Draft202012Validator(
                {"$ref": OBJECT_META}, registry=self.registry)
        return self.cache["meta"]


def strict_crd_schema(node, structural=True):
    """A CRD's structural OpenAPI v3 schema as JSON Schema draft 4 that refuses what
    kube-apiserver would prune: an object without `additionalProperties` or
    `x-kubernetes-preserve-unknown-fields` takes only its `properties`. Value validations under
    allOf/anyOf/oneOf/not are not structural and keep their meaning."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            node[key] = [strict_crd_schema(s, False) for s in node[key]]
    if "not" in node:
        node["not"] = strict_crd_schema(node["not"], False)
    if "properties" in node:
        node["properties"] = {k: strict_crd_schema(v, structural)
                              for k, v in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        node["items"] = strict_crd_schema(node["items"], structural)
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict_crd_schema(node["additionalProperties"], structural)
    if node.pop("nullable", False):
        if "type" in node:
            node["type"] = [node["type"], "null"]
        if "enum" in node:
            node["enum"] = list(node["enum"]) + [None]
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        node["type"] = ["integer", "string"]
    if node.get("x-kubernetes-list-type") == "set":
        node["uniqueItems"] = True
    if structural and (node.get("type") == "object" or "properties" in node) \
            and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        if node.get("x-kubernetes-embedded-resource"):
            props = dict(node.get("properties", {}))
            for key in ("apiVersion", "kind", "metadata"):
                props.setdefault(key, {})
            node["properties"] = props
        node["additionalProperties"] = False
    return node


class CustomResources:
    """The CRDs in a directory: (group, kind) -> CRD."""

    def __init__(self, crd_dir):
        self.dir = os.path.normpath(crd_dir)
        self.crds = {}
        self.cache = {}
        for path in sorted(glob.glob(os.path.join(self.dir, "*.yaml"))):
            with open(path) as f:
                for doc in yaml.safe_load_all(f):
                    if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                        spec = doc["spec"]
                        self.crds[(spec["group"], spec["names"]["kind"])] = doc

    def find(self, api_version, kind):
        group, _, version = api_version.rpartition("/")
        return self.crds.get((group, kind)), version

    def validator(self, crd, version):
        key = (crd["metadata"]["name"], version)
        if key not in self.cache:
            served = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
            schema = served[0].get("schema", {}).get("openAPIV3Schema") if served else None
            if schema is None:
                self.cache[key] = None
            else:
                schema = strict_crd_schema(copy.deepcopy(schema))
                props = dict(schema.get("properties", {}))
                props.update(apiVersion={"type": "string"}, kind={"type": "string"},
                             metadata={})  # metadata: against ObjectMeta, separately
                schema["properties"] = props
                schema["additionalProperties"] = False
                self.cache[key] = jsonschema.Draft4Validator(
                    schema, registry=referencing.Registry(retrieve=_refuse_retrieval))
        return self.cache[key]


def _string_timestamps(loader, node):
    return loader.construct_scalar(node)  # as kubectl and helm read them: strings


def documents(text):
    """(object, helm's `# Source:` for it) for every non-empty document."""
    class Loader(yaml.SafeLoader):
        pass
    Loader.add_constructor("tag:yaml.org,2002:timestamp", _string_timestamps)
    Loader.add_constructor("tag:yaml.org,2002:value", _string_timestamps)
    sources = [(i, m.group(1)) for i, line in enumerate(text.splitlines())
               for m in [re.match(r"^# Source: (.*\S)", line)] if m]
    loader = Loader(text)
    previous_end = -1
    try:
        while loader.check_node():
            node = loader.get_node()
            data = loader.construct_document(node)
            line, end = node.start_mark.line, node.end_mark.line
            if data is None:
                continue  # an empty document (a crds/ file's leading `---`, a template's nothing)
            source = [s for i, s in sources if previous_end <= i < line]
            previous_end = end
            yield data, (source[-1] if source else "line %d" % (line + 1))
    finally:
        loader.dispose()


def name_of(obj):
    if not isinstance(obj, dict):
        return "?"
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    parts = [str(obj.get("kind", "?"))]
    if meta.get("namespace"):
        parts.append(str(meta["namespace"]))
    parts.append(str(meta.get("name", "?")))
    return "/".join(parts)


def validate(obj, kube, crs):
    """(field path, message) for every error in one object."""
    if not isinstance(obj, dict):
        return [("(root)", "not an object: %r" % (obj,))]
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return [("(root)", "apiVersion and kind must be strings")]
    validator = kube.validator(api_version, kind)
    if validator is not None:
        return list(error_lines(validator, obj))
    crd, version = crs.find(api_version, kind)
    if crd is None:
        return [("(root)", "no schema for %s %s: not a Kubernetes %s kind, nor a CRD in %s"
                 % (api_version, kind, kube.version, os.path.relpath(crs.dir)))]
    validator = crs.validator(crd, version)
    if validator is None:
        return [("apiVersion", "%s is not a served version of CRD %s (%s)"
                 % (api_version, crd["metadata"]["name"],
                    ", ".join(v["name"] for v in crd["spec"]["versions"] if v.get("served"))))]
    errors = list(error_lines(validator, obj))
    if "metadata" in obj:
        errors += error_lines(kube.object_meta(), obj["metadata"], ["metadata"])
    else:
        errors.append(("(root)", "'metadata' is a required property"))
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubernetes-version", default=TARGET_KUBERNETES,
                        help="validate for this release (default %(default)s)")
    parser.add_argument("--crds", default=DEFAULT_CRDS,
                        help="directory of the CRDs for custom kinds (default charts/base/crds)")
    parser.add_argument("--check", action="store_true",
                        help="only report whether kubernetes-validate is installed")
    parser.add_argument("files", nargs="*", help="YAML files; '-' or none: stdin")
    args = parser.parse_args()

    missing = _import_validator()
    if missing:
        print("validate.py: " + missing, file=sys.stderr)
        return EXIT_MISSING
    version = schema_version(args.kubernetes_version)
    if args.check:
        print("kubernetes-validate %s at %s: Kubernetes %s schemas (for %s)"
              % (kv_version, validator_dir, version, args.kubernetes_version))
        return 0
    kube = Kubernetes(version)
    crs = CustomResources(args.crds)

    count = errors = 0
    for path in args.files or ["-"]:
        try:
            if path == "-":
                text, label = sys.stdin.read(), "<stdin>"
            else:
                with open(path) as f:
                    text, label = f.read(), path
            docs = list(documents(text))
        except (OSError, yaml.YAMLError) as err:
            print("validate.py: %s: %s" % (path, err), file=sys.stderr)
            return EXIT_INPUT
        for obj, source in docs:
            count += 1
            where = source if label == "<stdin>" else "%s: %s" % (label, source)
            for field, message in validate(obj, kube, crs):
                errors += 1
                print("ERROR %s (%s): %s: %s" % (name_of(obj), where, field, message))
    print("%s: %d objects, %d errors (strict, Kubernetes %s schemas of kubernetes-validate %s, "
          "custom kinds from %s)" % ("FAILED" if errors else "ok", count, errors, version,
                                     kv_version, os.path.relpath(crs.dir)))
    return EXIT_INVALID if errors else 0


if __name__ == "__main__":
    sys.exit(main())
