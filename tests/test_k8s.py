"""The KubeRay deployment in k8s/ is valid, runnable and safe, checked without a cluster.

Each overlay in k8s/overlays/ is checked twice: as its files (what the overlay lists, before kustomize)
and as `kubectl kustomize` renders it (skipped with a reason where no kubectl with kustomize v5 is
installed). KubeRay objects validate against the v1.7.0 CRD schemas in ../shared/kuberay-crds (unknown
fields rejected, as the API server's pruning would silently drop them), plain objects against
kubernetes-validate's strict schemas; RayJobs, the nightly CronJob's included, also pass the rules KubeRay
v1.7.0's controller and Kueue's webhook apply before they run anything. Every `sdfleet` entrypoint parses
with the CLI's own parser. The nightly run itself, kustomize and the guide: tests/test_k8s_nightly.py;
loading and walking the objects: tests/k8s_objects.py.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pytest

from k8s_objects import (
    CACHE_CLAIM, GPU, K8S, KUBERNETES_VERSION, KUEUE_QUEUE, LAUNCHER, LITERALS, MAX_RAYCRONJOB_NAME, METRICS_PORT,
    NAMESPACE, OVERLAYS, PLACEHOLDER, REPO, SCHEDULERS, WORKLOADS, _argv, _autoscaled, _cluster_of, _cluster_specs,
    _cpu, _files, _gpu_capacity, _gpus, _groups, _jobs, _kuberay_rejects, _load, _name, _of_kind, _parse,
    _pod_templates, _ray_containers, _ray_pod_labels, _schema_errors, _with_created,
)


def test_objects_validate_against_their_schemas(objects):
    """Every overlay renders, and every object in it (and the RayJob its CronJob creates) validates."""
    assert objects, "the overlay holds nothing"
    for origin, obj in objects:
        errors = _schema_errors(obj)
        assert not errors, f"{origin} breaks its schema (KubeRay v1.7.0 / Kubernetes {KUBERNETES_VERSION}):\n  " \
                           + "\n  ".join(errors)


def test_example_secrets_validate():
    for origin, obj in _load([K8S / "secret.yaml.example"]):
        assert not _schema_errors(obj), f"{origin}: {_schema_errors(obj)}"


# --- one overlay, one thing ---------------------------------------------------------------------

def test_one_apply_starts_one_thing(objects):
    workloads = [o for o, obj in objects if obj["kind"] in WORKLOADS and ">" not in o]
    schedulers = [o for o, obj in objects if obj["kind"] in SCHEDULERS]
    assert len(schedulers) <= 1, f"two schedulers in one overlay would run the nightly twice: {schedulers}"
    assert len(workloads) <= 1, f"`kubectl apply -k` on one overlay would start several things: {workloads}"


def test_every_overlay_but_monitoring_starts_something():
    for overlay in OVERLAYS:
        kinds = {obj["kind"] for _, obj in _files(overlay)}
        assert bool(kinds & WORKLOADS) == (overlay != "monitoring"), f"overlays/{overlay}: {sorted(kinds)}"


def test_no_overlay_holds_secrets_and_none_lists_the_example():
    for path in K8S.rglob("kustomization.yaml"):
        assert "secret.yaml.example" not in path.read_text(), f"{path.relative_to(REPO)} lists secret.yaml.example"
    for overlay in OVERLAYS:
        assert not _of_kind(_files(overlay), "Secret"), f"overlays/{overlay} would overwrite real Secrets"
    # `kubectl apply -f DIR [-R]` takes every .yaml, .yml and .json in it: none of k8s/ may be a placeholder Secret
    for path in K8S.rglob("*"):
        if path.suffix in (".yaml", ".yml", ".json"):
            assert not _of_kind(_load([path]), "Secret"), f"`kubectl apply -f k8s/ -R` would apply {path}'s Secrets"


# --- pod security -------------------------------------------------------------------------------

PSS_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
               "projected", "secret"}


def _restricted_violations(pod: dict, added: list[dict]) -> list[str]:
    """Where a pod breaks the restricted Pod Security Standard (Kubernetes' pod-security admission)."""
    found = []
    pod_sc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"{field} is on")
    for volume in pod.get("volumes", []):
        kind = (set(volume) - {"name"}).pop()
        if kind not in PSS_VOLUMES:
            found.append(f"volume {volume['name']} is a {kind}")
    for c in pod.get("initContainers", []) + pod["containers"] + added:
        sc = c.get("securityContext") or {}
        where = f"container {c['name']}"
        if sc.get("privileged"):
            found.append(f"{where} is privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            found.append(f"{where}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where} adds capabilities {caps['add']}")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            found.append(f"{where}: runAsNonRoot is not true")
        # sdfleet's rule on top: the image's user is named, so only a numeric uid lets the kubelet
        # check runAsNonRoot.
        user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if not (isinstance(user, int) and user > 0):
            found.append(f"{where}: no non-zero runAsUser")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccompProfile is {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{where} uses a hostPort")
    return found


def test_every_pod_meets_the_restricted_pod_security_standard(objects):
    """Head, workers, the autoscaler KubeRay adds, any submitter, and the CronJob's pod."""
    for where, pod, added in _pod_templates(objects):
        found = _restricted_violations(pod, added)
        assert not found, f"{where} fails the restricted Pod Security Standard:\n  " + "\n  ".join(found)


def test_the_restricted_check_catches_a_bare_pod():
    found = _restricted_violations({"containers": [{"name": "c"}], "volumes": [{"name": "h", "hostPath": {}}]}, [])
    assert len(found) == 6, found


# --- entrypoints --------------------------------------------------------------------------------

def test_entrypoints_parse_and_survive_a_partial_run(objects):
    for origin, _, job in _jobs(objects):
        argv = _argv(job["entrypoint"])
        args = _parse(argv)
        assert args.command in ("generate", "finetune"), f"{origin}: unexpected command {args.command!r}"
        assert not re.search(r"AWS_|TOKEN|SECRET|://[^/\s]*@", job["entrypoint"], re.IGNORECASE), \
            f"{origin}: credentials belong in workload identity or Secrets, not the entrypoint"
        capacity = _gpu_capacity(_cluster_of(job, objects))
        if args.command == "generate":
            # Exit 2 (some rows failed) would be a Failed RayJob, retried on a fresh cluster.
            assert args.rows_may_fail, f"{origin}: generate without --rows-may-fail fails the RayJob on a partial run"
            assert 1 <= args.actors <= capacity, f"{origin}: --actors {args.actors}, GPU workers hold {capacity}"
            assert args.device == "cuda", f"{origin}: --device {args.device}; a GPU cluster needs --device cuda"
        else:
            # Ray Train waits for every worker's GPU: more workers than GPUs never starts.
            assert args.gpu and 1 <= args.workers <= capacity, \
                f"{origin}: --workers {args.workers} (--gpu {args.gpu}) on {capacity} GPUs"


def test_there_are_generate_and_finetune_jobs():
    commands = {_argv(job["entrypoint"])[0] for o in OVERLAYS for _, _, job in _jobs(_with_created(_files(o)))}
    assert commands == {"generate", "finetune"}, commands


# --- what KubeRay v1.7.0 and Kueue accept -------------------------------------------------------

def test_kuberay_and_kueue_accept_every_job(objects):
    for origin, metadata, job in _jobs(objects):
        found = _kuberay_rejects(metadata, job)
        assert not found, f"{origin} would be ValidationFailed or refused:\n  " + "\n  ".join(found)
    for origin, cron in _of_kind(objects, "RayCronJob"):
        assert len(_name(cron)) <= MAX_RAYCRONJOB_NAME, f"{origin}: name longer than {MAX_RAYCRONJOB_NAME}"


def test_the_kuberay_rules_catch_known_rejections():
    cluster = {"enableInTreeAutoscaling": True, "workerGroupSpecs": []}
    bad = {"clusterSelector": {"ray.io/cluster": "c"}, "backoffLimit": 2, "shutdownAfterJobFinishes": True,
           "deletionStrategy": {"deletionRules": [{"policy": "DeleteWorkers", "condition": {"jobStatus": "FAILED"}}]}}
    assert len(_kuberay_rejects({}, bad)) == 3
    assert _kuberay_rejects({"labels": {KUEUE_QUEUE: "q"}}, {"rayClusterSpec": cluster}) == [
        "Kueue: a queued job must set shutdownAfterJobFinishes",
        "Kueue: a queued job must not autoscale (without workload slicing)"]


def test_jobs_are_cheap_and_robust(objects):
    """Retries only for real failures, GPUs released at the end, no pile-up, no log-stream failures."""
    for origin, metadata, job in _jobs(objects):
        cluster = _cluster_of(job, objects)
        # K8sJobMode and SidecarMode follow logs; a dropped stream can fail a running job (kuberay#4921).
        assert job.get("submissionMode") == "HTTPMode", f"{origin}: submissionMode {job.get('submissionMode')}"
        assert isinstance(job.get("backoffLimit"), int), f"{origin}: backoffLimit unset"
        active, pre = job.get("activeDeadlineSeconds"), job.get("preRunningDeadlineSeconds")
        assert isinstance(active, int) and isinstance(pre, int) and 0 < pre < active, \
            f"{origin}: needs preRunningDeadlineSeconds < activeDeadlineSeconds, got {pre} and {active}"
        if metadata.get("labels", {}).get(KUEUE_QUEUE):
            # Kueue needs shutdownAfterJobFinishes; the cluster holds quota until it is gone.
            assert job.get("shutdownAfterJobFinishes") is True and job.get("ttlSecondsAfterFinished") == 0, \
                f"{origin}: a queued job should give its cluster (and quota) back at once"
            continue
        rules = job.get("deletionStrategy", {}).get("deletionRules", [])
        for condition in ({"jobStatus": "SUCCEEDED"}, {"jobStatus": "FAILED"}, {"jobDeploymentStatus": "Failed"}):
            policies = {r["policy"]: r["condition"].get("ttlSeconds", 0) for r in rules
                        if {k: v for k, v in r["condition"].items() if k != "ttlSeconds"} == condition}
            release = policies.get("DeleteWorkers", policies.get("DeleteCluster"))
            assert release == 0, f"{origin}: on {condition} the GPU workers must go at once, got {policies}"
            assert "DeleteSelf" in policies, f"{origin}: on {condition} finished RayJobs would pile up"
        assert not _autoscaled(cluster), f"{origin}: DeleteWorkers needs a fixed worker count"


def test_worker_counts(objects):
    """The long-lived cluster scales from zero; a RayJob's cluster is fixed at its GPU count."""
    for origin, cluster in _cluster_specs(objects):
        for g in cluster["workerGroupSpecs"]:
            where = f"{origin} group {g['groupName']}"
            if _autoscaled(cluster):
                assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], where
            else:
                assert g["minReplicas"] == g["replicas"] == g["maxReplicas"] >= 1, f"{where}: not a fixed size"


# --- placement, resources, cache ----------------------------------------------------------------

SPOT_LABELS = {"karpenter.sh/capacity-type", "eks.amazonaws.com/capacityType", "cloud.google.com/gke-spot",
               "kubernetes.azure.com/scalesetpriority"}


def test_heads_avoid_spot_nodes_and_workers_accept_them(objects):
    for origin, cluster in _cluster_specs(objects):
        for group, node_type, template in _groups(cluster):
            pod = template["spec"]
            where = f"{origin} group {group}"
            if node_type == "head":
                terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                assert len(terms["nodeSelectorTerms"]) == 1, f"{where}: terms are ORed; keep one"
                avoided = {e["key"] for e in terms["nodeSelectorTerms"][0]["matchExpressions"]
                           if e["operator"] == "NotIn"}
                assert SPOT_LABELS <= avoided, f"{where}: may land on spot nodes ({SPOT_LABELS - avoided})"
            else:
                tolerated = {t.get("key") for t in pod.get("tolerations", [])}
                assert tolerated & SPOT_LABELS, f"{where}: tolerates no spot taint"


def test_gpu_workers_request_and_limit_their_gpus(objects):
    from cluster.connect import READ_CPU_RESERVE, size_actors

    cpus_per_actor = size_actors(1, {"GPU": 1.0, "CPU": 8.0}, "cuda").num_cpus
    for origin, cluster in _cluster_specs(objects):
        head_cpus = cluster["headGroupSpec"].get("rayStartParams", {}).get("num-cpus")
        for group, node_type, template in _groups(cluster):
            pod, where = template["spec"], f"{origin} group {group}"
            for c in pod["containers"]:
                requests, limits = c["resources"]["requests"], c["resources"]["limits"]
                # Ray sizes itself from limits; requests below them would overcommit the node.
                for key in ("cpu", "memory", GPU):
                    assert requests.get(key) == limits.get(key), \
                        f"{where}: {key} request {requests.get(key)} != limit {limits.get(key)}"
            if node_type == "head":
                assert _gpus(pod) == 0, f"{where}: the head should not hold a GPU"
                continue
            gpus = _gpus(pod)
            assert gpus >= 1, f"{where}: worker has no {GPU} limit"
            assert {t.get("key") for t in pod.get("tolerations", [])} & {GPU, "ray.io/node-type"}, \
                f"{where}: no toleration for the GPU taint"
            assert pod.get("nodeSelector"), f"{where}: no nodeSelector for the GPU pool"
            # With a CPU-less head, Ray Data's read tasks need CPUs beside the actors or the run hangs.
            cpus = sum(_cpu(c["resources"]["limits"]["cpu"]) for c in pod["containers"])
            needed = gpus * cpus_per_actor + (READ_CPU_RESERVE if head_cpus == "0" else 0)
            assert cpus >= needed, f"{where}: {cpus:g} CPUs for {gpus} actor(s); needs at least {needed:g}"


def _bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    number, unit = re.fullmatch(r"([\d.]+)([KMGT]i?)?", str(quantity)).groups()
    return float(number) * units.get(unit or "", 1)


def test_every_ray_pod_keeps_its_object_store_in_memory(objects):
    """Ray puts a node's object store in /dev/shm only where that holds it, else on disk "which will harm
    performance": the containers' /dev/shm is 64 MiB. The heads had none (the driver's store, on disk). The store is
    30% of the memory, at most 95% of /dev/shm or 10 GB, whichever is more (ray._private.utils'
    resolve_object_store_memory, Ray 2.60)."""
    for origin, cluster in _cluster_specs(objects):
        for group, node_type, template in _groups(cluster):
            pod, where = template["spec"], f"{origin} group {group}"
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert "/dev/shm" in mounts, f"{where}: {c['name']} has no /dev/shm volume"
                shm = volumes[mounts["/dev/shm"]].get("emptyDir") or {}
                assert shm.get("medium") == "Memory", f"{where}: /dev/shm is not in memory"
                size = _bytes(shm["sizeLimit"])
                assert "memory" in c["resources"].get("limits", {}), f"{where}: {c['name']} has no memory limit"
                store = min(0.3 * _bytes(c["resources"]["limits"]["memory"]), max(10e9, 0.95 * size))
                assert size >= store, f"{where}: /dev/shm {shm['sizeLimit']} < the object store, {store / 2**30:.1f} GiB"


def test_ray_pods_share_the_persistent_model_cache(objects):
    claims = {_name(obj): obj for _, obj in _of_kind(objects, "PersistentVolumeClaim")}
    for where, pod, c in _ray_containers(objects):
        cache = {e["name"]: e.get("value") for e in c.get("env", [])}.get("SDFLEET_CACHE")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        mount = next((p for p in mounts if cache and cache.startswith(p.rstrip("/") + "/")), None)
        assert mount, f"{where}: SDFLEET_CACHE={cache} is not under a mounted volume"
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[mount])
        assert volume.get("persistentVolumeClaim", {}).get("claimName") == CACHE_CLAIM, \
            f"{where}: the model cache is {volume}, not the shared claim {CACHE_CLAIM}"
        assert pod["securityContext"].get("fsGroup"), f"{where}: no fsGroup; the cache may not be writable"
        # without it the kubelet walks the whole cache (models, engines) to relabel it at every pod start
        assert pod["securityContext"].get("fsGroupChangePolicy") == "OnRootMismatch", where
    if list(_ray_containers(objects)):
        claim = claims.get(CACHE_CLAIM)
        assert claim and claim["spec"]["accessModes"] == ["ReadWriteMany"], \
            f"the overlay must bring {CACHE_CLAIM} as ReadWriteMany (workers on many nodes mount it at once)"


# --- versions -----------------------------------------------------------------------------------

def _pinned_ray() -> str:
    found = re.findall(r'"ray(?:\[[^\]]*\])?==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert len(found) == 1, f"pyproject.toml pins ray {len(found)} times"
    return found[0]


def _dockerfile_images() -> list[str]:
    text = (K8S / "Dockerfile").read_text()
    return re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE) + re.findall(r"--from=(\S+)", text)


def test_image_and_clusters_use_the_pinned_ray(objects):
    pinned = _pinned_ray()
    base = re.search(r"^FROM\s+(\S+)", (K8S / "Dockerfile").read_text(), re.MULTILINE).group(1)
    tag = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)(?:-py(\d+))?.*", base)
    assert tag, f"Dockerfile base {base!r} is not a rayproject/ray:<version>-... image"
    assert tag.group(1) == pinned, f"Dockerfile base has Ray {tag.group(1)}, pyproject pins ray=={pinned}"
    for origin, cluster in _cluster_specs(objects):
        assert cluster.get("rayVersion") == pinned, \
            f"{origin}: rayVersion {cluster.get('rayVersion')!r}, pyproject pins ray=={pinned}"


MANIFEST_TYPES = ("application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
                  "application/vnd.docker.distribution.manifest.list.v2+json, "
                  "application/vnd.docker.distribution.manifest.v2+json")


def _tag_exists(image: str, timeout: float = 8.0) -> bool:
    """Whether a public registry serves `image` (registry/repo:tag), asked anonymously; raises OSError offline."""
    name, tag = image.rsplit(":", 1)
    first = name.split("/")[0]
    registry, repo = (first, name.split("/", 1)[1]) if "." in first else ("registry-1.docker.io", name)
    if registry == "registry-1.docker.io" and "/" not in repo:
        repo = f"library/{repo}"
    url = f"https://{registry}/v2/{repo}/manifests/{tag}"
    headers = {"Accept": MANIFEST_TYPES}
    for _ in range(2):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers, method="HEAD"),
                                        timeout=timeout) as answer:
                return answer.status == 200
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return False
            challenge = exc.headers.get("WWW-Authenticate", "")
            if exc.code != 401 or not challenge.startswith("Bearer ") or "Authorization" in headers:
                raise
            params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
            query = urllib.parse.urlencode({k: v for k, v in params.items() if k in ("service", "scope")})
            with urllib.request.urlopen(f"{params['realm']}?{query}", timeout=timeout) as answer:
                token = json.load(answer).get("token")
            headers["Authorization"] = f"Bearer {token}"
    return False


def test_every_named_image_tag_exists():
    """The Dockerfile's images (Ray base, kubectl) and any other public image the overlays name."""
    images = set(_dockerfile_images())
    for overlay in OVERLAYS:
        for _, pod, _ in _pod_templates(_files(overlay)):
            images |= {c["image"] for c in pod["containers"] if "image" in c}
    images = sorted(i for i in images if not i.startswith("sdfleet:"))  # ours: pushed by the user
    missing = []
    for image in images:
        try:
            if not _tag_exists(image):
                missing.append(image)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            pytest.skip(f"could not ask the registry about {image} ({type(exc).__name__}: {exc}); "
                        f"unchecked: {images}")
    assert not missing, f"these image tags do not exist: {missing}"


# --- security: auth, exposure, credentials, network ----------------------------------------------

EXAMPLE_SECRETS = {_name(obj): obj for _, obj in _load([K8S / "secret.yaml.example"])}


def test_ray_token_auth_is_on_with_a_token_from_a_secret(objects):
    for origin, cluster in _cluster_specs(objects):
        auth = cluster.get("authOptions", {})
        assert auth.get("mode") == "token", f"{origin}: authOptions.mode is {auth.get('mode')!r}, not token"
        secret = EXAMPLE_SECRETS.get(auth.get("secretName"))
        assert secret is not None and "auth_token" in secret.get("stringData", {}), \
            f"{origin}: KubeRay reads the token from key `auth_token` of a Secret in secret.yaml.example"


def test_dashboard_stays_inside_the_cluster(objects):
    for origin, cluster in _cluster_specs(objects):
        head = cluster["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{origin}: head service is {head['serviceType']}"
        assert not head.get("enableIngress"), f"{origin}: the dashboard runs arbitrary code; no ingress"
    for origin, svc in _of_kind(objects, "Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{origin}: {svc['spec']['type']} Service"


def test_bucket_access_is_workload_identity_first(objects):
    """Ray pods run as the sdfleet-ray account (annotate it for IRSA/GKE); static keys are optional."""
    credential = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
    accounts = {_name(obj): obj for _, obj in _of_kind(objects, "ServiceAccount")}
    for where, pod, c in _ray_containers(objects):
        assert pod.get("serviceAccountName") == "sdfleet-ray" and "sdfleet-ray" in accounts, \
            f"{where}: runs as {pod.get('serviceAccountName')!r}, not the overlay's sdfleet-ray account"
        for source in c.get("envFrom", []):
            assert "configMapRef" not in source, f"{where}: credentials in a ConfigMap"
            ref = source["secretRef"]
            assert ref["name"] in EXAMPLE_SECRETS and ref.get("optional") is True, \
                f"{where}: static keys ({ref['name']}) must be an optional fallback"
        for e in c.get("env", []):
            if credential.search(e["name"]):
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {e['name']} set literally"
    for name, account in accounts.items():
        assert account.get("automountServiceAccountToken") is False, f"ServiceAccount {name} mounts a token everywhere"


SECRET_LOOKING = {
    "AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret access key": r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]*[0-9])(?=[A-Za-z0-9/+]*[a-z])"
                             r"(?=[A-Za-z0-9/+]*[A-Z])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "hex token": r"\b[0-9a-fA-F]{32,}\b",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}",
    "JWT": r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.",
}


def test_no_secret_looking_values_in_deployment_files():
    for path in [p for p in K8S.rglob("*") if p.is_file()] + [LAUNCHER]:
        text = path.read_text()
        for what, pattern in SECRET_LOOKING.items():
            hit = re.search(pattern, text)
            assert not hit, f"{path.relative_to(REPO)} holds what looks like a {what}: {hit.group(0)[:12]}..."
    for name, secret in EXAMPLE_SECRETS.items():
        for key, value in {**secret.get("stringData", {}), **secret.get("data", {})}.items():
            if re.search(r"KEY|SECRET|TOKEN|PASSWORD", key, re.IGNORECASE):
                assert value == PLACEHOLDER, f"secret.yaml.example {name}.{key} must stay {PLACEHOLDER}"


def _selects(selector: dict | None, labels: dict) -> bool:
    assert not (selector or {}).get("matchExpressions"), "this test evaluates matchLabels only"
    return all(labels.get(k) == v for k, v in ((selector or {}).get("matchLabels") or {}).items())


def _admits(policies: list[dict], labels: dict, port: int, source_ns: str, source_labels: dict) -> bool:
    """Whether NetworkPolicies let a pod in `source_ns` reach a pod with `labels` (in NAMESPACE) on TCP `port`."""
    isolating = [p["spec"] for p in policies
                 if _selects(p["spec"]["podSelector"], labels) and "Ingress" in p["spec"].get("policyTypes", [])]
    if not isolating:
        return True
    for spec in isolating:
        for rule in spec.get("ingress", []):
            if rule.get("ports") and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP"
                                             for p in rule["ports"]):
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                in_ns = _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source_ns}) \
                    if "namespaceSelector" in peer else source_ns == NAMESPACE
                if in_ns and _selects(peer.get("podSelector"), source_labels):
                    return True
    return False


def test_network_policy_admits_ray_peers_the_operator_and_prometheus_only(objects):
    policies = [obj for _, obj in _of_kind(objects, "NetworkPolicy")]
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    ray_peer = {"app.kubernetes.io/name": "sdfleet", "ray.io/is-ray-node": "yes"}
    for origin, cluster in _cluster_specs(objects):
        for group, node_type, template in _groups(cluster):
            labels, where = _ray_pod_labels("any", node_type, template), f"{origin} group {group}"
            assert policies and not _admits(policies, labels, 6379, NAMESPACE, {"app": "other"}), \
                f"{where}: any pod in the namespace may reach it"
            assert _admits(policies, labels, 6379, NAMESPACE, ray_peer), f"{where}: other Ray pods are shut out"
            assert _admits(policies, labels, METRICS_PORT[1], LITERALS["prometheus-namespace"], {}), \
                f"{where}: Prometheus cannot scrape port {METRICS_PORT[1]}"
            assert not _admits(policies, labels, 6379, LITERALS["operator-namespace"], operator), \
                f"{where}: the operator reaches more than the dashboard"
            if node_type == "head":
                assert _admits(policies, labels, 8265, LITERALS["operator-namespace"], operator), \
                    f"{where}: the KubeRay operator cannot reach the dashboard (HTTPMode submits there)"
    for origin, cronjob in _of_kind(objects, "CronJob"):
        labels = cronjob["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
        assert not _admits(policies, labels, 8080, NAMESPACE, ray_peer), f"{origin}: its pod accepts connections"


def test_pod_monitor_scrapes_every_ray_pod_on_kuberays_metrics_port():
    (origin, monitor), = _of_kind(_files("monitoring"), "PodMonitor")
    spec = monitor["spec"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1", origin
    assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}, f"{origin}: {set(spec)}"
    endpoints = spec["podMetricsEndpoints"]
    assert [e["port"] for e in endpoints] == [METRICS_PORT[0]], f"{origin}: scrapes {endpoints}"
    for e in endpoints:
        assert set(e) <= {"port", "interval", "path", "relabelings"}, f"{origin}: unknown endpoint fields {set(e)}"
        for r in e.get("relabelings", []):
            assert set(r) <= {"sourceLabels", "targetLabel", "action", "regex", "replacement"}, origin
    for overlay in OVERLAYS:
        for o, cluster in _cluster_specs(_files(overlay)):
            for group, node_type, template in _groups(cluster):
                labels = _ray_pod_labels("any", node_type, template)
                assert _selects(spec["selector"], labels), f"{o} group {group} is not scraped by {origin}"
                for c in template["spec"]["containers"]:
                    clash = [p for p in c.get("ports", []) if p.get("name") == METRICS_PORT[0]
                             and p["containerPort"] != METRICS_PORT[1]]
                    assert not clash, f"{o}: {clash} moves the metrics port off {METRICS_PORT[1]}"


# What every Linux image has (glibc, GCC's runtime): the system libraries cv2 may link without the image installing them
_BASE_LIBRARIES = {"ld-linux-x86-64.so.2", "libc.so.6", "libdl.so.2", "libm.so.6", "libpthread.so.0", "librt.so.1",
                   "libgcc_s.so.1", "libstdc++.so.6"}


def _needed(path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils) to read what cv2 links")
def test_image_installs_every_system_library_that_opencv_links():
    """opencv-python (invisible-watermark requires it) is OpenCV's desktop build: through its bundled Qt it links
    libGL, glib and libxcb from the system, which Ray's image lacks, so `import cv2` failed on the
    cluster and every image with it (the PNG encoder and the watermark use OpenCV). The Dockerfile's
    LIBRARY=package pairs must name each library the installed cv2 links and does not bundle."""
    import importlib.util

    spec = importlib.util.find_spec("cv2")
    package = pathlib.Path(spec.origin).parent
    bundled = {p.name: p for folder in package.parent.glob("opencv_python*.libs") for p in folder.iterdir()}
    modules = [*package.glob("cv2*.so"), *package.glob("*/cv2*.so")]
    assert modules, f"no cv2 extension module under {package}"
    system, seen, todo = set(), set(), list(modules)
    while todo:  # what cv2 needs, and what each library it bundles needs, loaded with it
        for name in _needed(todo.pop()):
            if name in bundled and name not in seen:
                seen.add(name)
                todo.append(bundled[name])
            elif name not in bundled:
                system.add(name)
    installs = dict(re.findall(r"\b(lib[\w.+-]+\.so\.\d+)=([\w.+-]+)", (K8S / "Dockerfile").read_text()))
    missing = sorted(system - _BASE_LIBRARIES - set(installs))
    assert not missing, f"cv2 links {missing} from the system; add LIBRARY=package pairs for them to k8s/Dockerfile"
