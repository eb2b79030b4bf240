"""The command line: doctor and selfcheck."""

from __future__ import annotations

from typer.testing import CliRunner

from aim_platform.cli import app


def test_doctor_reports_versions_pil_and_devices() -> None:
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for key in ("python", "torch", "ray", "mlflow", "PIL", "libjpeg-turbo", "devices", "cpu:"):
        assert key in result.output
    assert "Pillow" in result.output


def test_selfcheck_parity_and_loss_falls() -> None:
    result = CliRunner().invoke(app, ["selfcheck", "--steps", "40"])
    assert result.exit_code == 0, result.output
    assert "ml-aim parity" in result.output and "OK" in result.output
