"""The TLS context the calls to Supabase Auth share: httpx's own choice, verified, made once,
and made again when its CA file changes."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import certifi
import pytest

from tenantflow.auth.supabase import tls_context


def test_the_auth_clients_share_one_verified_context_renewed_when_its_ca_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "ca.pem"
    shutil.copy(certifi.where(), bundle)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    first = tls_context()
    assert tls_context() is first
    assert first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname
    assert first.get_ca_certs() or first.cert_store_stats()["x509_ca"] > 0
    with bundle.open("a") as file:
        file.write("\n")
    renewed = tls_context()
    assert renewed is not first and tls_context() is renewed
    monkeypatch.delenv("SSL_CERT_FILE")
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    assert tls_context() is not renewed  # back to certifi's bundle, httpx's default
