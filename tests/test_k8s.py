"""The KubeRay deployment in k8s/ is valid, runnable and safe, checked without a cluster.

Each overlay in k8s/overlays/ is checked twice: as its files (what the overlay lists, before kustomize)
and as `kubectl kustomize` renders it (skipped with a reason where no kubectl with kustomize v5 is
installed). KubeRay objects validate against the v1.7.0 CRD schemas in ../shared/kuberay-crds (unknown
fields rejected, as the API server's pruning would silently drop them), plain objects against
kubernetes-validate's strict schemas; RayJobs also pass the rules KubeRay v1.7.0's controller and
Kueue's webhook apply before they run anything. Every `sdfleet` entrypoint parses with the CLI's own
parser. The nightly CronJob's script runs under a POSIX sh against a stub kubectl, once per terminal
state of its RayJob, and the RayJob it creates is checked like the others.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS_DIR = K8S / "overlays"
SETTINGS_DIR = K8S / "settings"
DOCS = REPO / "docs" / "kubernetes.md"
LAUNCHER = REPO / "cluster" / "cluster-launcher.aws.yaml"
CRD_DIR = Path(os.environ.get("SDFLEET_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds"))
KUBERNETES_VERSION = "1.37"
KUBERAY_GROUP = "ray.io"
GPU = "nvidia.com/gpu"
PLACEHOLDER = "REPLACE_ME"
CACHE_CLAIM = "sdfleet-model-cache"

# From KubeRay v1.7.0 (ray-operator/controllers/ray/utils/constant.go, common/pod.go): name limits,
# the metrics port every Ray container gets, and the labels every Ray pod gets.
MAX_RAYJOB_NAME = 47
MAX_RAYCRONJOB_NAME = 36
METRICS_PORT = ("metrics", 8080)
# Kueue (pkg/controller/jobs/rayjob/rayjob_webhook.go, raycluster/common.go).
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY = "kueue.x-k8s.io/priority-class"
KUEUE_MAX_POD_SETS = 8
# Kinds whose schema is not available offline; tests below check their structure instead.
NO_OFFLINE_SCHEMA = {("monitoring.coreos.com/v1", "PodMonitor")}
WORKLOADS = {"RayCluster", "RayJob", "RayCronJob", "CronJob", "Job", "Deployment"}
SCHEDULERS = {"RayCronJob", "CronJob"}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --- loading the overlays -----------------------------------------------------------------------

def _kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def _resource_files(folder: Path) -> list[Path]:
    """The manifest files a kustomization applies, following folders it lists (not its components)."""
    files = []
    for entry in _kustomization(folder).get("resources", []):
        path = (folder / entry).resolve()
        files += _resource_files(path) if path.is_dir() else [path]
    return files


def _name(obj: dict) -> str:
    meta = obj.get("metadata", {})
    return meta.get("name") or meta.get("generateName", "?")


def _load(files: list[Path]) -> list[tuple[str, dict]]:
    objects = []
    for path in files:
        for doc in yaml.load_all(path.read_text(), Loader=_Loader):
            if doc:
                objects.append((f"{path.relative_to(K8S)}:{doc['kind']}/{_name(doc)}", doc))
    return objects


OVERLAYS = sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())
SETTINGS = _kustomization(SETTINGS_DIR)
LITERALS = dict(lit.split("=", 1) for gen in SETTINGS["configMapGenerator"] for lit in gen["literals"])
NAMESPACE = SETTINGS["namespace"]


@functools.cache
def _kubectl() -> tuple[str | None, str]:
    """kubectl's path, or None and why it cannot render the overlays."""
    path = shutil.which("kubectl")
    if not path:
        return None, "kubectl is not installed (.ci/run installs Debian's where it can); the file checks still ran"
    done = subprocess.run([path, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60,
                          check=False)
    try:
        version = json.loads(done.stdout).get("kustomizeVersion", "")
    except json.JSONDecodeError:
        version = ""
    major = re.match(r"v?(\d+)", version)
    if not major or int(major.group(1)) < 5:
        return None, (f"{path} embeds kustomize {version or '(unknown)'}; the overlays need v5 "
                      "(components, replacements); the file checks still ran")
    return path, ""


def _render(folder: Path) -> list[dict]:
    kubectl, why = _kubectl()
    if not kubectl:
        pytest.skip(why)
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, f"kubectl kustomize {folder} fails:\n{done.stderr}"
    return [doc for doc in yaml.load_all(done.stdout, Loader=_Loader) if doc]


@functools.cache
def _rendered(overlay: str) -> tuple[tuple[str, dict], ...]:
    return tuple((f"{overlay}(rendered):{d['kind']}/{_name(d)}", d) for d in _render(OVERLAYS_DIR / overlay))


@functools.cache
def _files(overlay: str) -> tuple[tuple[str, dict], ...]:
    return tuple(_load(_resource_files(OVERLAYS_DIR / overlay)))


def _with_created(objects) -> list[tuple[str, dict]]:
    """The objects plus the RayJob each CronJob's script creates (run under sh with a stub kubectl)."""
    objects = list(objects)
    for origin, obj in list(objects):
        if obj["kind"] == "CronJob":
            objects.append((origin + ">RayJob", _run_cron_script(obj, "Complete", "SUCCEEDED").created))
    return objects


SOURCES = [f"{form}:{overlay}" for form in ("files", "rendered") for overlay in OVERLAYS]


@pytest.fixture(params=SOURCES)
def objects(request) -> list[tuple[str, dict]]:
    """Every object one overlay applies, as files or as rendered, with the RayJobs its CronJob creates."""
    form, overlay = request.param.split(":")
    return _with_created(_files(overlay) if form == "files" else _rendered(overlay))


# --- walking objects ----------------------------------------------------------------------------

def _of_kind(objects, *kinds: str) -> list[tuple[str, dict]]:
    return [(o, obj) for o, obj in objects if obj["kind"] in kinds]


def _jobs(objects) -> list[tuple[str, dict, dict]]:
    """(origin, metadata, RayJob spec) for every RayJob, including a RayCronJob's template."""
    jobs = [(o, obj["metadata"], obj["spec"]) for o, obj in _of_kind(objects, "RayJob")]
    jobs += [(o, {}, obj["spec"]["jobTemplate"]) for o, obj in _of_kind(objects, "RayCronJob")]
    return jobs


def _cluster_specs(objects) -> list[tuple[str, dict]]:
    specs = [(o, obj["spec"]) for o, obj in _of_kind(objects, "RayCluster")]
    specs += [(o, job["rayClusterSpec"]) for o, _, job in _jobs(objects) if "rayClusterSpec" in job]
    return specs


def _cluster_of(job: dict, objects) -> dict:
    """The RayCluster spec a job runs on: its own, or the one its clusterSelector names."""
    if "rayClusterSpec" in job:
        return job["rayClusterSpec"]
    wanted = job["clusterSelector"]["ray.io/cluster"]
    return next(obj["spec"] for _, obj in _of_kind(objects, "RayCluster") if _name(obj) == wanted)


def _autoscaled(cluster: dict) -> bool:
    return cluster.get("enableInTreeAutoscaling") is True


def _groups(cluster: dict) -> list[tuple[str, str, dict]]:
    """(group, node type, pod template) for the head and every worker group."""
    groups = [("head", "head", cluster["headGroupSpec"]["template"])]
    groups += [(g["groupName"], "worker", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    return groups


def _ray_pod_labels(cluster_name: str, node_type: str, template: dict) -> dict:
    """A Ray pod's labels: its template's plus those KubeRay adds (common/pod.go labelPod)."""
    return {**template.get("metadata", {}).get("labels", {}),
            "ray.io/is-ray-node": "yes", "ray.io/node-type": node_type, "ray.io/cluster": cluster_name}


def _pod_templates(objects) -> list[tuple[str, dict, list[dict]]]:
    """(where, pod spec, containers KubeRay adds) for every pod any object here will create."""
    pods = []
    for origin, cluster in _cluster_specs(objects):
        for group, node_type, template in _groups(cluster):
            added = []
            if node_type == "head" and _autoscaled(cluster):
                added.append({"name": "autoscaler",
                              "securityContext": cluster.get("autoscalerOptions", {}).get("securityContext")})
            pods.append((f"{origin} {group}", template["spec"], added))
    for origin, _, job in _jobs(objects):
        mode = job.get("submissionMode", "K8sJobMode")
        if "submitterPodTemplate" in job:
            pods.append((f"{origin} submitter", job["submitterPodTemplate"]["spec"], []))
        elif mode == "K8sJobMode":  # KubeRay's default submitter pod sets no security context
            pods.append((f"{origin} default submitter", {"containers": [{"name": "ray-job-submitter"}]}, []))
        elif mode == "SidecarMode":
            pods.append((f"{origin} sidecar submitter", {"containers": [{"name": "ray-job-submitter"}]}, []))
    for origin, obj in _of_kind(objects, "CronJob"):
        pods.append((origin, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"], []))
    for origin, obj in _of_kind(objects, "Job", "Deployment"):
        pods.append((origin, obj["spec"]["template"]["spec"], []))
    return pods


def _ray_containers(objects):
    for origin, cluster in _cluster_specs(objects):
        for group, _, template in _groups(cluster):
            for c in template["spec"]["containers"]:
                yield f"{origin} {group}/{c['name']}", template["spec"], c


def _gpus(pod: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get(GPU, 0)) for c in pod["containers"])


def _gpu_capacity(cluster: dict) -> int:
    return sum(g["maxReplicas"] * _gpus(g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", []))


def _cpu(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _argv(entrypoint: str) -> list[str]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "sdfleet", f"entrypoint does not run sdfleet: {entrypoint!r}"
    return argv[1:]


def _parse(argv: list[str]):
    from jobs.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`sdfleet {shlex.join(argv)}` does not parse:\n{err.getvalue()}")


# --- schemas ------------------------------------------------------------------------------------

def _strict(schema):
    """A CRD schema as JSON Schema that rejects unknown fields; `x-kubernetes-*` keys are annotations."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = _strict(value)
        else:
            out[key] = value
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_validators() -> dict[tuple[str, str], jsonschema.Draft4Validator]:
    if not CRD_DIR.is_dir():
        pytest.fail(f"KubeRay CRDs not found at {CRD_DIR} (the shared/ folder beside the repository); "
                    "set SDFLEET_KUBERAY_CRDS to their folder")
    validators = {}
    for path in CRD_DIR.glob("ray.io_*.yaml"):
        crd = yaml.load(path.read_text(), Loader=_Loader)
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            validators[key] = jsonschema.Draft4Validator(_strict(version["schema"]["openAPIV3Schema"]))
    return validators


def _schema_errors(obj: dict) -> list[str]:
    key = (obj["apiVersion"], obj["kind"])
    if key in NO_OFFLINE_SCHEMA:
        return []
    if obj["apiVersion"].split("/")[0] == KUBERAY_GROUP:
        validator = _crd_validators().get(key)
        if validator is None:
            return [f"KubeRay v1.7.0 serves no {obj['kind']} in {obj['apiVersion']}"]
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path)) or '<root>'}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def test_objects_validate_against_their_schemas(objects):
    """Every overlay renders, and every object in it (and the RayJob its CronJob creates) validates."""
    assert objects, "the overlay holds nothing"
    for origin, obj in objects:
        errors = _schema_errors(obj)
        assert not errors, f"{origin} breaks its schema (KubeRay v1.7.0 / Kubernetes {KUBERNETES_VERSION}):\n  " \
                           + "\n  ".join(errors)


def test_example_secrets_validate():
    for origin, obj in _load([K8S / "secret.example.yaml"]):
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
        assert "secret.example.yaml" not in path.read_text(), f"{path.relative_to(REPO)} lists secret.example.yaml"
    for overlay in OVERLAYS:
        assert not _of_kind(_files(overlay), "Secret"), f"overlays/{overlay} would overwrite real Secrets"


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

DELETION_ORDER = ["DeleteWorkers", "DeleteCluster", "DeleteSelf"]


def _kuberay_rejects(metadata: dict, job: dict) -> list[str]:
    """Why KubeRay v1.7.0 would mark this RayJob ValidationFailed (utils/validation.go), and Kueue refuse it."""
    found = []
    selector = bool(job.get("clusterSelector"))
    shutdown = job.get("shutdownAfterJobFinishes", False)
    mode = job.get("submissionMode", "K8sJobMode")
    backoff = job.get("backoffLimit", 0)
    cluster = job.get("rayClusterSpec")
    if job.get("suspend") and not shutdown:
        found.append("suspend needs shutdownAfterJobFinishes")
    if not shutdown and job.get("ttlSecondsAfterFinished", 0) > 0:
        found.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    strategy = job.get("deletionStrategy")
    if strategy is not None:
        rules = strategy.get("deletionRules", [])
        legacy = "onSuccess" in strategy or "onFailure" in strategy
        if rules and shutdown:
            found.append("deletionRules and shutdownAfterJobFinishes are mutually exclusive")
        if rules and legacy:
            found.append("deletionRules and onSuccess/onFailure are mutually exclusive")
        if not rules and not ("onSuccess" in strategy and "onFailure" in strategy):
            found.append("deletionStrategy needs deletionRules or both onSuccess and onFailure")
        ttls: dict[tuple, dict[str, int]] = {}
        for rule in rules:
            condition = rule["condition"]
            key = ("jobStatus", condition["jobStatus"]) if "jobStatus" in condition \
                else ("jobDeploymentStatus", condition.get("jobDeploymentStatus"))
            if rule["policy"] in ("DeleteCluster", "DeleteWorkers") and selector:
                found.append(f"{rule['policy']} is not supported with clusterSelector")
            if rule["policy"] == "DeleteWorkers" and cluster and _autoscaled(cluster):
                found.append("DeleteWorkers is not supported with autoscaling enabled")
            if rule["policy"] in ttls.setdefault(key, {}):
                found.append(f"duplicate rule {rule['policy']} for {key}")
            ttls[key][rule["policy"]] = condition.get("ttlSeconds", 0)
        for key, by_policy in ttls.items():
            ordered = [by_policy[p] for p in DELETION_ORDER if p in by_policy]
            if ordered != sorted(ordered):
                found.append(f"TTLs for {key} must grow DeleteWorkers <= DeleteCluster <= DeleteSelf")
    if job.get("suspend") and selector:
        found.append("clusterSelector cannot be suspended")
    if not cluster and not selector:
        found.append("needs rayClusterSpec or clusterSelector")
    if selector:
        if not job["clusterSelector"].get("ray.io/cluster"):
            found.append("clusterSelector needs ray.io/cluster")
        if mode == "SidecarMode":
            found.append("clusterSelector is not supported in SidecarMode")
        if backoff > 0:
            found.append("backoffLimit > 0 is incompatible with clusterSelector")
    if mode == "InteractiveMode" and backoff > 0:
        found.append("backoffLimit > 0 is incompatible with InteractiveMode")
    if mode == "SidecarMode" and ("submitterPodTemplate" in job or "submitterConfig" in job):
        found.append("SidecarMode takes no submitterPodTemplate or submitterConfig")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if field in job and job[field] <= 0:
            found.append(f"{field} must be positive")
    if backoff < 0:
        found.append("backoffLimit must not be negative")
    if cluster and not _autoscaled(cluster):
        for g in cluster.get("workerGroupSpecs", []):
            if "minReplicas" not in g or "maxReplicas" not in g:
                found.append(f"worker group {g['groupName']} needs minReplicas and maxReplicas without autoscaling")
    if metadata.get("labels", {}).get(KUEUE_QUEUE):
        if selector:
            found.append("Kueue: a queued job must not use an existing cluster")
        if not shutdown:
            found.append("Kueue: a queued job must set shutdownAfterJobFinishes")
        if cluster and _autoscaled(cluster):
            found.append("Kueue: a queued job must not autoscale (without workload slicing)")
        if cluster and len(cluster.get("workerGroupSpecs", [])) + 1 > KUEUE_MAX_POD_SETS:
            found.append("Kueue: too many worker groups")
        if cluster and any(g["groupName"] == "head" for g in cluster.get("workerGroupSpecs", [])):
            found.append("Kueue: no worker group may be called head")
    name = metadata.get("name") or ""
    if name and (len(name) > MAX_RAYJOB_NAME or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)):
        found.append(f"name {name!r} is not a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters")
    if metadata.get("generateName") and len(metadata["generateName"]) + 5 > MAX_RAYJOB_NAME:
        found.append("generateName leaves no room for the random suffix")
    return found


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

EXAMPLE_SECRETS = {_name(obj): obj for _, obj in _load([K8S / "secret.example.yaml"])}


def test_ray_token_auth_is_on_with_a_token_from_a_secret(objects):
    for origin, cluster in _cluster_specs(objects):
        auth = cluster.get("authOptions", {})
        assert auth.get("mode") == "token", f"{origin}: authOptions.mode is {auth.get('mode')!r}, not token"
        secret = EXAMPLE_SECRETS.get(auth.get("secretName"))
        assert secret is not None and "auth_token" in secret.get("stringData", {}), \
            f"{origin}: KubeRay reads the token from key `auth_token` of a Secret in secret.example.yaml"


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
                assert value == PLACEHOLDER, f"secret.example.yaml {name}.{key} must stay {PLACEHOLDER}"


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


# --- the nightly run ----------------------------------------------------------------------------

STUB_KUBECTL = r"""#!/bin/sh
# Stands in for kubectl: logs each call, keeps what `create` reads, answers as a RayJob in $STUB_* would.
printf '%s\n' "$*" >> "$STUB_DIR/calls"
case "$1" in
  create) cat > "$STUB_DIR/created.yaml"; printf '%s' sdfleet-catalog-nightly-x7k2p ;;
  wait)
    case "$*" in
      *endTime*) [ "$STUB_ENDS" = yes ] || { echo 'error: timed out waiting for the condition' >&2; exit 1; } ;;
    esac ;;
  get)
    case "$*" in
      *reason*) echo "$STUB_REASON: $STUB_MESSAGE" ;;
      *jobStatus*) printf '%s/%s' "$STUB_DEPLOYMENT" "$STUB_JOB" ;;
      *jobDeploymentStatus*) printf '%s' "$STUB_DEPLOYMENT" ;;
      *) echo "stub kubectl: unexpected get $*" >&2; exit 1 ;;
    esac ;;
  *) echo "stub kubectl: unexpected $*" >&2; exit 1 ;;
esac
"""


class CronRun:
    def __init__(self, rc: int, output: str, calls: list[str], created: dict):
        self.rc, self.output, self.calls, self.created = rc, output, calls, created


def _cron_container(cronjob: dict) -> dict:
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container


@functools.cache
def _run_script(script: str, env: tuple, deployment: str, job: str, reason: str = "",
                message: str = "", ends: bool = True) -> CronRun:
    shell = shutil.which("dash") or shutil.which("sh")
    if not shell:
        pytest.skip("no POSIX sh to run the CronJob's script with")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        stub = Path(tmp) / "kubectl"
        stub.write_text(STUB_KUBECTL)
        stub.chmod(0o755)
        run_env = {**dict(env), "PATH": f"{tmp}{os.pathsep}/usr/bin:/bin", "STUB_DIR": tmp,
                   "STUB_DEPLOYMENT": deployment, "STUB_JOB": job, "STUB_REASON": reason,
                   "STUB_MESSAGE": message, "STUB_ENDS": "yes" if ends else "no"}
        done = subprocess.run([shell, "-c", script], env=run_env, capture_output=True, text=True, timeout=60,
                              check=False)
        calls = (Path(tmp) / "calls").read_text().splitlines()
        created_file = Path(tmp) / "created.yaml"
        created = yaml.safe_load(created_file.read_text()) if created_file.exists() else None
    return CronRun(done.returncode, done.stdout + done.stderr, calls, created)


def _run_cron_script(cronjob: dict, deployment: str, job: str, **kw) -> CronRun:
    container = _cron_container(cronjob)
    assert container["command"] == ["/bin/sh", "-c"], f"the script must run under /bin/sh: {container['command']}"
    env = tuple(sorted((e["name"], e["value"]) for e in container["env"]))
    return _run_script(container["args"][0], env, deployment, job, **kw)


@functools.cache
def _nightly_cronjob(form: str) -> dict:
    objects = _files("nightly") if form == "files" else _rendered("nightly")
    (_, cronjob), = _of_kind(objects, "CronJob")
    return cronjob


TERMINAL = [  # (jobDeploymentStatus, jobStatus, reason, endTime set, exit code, what the log must say)
    ("Complete", "SUCCEEDED", "", True, 0, "Complete/SUCCEEDED"),
    ("Failed", "FAILED", "AppFailed", True, 1, "AppFailed: the message"),
    ("Failed", "RUNNING", "DeadlineExceeded", True, 1, "DeadlineExceeded: the message"),
    ("Complete", "STOPPED", "", True, 1, "Complete/STOPPED"),
    ("ValidationFailed", "", "ValidationFailed", False, 2, "ValidationFailed: the message"),
    ("Running", "RUNNING", "", False, 3, "has no outcome"),
]


@pytest.mark.parametrize("form", ["files", "rendered"])
@pytest.mark.parametrize("deployment,job,reason,ends,rc,said", TERMINAL,
                         ids=[f"{t[0]}-{t[1] or 'none'}" for t in TERMINAL])
def test_cronjob_script_ends_on_every_terminal_state(form, deployment, job, reason, ends, rc, said):
    run = _run_cron_script(_nightly_cronjob(form), deployment, job, reason=reason, message="the message", ends=ends)
    assert run.rc == rc, f"RayJob {deployment}/{job}: the script exits {run.rc}, not {rc}:\n{run.output}"
    assert said in run.output, f"the script's log does not say {said!r}:\n{run.output}"
    assert run.calls[0].startswith("create "), run.calls
    waits = [c for c in run.calls if c.startswith("wait ")]
    assert all("--for=jsonpath=" in w and "--timeout=" in w for w in waits), waits
    assert any("endTime" in w for w in waits) == (deployment != "ValidationFailed"), \
        f"ValidationFailed never ends, so only then may the script skip waiting for endTime: {waits}"
    assert len(run.calls) <= 6, f"the script polls: {run.calls}"


def test_cronjob_script_is_posix_and_waits_without_polling():
    script = _cron_container(_nightly_cronjob("files"))["args"][0]
    outside = re.sub(r"<<EOF\n.*?\nEOF\n", "", script, flags=re.DOTALL)
    assert not re.search(r"\b(sleep|while|until)\b", outside), "use kubectl wait, not a polling loop"
    assert not re.search(r"\[\[|pipefail|\bfunction\b|\$\{[A-Za-z_]+//|<<<|\bdeclare\b|\blocal\b", outside), \
        "bash-only syntax in a /bin/sh script"


def test_cronjob_creates_the_raycronjob_template():
    """Both nightly overlays run the same RayJob: with the files' defaults and as rendered."""
    forms = [("files", _files)] + ([("rendered", _rendered)] if _kubectl()[0] else [])
    for form, load in forms:
        (_, cron), = _of_kind(load("nightly-raycronjob"), "RayCronJob")
        cronjob = _nightly_cronjob(form)
        created = _run_cron_script(cronjob, "Complete", "SUCCEEDED").created
        assert created["spec"] == cron["spec"]["jobTemplate"], \
            f"{form}: the CronJob's RayJob differs from the RayCronJob's jobTemplate"
        assert created["metadata"].get("generateName") and not created["metadata"].get("name"), \
            "each night needs a fresh RayJob name"
        for field in ("schedule", "timeZone"):
            assert cronjob["spec"][field] == cron["spec"][field], f"{form}: {field} differs between the two nightlies"


def test_nightly_reruns_the_catalog_within_the_day(objects):
    for origin, _, job in _jobs(objects):
        if "catalog" not in origin:
            continue
        args = _parse(_argv(job["entrypoint"]))
        assert args.command == "generate" and not args.force, \
            f"{origin}: the nightly run must resume (generate without --force), so only changed rows are drawn"
        assert not re.search(r"[$`{}%]", args.out), f"{origin}: --out {args.out!r} must be the same every night"
        # Deadlines count per attempt; a night's attempts must end before the next night.
        worst = (job["backoffLimit"] + 1) * job["activeDeadlineSeconds"]
        assert worst < 24 * 3600, f"{origin}: up to {worst / 3600:g} h of retries would overlap the next night"
    for origin, cronjob in _of_kind(objects, "CronJob"):
        spec = cronjob["spec"]
        env = {e["name"]: e["value"] for e in _cron_container(cronjob)["env"]}
        created = _run_cron_script(cronjob, "Complete", "SUCCEEDED").created["spec"]
        worst = (created["backoffLimit"] + 1) * created["activeDeadlineSeconds"]
        wait, deadline = int(env["RAYJOB_WAIT_SECONDS"]), spec["jobTemplate"]["spec"]["activeDeadlineSeconds"]
        assert spec.get("concurrencyPolicy") == "Forbid", f"{origin}: concurrencyPolicy must be Forbid"
        assert spec["jobTemplate"]["spec"].get("backoffLimit") == 0, f"{origin}: a retried pod creates a second RayJob"
        assert worst < wait < deadline - 600 < 24 * 3600, \
            f"{origin}: RayJob worst case {worst} s, wait {wait} s and Job deadline {deadline} s must nest"


def test_cronjob_rbac_is_minimal(objects):
    for origin, cronjob in _of_kind(objects, "CronJob"):
        account = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
        roles = {b["roleRef"]["name"] for _, b in _of_kind(objects, "RoleBinding")
                 if b["roleRef"]["kind"] == "Role" and any(s["kind"] == "ServiceAccount" and s["name"] == account
                                                          and s.get("namespace") == NAMESPACE for s in b["subjects"])}
        rules = [r for _, role in _of_kind(objects, "Role") if _name(role) in roles for r in role["rules"]]
        assert rules == [{"apiGroups": [KUBERAY_GROUP], "resources": ["rayjobs"],
                          "verbs": ["create", "get", "list", "watch"]}], \
            f"{origin}: {account} should only create and watch RayJobs, has {rules}"
    assert not _of_kind(objects, "ClusterRole", "ClusterRoleBinding"), "nothing here needs cluster-wide rights"


# --- kustomize ----------------------------------------------------------------------------------

def _split_field_path(path: str) -> list[str]:
    return re.findall(r"\[[^\]]*\]|[^.\[\]]+", path)


def _get(obj, path: str):
    for part in _split_field_path(path):
        if part.startswith("[") and "=" in part:
            key, _, want = part[1:-1].partition("=")
            matches = [el for el in obj if str(el.get(key)) == want]
            assert len(matches) == 1, f"{path}: {part} matches {len(matches)} elements"
            obj = matches[0]
        elif part.startswith("["):
            obj = obj[part[1:-1]]
        elif isinstance(obj, list):
            obj = obj[int(part)]
        else:
            assert isinstance(obj, dict) and part in obj, f"{path}: no field {part!r}"
            obj = obj[part]
    return obj


def test_kustomize_replacements_land_on_the_values_they_replace():
    """Each manifest already holds the setting's value where a replacement writes it.

    So `kubectl apply -f` on one file and `kubectl apply -k` agree, and a wrong path or word index in a
    replacement (which kustomize would apply silently to the wrong word) fails here, without kubectl.
    """
    files = sorted({p for o in OVERLAYS for p in _resource_files(OVERLAYS_DIR / o)})
    resources = [obj for _, obj in _load(files)]
    resources.append({"kind": "ConfigMap", "metadata": {"name": "sdfleet-settings"}, "data": LITERALS})
    for obj in resources:
        obj.setdefault("metadata", {}).setdefault("namespace", NAMESPACE)
    replacements = list(SETTINGS["replacements"])
    for overlay in OVERLAYS:
        replacements += _kustomization(OVERLAYS_DIR / overlay).get("replacements", [])

    def select(sel: dict) -> list[dict]:
        found = [r for r in resources if r["kind"] == sel["kind"] and r["metadata"].get("name") == sel["name"]]
        assert found, f"replacement selects {sel}, which no resource is"
        return found

    for rep in replacements:
        src = rep["source"]
        value = str(_get(select(src)[0], src["fieldPath"]))
        for target in rep["targets"]:
            options = target.get("options", {})
            for obj in select(target["select"]):
                for path in target["fieldPaths"]:
                    current = str(_get(obj, path))
                    if "delimiter" in options:
                        words = current.split(options["delimiter"])
                        current = words[options["index"]] if options["index"] < len(words) else None
                    assert current == value, \
                        f"{target['select']['kind']}/{target['select']['name']} {path} {options or ''}: " \
                        f"holds {current!r}, {src['fieldPath']} is {value!r}"


def test_kustomize_images_cover_every_sdfleet_container():
    names = {image["name"] for image in SETTINGS["images"]}
    for overlay in OVERLAYS:
        for where, pod, _ in _pod_templates(_files(overlay)):
            for c in pod["containers"]:
                name = re.split(r"[@]|:(?=[^/]*$)", c["image"])[0]
                assert name in names, f"{where}: image {c['image']!r} is not rewritten by k8s/settings images"


def test_kustomize_build_applies_the_settings_everywhere(tmp_path):
    """Render the overlays with other settings; every object stays valid and picks them up."""
    if not _kubectl()[0]:
        pytest.skip(_kubectl()[1])
    shutil.copytree(K8S, tmp_path / "k8s")
    path = tmp_path / "k8s" / "settings" / "kustomization.yaml"
    text = path.read_text()
    changes = {"gpu-workers=4": "gpu-workers=7", '"schedule=0 2 * * *"': '"schedule=15 4 * * 1-5"',
               "catalog-out=s3://sdfleet-example/catalog/out": "catalog-out=s3://other/night",
               "cache-storage-class=standard-rwx": "cache-storage-class=efs-sc",
               "operator-namespace=kuberay-system": "operator-namespace=ops",
               'newTag: "0.1.0"': 'newTag: "9.9.9"'}
    for old, new in changes.items():
        assert old in text, f"k8s/settings/kustomization.yaml no longer has {old!r}; update this test"
        text = text.replace(old, new)
    path.write_text(text)
    for overlay in ("cluster", "generate", "nightly", "nightly-raycronjob"):
        objects = _with_created((f"{overlay}:{d['kind']}/{_name(d)}", d)
                                for d in _render(tmp_path / "k8s" / "overlays" / overlay))
        for origin, obj in objects:
            assert not _schema_errors(obj), f"{origin}: {_schema_errors(obj)}"
            assert obj["kind"] != "ConfigMap", f"{origin}: the settings ConfigMap leaked into the output"
        for where, pod, _ in _pod_templates(objects):
            for c in pod["containers"]:
                assert c["image"] == "registry.example.com/ml/sdfleet:9.9.9", f"{where}: image {c['image']}"
        for origin, cluster in _cluster_specs(objects):
            assert _gpu_capacity(cluster) == 7, f"{origin}: GPU count not applied"
        for origin, _, job in _jobs(objects):
            args = _parse(_argv(job["entrypoint"]))
            assert args.actors == 7, f"{origin}: --actors not applied"
            if "catalog" in origin:
                assert args.out == "s3://other/night", f"{origin}: catalog-out not applied"
        for origin, obj in _of_kind(objects, "RayCronJob", "CronJob"):
            assert obj["spec"]["schedule"] == "15 4 * * 1-5", f"{origin}: schedule not applied"
        for origin, obj in _of_kind(objects, "PersistentVolumeClaim"):
            assert obj["spec"]["storageClassName"] == "efs-sc", f"{origin}: storage class not applied"
        for origin, obj in _of_kind(objects, "NetworkPolicy"):
            if obj["spec"].get("ingress"):
                assert "ops" in json.dumps(obj["spec"]), f"{origin}: operator namespace not applied"


def test_kueue_overlay_labels_and_lifecycle():
    for source in ("overlays/kueue", "finetune"):
        if source == "finetune":  # the component on the other RayJob overlay, as docs/kubernetes.md says
            if not _kubectl()[0]:
                pytest.skip(_kubectl()[1])
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                rel = lambda p: os.path.relpath(p, tmp)  # kustomize refuses absolute paths
                (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(
                    {"resources": [rel(OVERLAYS_DIR / "finetune")], "components": [rel(K8S / "components" / "kueue")]}))
                objects = [(f"finetune+kueue:{d['kind']}/{_name(d)}", d) for d in _render(Path(tmp))]
        else:
            objects = list(_rendered("kueue"))
        (origin, job), = _of_kind(objects, "RayJob")
        labels = job["metadata"]["labels"]
        assert labels.get(KUEUE_QUEUE) and labels.get(KUEUE_PRIORITY), f"{origin}: no Kueue labels: {labels}"
        assert not _kuberay_rejects(job["metadata"], job["spec"]), _kuberay_rejects(job["metadata"], job["spec"])
        assert not _schema_errors(job), _schema_errors(job)


# --- docs -----------------------------------------------------------------------------------------

def test_the_kubernetes_guide_matches_the_overlays():
    text = DOCS.read_text()
    named = set(re.findall(r"k8s/overlays/([\w.-]+)", text))
    assert named == set(OVERLAYS), f"docs/kubernetes.md names overlays {sorted(named)}, k8s/overlays has {OVERLAYS}"
    for path in re.findall(r"(?<![\w/])(k8s/[\w./-]*[\w-])", text):
        assert (REPO / path).exists(), f"docs/kubernetes.md names {path}, which does not exist"
    for path in re.findall(r"kubectl (?:apply|kustomize|delete) -k ([^\s`]+)", text):
        assert (REPO / path / "kustomization.yaml").is_file(), f"docs/kubernetes.md applies {path}: no kustomization"
    assert "--rows-may-fail" in text and "## Metrics" in text
    assert "docs/kubernetes.md" in (REPO / "README.md").read_text()


def test_the_guides_yaml_examples_are_valid():
    """RayJob and RayCluster examples in docs/kubernetes.md pass the same checks as the overlays."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    examples = [doc for block in blocks for doc in yaml.safe_load_all(block)
                if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith(KUBERAY_GROUP)]
    assert examples, "docs/kubernetes.md shows no KubeRay example"
    known = [o for overlay in OVERLAYS for o in _files(overlay)]
    for doc in examples:
        where = f"docs/kubernetes.md {doc['kind']}/{_name(doc)}"
        assert not _schema_errors(doc), f"{where}: {_schema_errors(doc)}"
        if doc["kind"] == "RayJob":
            found = _kuberay_rejects(doc["metadata"], doc["spec"])
            assert not found, f"{where}: {found}"
            args = _parse(_argv(doc["spec"]["entrypoint"]))
            assert args.command != "generate" or args.rows_may_fail, f"{where}: no --rows-may-fail"
            assert _cluster_of(doc["spec"], known + [(where, doc)]) is not None


# --- cluster launcher ---------------------------------------------------------------------------

def test_cluster_launcher_config_is_coherent():
    config = yaml.safe_load(LAUNCHER.read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] in types, "head_node_type is not one of available_node_types"
    assert all(t.get("max_workers", 0) <= config["max_workers"] for t in types.values())
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"], "token auth is off"
    assert any("auth_token" in target for target in config.get("file_mounts", {})), "no token file mounted"
    assert any("--num-cpus=0" in cmd for cmd in config["head_start_ray_commands"]), \
        "the head should run no tasks: it hosts the driver"
