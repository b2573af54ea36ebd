"""The nightly catalogue run (its CronJob's script against a stub kubectl, once per terminal state of its
RayJob), the kustomize settings, the Kubernetes guide and the cluster launcher config, checked without a
cluster. The objects come from tests/k8s_objects.py, as in test_k8s.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from k8s_objects import (
    DOCS, K8S, KUBERAY_GROUP, KUEUE_PRIORITY, KUEUE_QUEUE, LAUNCHER, LITERALS, NAMESPACE, OVERLAYS_DIR, OVERLAYS,
    REPO, SETTINGS, _argv, _cluster_of, _cluster_specs, _cron_container, _files, _gpu_capacity, _jobs, _kubectl,
    _kuberay_rejects, _kustomization, _load, _name, _of_kind, _parse, _pod_templates, _render, _rendered,
    _resource_files, _run_cron_script, _schema_errors, _with_created,
)


# --- the nightly run ----------------------------------------------------------------------------

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
    assert len([c for c in run.calls if not c.startswith("delete ")]) <= 6, f"the script polls: {run.calls}"
    # a stopped night matches none of its RayJob's deletion rules: the script deletes it, and only then
    deletes = [c for c in run.calls if c.startswith("delete ")]
    assert deletes == (["delete rayjob/sdfleet-catalog-nightly-x7k2p --wait=false"] if job == "STOPPED" else []), \
        f"RayJob {deployment}/{job}: {deletes}"


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
                          "verbs": ["create", "get", "list", "watch", "delete"]}], \
            f"{origin}: {account} should only create, watch and delete RayJobs, has {rules}"
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
    changes = {"gpu-workers=4": "gpu-workers=7", '"schedule=30 3 * * *"': '"schedule=15 4 * * 1-5"',
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


def test_the_guides_operator_values_outlast_a_lost_heads_replacement():
    """KubeRay fails a RayJob whose head it cannot ask for 300 s (its default), and never retries that failure:
    a head lost with its node is rarely back so soon, so the guide's Helm values raise the timeout, and keep
    the gates the overlays need."""
    install = re.search(r"helm install kuberay-operator .*?<<'EOF'\n(.*?)\nEOF", DOCS.read_text(), re.DOTALL)
    assert install, "docs/kubernetes.md no longer shows the operator's Helm values"
    values = yaml.safe_load(install.group(1))
    env = {e["name"]: e["value"] for e in values.get("env", [])}
    assert isinstance(env.get("RAYJOB_STATUS_CHECK_TIMEOUT_SECONDS"), str), env  # a container env value: a string
    assert int(env["RAYJOB_STATUS_CHECK_TIMEOUT_SECONDS"]) >= 900, env
    gates = {g["name"]: g["enabled"] for g in values["featureGates"]}
    assert gates.get("RayJobDeletionPolicy") is True, gates


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
