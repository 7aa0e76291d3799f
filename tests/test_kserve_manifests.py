"""The KServe deployment files in config/kserve agree with each other, with KServe's TorchServe runtime, and with the
model config they ship. Only files are read: no cluster and no network."""

import json
import re
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KSERVE = ROOT / "config" / "kserve"
MODEL_CONFIG = yaml.safe_load((ROOT / "config" / "model-config.yaml").read_text())

# Every key config/kserve/config.properties may use. Each is a TorchServe 0.12 setting (the last test checks them
# against the installed frontend). TorchServe ignores unknown keys silently, so a typo would otherwise go unnoticed.
KNOWN_KEYS = {
    "inference_address", "management_address", "metrics_address", "grpc_inference_address",
    "grpc_management_address", "model_store", "disable_token_authorization", "enable_model_api", "allowed_urls",
    "install_py_dep_per_model", "enable_envvars_config", "blacklist_env_vars", "default_workers_per_model",
    "job_queue_size", "max_request_size", "max_response_size", "default_response_timeout",
    "default_startup_timeout", "metrics_mode", "metrics_config", "model_metrics_auto_detect",
    "disable_system_metrics", "model_snapshot",
}
WRAPPER_PORTS = {8080, 8081}  # the torchserve-kfs wrapper's HTTP and gRPC ports, in the same container


def read_properties(path: Path) -> dict[str, str]:
    """key=value lines; blank lines and # or ! comments skipped. A key given twice is an error."""
    properties = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {line!r}"
        assert key.strip() not in properties, f"{key} set twice"
        properties[key.strip()] = value.strip()
    return properties


def load_services() -> dict[str, dict]:
    services = {}
    for path in sorted(KSERVE.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                services[path.name] = document
    return services


PROPERTIES = read_properties(KSERVE / "config.properties")
SNAPSHOT = json.loads(PROPERTIES["model_snapshot"])
SERVICES = load_services()
MAIN = SERVICES["inferenceservice.yaml"]
CANARY = SERVICES["inferenceservice-canary.yaml"]
FRONT = SERVICES["inferenceservice-kserve-front.yaml"]


def address(key: str):
    return urlparse(PROPERTIES[key])


def duration_seconds(text: str) -> int:
    match = re.fullmatch(r"(\d+)([smh])", text)
    assert match, text
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]


def test_every_yaml_is_an_inference_service():
    assert set(SERVICES) == {"inferenceservice.yaml", "inferenceservice-canary.yaml",
                              "inferenceservice-kserve-front.yaml"}
    for name, service in SERVICES.items():
        assert service["apiVersion"] == "serving.kserve.io/v1beta1", name
        assert service["kind"] == "InferenceService", name


@pytest.mark.parametrize("name", ["inferenceservice.yaml", "inferenceservice-canary.yaml"])
def test_predictor(name):
    service = SERVICES[name]
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "pytorch"
    assert model["protocolVersion"] == "v2"
    assert urlparse(model["storageUri"]).scheme in {"pvc", "s3", "gs"}
    resources = model["resources"]
    assert str(resources["requests"]["nvidia.com/gpu"]) == str(resources["limits"]["nvidia.com/gpu"]) == "1"
    assert predictor["scaleMetric"] == "concurrency"
    assert isinstance(predictor["scaleTarget"], int) and predictor["scaleTarget"] > 0
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["timeout"] == MODEL_CONFIG["responseTimeout"]
    # The wrapper gives up on a slow start after MODEL_LOAD_MAX_TRY x MODEL_LOAD_DELAY seconds, and Knative after
    # its progress deadline. Both have to outlast TorchServe's startupTimeout.
    env = {item["name"]: int(item["value"]) for item in model["env"]}
    assert env["MODEL_LOAD_MAX_TRY"] * env["MODEL_LOAD_DELAY"] >= MODEL_CONFIG["startupTimeout"]
    annotations = service["metadata"]["annotations"]
    assert duration_seconds(annotations["serving.knative.dev/progress-deadline"]) > MODEL_CONFIG["startupTimeout"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    # config.properties disables tokens; the flag would only duplicate it.
    assert "--disable-token-auth" not in model.get("args", [])


def test_names_match():
    name = MAIN["metadata"]["name"]
    assert CANARY["metadata"]["name"] == name
    assert list(SNAPSHOT["models"]) == [name]


def test_canary():
    percent = CANARY["spec"]["predictor"]["canaryTrafficPercent"]
    assert isinstance(percent, int) and 0 <= percent <= 100
    assert "canaryTrafficPercent" not in MAIN["spec"]["predictor"]
    assert CANARY["spec"]["predictor"]["model"]["storageUri"] != MAIN["spec"]["predictor"]["model"]["storageUri"]


def test_config_keys_are_torchserve_settings():
    assert set(PROPERTIES) <= KNOWN_KEYS, set(PROPERTIES) - KNOWN_KEYS


def test_addresses():
    inference, management, metrics = address("inference_address"), address("management_address"), \
        address("metrics_address")
    assert inference.port == 8085  # the wrapper answers on 8080 and forwards here
    # Only the wrapper, in the same container, calls inference and management.
    assert inference.hostname == management.hostname == "127.0.0.1"
    assert metrics.port == 8082  # the port the kserve-torchserve runtime declares for Prometheus
    ports = [inference.port, management.port, metrics.port]
    assert len(set(ports)) == 3 and not set(ports) & WRAPPER_PORTS, ports
    assert PROPERTIES["grpc_inference_address"] == PROPERTIES["grpc_management_address"] == "127.0.0.1"


def test_security_and_envelope():
    assert PROPERTIES["disable_token_authorization"] == "true"  # the wrapper calls TorchServe without a token
    assert PROPERTIES["enable_model_api"] == "false"
    assert PROPERTIES["allowed_urls"] == "file:///mnt/models/.*"
    assert PROPERTIES["install_py_dep_per_model"] == "false"
    # The handler speaks v1 and v2 itself. TorchServe's envelopes read only the first request of a batch, so neither
    # the file nor KServe's TS_SERVICE_ENVELOPE (read only when enable_envvars_config=true) may set one.
    assert "service_envelope" not in PROPERTIES
    assert PROPERTIES["enable_envvars_config"] == "false"
    top_level = read_properties(ROOT / "config.properties")
    for key in ("blacklist_env_vars", "max_request_size", "max_response_size"):
        assert PROPERTIES[key] == top_level[key], key


def test_paths_are_under_the_storage_uri_mount():
    assert PROPERTIES["model_store"] == "/mnt/models/model-store"  # where the runtime points --model-store
    assert PROPERTIES["metrics_config"].startswith("/mnt/models/config/")
    assert (ROOT / "config" / Path(PROPERTIES["metrics_config"]).name).is_file()  # the file to upload there


def test_snapshot_matches_the_model_config():
    assert SNAPSHOT["modelCount"] == len(SNAPSHOT["models"]) == 1
    (name, versions), = SNAPSHOT["models"].items()
    (version, settings), = versions.items()
    assert version == "1.0"  # scripts/package_model.py's default --version
    # --no-archive writes the folder model-store/<model name>/, which TorchServe finds by this name.
    assert settings["marName"] == name
    assert settings["defaultVersion"] is True
    # TorchServe applies these over the packaged model-config.yaml, so they must say the same.
    for key in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout"):
        assert settings[key] == MODEL_CONFIG[key], key
    assert int(PROPERTIES["default_response_timeout"]) == MODEL_CONFIG["responseTimeout"]
    assert int(PROPERTIES["default_startup_timeout"]) == MODEL_CONFIG["startupTimeout"]
    assert int(PROPERTIES["job_queue_size"]) == MODEL_CONFIG["jobQueueSize"]


def test_known_keys_exist_in_the_installed_torchserve():
    ts = pytest.importorskip("ts")
    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    if not jar.is_file():
        pytest.skip("TorchServe's frontend jar is not installed")
    with zipfile.ZipFile(jar) as archive:
        config_manager = archive.read("org/pytorch/serve/util/ConfigManager.class")
    # A class file stores each string constant as a 2-byte length followed by the bytes.
    missing = {key for key in KNOWN_KEYS if len(key).to_bytes(2, "big") + key.encode() not in config_manager}
    assert not missing, missing


def test_the_kserve_front_predictor():
    """The custom predictor: its args are sd_kserve.py's, its probes are v2 health routes that need no key, the port
    is the one it listens on, the model is under the storage initializer's mount, and the pod waits for the drain."""
    # sd_kserve_server, not sd_kserve: kserve's gRPC module clashes with tritonclient's in one process.
    from sd_kserve_server import OPEN_PATHS, argument_parser

    predictor = FRONT["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    args = argument_parser().parse_args(container["args"])
    assert (args.host, args.http_port, args.grpc_port) == ("0.0.0.0", 8080, 0)
    assert [port["containerPort"] for port in container["ports"]] == [args.http_port]
    assert str(args.model_dir).startswith("/mnt/models/model-store/")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == args.http_port
        assert container[probe]["httpGet"]["path"] in OPEN_PATHS
    # Allows a start that compiles as long as TorchServe's own startupTimeout does.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= MODEL_CONFIG["startupTimeout"]
    assert predictor["terminationGracePeriodSeconds"] > args.grace_seconds
    assert predictor["timeout"] == MODEL_CONFIG["responseTimeout"]
    assert predictor["scaleTarget"] == MODEL_CONFIG["batchSize"]
    dockerfile = (ROOT / "docker" / "kserve-front.Dockerfile").read_text()
    command = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, flags=re.M).group(1))
    assert argument_parser().parse_args(command).model_dir == args.model_dir
