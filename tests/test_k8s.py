"""The Kubernetes manifests in k8s/ are valid, runnable and coherent, checked without a cluster.

KubeRay objects validate against the v1.7.0 CRD schemas in ../shared/kuberay-crds (unknown fields
rejected, as the API server's pruning would silently drop them); plain objects against
kubernetes-validate's strict schemas; every `sdfleet` entrypoint parses with the CLI's own parser.
The RayJob that the fallback CronJob creates from a script is rendered and checked like the others.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import string
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
LAUNCHER = REPO / "cluster" / "cluster-launcher.aws.yaml"
CRD_DIR = Path(os.environ.get("SDFLEET_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds"))
KUBERNETES_VERSION = "1.37"
KUBERAY_GROUP = "ray.io"
GPU = "nvidia.com/gpu"
PLACEHOLDER = "REPLACE_ME"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --- loading ------------------------------------------------------------------------------------

def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _load_objects(files: list[Path]) -> list[tuple[str, dict]]:
    """(origin, object) for every document, plus the RayJob a CronJob's script creates."""
    objects = []
    for path in files:
        for doc in yaml.load_all(path.read_text(), Loader=_Loader):
            if doc:
                objects.append((f"{path.name}:{doc['kind']}/{_name(doc)}", doc))
    for origin, obj in list(objects):
        if obj["kind"] == "CronJob":
            objects.append((origin + ">RayJob", _cronjob_rayjob(obj)))
    return objects


def _name(obj: dict) -> str:
    meta = obj.get("metadata", {})
    return meta.get("name") or meta.get("generateName", "?")


def _cronjob_container(cronjob: dict) -> dict:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]


def _cronjob_rayjob(cronjob: dict) -> dict:
    """The RayJob in the CronJob's heredoc, with ${VARS} filled from the container's env, as bash would."""
    container = _cronjob_container(cronjob)
    script = "\n".join(container.get("args", []) + container.get("command", []))
    found = re.search(r"<<EOF\n(.*?)\nEOF\n", script, re.S)
    assert found, f"CronJob {_name(cronjob)}: no `<<EOF ... EOF` RayJob in its script"
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    try:
        return yaml.safe_load(string.Template(found.group(1)).substitute(env))
    except KeyError as exc:
        raise AssertionError(f"CronJob {_name(cronjob)}: its RayJob uses ${{{exc.args[0]}}}, "
                             "which the container's env does not set") from None


OBJECTS = _load_objects(_manifest_files())
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _of_kind(*kinds: str, objects=None) -> list[tuple[str, dict]]:
    return [(o, obj) for o, obj in (objects or OBJECTS) if obj["kind"] in kinds]


def _jobs(objects=None) -> list[tuple[str, dict]]:
    """(origin, RayJob spec) for every RayJob, including a RayCronJob's template."""
    jobs = [(o, obj["spec"]) for o, obj in _of_kind("RayJob", objects=objects)]
    jobs += [(o, obj["spec"]["jobTemplate"]) for o, obj in _of_kind("RayCronJob", objects=objects)]
    return jobs


def _cluster_specs(objects=None) -> list[tuple[str, dict]]:
    specs = [(o, obj["spec"]) for o, obj in _of_kind("RayCluster", objects=objects)]
    specs += [(o, job["rayClusterSpec"]) for o, job in _jobs(objects) if "rayClusterSpec" in job]
    return specs


def _cluster_of(job: dict, objects=None) -> dict:
    """The RayCluster spec a job runs on: its own, or the one its clusterSelector names."""
    if "rayClusterSpec" in job:
        return job["rayClusterSpec"]
    wanted = job["clusterSelector"]["ray.io/cluster"]
    return next(obj["spec"] for _, obj in _of_kind("RayCluster", objects=objects) if _name(obj) == wanted)


def _pod_specs(cluster: dict) -> list[tuple[str, dict]]:
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
    return pods


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


def _flag(argv: list[str], flag: str) -> str:
    assert flag in argv, f"`sdfleet {shlex.join(argv)}` has no {flag}"
    return argv[argv.index(flag) + 1]


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


_VALIDATORS: dict[tuple[str, str], jsonschema.Draft4Validator] = {}


def _crd_validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    if not _VALIDATORS:
        if not CRD_DIR.is_dir():
            pytest.fail(f"KubeRay CRDs not found at {CRD_DIR} (the shared/ folder beside the repository); "
                        "set SDFLEET_KUBERAY_CRDS to their folder")
        for path in CRD_DIR.glob("ray.io_*.yaml"):
            crd = yaml.load(path.read_text(), Loader=_Loader)
            for version in crd["spec"]["versions"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                _VALIDATORS[key] = jsonschema.Draft4Validator(_strict(version["schema"]["openAPIV3Schema"]))
    assert (api_version, kind) in _VALIDATORS, f"KubeRay v1.7.0 serves no {kind} in {api_version}"
    return _VALIDATORS[(api_version, kind)]


def _crd_errors(obj: dict) -> list[str]:
    validator = _crd_validator(obj["apiVersion"], obj["kind"])
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


def _is_kuberay(obj: dict) -> bool:
    return obj["apiVersion"].split("/")[0] == KUBERAY_GROUP


def _assert_schema_valid(origin: str, obj: dict) -> None:
    if _is_kuberay(obj):
        errors = _crd_errors(obj)
        assert not errors, f"{origin} breaks the KubeRay v1.7.0 CRD schema:\n  " + "\n  ".join(errors)
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(map(str, exc.absolute_path)) or "<root>"
        pytest.fail(f"{origin} breaks the Kubernetes {KUBERNETES_VERSION} schema at {where}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{origin}: {exc.message}")


@pytest.mark.parametrize("origin,obj", OBJECTS, ids=[o for o, _ in OBJECTS])
def test_object_validates_against_its_schema(origin, obj):
    _assert_schema_valid(origin, obj)


# --- entrypoints --------------------------------------------------------------------------------

ENTRYPOINTS = [(o, job["entrypoint"]) for o, job in _jobs()]


@pytest.mark.parametrize("origin,entrypoint", ENTRYPOINTS, ids=[o for o, _ in ENTRYPOINTS])
def test_entrypoint_parses_with_the_cli(origin, entrypoint):
    _parse(_argv(entrypoint))


def test_every_job_runs_sdfleet_without_credentials():
    assert ENTRYPOINTS, "no RayJob entrypoints found in k8s/"
    for origin, entrypoint in ENTRYPOINTS:
        argv = _argv(entrypoint)
        assert argv[0] in ("generate", "finetune"), f"{origin}: unexpected command {argv[0]!r}"
        assert not re.search(r"AWS_|TOKEN|SECRET|://[^/\s]*@", entrypoint, re.I), \
            f"{origin}: credentials belong in Secrets, not in the entrypoint: {entrypoint!r}"


# --- resources ----------------------------------------------------------------------------------

def test_generate_actors_fit_the_gpu_workers():
    for origin, job in _jobs():
        argv = _argv(job["entrypoint"])
        if argv[0] != "generate":
            continue
        args = _parse(argv)
        capacity = _gpu_capacity(_cluster_of(job))
        assert 1 <= args.actors <= capacity, \
            f"{origin}: --actors {args.actors} but the GPU worker groups hold at most {capacity} GPUs"
        # An autoscaled cluster shows no GPU until an actor asks for one; `auto` would pick CPU actors.
        assert args.device == "cuda", f"{origin}: --device {args.device}; a GPU cluster needs --device cuda"


def test_finetune_workers_fit_the_gpu_workers():
    jobs = [(o, j) for o, j in _jobs() if _argv(j["entrypoint"])[0] == "finetune"]
    assert jobs, "no finetune RayJob in k8s/"
    for origin, job in jobs:
        argv = _argv(job["entrypoint"])
        workers = int(_flag(argv, "--workers"))
        capacity = _gpu_capacity(_cluster_of(job))
        assert "--gpu" in argv, f"{origin}: a GPU cluster but no --gpu"
        # Ray Train waits for every worker's GPU: more workers than GPUs never starts.
        assert 1 <= workers <= capacity, f"{origin}: --workers {workers} but at most {capacity} GPUs"


def test_gpu_workers_request_and_limit_their_gpus():
    from cluster.connect import READ_CPU_RESERVE, size_actors

    cpus_per_actor = size_actors(1, {"GPU": 1.0, "CPU": 8.0}, "cuda").num_cpus
    for origin, cluster in _cluster_specs():
        head_cpus = cluster["headGroupSpec"].get("rayStartParams", {}).get("num-cpus")
        for group, pod in _pod_specs(cluster):
            where = f"{origin} group {group}"
            for c in pod["containers"]:
                requests, limits = c["resources"]["requests"], c["resources"]["limits"]
                # Ray sizes itself from limits; requests below them would overcommit the node.
                for key in ("cpu", "memory", GPU):
                    assert requests.get(key) == limits.get(key), \
                        f"{where}: {key} request {requests.get(key)} != limit {limits.get(key)}"
            if group == "head":
                assert _gpus(pod) == 0, f"{where}: the head should not hold a GPU"
                continue
            gpus = _gpus(pod)
            assert gpus >= 1, f"{where}: worker has no {GPU} limit"
            tolerated = {t.get("key") for t in pod.get("tolerations", [])}
            assert tolerated & {GPU, "ray.io/node-type"}, f"{where}: no toleration for the GPU taint"
            assert pod.get("nodeSelector"), f"{where}: no nodeSelector for the GPU pool"
            # With a CPU-less head, Ray Data's read tasks need CPUs beside the actors or the run hangs.
            cpus = sum(_cpu(c["resources"]["limits"]["cpu"]) for c in pod["containers"])
            needed = gpus * cpus_per_actor + (READ_CPU_RESERVE if head_cpus == "0" else 0)
            assert cpus >= needed, f"{where}: {cpus:g} CPUs for {gpus} actor(s); needs at least {needed:g}"


def test_clusters_autoscale_between_min_and_max():
    for origin, cluster in _cluster_specs():
        assert cluster.get("enableInTreeAutoscaling") is True, f"{origin}: in-tree autoscaling is off"
        for g in cluster["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], \
                f"{origin} group {g['groupName']}: need minReplicas <= replicas <= maxReplicas"


def test_jobs_have_a_batch_lifecycle():
    for origin, job in _jobs():
        assert job.get("shutdownAfterJobFinishes") is True, f"{origin}: the cluster outlives the job"
        for field in ("ttlSecondsAfterFinished", "backoffLimit"):
            assert isinstance(job.get(field), int) and job[field] >= 0, f"{origin}: {field} unset"
        assert isinstance(job.get("activeDeadlineSeconds"), int) and job["activeDeadlineSeconds"] > 0, \
            f"{origin}: no activeDeadlineSeconds; a hung job would hold its GPUs forever"


# --- versions -----------------------------------------------------------------------------------

def _pinned_ray() -> str:
    found = re.findall(r'"ray(?:\[[^\]]*\])?==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert len(found) == 1, f"pyproject.toml pins ray {len(found)} times"
    return found[0]


def test_image_and_clusters_use_the_pinned_ray():
    pinned = _pinned_ray()
    base = re.search(r"^FROM\s+(\S+)", (K8S / "Dockerfile").read_text(), re.M).group(1)
    tag = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)(?:-py(\d+))?.*", base)
    assert tag, f"Dockerfile base {base!r} is not a rayproject/ray:<version>-... image"
    assert tag.group(1) == pinned, f"Dockerfile base has Ray {tag.group(1)}, pyproject pins ray=={pinned}"
    for origin, cluster in _cluster_specs():
        assert cluster.get("rayVersion") == pinned, \
            f"{origin}: rayVersion {cluster.get('rayVersion')!r}, pyproject pins ray=={pinned}"


# --- security -----------------------------------------------------------------------------------

EXAMPLE_SECRETS = {_name(obj): obj for _, obj in _load_objects([K8S / "secret.example.yaml"])}


def _ray_containers():
    for origin, cluster in _cluster_specs():
        for group, pod in _pod_specs(cluster):
            for c in pod["containers"]:
                yield f"{origin} {group}/{c['name']}", c


def test_ray_token_auth_is_on_with_a_token_from_a_secret():
    for origin, cluster in _cluster_specs():
        auth = cluster.get("authOptions", {})
        assert auth.get("mode") == "token", f"{origin}: authOptions.mode is {auth.get('mode')!r}, not token"
        secret = EXAMPLE_SECRETS.get(auth.get("secretName"))
        assert secret is not None, f"{origin}: authOptions.secretName {auth.get('secretName')!r} " \
                                   "is not a Secret in secret.example.yaml"
        assert "auth_token" in secret.get("stringData", {}), \
            f"{origin}: KubeRay reads the token from key `auth_token` of {auth['secretName']}"


def test_dashboard_stays_inside_the_cluster():
    for origin, cluster in _cluster_specs():
        head = cluster["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{origin}: head service is {head['serviceType']}"
        assert not head.get("enableIngress"), f"{origin}: the dashboard runs arbitrary code; no ingress"
    for origin, svc in _of_kind("Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{origin}: {svc['spec']['type']} Service"


def test_bucket_credentials_come_only_from_secrets():
    credential = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)
    for where, c in _ray_containers():
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert refs and all(r in EXAMPLE_SECRETS for r in refs), \
            f"{where}: bucket credentials must come from a Secret (envFrom secretRef); got {refs}"
        assert not [e for e in c.get("envFrom", []) if "configMapRef" in e], f"{where}: credentials in a ConfigMap"
        for e in c.get("env", []):
            if credential.search(e["name"]):
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {e['name']} set literally"


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
    files = [p for p in K8S.iterdir() if p.is_file()] + [LAUNCHER]
    for path in files:
        text = path.read_text()
        for what, pattern in SECRET_LOOKING.items():
            hit = re.search(pattern, text)
            assert not hit, f"{path.relative_to(REPO)} holds what looks like a {what}: {hit.group(0)[:12]}..."
    for name, secret in EXAMPLE_SECRETS.items():
        for key, value in {**secret.get("stringData", {}), **secret.get("data", {})}.items():
            if re.search(r"KEY|SECRET|TOKEN|PASSWORD", key, re.I):
                assert value == PLACEHOLDER, f"secret.example.yaml {name}.{key} must stay {PLACEHOLDER}"


def test_kustomization_never_ships_secrets():
    assert "secret.example.yaml" not in KUSTOMIZATION["resources"]
    shipped = [o for o, obj in OBJECTS if obj["kind"] == "Secret" and o.split(":")[0] in KUSTOMIZATION["resources"]]
    assert not shipped, f"kubectl apply -k would overwrite real Secrets with {shipped}"


# --- the nightly run ----------------------------------------------------------------------------

def test_nightly_reruns_the_catalog_into_the_same_output():
    (origin, cron), = _of_kind("RayCronJob")
    assert cron["spec"]["schedule"] and cron["spec"].get("timeZone"), f"{origin}: schedule and timeZone"
    job = cron["spec"]["jobTemplate"]
    args = _parse(_argv(job["entrypoint"]))
    assert args.command == "generate" and not args.force, \
        f"{origin}: the nightly run must resume (generate without --force), so only changed rows are drawn"
    assert not re.search(r"[$`{}%]", args.out), f"{origin}: --out {args.out!r} must be the same every night"
    # RayCronJob has no concurrencyPolicy: a nightly run, retries included, must end within the day.
    worst = (job["backoffLimit"] + 1) * job["activeDeadlineSeconds"]
    assert worst < 24 * 3600, f"{origin}: up to {worst / 3600:g} h of retries would overlap the next night"


def test_cronjob_fallback_creates_the_same_rayjob():
    (_, cron), = _of_kind("RayCronJob")
    (origin, cronjob), = _of_kind("CronJob")
    (_, created), = [(o, obj) for o, obj in OBJECTS if o.startswith(origin + ">")]
    assert created["spec"] == cron["spec"]["jobTemplate"], \
        f"{origin}: its RayJob differs from the RayCronJob's jobTemplate"
    assert created["metadata"].get("generateName"), f"{origin}: each night needs a fresh RayJob name"
    for field in ("schedule", "timeZone"):
        assert cronjob["spec"].get(field) == cron["spec"][field], f"{origin}: {field} differs from the RayCronJob"
    assert cronjob["spec"].get("concurrencyPolicy") == "Forbid", f"{origin}: concurrencyPolicy must be Forbid"
    # The pod's ServiceAccount must be allowed to create (and wait on) RayJobs, and nothing cluster-wide.
    account = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
    roles = {b["roleRef"]["name"] for _, b in _of_kind("RoleBinding")
             if b["roleRef"]["kind"] == "Role"
             and any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])}
    rules = [r for _, role in _of_kind("Role") if _name(role) in roles for r in role["rules"]]
    assert any(KUBERAY_GROUP in r["apiGroups"] and "rayjobs" in r["resources"]
               and {"create", "get"} <= set(r["verbs"]) for r in rules), \
        f"{origin}: ServiceAccount {account} may not create and get RayJobs"
    assert not _of_kind("ClusterRole", "ClusterRoleBinding"), "the nightly needs no cluster-wide rights"


# --- kustomize ----------------------------------------------------------------------------------

def _split_field_path(path: str) -> list[str]:
    return re.findall(r"\[[^\]]*\]|[^.\[\]]+", path)


def _get(obj, path: str):
    for part in _split_field_path(path):
        if part.startswith("["):
            key, _, want = part[1:-1].partition("=")
            matches = [el for el in obj if str(el.get(key)) == want]
            assert len(matches) == 1, f"{path}: {part} matches {len(matches)} elements"
            obj = matches[0]
        else:
            assert isinstance(obj, dict) and part in obj, f"{path}: no field {part!r}"
            obj = obj[part]
    return obj


def _kustomize_resources() -> list[dict]:
    """The objects kustomize starts from: the listed files, the generated ConfigMaps, the namespace."""
    resources = [obj for _, obj in _load_objects([K8S / f for f in KUSTOMIZATION["resources"]])
                 if "generateName" not in obj.get("metadata", {})]
    for gen in KUSTOMIZATION.get("configMapGenerator", []):
        data = dict(literal.split("=", 1) for literal in gen.get("literals", []))
        resources.append({"kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for obj in resources:
        obj.setdefault("metadata", {}).setdefault("namespace", KUSTOMIZATION.get("namespace"))
    return resources


def test_kustomize_replacements_land_on_the_values_they_replace():
    """Each manifest already holds the kustomization's value where a replacement writes it.

    So `kubectl apply -f` on one file and `kubectl apply -k` agree, and a wrong path or word index in
    a replacement (which kustomize would apply silently to the wrong word) fails here.
    """
    resources = _kustomize_resources()

    def select(sel: dict) -> list[dict]:
        found = [r for r in resources if r["kind"] == sel["kind"] and r["metadata"]["name"] == sel["name"]]
        assert found, f"replacement selects {sel}, which no resource is"
        return found

    for rep in KUSTOMIZATION["replacements"]:
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
    names = {image["name"] for image in KUSTOMIZATION["images"]}
    for where, c in _ray_containers():
        if where.startswith("cronjob."):
            continue  # written from the CronJob's env, which a replacement keeps in step
        name = re.split(r"[@]|:(?=[^/]*$)", c["image"])[0]
        assert name in names, f"{where}: image {c['image']!r} is not rewritten by kustomization.yaml images"


def test_kustomize_build_applies_the_settings_everywhere(tmp_path):
    """Render the kustomization with other settings; every object stays valid and picks them up."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl (with its built-in kustomize) is not installed; the static checks above still ran")
    shutil.copytree(K8S, tmp_path / "k8s")
    path = tmp_path / "k8s" / "kustomization.yaml"
    text = path.read_text()
    for old, new in (("gpu-workers=4", "gpu-workers=7"), ('"schedule=0 2 * * *"', '"schedule=15 4 * * 1-5"'),
                     ("catalog-out=s3://sdfleet-example/catalog/out", "catalog-out=s3://other/night")):
        assert old in text, f"kustomization.yaml no longer has {old!r}; update this test"
        text = text.replace(old, new)
    path.write_text(text)
    rendered = subprocess.run([kubectl, "kustomize", str(path.parent)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    objects = [(f"rendered:{d['kind']}/{_name(d)}", d) for d in docs]
    objects += [(o + ">RayJob", _cronjob_rayjob(d)) for o, d in objects if d["kind"] == "CronJob"]
    assert not [o for o, d in objects if d["kind"] == "ConfigMap"], "the settings ConfigMap leaked into the output"
    for origin, obj in objects:
        _assert_schema_valid(origin, obj)
    for origin, job in _jobs(objects):
        argv = _argv(job["entrypoint"])
        if argv[0] == "generate":
            args = _parse(argv)
            assert args.actors == _gpu_capacity(_cluster_of(job, objects)) == 7, f"{origin}: GPU count not applied"
            if "catalog" in origin:
                assert args.out == "s3://other/night", f"{origin}: catalog-out not applied"
    for origin, obj in objects:
        if obj["kind"] in ("RayCronJob", "CronJob"):
            assert obj["spec"]["schedule"] == "15 4 * * 1-5", f"{origin}: schedule not applied"


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
