"""The deployment files (issue 19): docker/compose.yaml validates with docker-compose (no
engine needed), every metric the Grafana dashboard queries is one the backend exports on a
running server (with the labels the queries group by), Prometheus scrapes the metrics port,
the image's build copies files that exist and builds with scripts/build.sh, and the KServe
manifests carry the fields KServe requires."""

import json
import os
import re
import shutil
import subprocess
import urllib.request

import pytest
import yaml

from conftest import REPO

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "triton-llm.json"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
KSERVE = REPO / "deploy" / "kserve"
PROFILES = ("gpu", "cpu", "monitoring")

# PromQL words that are not metric names: functions (followed by "("), aggregation
# modifiers and operators.
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "and", "or", "unless", "offset"}


def compose_config():
    """`docker-compose config` with every profile: validates the file against the compose
    schema and returns it resolved (paths absolute, defaults filled)."""
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is missing: scripts/setup.sh installs Debian's package"
    args = [exe, "-f", str(COMPOSE)]
    for profile in PROFILES:
        args += ["--profile", profile]
    env = {k: v for k, v in os.environ.items() if k != "MODELS_DIR"}
    done = subprocess.run([*args, "config"], capture_output=True, text=True, cwd=DOCKER, env=env)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_compose_validates():
    services = compose_config()["services"]
    assert set(services) == {"triton", "triton-cpu", "prometheus", "grafana"}
    gpu, cpu = services["triton"], services["triton-cpu"]
    for service in (gpu, cpu):
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert service["build"]["context"] == str(REPO)
        assert {p["target"] for p in service["ports"]} == {8000, 8001, 8002}
        assert "http://localhost:8000/v2/health/ready" in service["healthcheck"]["test"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "deploy" not in cpu
    mounts = {v.split(":")[1]: v for v in gpu["volumes"]}
    assert mounts["/model_repository"].endswith(":ro") and mounts["/models"].endswith(":ro")
    assert "--model-repository=/model_repository" in gpu["command"]
    # Every file or folder the services mount from the checkout exists (MODELS_DIR aside).
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(str(REPO)):
                assert (REPO / source[len(str(REPO)) + 1:]).exists(), (name, volume)


def test_compose_models_dir_default_and_override():
    exe = shutil.which("docker-compose")
    assert exe
    done = subprocess.run([exe, "-f", str(COMPOSE), "--profile", "gpu", "config"], capture_output=True,
                          text=True, cwd=DOCKER, env={**os.environ, "MODELS_DIR": "/data/hf"})
    assert done.returncode == 0, done.stderr
    assert "/data/hf:/models:ro" in yaml.safe_load(done.stdout)["services"]["triton"]["volumes"]
    assert "/models:/models:ro" in compose_config()["services"]["triton"]["volumes"]


def dashboard_queries():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(queries) >= 10
    return queries


def metric_names(expr):
    """The metric names in a PromQL expression: identifiers that are not functions (followed
    by "("), keywords, label names (inside by/without (...) or {...}) or durations."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word, rest = m.group(), expr[m.end():].lstrip()
        if word in PROMQL_KEYWORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


def grouping_labels(expr):
    labels = set()
    for m in re.finditer(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in m.group(1).split(",") if label.strip()}
    return labels - {"le"}


def scrape(server):
    """{family: (type, set of label names of its samples)} from the metrics port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    families = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            families[name] = (kind, set())
    for line in text.splitlines():
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}", line)
        if not m:
            continue
        name = m.group(1)
        family = name if name in families else re.sub(r"_(bucket|sum|count)$", "", name)
        if family in families:
            families[family][1].update(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', m.group(2)))
    return families


def test_metric_name_extraction():
    q = 'histogram_quantile(0.99, sum by (le, model) (rate(llm_time_to_first_token_seconds_bucket{model="x"}[1m])))'
    assert metric_names(q) == {"llm_time_to_first_token_seconds_bucket"}
    assert metric_names("sum by (model) (rate(a_total[5m])) / sum without (instance) (b)") == {"a_total", "b"}
    assert grouping_labels(q) == {"model"}


def test_dashboard_metrics_are_exported(server):
    # One request first, so that the histograms and counters have samples.
    body = json.dumps({"prompt": "hello", "temperature": "0", "max_new_tokens": "4"}).encode()
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/internlm2-tiny/generate", data=body)
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert json.loads(reply.read())["response"] is not None
    families = scrape(server)
    checked = set()
    for expr in dashboard_queries():
        names = metric_names(expr)
        assert names, expr
        for name in names:
            family = name
            if family not in families:
                family = re.sub(r"_(bucket|sum|count)$", "", name)
                assert families.get(family, ("",))[0] == "histogram", f"{name} (in {expr}) is not exported"
            kind, labels = families[family]
            missing = grouping_labels(expr) - labels
            assert not missing, f"{expr} groups by {missing}, which {family} lacks (it has {labels})"
            checked.add(family)
    # The panels the dashboard promises.
    assert {"llm_generated_tokens_total", "llm_prompt_tokens_total", "llm_requests_running",
            "llm_requests_waiting", "llm_kv_blocks_used", "llm_kv_blocks_free",
            "llm_prefix_cache_hit_tokens_total", "llm_time_to_first_token_seconds",
            "llm_inter_token_latency_seconds", "llm_engine_healthy"} <= checked


def test_dashboard_uses_the_provisioned_datasource():
    datasources = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = datasources["datasources"][0]["uid"]
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
    providers = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/triton-llm.yaml").read_text())
    grafana = compose_config()["services"]["grafana"]
    mounted = {v.split(":")[1] for v in grafana["volumes"]}
    assert providers["providers"][0]["options"]["path"] in mounted


def test_prometheus_scrapes_the_metrics_port():
    config = yaml.safe_load(PROMETHEUS.read_text())
    services = compose_config()["services"]
    targets = [t for job in config["scrape_configs"] if job.get("metrics_path", "/metrics") == "/metrics"
               for sc in job["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == ["triton-cpu:8002", "triton:8002"]
    for target in targets:
        assert target.split(":")[0] in services


def test_dockerfile_builds_with_the_ci_script():
    text = (DOCKER / "Dockerfile").read_text()
    assert "RUN bash scripts/build.sh" in text
    assert "bash scripts/build.sh" in (REPO / "scripts" / "test.sh").read_text()
    assert re.search(r"^ARG TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:25\.08-py3$", text, re.M)
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for source in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):
        if source == ".":
            continue
        assert (REPO / source).exists(), source
        assert not any(source == i or source.startswith(i.rstrip("/") + "/") for i in ignored), source
    for needed in ("Cargo.toml", "Cargo.lock", "src", "kernels", "triton_headers", "scripts", "tests"):
        assert needed not in ignored
    # The image's default command serves the tiny models, whose model_dir resolves in the
    # copied layout (tests/model_repository/<m>/1/../../../fixtures/<name>).
    assert 'CMD ["tritonserver", "--model-repository=/opt/triton-llm/tests/model_repository"]' in text
    for config in (REPO / "tests" / "model_repository").glob("*/config.pbtxt"):
        model_dir = re.search(r'key: "model_dir" value \{ string_value: "([^"]+)"', config.read_text()).group(1)
        assert (config.parent / "1" / model_dir).resolve().is_dir(), config


def kserve_documents():
    docs = {}
    for path in sorted(KSERVE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            docs.setdefault(doc["kind"], []).append(doc)
    return docs


def test_kserve_runtime():
    docs = kserve_documents()
    (runtime,) = docs["ClusterServingRuntime"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert spec["annotations"] == {"prometheus.kserve.io/port": "8002", "prometheus.kserve.io/path": "/metrics"}
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"}
    container = spec["containers"][0]
    assert container["name"] == "kserve-container"
    assert container["args"][0] == "tritonserver"
    assert "--model-store=/mnt/models" in container["args"]
    assert "--http-port=8080" in container["args"] and "--grpc-port=9000" in container["args"]
    assert [p["containerPort"] for p in container["ports"]] == [8080]


@pytest.mark.parametrize("model", ["chatglm2-6b", "internlm2_5-7b-chat"])
def test_kserve_inference_service(model):
    docs = kserve_documents()
    (runtime,) = docs["ClusterServingRuntime"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    (isvc,) = [d for d in docs["InferenceService"] if d["spec"]["predictor"]["model"]["storageUri"].endswith(
        f"/{model}-repository")]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    # A DNS-1035 label: Knative names services and routes after it.
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", isvc["metadata"]["name"]) and len(isvc["metadata"]["name"]) <= 45
    predictor = isvc["spec"]["predictor"]
    spec = predictor["model"]
    assert spec["modelFormat"]["name"] in formats
    assert spec["runtime"] == runtime["metadata"]["name"]
    assert spec["storageUri"].startswith("pvc://")
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "memory" in spec["resources"]["limits"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] > 0
    # The config's model_dir (/models/<model>) is where the Hugging Face folder is mounted.
    config = (REPO / "model_repository" / model / "config.pbtxt").read_text()
    assert f'string_value: "/models/{model}"' in config
    mounts = {m["mountPath"]: m["name"] for m in spec["volumeMounts"]}
    volumes = {v["name"]: v for v in predictor["volumes"]}
    assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == spec["storageUri"].split("/")[2]
