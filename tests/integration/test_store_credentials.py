"""No S3 credentials is a permanent fault: one attempt, one line, no retries (store and task policy).

botocore's NoCredentialsError is a BotoCoreError, which the store retried as a connection fault: 5 attempts
and ~16 s of backoff before the same error. The S3 endpoint is moto's real server; the file exists there
(written with credentials), and the environment then loses them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from rlme_tasks.retries import transient

from rlme_pipeline.storage.store import StorageError, Store
from tests.conftest import ROOT

QUESTIONS = b"- id: short\n  text: Is the answer short?\n"
NO_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@pytest.fixture
def no_credentials(s3, monkeypatch, tmp_path):
    """The bucket of `s3`, with a questions file in it, and an environment that holds no credentials
    (nor a credentials file, nor the instance-metadata lookup); the endpoint stays."""
    import s3fs

    s3.fs.pipe(f"{s3.name}/q/questions.yaml", QUESTIONS)
    for k in NO_CREDENTIALS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would still hold the test's credentials
    return s3


def _counted(monkeypatch, fs, name: str) -> list:
    calls, real = [], getattr(fs, name)

    def counted(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(fs, name, counted)
    return calls


def test_reads_and_writes_fail_at_the_first_attempt(no_credentials, monkeypatch):
    store = Store(no_credentials.url("q"))
    reads, writes = _counted(monkeypatch, store.fs, "cat_file"), _counted(monkeypatch, store.fs, "pipe_file")
    with pytest.raises(StorageError, match=r"NoCredentialsError.*set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") as e:
        store.read_bytes("questions.yaml")
    assert len(reads) == 1
    assert e.value.__cause__ is None and not transient(e.value)  # the task retry policy: not retried either
    with pytest.raises(StorageError, match=r"NoCredentialsError"):
        store.write_bytes("other.yaml", QUESTIONS)
    assert len(writes) == 1


def test_the_task_retry_policy_never_retries_credential_errors():
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    assert not transient(NoCredentialsError())  # raised outside the store (a raw s3fs call)
    assert not transient(PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"))
    try:
        raise StorageError("read failed after 5 attempts") from ConnectionResetError()
    except StorageError as e:
        assert transient(e)  # a connection fault still is transient


def test_rescore_with_an_s3_questions_file_and_no_credentials_is_one_line_at_once(no_credentials, micro_config, tmp_path):  # fmt: skip
    from rlme_pipeline.config import load_config
    from rlme_pipeline.jobs.train import train
    from rlme_pipeline.storage.run import Run

    cfg = load_config(micro_config(str(tmp_path / "runs"), iterations=1))
    train(cfg, Run.for_config(cfg))
    env = {k: v for k, v in os.environ.items() if k not in NO_CREDENTIALS}
    env.update(PYTHONPATH=str(ROOT), PREFECT_API_URL="http://127.0.0.1:9/api")  # Prefect must not be reached
    env.pop("RLME_STORE_ATTEMPTS", None)  # the default: 5 attempts for a transient fault
    questions = f"s3://{no_credentials.name}/q/questions.yaml"
    cmd = [sys.executable, "-m", "rlme_flows.cli", "rescore", str(tmp_path / "runs" / cfg.run.id)]
    p = subprocess.run(
        [*cmd, "--name", "v2", "--questions", questions], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stdout.startswith(f"error: read {questions} failed: NoCredentialsError") and p.stdout.count("\n") == 1
    # each retry logs one "transient ... retrying" warning: none means one attempt
    assert "retrying" not in p.stderr, p.stderr
