#!/usr/bin/env python3
"""Checks the Kubernetes manifests of deploy/k8s offline. Run through scripts/k8s-check.sh, which
installs what this needs (kubectl with kustomize v5, kubernetes-validate).

For every kustomization directory given (by default every overlay under deploy/k8s/overlays):

1. renders it with `kubectl kustomize`;
2. validates every object against the Kubernetes JSON schemas (kubernetes-validate, strict: an
   unknown field is an error), for the oldest Kubernetes the manifests support and the newest
   the schemas know;
3. checks references: the ConfigMaps, Secrets (and their keys) and claims that pods use exist,
   and every Service, PodDisruptionBudget and NetworkPolicy selects pods and names real ports;
4. checks the deployment's rules: no container runs as root or can escalate, root filesystems
   are read-only, capabilities are dropped, every long-running container has readiness and
   liveness probes (gRPC ones for baton; for a TLS server, an httpGet of /health on the metrics
   port), resources, Prometheus annotations on every pod, a PDB for every workload with more
   than one replica, the manager's standby kept out of its Service by a readiness probe on
   baton.v1.SessionManager, and NetworkPolicies that let only the mesh reach the manager and
   etcd;
5. checks every baton container against the built binary: its subcommand exists, each --flag is
   listed by `baton <subcommand> --help`, each BATON_* variable it is given is one that command
   reads, every $(VAR) it uses is defined, and then the binary parses the whole configuration
   (the flags, plus the BATON_* variables turned into their flags) with --help appended, which
   rejects a bad value (`--deadline=soon`) as it would at start.

`--self-test` feeds it broken manifests (a schema violation, an unknown flag, a bad value, an
unknown variable, a root container, a standby in the manager's Service, a missing readiness
probe) and fails unless each one is reported.
"""

from __future__ import annotations

import argparse
import base64
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

import kubernetes_validate
import kubernetes_validate.utils

# kubernetes-validate parses its schema files (megabytes of JSON) on every call: parse each once.
kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
    kubernetes_validate.utils.schema_contents)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes the manifests support (the dev overlay's native sidecar needs 1.29; gRPC
# probes 1.27) and the newest the pinned kubernetes-validate knows.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version() + ".0")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
MESH_LABEL = ("app.kubernetes.io/part-of", "baton")
PROM = ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path")


def log(msg: str) -> None:
    print(f"k8s-check: {msg}", flush=True)


class Checker:
    def __init__(self, kubectl: str, baton: str) -> None:
        self.kubectl = kubectl
        self.baton = baton
        self.help_cache: dict[tuple[str, ...], tuple[bool, str]] = {}

    # --- the binary ---------------------------------------------------------------------------

    def help(self, sub: tuple[str, ...]) -> tuple[bool, str]:
        """`baton <sub> --help`: (ok, text or the error)."""
        if sub not in self.help_cache:
            p = subprocess.run([self.baton, *sub, "--help"], capture_output=True, text=True,
                               env=clean_env())
            self.help_cache[sub] = (p.returncode == 0,
                                    p.stdout if p.returncode == 0 else (p.stderr or p.stdout).strip())
        return self.help_cache[sub]

    @staticmethod
    def parse_help(text: str) -> tuple[set[str], dict[str, str]]:
        """The long flags a help text lists, and each BATON_* variable with its flag."""
        flags: set[str] = set()
        env_flag: dict[str, str] = {}
        current = None
        for line in text.splitlines():
            m = re.match(r"^\s*(?:-[A-Za-z0-9],\s*)?--([A-Za-z0-9][A-Za-z0-9-]*)", line)
            if m:
                current = m.group(1)
                flags.add(current)
            for e in re.findall(r"\[env:\s*([A-Z0-9_]+)", line):
                if current:
                    env_flag[e] = current
        return flags, env_flag

    # --- one kustomization ----------------------------------------------------------------------

    def check(self, kdir: Path, label: str) -> list[str]:
        errors: list[str] = []

        def err(where: str, msg: str) -> None:
            errors.append(f"{label}: {where}: {msg}")

        p = subprocess.run([self.kubectl, "kustomize", str(kdir)], capture_output=True, text=True)
        if p.returncode != 0:
            return [f"{label}: kubectl kustomize failed: {p.stderr.strip()}"]
        docs = [d for d in yaml.safe_load_all(p.stdout) if d]
        objs = {(d["kind"], d["metadata"]["name"]): d for d in docs}

        # 2. schemas
        for d in docs:
            seen = set()
            for v in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(d, v, strict=True)
                except kubernetes_validate.ValidationError as e:
                    path = ".".join(str(x) for x in e.path)
                    msg = f"{path}: {e.message}"
                    if msg not in seen:
                        seen.add(msg)
                        err(kn(d), f"schema (Kubernetes {e.version}): {msg}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    err(kn(d), e.message)
                    break

        configmaps = {n: dict(o.get("data") or {}) for (k, n), o in objs.items() if k == "ConfigMap"}
        secrets = {}
        for (k, n), o in objs.items():
            if k == "Secret":
                data = {key: b64(val) for key, val in (o.get("data") or {}).items()}
                data.update(o.get("stringData") or {})
                secrets[n] = data
        pvcs = {n for (k, n) in objs if k == "PersistentVolumeClaim"}
        workloads = [o for o in docs if o["kind"] in WORKLOAD_KINDS]

        # 3. references, 4. rules, 5. flags, pod by pod
        for w in workloads:
            where = kn(w)
            tpl = w["spec"]["template"]
            spec = tpl["spec"]
            labels = tpl.get("metadata", {}).get("labels") or {}
            annotations = tpl.get("metadata", {}).get("annotations") or {}
            claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates") or []}
            for vol in spec.get("volumes") or []:
                if "configMap" in vol and vol["configMap"]["name"] not in configmaps:
                    err(where, f"volume {vol['name']}: no ConfigMap {vol['configMap']['name']}")
                if "secret" in vol and vol["secret"]["secretName"] not in secrets:
                    err(where, f"volume {vol['name']}: no Secret {vol['secret']['secretName']}")
                pvc = vol.get("persistentVolumeClaim")
                if pvc and pvc["claimName"] not in pvcs:
                    err(where, f"volume {vol['name']}: no PersistentVolumeClaim {pvc['claimName']}")
            volumes = {v["name"] for v in spec.get("volumes") or []} | claims

            psc = spec.get("securityContext") or {}
            if MESH_LABEL[0] not in labels or labels[MESH_LABEL[0]] != MESH_LABEL[1]:
                err(where, f"pods lack the label {MESH_LABEL[0]}: {MESH_LABEL[1]} (the NetworkPolicies' mesh)")
            for a in PROM:
                if a not in annotations:
                    err(where, f"pods lack the annotation {a}")
            ports = {}
            for c in all_containers(spec):
                for cp in c.get("ports") or []:
                    ports[cp["containerPort"]] = cp.get("name")
            prom_port = annotations.get("prometheus.io/port")
            if prom_port and (not prom_port.isdigit() or int(prom_port) not in ports):
                err(where, f"prometheus.io/port {prom_port} is no container port of the pod")
            if not (psc.get("seccompProfile") or all(
                    (c.get("securityContext") or {}).get("seccompProfile") for c in all_containers(spec))):
                err(where, "no seccompProfile")

            for c in all_containers(spec):
                cw = f"{where} container {c['name']}"
                csc = c.get("securityContext") or {}
                # effective settings: the container's, else the pod's
                non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
                uid = csc.get("runAsUser", psc.get("runAsUser"))
                if non_root is not True:
                    err(cw, "runAsNonRoot is not true")
                if uid == 0:
                    err(cw, "runs as root (runAsUser: 0)")
                elif uid is None:
                    err(cw, "runAsUser is unset (set a non-zero uid, so no image can run it as root)")
                if csc.get("privileged"):
                    err(cw, "is privileged")
                if csc.get("allowPrivilegeEscalation") is not False:
                    err(cw, "allowPrivilegeEscalation is not false")
                if csc.get("readOnlyRootFilesystem") is not True:
                    err(cw, "readOnlyRootFilesystem is not true")
                if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
                    err(cw, "does not drop ALL capabilities")
                res = c.get("resources") or {}
                if not all(k in (res.get("requests") or {}) for k in ("cpu", "memory")):
                    err(cw, "no cpu and memory requests")
                if "memory" not in (res.get("limits") or {}):
                    err(cw, "no memory limit")
                for vm in c.get("volumeMounts") or []:
                    if vm["name"] not in volumes:
                        err(cw, f"mounts an undefined volume {vm['name']}")
                env_names, env_values = self.container_env(c, configmaps, secrets, lambda m: err(cw, m))
                long_running = c in spec.get("containers", []) or c.get("restartPolicy") == "Always"
                baton = is_baton(c)
                if long_running:
                    tls = serves_tls(c, env_names)
                    for probe in ("readinessProbe", "livenessProbe"):
                        pr = c.get(probe)
                        if not pr:
                            err(cw, f"no {probe}")
                        elif baton and tls and not is_health_get(pr):
                            # the kubelet's gRPC probe is plaintext: a TLS server is probed on
                            # the plain-HTTP /health of its metrics port
                            err(cw, f"{probe} of a TLS server is not an httpGet of /health on the metrics port")
                        elif baton and not tls and "grpc" not in pr:
                            err(cw, f"{probe} is not of type grpc")
                if baton:
                    self.check_baton(c, cw, env_names, env_values, err)
                    self.check_manager(w, c, cw, objs, err)

        for o in docs:
            if o["kind"] == "Service" and o["spec"].get("selector"):
                self.check_selects(o, o["spec"]["selector"], workloads, err,
                                   ports=[p["targetPort"] for p in o["spec"].get("ports", [])
                                          if "targetPort" in p])
            if o["kind"] == "PodDisruptionBudget":
                self.check_selects(o, o["spec"]["selector"].get("matchLabels", {}), workloads, err)
            if o["kind"] == "NetworkPolicy":
                sel = o["spec"]["podSelector"].get("matchLabels", {})
                named = [p["port"] for r in o["spec"].get("ingress", []) for p in r.get("ports", [])
                         if isinstance(p.get("port"), str)]
                self.check_selects(o, sel, workloads, err, ports=named)

        # PDBs for every workload with more than one replica
        pdbs = [o for o in docs if o["kind"] == "PodDisruptionBudget"]
        for w in workloads:
            if (w["spec"].get("replicas") or 1) > 1:
                labels = w["spec"]["template"]["metadata"].get("labels") or {}
                if not any(matches(p["spec"]["selector"].get("matchLabels", {}), labels) for p in pdbs):
                    err(kn(w), f"{w['spec']['replicas']} replicas and no PodDisruptionBudget")

        self.check_network_policies(docs, workloads, err)
        return errors

    @staticmethod
    def container_env(c, configmaps, secrets, err):
        """Every variable a container gets, and the values known offline (None: filled in by the
        kubelet, such as fieldRefs)."""
        names: list[str] = []
        values: dict[str, str | None] = {}
        for ef in c.get("envFrom") or []:
            prefix = ef.get("prefix", "")
            for kind, ref, pool in (("ConfigMap", ef.get("configMapRef"), configmaps),
                                    ("Secret", ef.get("secretRef"), secrets)):
                if ref is None:
                    continue
                if ref["name"] not in pool:
                    if not ref.get("optional"):
                        err(f"envFrom: no {kind} {ref['name']}")
                    continue
                for key, val in pool[ref["name"]].items():
                    names.append(prefix + key)
                    values[prefix + key] = val
        for e in c.get("env") or []:
            name = e["name"]
            names.append(name)
            vf = e.get("valueFrom")
            if vf is None:
                # $(VAR) in a value refers to a variable defined before it
                val = e.get("value", "")
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", val):
                    if ref not in values:
                        err(f"env {name} refers to $({ref}), which is not defined before it")
                values[name] = expand(val, values)
                continue
            for kind, key_ref, pool in (("ConfigMap", vf.get("configMapKeyRef"), configmaps),
                                        ("Secret", vf.get("secretKeyRef"), secrets)):
                if key_ref is None:
                    continue
                src = pool.get(key_ref["name"])
                if src is None or key_ref["key"] not in src:
                    if not key_ref.get("optional"):
                        err(f"env {name}: no key {key_ref['key']} in {kind} {key_ref['name']}")
                    values[name] = None
                else:
                    values[name] = src[key_ref["key"]]
            if "fieldRef" in vf or "resourceFieldRef" in vf:
                values[name] = None
        return names, values

    def check_baton(self, c, cw, env_names, env_values, err) -> None:
        command = c.get("command")
        if command and not (len(command) == 1 and command[0].rsplit("/", 1)[-1] == "baton"):
            err(cw, f"command {command} replaces the image's entrypoint (baton)")
        args = [str(a) for a in c.get("args") or []]
        sub = []
        for a in args:
            if a.startswith("-"):
                break
            sub.append(a)
        sub = tuple(sub)
        cmd = "baton " + " ".join(sub)
        if not sub:
            err(cw, "no baton subcommand in args")
            return
        ok, text = self.help(sub)
        if not ok:
            err(cw, f"`{cmd}` is not a command of the binary: {text}")
            return
        flags, env_flag = self.parse_help(text)
        bad = False
        given_flags = []
        rest = args[len(sub):]
        for i, a in enumerate(rest):
            if not a.startswith("--"):
                if not (i and rest[i - 1].startswith("--") and "=" not in rest[i - 1]):
                    err(cw, f"stray argument {a!r} after the flags of `{cmd}`")
                    bad = True
                continue
            name = a[2:].split("=", 1)[0]
            given_flags.append(name)
            if name not in flags:
                err(cw, f"unknown flag --{name}: `{cmd} --help` does not list it")
                bad = True
        for name in env_names:
            if name.startswith("BATON_") and name not in env_flag:
                err(cw, f"unknown variable {name}: `{cmd} --help` reads no such variable")
                bad = True
        for a in args:
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
                if ref not in env_values:
                    err(cw, f"argument {a!r} refers to $({ref}), which the container's env does not define")
                    bad = True
        if bad:
            return
        # the whole configuration through the binary's own parser: flags as given, variables as
        # the flags they stand for (a flag given in args wins over its variable, as in baton)
        argv = [expand(a, env_values) for a in rest]
        for name in env_names:
            if name.startswith("BATON_") and env_flag[name] not in given_flags:
                val = env_values.get(name)
                argv.append(f"--{env_flag[name]}={val if val is not None else placeholder(name)}")
        p = subprocess.run([self.baton, *sub, *argv, "--help"], capture_output=True, text=True,
                           env=clean_env())
        if p.returncode != 0:
            err(cw, f"`{cmd}` rejects its configuration: {(p.stderr or p.stdout).strip()}")

    @staticmethod
    def check_manager(w, c, cw, objs, err) -> None:
        """A manager pair under etcd: the standby must stay out of the client Service."""
        args = [str(a) for a in c.get("args") or []]
        if args[:2] != ["manager", "serve"] or not any(a.startswith("--etcd") for a in args):
            return
        probe = c.get("readinessProbe") or {}
        service = ((probe.get("grpc") or {}).get("service")
                   or (probe.get("httpGet") or {}).get("path", "").partition("?service=")[2])
        if service != "baton.v1.SessionManager":
            err(cw, "readinessProbe must check the gRPC health of baton.v1.SessionManager, "
                    "which only the primary reports SERVING")
        if w["kind"] == "StatefulSet":
            if w["spec"].get("podManagementPolicy") != "Parallel":
                err(kn(w), "podManagementPolicy must be Parallel (a standby is never Ready)")
            if (w["spec"].get("updateStrategy") or {}).get("type") != "OnDelete":
                err(kn(w), "updateStrategy must be OnDelete (a RollingUpdate waits for the standby to be Ready)")
        labels = w["spec"]["template"]["metadata"].get("labels") or {}
        for (kind, name), o in objs.items():
            if kind != "Service" or not matches(o["spec"].get("selector") or {}, labels):
                continue
            if o["spec"].get("clusterIP") != "None" and o["spec"].get("publishNotReadyAddresses"):
                err(kn(o), "publishes not-ready addresses: the manager's standby would get traffic")

    @staticmethod
    def check_selects(o, selector, workloads, err, ports=()) -> None:
        hit = [w for w in workloads if matches(selector, w["spec"]["template"]["metadata"].get("labels") or {})]
        if not hit:
            err(kn(o), f"selects no pods ({selector})")
            return
        for port in ports:
            found = False
            for w in hit:
                for c in all_containers(w["spec"]["template"]["spec"]):
                    for cp in c.get("ports") or []:
                        if port in (cp["containerPort"], cp.get("name")):
                            found = True
            if not found:
                err(kn(o), f"port {port} is no container port of the pods it selects")

    @staticmethod
    def check_network_policies(docs, workloads, err) -> None:
        """The manager and etcd: reached only from mesh pods, apart from their metrics port."""
        policies = [o for o in docs if o["kind"] == "NetworkPolicy"]
        for w in workloads:
            tpl = w["spec"]["template"]
            labels = tpl["metadata"].get("labels") or {}
            cs = tpl["spec"]["containers"]
            internal = any(str(a) == "manager" for c in cs for a in (c.get("args") or [])[:1]) or \
                any("etcd" in c.get("image", "").rsplit("/", 1)[-1] for c in cs)
            if not internal:
                continue
            metrics = {"metrics"}
            prom = (tpl["metadata"].get("annotations") or {}).get("prometheus.io/port")
            if prom:
                metrics.add(int(prom))
            for c in cs:
                for cp in c.get("ports") or []:
                    if cp.get("name") == "metrics":
                        metrics.add(cp["containerPort"])
            mine = [p for p in policies if "Ingress" in (p["spec"].get("policyTypes") or ["Ingress"])
                    and matches(p["spec"]["podSelector"].get("matchLabels", {}), labels)]
            if not mine:
                err(kn(w), "no ingress NetworkPolicy selects these pods: anything can reach them")
                continue
            for p in mine:
                for i, rule in enumerate(p["spec"].get("ingress") or []):
                    rports = {x.get("port") for x in rule.get("ports") or []}
                    if rports and rports <= metrics:
                        continue
                    peers = rule.get("from")
                    if not peers:
                        err(kn(p), f"ingress[{i}] admits every source to {kn(w)}")
                        continue
                    for peer in peers:
                        sel = (peer.get("podSelector") or {}).get("matchLabels") or {}
                        if "namespaceSelector" in peer or "ipBlock" in peer or \
                                sel.get(MESH_LABEL[0]) != MESH_LABEL[1]:
                            err(kn(p), f"ingress[{i}] admits pods outside the mesh to {kn(w)} "
                                       f"(a peer must be a podSelector with {MESH_LABEL[0]}: {MESH_LABEL[1]})")


# --- helpers ----------------------------------------------------------------------------------

def kn(o) -> str:
    return f"{o['kind']}/{o['metadata']['name']}"


def all_containers(spec) -> list:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def serves_tls(c, env_names) -> bool:
    """Whether a container's server serves TLS (--tls-cert, or BATON_TLS_CERT)."""
    return "BATON_TLS_CERT" in env_names or any(str(a).startswith("--tls-cert") for a in c.get("args") or [])


def is_health_get(probe) -> bool:
    """An httpGet of /health (`?service=NAME` allowed) on the metrics port."""
    get = probe.get("httpGet") or {}
    return "grpc" not in probe and get.get("port") == "metrics" and get.get("path", "").split("?")[0] == "/health"


def is_baton(c) -> bool:
    image = c.get("image", "").split("@", 1)[0]
    name = image.rsplit("/", 1)[-1].split(":", 1)[0]
    return name == "baton"


def b64(s: str) -> str:
    try:
        return base64.b64decode(s).decode()
    except Exception:
        return s


def expand(s: str, values: dict) -> str:
    """Kubernetes' $(VAR) expansion, with a placeholder for what only the kubelet knows."""
    def sub(m):
        v = values.get(m.group(1))
        return v if v is not None else placeholder(m.group(1))
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, s)


def placeholder(name: str) -> str:
    return "baton-placeholder-0"


def clean_env() -> dict:
    """The environment for running the binary: without BATON_* (ours would leak into its parse)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BATON_")}


def staged_tree() -> Path:
    """A copy of deploy/k8s where every overlay that keeps its secrets out of git
    (NAME.example beside a missing NAME: secrets.env, blobs.env, the TLS files) gets the example's
    placeholders."""
    tmp = Path(tempfile.mkdtemp(prefix="baton-k8s-check-")) / "k8s"
    shutil.copytree(K8S, tmp)
    for ex in tmp.rglob("*.example"):
        real = ex.with_name(ex.name.removesuffix(".example"))
        if not real.exists():
            shutil.copy(ex, real)
    return tmp


def run(checker: Checker, dirs: list[Path]) -> int:
    stage = staged_tree()
    try:
        total = 0
        for d in dirs:
            d = d.resolve()
            try:
                target = stage / d.relative_to(K8S)
            except ValueError:
                target = d
            label = os.path.relpath(d, ROOT)
            errors = checker.check(target, label)
            for e in errors:
                print(f"k8s-check: ERROR {e}", flush=True)
            log(f"{label}: {'ok' if not errors else f'{len(errors)} error(s)'}")
            total += len(errors)
        return total
    finally:
        shutil.rmtree(stage.parent, ignore_errors=True)


# --- self-test --------------------------------------------------------------------------------

SELF_TESTS = [
    # (name, overlay, patch (a kustomize `patches` entry), a string the report must contain)
    ("schema violation (a misspelt field)", "prod", """
  - target: {kind: Deployment, name: baton-intake}
    patch: |-
      - op: add
        path: /spec/template/spec/containers/0/securityContext/readOnlyRootFilesytem
        value: true
""", "readOnlyRootFilesytem"),
    ("schema violation (a wrong type)", "dev", """
  - target: {kind: StatefulSet, name: baton-manager}
    patch: |-
      - op: replace
        path: /spec/template/spec/containers/0/ports/0/containerPort
        value: seventy-four-hundred
""", "'seventy-four-hundred' is not of type 'integer'"),
    ("unknown flag", "prod", """
  - target: {kind: Deployment, name: baton-intake}
    patch: |-
      - op: add
        path: /spec/template/spec/containers/0/args/-
        value: --no-such-flag=1
""", "unknown flag --no-such-flag"),
    ("flag with a bad value", "prod", """
  - target: {kind: Deployment, name: baton-intake}
    patch: |-
      - op: add
        path: /spec/template/spec/containers/0/args/-
        value: --deadline=soon
""", "invalid value 'soon'"),
    ("unknown subcommand", "dev", """
  - target: {kind: StatefulSet, name: baton-manager}
    patch: |-
      - op: replace
        path: /spec/template/spec/containers/0/args/1
        value: serv
""", "`baton manager serv` is not a command"),
    ("unknown variable", "prod", """
  - target: {kind: Deployment, name: baton-intake}
    patch: |-
      - op: add
        path: /spec/template/spec/containers/0/env/-
        value: {name: BATON_NO_SUCH_SETTING, value: "1"}
""", "unknown variable BATON_NO_SUCH_SETTING"),
    ("a container running as root", "prod", """
  - target: {kind: Deployment, name: baton-sync}
    patch: |-
      - op: replace
        path: /spec/template/spec/securityContext/runAsUser
        value: 0
""", "container sync: runs as root"),
    ("a TLS server probed by gRPC (the kubelet's is plaintext)", "prod", """
  - target: {kind: Deployment, name: baton-intake}
    patch: |-
      - op: replace
        path: /spec/template/spec/containers/0/readinessProbe
        value: {grpc: {port: 7400, service: baton.v1.Intake}, periodSeconds: 5}
""", "readinessProbe of a TLS server is not an httpGet of /health"),
    ("the standby in the manager's Service", "prod", """
  - target: {kind: Service, name: baton-manager}
    patch: |-
      - op: add
        path: /spec/publishNotReadyAddresses
        value: true
""", "the manager's standby would get traffic"),
    ("no readiness probe", "prod", """
  - target: {kind: Deployment, name: baton-sync}
    patch: |-
      - op: remove
        path: /spec/template/spec/containers/0/readinessProbe
""", "container sync: no readinessProbe"),
    ("etcd open to every pod", "prod", """
  - target: {kind: NetworkPolicy, name: baton-etcd}
    patch: |-
      - op: replace
        path: /spec/ingress/0/from
        value: [{podSelector: {}}]
""", "admits pods outside the mesh"),
]


def self_test(checker: Checker) -> int:
    stage = staged_tree()
    failures = 0
    try:
        # The unbroken overlays' own report (it may have errors of its own, for example while a
        # command is missing from the binary): a broken case must add its expected error.
        baseline = {}
        for overlay in ("dev", "prod"):
            baseline[overlay] = "\n".join(checker.check(stage / "overlays" / overlay, overlay))
        for i, (name, overlay, patch, expect) in enumerate(SELF_TESTS):
            d = stage / f"self-test-{i}"
            d.mkdir()
            (d / "kustomization.yaml").write_text(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                f"resources:\n  - ../overlays/{overlay}\npatches:{patch}")
            errors = checker.check(d, f"self-test {name}")
            report = "\n".join(errors)
            if expect in baseline[overlay]:
                log(f"self-test FAILED: {name}: the unbroken {overlay} overlay already reports {expect!r}")
                failures += 1
            elif not errors or expect not in report:
                log(f"self-test FAILED: {name}: expected an error containing {expect!r}, got:\n"
                    + (report or "  (no errors)"))
                failures += 1
            else:
                hit = next(e for e in errors if expect in e)
                log(f"self-test ok: {name}: {hit}")
    finally:
        shutil.rmtree(stage.parent, ignore_errors=True)
    log(f"self-test: {len(SELF_TESTS) - failures} of {len(SELF_TESTS)} broken manifests caught")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kubectl", default=os.environ.get("BATON_KUBECTL", "kubectl"))
    ap.add_argument("--baton", default=os.environ.get("BATON_BIN", str(ROOT / "target/debug/baton")))
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("dirs", nargs="*", type=Path,
                    help="kustomization directories (default: every overlay under deploy/k8s/overlays)")
    a = ap.parse_args()
    if not os.access(a.baton, os.X_OK):
        log(f"no baton binary at {a.baton} (build it: cargo build -p baton, or set BATON_BIN)")
        return 2
    checker = Checker(a.kubectl, a.baton)
    if a.self_test:
        return 1 if self_test(checker) else 0
    dirs = a.dirs or sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
    total = run(checker, dirs)
    log(f"{len(dirs)} kustomization(s), {total} error(s)")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
