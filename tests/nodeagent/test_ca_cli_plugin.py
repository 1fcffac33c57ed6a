"""`trellis ca serve --plugin-ca`: a cacerts directory that does not fit together stops
the CA at start with one line naming the file, and creates nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from identity.ca import CertificateAuthority
from identity.certs import generate_key, private_key_pem

pytestmark = pytest.mark.inprocess


def test_a_key_that_is_not_the_intermediates_stops_the_ca_naming_the_file(
        tmp_path: Path) -> None:
    # An online root's files posing as cacerts, with someone else's key.
    CertificateAuthority.load_or_create(tmp_path / "made")
    cacerts = tmp_path / "cacerts"
    cacerts.mkdir()
    root = (tmp_path / "made" / "root-cert.pem").read_bytes()
    for name in ("ca-cert.pem", "cert-chain.pem", "root-cert.pem"):
        (cacerts / name).write_bytes(root)
    (cacerts / "ca-key.pem").write_bytes(private_key_pem(generate_key()))
    (cacerts / "ca-key.pem").chmod(0o600)
    (tmp_path / "workloads.yaml").write_text("")
    (tmp_path / "digests").write_text("{}")
    done = subprocess.run(
        [sys.executable, "-m", "trellis.cli", "ca", "serve", "--plugin-ca",
         f"--state-dir={cacerts}", "--listen=127.0.0.1:1",
         f"--workloads={tmp_path / 'workloads.yaml'}", f"--node-tokens={tmp_path / 'digests'}"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert f"{cacerts / 'ca-key.pem'} is not the private key of {cacerts / 'ca-cert.pem'}" \
        in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in cacerts.iterdir()) == [
        "ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]
