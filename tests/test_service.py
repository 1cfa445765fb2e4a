"""The whole service tree from a configuration: HTTPS listener, admin listener, start and stop."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.internet.task import deferLater
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from relayd.config import loads
from relayd.service import make_service

from .conftest import HARNESS_ENV, LD_ENV_ID, free_port


def self_signed(folder: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(cert_pem)
    return key_path, cert_path, cert_pem


@pytest_twisted.ensureDeferred
async def test_https_listener_and_admin_listener(tmp_path: Path, offline_dir: Path) -> None:
    key, cert, cert_pem = self_signed(tmp_path)
    https_port, admin_port = free_port(), free_port()
    config = loads(f"""
[relayd]
listen = ssl:{https_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}
admin_listen = tcp:{admin_port}:interface=127.0.0.1
offline_dir = {offline_dir}
""", base=tmp_path)
    service = make_service(config, reactor)
    service.startService()
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(cert_pem))
        client = treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))
        for _ in range(50):
            if service.store.environment("launchdarkly", LD_ENV_ID) is not None:
                break
            await deferLater(reactor, 0.05, lambda: None)
        response = await client.get(f"https://localhost:{https_port}/health")
        body = await response.json()
        assert response.code == 200
        assert {e["id"] for e in body["environments"]} == {HARNESS_ENV, LD_ENV_ID}

        metrics = await treq.get(f"http://127.0.0.1:{admin_port}/metrics", persistent=False)
        text = (await metrics.content()).decode()
        assert metrics.code == 200
        assert f'relayd_environment_state{{family="harness",environment="{HARNESS_ENV}",state="VALID"}} 1' in text
        assert "relayd_sse_streams 0" in text
        page = await treq.get(f"http://127.0.0.1:{admin_port}/", persistent=False)
        html = (await page.content()).decode()
        assert page.code == 200 and LD_ENV_ID in html and "sdk-00000000" not in html
        # the admin routes are not on the SDK listener
        # the Harness relay serves Prometheus text at GET /metrics on its SDK port too, without a token
        same = await client.get(f"https://localhost:{https_port}/metrics")
        assert same.code == 200 and b"relayd_sse_streams 0" in await same.content()
        # ... but the HTML page only on the admin listener
        other = await client.get(f"https://localhost:{https_port}/")
        assert other.code == 404
        await other.content()
    finally:
        await pool.closeCachedConnections()
        await service.stopService()
