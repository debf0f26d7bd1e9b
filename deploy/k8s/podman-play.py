#!/usr/bin/env python3
"""Play rendered Plateau manifests with `podman kube play`, on one host without Kubernetes.

    kubectl kustomize deploy/k8s/overlays/local > plateau.yaml
    deploy/k8s/podman-play.py up plateau.yaml --workdir DIR --publish superlink=127.0.0.1:8000
    ...
    deploy/k8s/podman-play.py down --workdir DIR [--volumes]

Podman 4.3 (Debian 12) plays the kinds Pod, Deployment, PersistentVolumeClaim and ConfigMap.
Everything else in the manifests is substituted, and each substitution is printed:

  Namespace    dropped: podman has no namespaces (pod, container and volume names are host-wide).
  Service      dropped: its name becomes a DNS alias, on a podman network, of every pod its
               selector matches (the cluster DNS stand-in). `--publish SERVICE=IP:PORT` maps the
               Service's first port on the host, like `kubectl port-forward svc/SERVICE`.
  StatefulSet  one Pod per replica, named NAME-i with hostname NAME-i (the pod identity the
               SuperNodes read their partition from) and the label apps.kubernetes.io/pod-index=i
               (as Kubernetes 1.28+ sets it); each volumeClaimTemplate becomes the
               PersistentVolumeClaim CLAIM-NAME-i, as Kubernetes names it, kept by `down` unless
               --volumes, and reused by the next `up`.
  Secret       podman 4.3 mounts secret volumes with the values still base64-encoded and the
               modes ignored: the decoded files go to DIR/secrets/POD/VOLUME with the volume's
               defaultMode and the pod's fsGroup as group, mounted as hostPath volumes.
  emptyDir     a fresh folder DIR/emptydirs/POD/VOLUME (group fsGroup, mode 2770) mounted as a
               hostPath volume, removed by `down`: the same for every podman version.
  fieldRef     an env value from the pod's metadata.name, metadata.namespace or a label or
               annotation (metadata.labels['KEY']) is written in as the value Kubernetes gives.
  subPath      a hostPath volume mounted with subPath or subPathExpr ($(VAR) from the container's
               env) becomes a hostPath volume of PATH/SUBPATH: the same folder, and the same
               check that it exists (type Directory).
  probes       removed: podman 4.3 turns an httpGet liveness probe into a curl healthcheck that
               needs systemd timers; readiness and startup probes it ignores. Wait on the real
               endpoints instead (the SuperLink's /health, `flwr supernode list`).
  ports        a containerPort without a hostPort is left out: podman 4.3 would publish it on
               every host address, which Kubernetes never does.

Any other kind stops with an error. Needs root (rootful podman) and PyYAML.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

PLAYED = ("Pod", "Deployment")
PROBES = ("livenessProbe", "readinessProbe", "startupProbe")


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"podman {' '.join(args)} failed ({result.returncode}):\n"
                         f"{result.stdout}{result.stderr}")
    return result


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


class Converter:
    """Rendered manifests -> one podman-playable YAML file per pod, and what was substituted."""

    def __init__(self, docs: list[dict], workdir: Path, publish: dict[str, tuple[str, int]]):
        self.docs = docs
        self.workdir = workdir
        self.publish = publish
        self.notes: list[str] = []
        self.by_kind: dict[str, list[dict]] = {}
        for doc in docs:
            self.by_kind.setdefault(doc["kind"], []).append(doc)
        supported = {*PLAYED, "StatefulSet", "Service", "Secret", "ConfigMap",
                     "PersistentVolumeClaim", "Namespace"}
        unknown = sorted(set(self.by_kind) - supported)
        if unknown:
            raise SystemExit(f"kinds this script cannot play or substitute: {', '.join(unknown)}")
        for name in publish:
            if not any(s["metadata"]["name"] == name for s in self.by_kind.get("Service", [])):
                raise SystemExit(f"--publish {name}=...: no Service named {name!r}")

    def secret_files(self, name: str) -> dict[str, bytes]:
        for secret in self.by_kind.get("Secret", []):
            if secret["metadata"]["name"] == name:
                files = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
                files |= {k: v.encode() for k, v in (secret.get("stringData") or {}).items()}
                return files
        raise SystemExit(f"Secret {name!r} is referenced but not in the manifests")

    def pod_spec(self, pod_name: str, spec: dict, labels: dict,
                 annotations: dict | None = None) -> dict:
        spec = copy.deepcopy(spec)
        group = (spec.get("securityContext") or {}).get("fsGroup", 0)
        for volume in spec.get("volumes", []):
            if "emptyDir" in volume:
                volume.pop("emptyDir")
                folder = self.workdir / "emptydirs" / pod_name / volume["name"]
                folder.mkdir(parents=True, exist_ok=True)
                os.chown(folder, 0, group)
                folder.chmod(0o2770)
                volume["hostPath"] = {"path": str(folder), "type": "Directory"}
                self.note(f"emptyDir {volume['name']} -> hostPath {folder} (mode 2770, group "
                          f"{group}) in pod {pod_name}")
                continue
            if "secret" not in volume:
                continue
            source = volume.pop("secret")
            files = self.secret_files(source["secretName"])
            mode = source.get("defaultMode", 0o644)
            items = source.get("items") or [{"key": k, "path": k} for k in files]
            folder = self.workdir / "secrets" / pod_name / volume["name"]
            folder.mkdir(parents=True, exist_ok=True)
            for item in items:
                target = folder / item["path"]
                target.write_bytes(files[item["key"]])
                os.chown(target, 0, group)
                target.chmod(item.get("mode", mode))
            volume["hostPath"] = {"path": str(folder), "type": "Directory"}
            self.note(f"Secret {source['secretName']} -> hostPath {folder} "
                      f"(mode {oct(mode)}, group {group}) in pod {pod_name}")
        for container in spec.get("containers", []):
            removed = [p for p in PROBES if container.pop(p, None) is not None]
            if removed:
                self.note(f"{pod_name}/{container['name']}: removed {', '.join(removed)}")
            self.resolve_field_refs(pod_name, container, labels, annotations or {})
            self.resolve_sub_paths(pod_name, container, spec)
        mounted = {m["name"] for c in spec.get("containers", []) for m in c.get("volumeMounts", [])}
        if "volumes" in spec:  # a hostPath only ever mounted with subPaths: no longer used
            spec["volumes"] = [v for v in spec["volumes"] if v["name"] in mounted
                               or not v.get("subPathsOnly")]
            for volume in spec["volumes"]:
                volume.pop("subPathsOnly", None)
        return spec

    def resolve_field_refs(self, pod_name: str, container: dict, labels: dict,
                           annotations: dict) -> None:
        """Write in the values of env fieldRefs to the pod's metadata."""
        for env in container.get("env", []):
            field = ((env.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            if field is None:
                continue
            found = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", field)
            if field == "metadata.name":
                value = pod_name
            elif field == "metadata.namespace":
                value = "default"
            elif found and found[2] in (labels if found[1] == "labels" else annotations):
                value = (labels if found[1] == "labels" else annotations)[found[2]]
            else:
                raise SystemExit(f"{pod_name}/{container['name']}: env {env['name']} from "
                                 f"fieldRef {field!r}: not something this pod has")
            env.pop("valueFrom")
            env["value"] = str(value)
            self.note(f"{pod_name}/{container['name']}: env {env['name']} from {field} -> "
                      f"{value!r}")

    def resolve_sub_paths(self, pod_name: str, container: dict, spec: dict) -> None:
        """A hostPath volume mounted with subPath(Expr) -> a hostPath volume of the sub-folder."""
        env = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            if "subPath" not in mount and "subPathExpr" not in mount:
                continue
            sub = mount.pop("subPath", None) or re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), mount.pop("subPathExpr"))
            volume = volumes.get(mount["name"], {})
            if "hostPath" not in volume or "$(" in sub or ".." in Path(sub).parts:
                raise SystemExit(f"{pod_name}/{container['name']}: mount of {mount['name']} "
                                 f"with subPath {sub!r}: only a hostPath volume and a sub-folder "
                                 "of it are supported")
            name = f"{mount['name']}-{re.sub(r'[^a-z0-9-]', '-', sub.lower())}"[:63]
            path = str(Path(volume["hostPath"]["path"]) / sub)
            if name not in volumes:
                volumes[name] = {"name": name, "hostPath": {**volume["hostPath"], "path": path}}
                spec["volumes"].append(volumes[name])
            mount["name"] = name
            volume["subPathsOnly"] = True
            self.note(f"{pod_name}/{container['name']}: {volume['hostPath']['path']} with "
                      f"subPath {sub} -> hostPath {path}")

    @staticmethod
    def unpublish(pod_name: str, spec: dict, notes: list[str]) -> None:
        """Drop the container ports that got no hostPort: podman 4.3 would publish them."""
        for container in spec.get("containers", []):
            ports = container.get("ports", [])
            kept = [p for p in ports if "hostPort" in p]
            if len(kept) < len(ports):
                notes.append(f"{pod_name}/{container['name']}: containerPort(s) "
                             f"{[p['containerPort'] for p in ports if 'hostPort' not in p]} "
                             "not declared (podman 4.3 publishes them on every host address)")
            if kept:
                container["ports"] = kept
            else:
                container.pop("ports", None)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def services_for(self, labels: dict) -> list[dict]:
        return [s for s in self.by_kind.get("Service", [])
                if matches(s["spec"].get("selector") or {}, labels)]

    def publish_ports(self, pod_name: str, labels: dict, spec: dict) -> None:
        for service in self.services_for(labels):
            name = service["metadata"]["name"]
            if name not in self.publish:
                continue
            host_ip, host_port = self.publish[name]
            target = service["spec"]["ports"][0].get("targetPort",
                                                     service["spec"]["ports"][0]["port"])
            for container in spec["containers"]:
                for port in container.get("ports", []):
                    if target in (port.get("name"), port["containerPort"]):
                        port["hostIP"], port["hostPort"] = host_ip, host_port
                        self.note(f"Service {name} port {target} -> {host_ip}:{host_port} "
                                  f"(pod {pod_name}, like kubectl port-forward)")
                        break

    def convert(self) -> list[dict]:
        """A list of {"name", "docs", "aliases", "claims"}: what one `podman kube play` plays."""
        for doc in self.by_kind.get("Namespace", []):
            self.note(f"Namespace {doc['metadata']['name']} dropped (podman has no namespaces)")
        for doc in self.by_kind.get("Service", []):
            self.note(f"Service {doc['metadata']['name']} -> DNS alias of the pods it selects")
        configmaps = self.by_kind.get("ConfigMap", [])
        plays = []
        for doc in self.docs:
            kind, meta = doc["kind"], doc["metadata"]
            if kind == "StatefulSet":
                replicas = doc["spec"].get("replicas", 1)
                self.note(f"StatefulSet {meta['name']} -> {replicas} Pod(s) {meta['name']}-i")
                for i in range(replicas):
                    plays.append(self.statefulset_pod(doc, i, configmaps))
            elif kind in PLAYED:
                doc = copy.deepcopy(doc)
                template = doc["spec"]["template"] if kind == "Deployment" else doc
                labels = template["metadata"].get("labels", {})
                pod_name = meta["name"]
                template["spec"] = self.pod_spec(pod_name, template["spec"], labels,
                                                 template["metadata"].get("annotations"))
                self.publish_ports(pod_name, labels, template["spec"])
                self.unpublish(pod_name, template["spec"], self.notes)
                plays.append({"name": pod_name, "docs": [*configmaps, doc],
                              "aliases": [s["metadata"]["name"]
                                          for s in self.services_for(labels)],
                              "claims": []})
            elif kind == "PersistentVolumeClaim":
                plays.append({"name": meta["name"], "docs": [doc], "aliases": [],
                              "claims": [meta["name"]]})
        return plays

    def statefulset_pod(self, sts: dict, i: int, configmaps: list[dict]) -> dict:
        name = f"{sts['metadata']['name']}-{i}"
        template = copy.deepcopy(sts["spec"]["template"])
        labels = {**template["metadata"].get("labels", {}),
                  "statefulset.kubernetes.io/pod-name": name,
                  "apps.kubernetes.io/pod-index": str(i)}
        spec = self.pod_spec(name, template["spec"], labels,
                             template["metadata"].get("annotations"))
        spec["hostname"] = name
        spec.setdefault("restartPolicy", "Always")
        claims = []
        pvcs = []
        for claim in sts["spec"].get("volumeClaimTemplates", []):
            claim_name = f"{claim['metadata']['name']}-{name}"
            pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": claim_name}, "spec": claim["spec"]}
            pvcs.append(pvc)
            claims.append(claim_name)
            spec.setdefault("volumes", []).append(
                {"name": claim["metadata"]["name"],
                 "persistentVolumeClaim": {"claimName": claim_name}})
            self.note(f"volumeClaimTemplate {claim['metadata']['name']} -> "
                      f"PersistentVolumeClaim {claim_name}")
        self.publish_ports(name, labels, spec)
        self.unpublish(name, spec, self.notes)
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "labels": labels}, "spec": spec}
        return {"name": name, "docs": [*configmaps, *pvcs, pod],
                "aliases": [s["metadata"]["name"] for s in self.services_for(labels)],
                "claims": claims}


def up(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir).resolve()
    if (workdir / "plan.json").exists():
        raise SystemExit(f"{workdir}/plan.json exists: run `down --workdir {workdir}` first")
    publish = {}
    for item in args.publish:
        service, _, address = item.partition("=")
        host_ip, _, port = address.rpartition(":")
        if not (service and host_ip and port.isdigit()):
            raise SystemExit(f"--publish {item!r}: expected SERVICE=IP:PORT")
        publish[service] = (host_ip, int(port))
    docs = [d for d in yaml.safe_load_all(Path(args.manifests).read_text()) if d]
    (workdir / "secrets").mkdir(parents=True, exist_ok=True)
    (workdir / "secrets").chmod(0o700)
    converter = Converter(docs, workdir, publish)
    plays = converter.convert()
    created_network = podman("network", "exists", args.network, check=False).returncode != 0
    if created_network:
        podman("network", "create", args.network)
    plan = {"network": args.network, "created_network": created_network, "files": [],
            "claims": [c for p in plays for c in p["claims"]]}
    (workdir / "plan.json").write_text(json.dumps(plan, indent=1))
    for i, play in enumerate(plays):
        docs = play["docs"]
        existing = [d for d in docs if d["kind"] == "PersistentVolumeClaim"
                    and podman("volume", "exists", d["metadata"]["name"],
                               check=False).returncode == 0]
        docs = [d for d in docs if d not in existing]  # an existing claim is reused
        if all(d["kind"] == "ConfigMap" for d in docs):
            continue
        path = workdir / f"{i:02d}-{play['name']}.yaml"
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        network = args.network + "".join(
            f"{':' if j == 0 else ','}alias={a}" for j, a in enumerate(play["aliases"]))
        podman("kube", "play", "--network", network, str(path))
        plan["files"].append(str(path))
        (workdir / "plan.json").write_text(json.dumps(plan, indent=1))
        aliases = f" (DNS: {', '.join(play['aliases'])})" if play["aliases"] else ""
        print(f"played {path.name}{aliases}")
    for text in converter.notes:
        print(f"substituted: {text}")


def down(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir).resolve()
    plan_path = workdir / "plan.json"
    if not plan_path.exists():
        raise SystemExit(f"{plan_path} not found: nothing was played from {workdir}")
    plan = json.loads(plan_path.read_text())
    for path in reversed(plan["files"]):
        podman("kube", "down", path, check=False)
    if args.volumes:
        for claim in plan["claims"]:
            if podman("volume", "exists", claim, check=False).returncode == 0:
                podman("volume", "rm", claim)
    if plan["created_network"]:
        podman("network", "rm", "--force", plan["network"], check=False)
    shutil.rmtree(workdir / "secrets", ignore_errors=True)
    shutil.rmtree(workdir / "emptydirs", ignore_errors=True)
    for path in plan["files"]:
        Path(path).unlink(missing_ok=True)
    plan_path.unlink()
    print(f"down: {len(plan['files'])} file(s), volumes {'removed' if args.volumes else 'kept'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    play = sub.add_parser("up", help="convert and play the rendered manifests")
    play.add_argument("manifests", help="output of `kubectl kustomize deploy/k8s/overlays/...`")
    play.add_argument("--workdir", required=True, help="for the pod files and secret files")
    play.add_argument("--network", default="plateau", help="podman network (created if missing)")
    play.add_argument("--publish", action="append", default=[], metavar="SERVICE=IP:PORT")
    stop = sub.add_parser("down", help="stop and remove what `up` played")
    stop.add_argument("--workdir", required=True)
    stop.add_argument("--volumes", action="store_true",
                      help="also remove the PersistentVolumeClaims' volumes")
    args = parser.parse_args(argv)
    if shutil.which("podman") is None:
        raise SystemExit("podman is not installed")
    {"up": up, "down": down}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
