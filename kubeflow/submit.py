"""Upload the compiled pipeline to Kubeflow Pipelines and schedule it with a cron trigger.

    python -m kubeflow.submit --host http://localhost:8080 --cron "0 0 2 * * *"

Without --package the graph is compiled first (kubeflow.runner). A pipeline of the same name
gets a new version instead of a second pipeline; the experiment is reused when it exists.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import sys
import tempfile
from typing import Iterator, List, Optional, Tuple

import kfp
import kfp_server_api
import urllib3
import yaml

# KFP schedules with robfig/cron: six fields, the first one seconds.
CRON_FIELDS = (("seconds", 0, 59), ("minutes", 0, 59), ("hours", 0, 23),
               ("day-of-month", 1, 31), ("month", 1, 12), ("day-of-week", 0, 6))
CRON_NAMES = {
    "month": {name: number for number, name in enumerate(
        "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split(), start=1)},
    "day-of-week": {name: number for number, name in enumerate("SUN MON TUE WED THU FRI SAT".split())},
}
CRON_EXAMPLE = "'0 0 2 * * *' (02:00 every day)"


class SubmitError(Exception):
    """A failure the user can act on from one line: bad input, or what the KFP server said."""


@dataclasses.dataclass(frozen=True)
class Submission:
    """What was created on the server, so scripts and tests need not parse the printout."""

    pipeline_id: str
    version_id: str
    experiment_id: str
    recurring_run_id: str


@dataclasses.dataclass(frozen=True)
class UploadPackage:
    """The compiled PipelineJob split into what the upload endpoint takes and what the run needs."""

    spec_path: str  # the bare PipelineSpec as YAML: kfp.Client uploads only that format
    pipeline_name: str
    pipeline_root: str


def validate_cron(expression: str) -> None:
    """Refuse locally what the server would refuse later, naming the field at fault."""
    fields = expression.split()
    if len(fields) != len(CRON_FIELDS):
        names = " ".join(name for name, _, _ in CRON_FIELDS)
        raise SubmitError(f"cron expression {expression!r} has {len(fields)} fields; KFP expects "
                          f"{len(CRON_FIELDS)} ({names}), e.g. {CRON_EXAMPLE}")
    for text, (name, low, high) in zip(fields, CRON_FIELDS):
        problem = _cron_field_problem(text, name, low, high)
        if problem:
            raise SubmitError(f"cron expression {expression!r}: {name} field {text!r}: {problem}")


def _cron_field_problem(text: str, name: str, low: int, high: int) -> Optional[str]:
    for item in text.split(","):
        span, _, step = item.partition("/")
        if step and not (step.isdigit() and int(step) > 0):
            return f"step {step!r} is not a positive number"
        if span == "?" and name in ("day-of-month", "day-of-week"):
            continue
        if span == "*":
            continue
        values = []
        for bound in span.split("-", 1):
            value = CRON_NAMES.get(name, {}).get(bound.upper())
            if value is None and bound.isdigit():
                value = int(bound)
            if value is None or not low <= value <= high:
                return f"{bound!r} is not a value in {low}-{high}"
            values.append(value)
        if values != sorted(values):
            return f"range {span!r} runs backwards"
    return None


def write_upload_package(job_path: str, directory: str) -> UploadPackage:
    """Unwrap KubeflowV2DagRunner's PipelineJob JSON: kfp.Client uploads a bare PipelineSpec."""
    with open(job_path) as handle:
        job = json.load(handle)
    if "pipelineSpec" not in job:
        raise SubmitError(f"{job_path} is not a PipelineJob from kubeflow.runner (no 'pipelineSpec')")
    spec = job["pipelineSpec"]
    spec_path = os.path.join(directory, "pipeline.yaml")
    with open(spec_path, "w") as handle:
        yaml.safe_dump(spec, handle, sort_keys=False)
    return UploadPackage(spec_path=spec_path, pipeline_name=spec["pipelineInfo"]["name"],
                         pipeline_root=job.get("runtimeConfig", {}).get("gcsOutputDirectory", ""))


def submit(host: str, cron: str, job_path: str, experiment: Optional[str] = None,
           run_name: Optional[str] = None, max_concurrency: int = 1,
           version_name: Optional[str] = None) -> Submission:
    """Upload `job_path` (a PipelineJob JSON) to the KFP at `host` and schedule it with `cron`."""
    validate_cron(cron)
    if max_concurrency < 1:
        raise SubmitError(f"max concurrency must be at least 1, got {max_concurrency}")
    with tempfile.TemporaryDirectory() as directory:
        package = write_upload_package(job_path, directory)
        with _server_step(f"connecting to {host}"):
            client = kfp.Client(host=host)
        pipeline_id, version_id = _upload(client, package, version_name or _timestamped(package))
    experiment = experiment or package.pipeline_name
    with _server_step(f"getting or creating experiment {experiment!r}"):
        experiment_id = client.create_experiment(name=experiment).experiment_id
    with _server_step("creating the recurring run"):
        recurring_run = client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=run_name or f"{package.pipeline_name}-recurring",
            cron_expression=cron,
            max_concurrency=max_concurrency,
            no_catchup=True,  # a schedule resumed after a pause should not replay every missed slot
            pipeline_id=pipeline_id,
            version_id=version_id,
            pipeline_root=package.pipeline_root or None,
        )
    return Submission(pipeline_id, version_id, experiment_id, recurring_run.recurring_run_id)


def _upload(client: kfp.Client, package: UploadPackage, version_name: str) -> Tuple[str, str]:
    """A new pipeline the first time, a new version of it afterwards: ids of both."""
    with _server_step(f"looking up pipeline {package.pipeline_name!r}"):
        pipeline_id = client.get_pipeline_id(package.pipeline_name)
    if pipeline_id:
        with _server_step(f"uploading version {version_name!r} of pipeline {pipeline_id}"):
            version = client.upload_pipeline_version(
                package.spec_path, pipeline_version_name=version_name, pipeline_id=pipeline_id)
        return pipeline_id, version.pipeline_version_id
    with _server_step(f"uploading pipeline {package.pipeline_name!r}"):
        pipeline_id = client.upload_pipeline(
            package.spec_path, pipeline_name=package.pipeline_name).pipeline_id
    # The upload creates the first version server-side but answers with the pipeline only.
    with _server_step(f"listing the versions of pipeline {pipeline_id}"):
        versions = client.list_pipeline_versions(
            pipeline_id, page_size=1, sort_by="created_at desc").pipeline_versions
    if not versions:
        raise SubmitError(f"the server lists no version of the pipeline {pipeline_id} it just created")
    return pipeline_id, versions[0].pipeline_version_id


def _timestamped(package: UploadPackage) -> str:
    """Version names must be unique within a pipeline; the upload time is, and says when."""
    return f"{package.pipeline_name}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"


@contextlib.contextmanager
def _server_step(description: str) -> Iterator[None]:
    """Turn the client's exceptions into one line naming the step, the HTTP status and message."""
    try:
        yield
    except kfp_server_api.ApiException as error:
        raise SubmitError(f"{description} failed: HTTP {error.status} {error.reason}: "
                          f"{_server_message(error.body)}") from None
    except urllib3.exceptions.HTTPError as error:
        raise SubmitError(f"{description} failed: the server could not be reached ({error})") from None


def _server_message(body: Optional[str]) -> str:
    """KFP answers errors as JSON with `message` (gRPC gateway) or `error_message` (upload)."""
    text = (body or "").strip()
    try:
        answer = json.loads(text)
    except ValueError:
        return text[:500] or "(empty body)"
    if isinstance(answer, dict) and (answer.get("message") or answer.get("error_message")):
        return answer.get("message") or answer["error_message"]
    return text[:500]


def _compile(profile: Optional[str], directory: str) -> str:
    # Imported here: TFX takes seconds to load and is not needed to upload a compiled file.
    from kubeflow.runner import compile_pipeline
    from pipeline.config import load_config

    return compile_pipeline(load_config(profile), os.path.join(directory, "pipeline.json"))


def main(argv: Optional[List[str]] = None) -> Submission:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    parser.add_argument("--cron", required=True,
                        help=f"6-field cron with seconds first, e.g. {CRON_EXAMPLE}")
    parser.add_argument("--experiment", default=None, help="experiment name (default: pipeline name)")
    parser.add_argument("--package", default=None,
                        help="PipelineJob JSON from kubeflow.runner (default: compile from --profile)")
    parser.add_argument("--profile", default=None, help="config profile to compile when no --package")
    parser.add_argument("--run-name", default=None,
                        help="recurring run name (default: <pipeline>-recurring)")
    parser.add_argument("--version-name", default=None,
                        help="name of the version added to an existing pipeline "
                             "(default: <pipeline>-<UTC time>)")
    parser.add_argument("--max-concurrency", type=int, default=1, help="runs allowed at once")
    args = parser.parse_args(argv)
    try:
        validate_cron(args.cron)  # before compiling, which takes a while
        with tempfile.TemporaryDirectory() as directory:
            package = args.package or _compile(args.profile, directory)
            submission = submit(args.host, args.cron, package, experiment=args.experiment,
                                run_name=args.run_name, max_concurrency=args.max_concurrency,
                                version_name=args.version_name)
    except SubmitError as error:
        sys.exit(f"error: {error}")
    for field in dataclasses.fields(submission):
        print(f"{field.name.replace('_', ' ')}: {getattr(submission, field.name)}")
    return submission


if __name__ == "__main__":
    main()
