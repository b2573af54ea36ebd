"""The k8s/ overlays as objects, for the tests in test_k8s*.py: loaded from their files or rendered by
`kubectl kustomize`, walked (jobs, clusters, pod templates, containers), checked against the KubeRay
v1.7.0 CRD schemas and kubernetes-validate's, and the nightly CronJob's script run against a stub kubectl
(its RayJob is one of the objects the `objects` fixture yields).
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
from pathlib import Path

import jsonschema
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


def overlay_objects(source: str) -> list[tuple[str, dict]]:
    """Every object one overlay applies (`source`: "files:OVERLAY" or "rendered:OVERLAY", see SOURCES), with
    the RayJobs its CronJob creates; the `objects` fixture of tests/conftest.py yields each."""
    form, overlay = source.split(":")
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
    # Imported here: conftest imports this module, and kubernetes-validate (a test-only extra, 108 MB) is not
    # on the lent GPU machine, which must still collect every other test.
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path)) or '<root>'}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


# --- the rules KubeRay v1.7.0's controller and Kueue's webhook apply to a RayJob -------------------

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


# --- the nightly CronJob's script, run against a stub kubectl ------------------------------------

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
  delete) ;;
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
