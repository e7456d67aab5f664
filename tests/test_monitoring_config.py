"""Check the monitoring stack's files: promtool on the Prometheus config and
rules, and the structure of docker-compose.yml and the Grafana dashboard."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from external import find_binary

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
PROMETHEUS_DIR = MONITORING / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TEST_FILES = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DASHBOARD_FILE = MONITORING / "grafana" / "dashboards" / "llmwatch.json"
DATASOURCE_FILE = (
    MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
)
DASHBOARD_PROVIDER_FILE = (
    MONITORING / "grafana" / "provisioning" / "dashboards" / "llmwatch.yml"
)

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
SEVERITIES = {"critical", "warning", "info"}
# The public metric names: the service's families, the batch push's, and the
# series that Prometheus and the Pushgateway add.
CONTRACT_METRICS = {
    "llm_requests_total",
    "llm_errors_total",
    "llm_tokens_total",
    "llm_cached_prompt_tokens_total",
    "llm_reasoning_tokens_total",
    "llm_request_latency_seconds_bucket",
    "llm_time_to_first_token_seconds_bucket",
    "llm_cost_usd_total",
    "llm_requests_in_flight",
    "llm_usage_missing_total",
    "llm_unpriced_requests_total",
    "llm_upstream_retries_total",
    "llm_ratelimit_remaining",
    "llm_ratelimit_limit",
    "llmwatch_build_info",
    "llm_batch_duration_seconds",
    "llm_batch_items_total",
    "llm_batch_last_success_timestamp_seconds",
    "push_time_seconds",
    "push_failure_time_seconds",
    "up",
}
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Return the metric and recording rule names that a PromQL query selects."""
    # Strip label values and label matchers' strings before tokenizing.
    expr = re.sub(r'"[^"]*"', '""', expr)
    return {
        token
        for token in IDENTIFIER.findall(expr)
        if token == "up" or ":" in token or token.startswith(("llm", "push_"))
    }


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as file:
        return yaml.safe_load(file)


def run_promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    promtool = find_binary("promtool")
    return subprocess.run(
        [promtool, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return data


def query_panels() -> list[dict[str, Any]]:
    """Return the dashboard's panels that run queries, rows left out."""
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def alert_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for path in RULE_FILES:
        for group in load_yaml(path)["groups"]:
            rules.extend(rule for rule in group["rules"] if "alert" in rule)
    return rules


def recording_rule_names() -> set[str]:
    names: set[str] = set()
    for path in RULE_FILES:
        for group in load_yaml(path)["groups"]:
            names.update(rule["record"] for rule in group["rules"] if "record" in rule)
    return names


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = load_yaml(COMPOSE_FILE)["services"]
    return services


def test_promtool_check_config_finds_rules() -> None:
    result = run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # rule_files is relative to the config file, so the shipped file must
    # find the shipped rules in place as it does under /etc/prometheus.
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in output


def test_rule_files_exist() -> None:
    names = {path.name for path in RULE_FILES}
    assert names == {"alerts.yml", "recording.yml"}


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda path: path.name)
def test_promtool_check_rules(rule_file: Path) -> None:
    result = run_promtool("check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    assert RULE_TEST_FILES, "no promtool test files in monitoring/prometheus/tests"
    names = [path.name for path in RULE_TEST_FILES]
    result = run_promtool("test", "rules", *names, cwd=PROMETHEUS_DIR / "tests")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("SUCCESS") == len(RULE_TEST_FILES), output


def test_every_alert_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TEST_FILES:
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    firing.add(check["alertname"])
                else:
                    quiet.add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: str(rule["alert"]))
def test_alert_rule_complete(rule: dict[str, Any]) -> None:
    assert rule.get("for"), "missing for:"
    assert rule.get("labels", {}).get("severity") in SEVERITIES
    annotations = rule.get("annotations", {})
    assert annotations.get("summary")
    assert annotations.get("description")


def test_rules_use_contract_metrics() -> None:
    recorded = recording_rule_names()
    for path in RULE_FILES:
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                names = metric_names(rule["expr"])
                unknown = names - CONTRACT_METRICS - recorded
                assert unknown == set(), f"{rule['expr']!r} uses unknown metrics"


def test_scrape_config_discovers_replicas() -> None:
    jobs = {
        job["job_name"]: job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
    }
    llmwatch = jobs["llmwatch"]
    assert llmwatch["dns_sd_configs"] == [
        {"names": ["llmwatch"], "type": "A", "port": 8000, "refresh_interval": "15s"}
    ]
    pushgateway = jobs["pushgateway"]
    assert pushgateway["honor_labels"] is True
    assert pushgateway["static_configs"] == [{"targets": ["pushgateway:9091"]}]


def test_compose_mounts_exist_in_repo() -> None:
    mounts = []
    for name, service in compose_services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                mounts.append((name, source))
    assert mounts, "no bind mounts found in docker-compose.yml"
    for name, source in mounts:
        assert (ROOT / source).exists(), f"{name} mounts missing {source}"


def test_compose_build_context_exists() -> None:
    for name, service in compose_services().items():
        if "build" in service:
            assert service["build"] == ".", name
            assert (ROOT / "Dockerfile").is_file()


@pytest.mark.parametrize("name", sorted(compose_services()))
def test_compose_image_pinned(name: str) -> None:
    service = compose_services()[name]
    if "build" in service:
        return
    image: str = service["image"]
    repository, _, tag = image.rpartition(":")
    assert repository and "/" not in tag, f"{image} has no tag"
    assert tag != "latest", f"{image} uses latest"
    assert re.search(r"\d+\.\d+\.\d+", tag), f"{image} is not an exact version"


def test_dockerfile_base_images_pinned() -> None:
    lines = (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
    images = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert images
    for image in images:
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", image), image


def test_compose_llmwatch_scalable() -> None:
    service = compose_services()["llmwatch"]
    # A fixed name or host port would make a second replica fail to start.
    assert "container_name" not in service
    assert "ports" not in service
    for other in compose_services().values():
        assert "container_name" not in other


def test_compose_services_restart_and_health() -> None:
    services = compose_services()
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
        if name not in ("llmwatch", "demo"):
            assert service["healthcheck"]["test"][0] == "CMD", name
    # llmwatch's health check is the Dockerfile's HEALTHCHECK.
    assert "HEALTHCHECK" in (ROOT / "Dockerfile").read_text(encoding="utf-8")


def test_compose_variables_documented() -> None:
    compose_text = COMPOSE_FILE.read_text(encoding="utf-8")
    used = set(re.findall(r"\$\{(\w+)", compose_text))
    documented = set(
        re.findall(r"^(\w+)=", ENV_EXAMPLE.read_text(encoding="utf-8"), re.MULTILINE)
    )
    for name in ("APP_PORT", "PROM_PORT", "GRAFANA_PORT", "GRAFANA_USER"):
        assert name in used
    assert "GRAFANA_PASS" in used
    assert "OPENAI_API_KEY" in documented
    assert used - documented == set(), "variables missing from .env.example"
    assert documented - used == set(), ".env.example lists unused variables"


def test_env_example_has_no_secret() -> None:
    values = dict(
        re.findall(
            r"^(\w+)=(.*)$", ENV_EXAMPLE.read_text(encoding="utf-8"), re.MULTILINE
        )
    )
    assert values["OPENAI_API_KEY"] == ""


def test_grafana_provider_path_matches_mount() -> None:
    provider = load_yaml(DASHBOARD_PROVIDER_FILE)["providers"][0]
    grafana = compose_services()["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./monitoring/grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD_FILE.name}"


def test_dashboard_panel_ids_unique() -> None:
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_has_required_panels() -> None:
    titles = {panel["title"] for panel in query_panels()}
    required = {
        "Requests per second by model",
        "Error ratio by type",
        "Request latency p50, p95, p99",
        "Time to first token p50, p95",
        "Tokens per second by type",
        "Cost per hour by model",
        "Cumulative cost by model",
        "Requests in flight",
        "Rate-limit headroom",
        "Time since last successful run",
        "Last run duration",
        "Items in the last run by outcome",
    }
    assert required - titles == set()


@pytest.mark.parametrize("panel", query_panels(), ids=lambda panel: str(panel["title"]))
def test_dashboard_panel_complete(panel: dict[str, Any]) -> None:
    assert panel["datasource"] == DATASOURCE_REF
    assert panel["targets"], "panel has no query"
    for target in panel["targets"]:
        assert target["datasource"] == DATASOURCE_REF
        assert target["expr"].strip()
    assert panel["fieldConfig"]["defaults"].get("unit"), "panel has no unit"
    description = panel.get("description", "")
    assert description.strip(), "panel has no description"
    assert "\n" not in description


def test_dashboard_queries_use_contract_metrics() -> None:
    for panel in query_panels():
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, target["expr"]
            assert names - CONTRACT_METRICS == set(), target["expr"]


def test_dashboard_template_variables() -> None:
    variables = {var["name"]: var for var in dashboard()["templating"]["list"]}
    assert {"datasource", "job", "model", "instance"} <= set(variables)
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"
    provisioned = load_yaml(DATASOURCE_FILE)["datasources"][0]
    assert datasource["current"]["value"] == provisioned["uid"]
    for name in ("job", "model", "instance"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == DATASOURCE_REF
        assert variable["includeAll"] is True
        # With ".*" for All, series without the label (batch jobs have no
        # instance) still match.
        assert variable["allValue"] == ".*"
        assert variable["query"]["query"] == variable["definition"]
        assert variable["definition"].startswith("label_values(")


def test_dashboard_queries_filter_by_variables() -> None:
    for panel in query_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            assert 'job=~"$job"' in expr, expr
            assert 'instance=~"$instance"' in expr, expr
