"""The shared fixtures themselves work: a real S3 endpoint and a real MLflow server."""

from __future__ import annotations


def test_s3_endpoint_round_trip(s3_endpoint) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint["endpoint_url"]})
    path = f"{s3_endpoint['bucket']}/fixture/hello.txt"
    fs.pipe(path, b"hello")
    assert fs.cat(path) == b"hello"


def test_mlflow_server_answers(mlflow_server) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.create_experiment("fixture-check")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "x", 1.5, step=3)
    history = client.get_metric_history(run.info.run_id, "x")
    assert [(m.step, m.value) for m in history] == [(3, 1.5)]
