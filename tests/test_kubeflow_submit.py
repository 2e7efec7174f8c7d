"""kubeflow.submit against a local server that answers the KFP v2beta1 REST API as kfp.Client uses it."""

import collections
import email.parser
import email.policy
import http.server
import json
import socket
import threading
import urllib.parse

import pytest
import yaml

from kubeflow.runner import compile_pipeline
from kubeflow.submit import SubmitError, Submission, main, submit, validate_cron
from pipeline.config import load_config

API = "/apis/v2beta1"
CRON = "0 30 2 * * *"

# body: the JSON sent, if any; uploaded: the text of the multipart `uploadfile`, if any.
Request = collections.namedtuple("Request", "method path query body uploaded")


class FakeKfpServer(http.server.ThreadingHTTPServer):
    """Records every request; answers from `pipelines`/`experiments` it holds, or with `failures`."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeKfpHandler)
        self.requests = []  # Request tuples, in the order they came
        self.pipelines = {}  # display name -> id
        self.experiments = {}  # display name -> id
        self.failures = {}  # (method, path) -> (status, JSON answer or text sent as it is)

    @property
    def host(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def sent(self, method, path):
        return [request for request in self.requests
                if (request.method, request.path) == (method, path)]


class FakeKfpHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self._answer("GET")

    def do_POST(self):
        self._answer("POST")

    def _answer(self, method):
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        uploaded = self._uploaded_file(raw)
        body = json.loads(raw) if raw and uploaded is None else None
        self.server.requests.append(Request(method, url.path, query, body, uploaded))
        if (method, url.path) in self.server.failures:
            self._reply(*self.server.failures[method, url.path])
        else:
            self._reply(*self._route(method, url.path, query, body))

    def _uploaded_file(self, raw):
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            return None
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        (part,) = [part for part in message.iter_parts()
                   if part.get_param("name", header="content-disposition") == "uploadfile"]
        return part.get_payload(decode=True).decode()

    def _route(self, method, path, query, body):
        server = self.server
        if (method, path) == ("GET", f"{API}/healthz"):
            return 200, {"multi_user": False}
        if (method, path) == ("GET", f"{API}/pipelines"):
            name = json.loads(query["filter"])["predicates"][0]["stringValue"]
            found = [{"pipeline_id": server.pipelines[name], "display_name": name}
                     ] if name in server.pipelines else []
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if (method, path) == ("POST", f"{API}/pipelines/upload"):
            server.pipelines[query["name"]] = "pipeline-new"
            return 200, {"pipeline_id": "pipeline-new", "display_name": query["name"]}
        if method == "GET" and path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
            pipeline_id = path.split("/")[-2]
            return 200, {"pipeline_versions": [{"pipeline_id": pipeline_id,
                                                "pipeline_version_id": "version-first"}],
                         "total_size": 1}
        if (method, path) == ("POST", f"{API}/pipelines/upload_version"):
            return 200, {"pipeline_id": query["pipelineid"], "pipeline_version_id": "version-next",
                         "display_name": query["name"]}
        if (method, path) == ("GET", f"{API}/experiments"):
            name = json.loads(query["filter"])["predicates"][0]["stringValue"]
            if name in server.experiments:
                return 200, {"experiments": [{"experiment_id": server.experiments[name],
                                              "display_name": name}], "total_size": 1}
            return 200, {}
        if (method, path) == ("POST", f"{API}/experiments"):
            server.experiments[body["display_name"]] = "experiment-new"
            return 200, dict(body, experiment_id="experiment-new")
        if (method, path) == ("POST", f"{API}/recurringruns"):
            return 200, dict(body, recurring_run_id="recurring-run-1")
        return 404, {"code": 5, "message": f"fake server has no {method} {path}"}

    def _reply(self, status, answer):
        """JSON for dicts; a string goes out as it is, like a proxy's error page."""
        data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The PipelineJob JSON of the test profile, compiled once (it takes seconds)."""
    directory = tmp_path_factory.mktemp("compiled")
    config = load_config("test", output_dir=str(directory))
    return config, compile_pipeline(config, str(directory / "pipeline.json"))


@pytest.fixture
def server():
    fake = FakeKfpServer()
    threading.Thread(target=fake.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield fake
    fake.shutdown()
    fake.server_close()


def test_first_submission_uploads_the_graph_and_schedules_it(server, compiled):
    config, job_path = compiled
    submission = submit(server.host, CRON, job_path, experiment="nightly", run_name="stem-nightly",
                        max_concurrency=2)

    assert submission == Submission(pipeline_id="pipeline-new", version_id="version-first",
                                    experiment_id="experiment-new",
                                    recurring_run_id="recurring-run-1")
    (upload,) = server.sent("POST", f"{API}/pipelines/upload")
    assert upload.query["name"] == config.pipeline_name
    spec = yaml.safe_load(upload.uploaded)
    assert spec["pipelineInfo"]["name"] == config.pipeline_name
    assert {"Trainer", "DefectClusterer", "SegmenterTrainer"} <= set(spec["root"]["dag"]["tasks"])
    assert not server.sent("POST", f"{API}/pipelines/upload_version")
    (created,) = server.sent("POST", f"{API}/experiments")
    assert created.body["display_name"] == "nightly"

    (run,) = server.sent("POST", f"{API}/recurringruns")
    body = run.body
    assert body["trigger"]["cron_schedule"]["cron"] == CRON
    assert body["display_name"] == "stem-nightly"
    assert body["experiment_id"] == "experiment-new"
    assert int(body["max_concurrency"]) == 2
    assert body["mode"] == "ENABLE"
    assert body["pipeline_version_reference"] == {"pipeline_id": "pipeline-new",
                                                  "pipeline_version_id": "version-first"}
    assert body["runtime_config"]["pipeline_root"] == config.kubeflow.pipeline_root
    assert "pipeline_spec" not in body  # the run points at the uploaded version, not a copy


def test_known_pipeline_gets_a_new_version_and_the_experiment_is_reused(server, compiled):
    config, job_path = compiled
    server.pipelines[config.pipeline_name] = "pipeline-old"
    server.experiments[config.pipeline_name] = "experiment-old"

    submission = submit(server.host, CRON, job_path, version_name="v2")

    assert submission == Submission(pipeline_id="pipeline-old", version_id="version-next",
                                    experiment_id="experiment-old",
                                    recurring_run_id="recurring-run-1")
    assert not server.sent("POST", f"{API}/pipelines/upload")
    assert not server.sent("POST", f"{API}/experiments")
    (upload,) = server.sent("POST", f"{API}/pipelines/upload_version")
    assert upload.query == {"name": "v2", "pipelineid": "pipeline-old"}
    assert "Trainer" in yaml.safe_load(upload.uploaded)["root"]["dag"]["tasks"]
    (run,) = server.sent("POST", f"{API}/recurringruns")
    assert run.body["pipeline_version_reference"] == {"pipeline_id": "pipeline-old",
                                                    "pipeline_version_id": "version-next"}
    assert run.body["experiment_id"] == "experiment-old"


@pytest.mark.parametrize("method, endpoint, status, answer, expected", [
    ("POST", "pipelines/upload", 409, {"error_message": "a pipeline of that name exists", "code": 6},
     "uploading pipeline '{name}' failed: HTTP 409 Conflict: a pipeline of that name exists"),
    ("POST", "recurringruns", 500, {"code": 13, "message": "scheduler unavailable"},
     "creating the recurring run failed: HTTP 500 Internal Server Error: scheduler unavailable"),
    ("GET", "experiments", 503, "upstream connect error",
     "getting or creating experiment '{name}' failed: HTTP 503 Service Unavailable: "
     "upstream connect error"),
])
def test_a_server_error_is_one_line_with_status_and_message(server, compiled, method, endpoint,
                                                             status, answer, expected):
    config, job_path = compiled
    server.failures[method, f"{API}/{endpoint}"] = (status, answer)

    with pytest.raises(SystemExit) as exited:
        main(["--host", server.host, "--cron", CRON, "--package", job_path])

    assert exited.value.code == "error: " + expected.format(name=config.pipeline_name)
    if endpoint != "recurringruns":
        assert not server.sent("POST", f"{API}/recurringruns")


def test_an_unreachable_server_is_one_line(compiled):
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with pytest.raises(SubmitError, match="the server could not be reached") as refused:
        submit(f"http://127.0.0.1:{port}", CRON, compiled[1])
    assert str(port) in str(refused.value) and "\n" not in str(refused.value)


def test_main_prints_the_created_ids(server, compiled, capsys):
    main(["--host", server.host, "--cron", CRON, "--package", compiled[1],
          "--max-concurrency", "3"])

    printed = capsys.readouterr().out
    for line in ("pipeline id: pipeline-new", "version id: version-first",
                 "experiment id: experiment-new", "recurring run id: recurring-run-1"):
        assert line in printed
    assert int(server.sent("POST", f"{API}/recurringruns")[0].body["max_concurrency"]) == 3


@pytest.mark.parametrize("cron, named", [
    ("0 2 * * *", "has 5 fields; KFP expects 6 (seconds minutes hours"),
    ("0 0 25 * * *", "hours field '25'"),
    ("60 0 2 * * *", "seconds field '60'"),
    ("0 0 2 0 * *", "day-of-month field '0'"),
    ("0 0 2 * 13 *", "month field '13'"),
    ("0 0 2 * * MON-FRY", "day-of-week field 'MON-FRY'"),
    ("0 */0 * * * *", "minutes field '*/0'"),
    ("0 0 2 ? * 5-1", "day-of-week field '5-1': range '5-1' runs backwards"),
    ("0 0 ? * * *", "hours field '?'"),
])
def test_a_bad_cron_is_refused_before_any_request(server, cron, named):
    with pytest.raises(SubmitError, match="cron expression") as refused:
        submit(server.host, cron, "never-read.json")
    assert named in str(refused.value)
    assert server.requests == []


def test_a_max_concurrency_below_one_is_refused_before_any_request(server):
    with pytest.raises(SubmitError, match="max concurrency must be at least 1, got 0"):
        submit(server.host, CRON, "never-read.json", max_concurrency=0)
    assert server.requests == []


@pytest.mark.parametrize("cron", ["0 0 2 * * *", "0 */15 * * * ?", "0 0 9 ? * 2-6",
                                  "0 0 0 1 JAN,jul *", "30 5 1-23/2 * * MON-FRI"])
def test_valid_crons_pass(cron):
    validate_cron(cron)
