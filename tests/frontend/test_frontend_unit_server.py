"""The frontend server in-process with no Triton behind it: TLS, the web page over HTTPS,
subprotocol negotiation, bad input, and a clear 1011 error when Triton is unreachable; and the
bound on a shutdown's end, in a process of its own."""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
import subprocess
import sys
import textwrap
import urllib.request

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from frontend.client import transcribe
from frontend.server import FrontendServer, ServerSettings, ssl_context
from frontend.triton_client import TritonBackend, TritonGateway
from twopass_asr import REPO_ROOT
from twopass_asr.serving.triton_launcher import free_port


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    client = ssl.create_default_context(cafile=str(certfile))
    return certfile, keyfile, client


def run_with_server(scenario, certificate, static_dir):
    """Start a TLS frontend whose Triton address has nothing listening, run scenario(port)."""
    certfile, keyfile, _ = certificate

    async def main():
        frontend = FrontendServer(ServerSettings(static_dir=static_dir),
                                  TritonBackend([TritonGateway(f"127.0.0.1:{free_port()}")]))
        port = free_port()
        server = await frontend.start("127.0.0.1", port, ssl_context(str(certfile), str(keyfile)))
        try:
            return await scenario(port)
        finally:
            server.close()
            await server.wait_closed()
            await frontend.close()

    return asyncio.run(main())


def test_tls_page_subprotocol_and_unreachable_triton(certificate, tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html><title>asr</title>")
    client_ssl = certificate[2]

    async def scenario(port):
        page = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"https://localhost:{port}/", context=client_ssl, timeout=10).read())
        async with connect(f"wss://localhost:{port}/any/path", ssl=client_ssl, subprotocols=["binary"]) as ws:
            negotiated = ws.subprotocol
        async with connect(f"wss://localhost:{port}", ssl=client_ssl) as ws:
            without = ws.subprotocol
        pcm = (np.sin(np.arange(16000) / 5) * 3000).astype(np.int16)
        down = await transcribe(f"wss://localhost:{port}", pcm, {"mode": "2pass", "wav_name": "w"},
                                ssl_context=client_ssl)
        return page, negotiated, without, down

    page, negotiated, without, down = run_with_server(scenario, certificate, tmp_path)
    assert page == b"<!doctype html><title>asr</title>"
    assert (negotiated, without) == ("binary", None)
    assert down.error == {**down.error, "mode": "2pass", "wav_name": "w", "code": "inference_unavailable",
                          "is_final": True, "is_end": True}
    assert "unreachable" in down.error["error"] and down.close_code == 1011
    assert down.messages == [down.error]


def test_bad_input_closes_only_that_connection(certificate, tmp_path):
    client_ssl = certificate[2]

    async def scenario(port):
        url = f"wss://localhost:{port}"
        async with connect(url, ssl=client_ssl) as healthy:
            async with connect(url, ssl=client_ssl) as bad:
                await bad.send(b"\x01\x02\x03")
                error = json.loads(await bad.recv())
                with pytest.raises(ConnectionClosed):
                    await bad.recv()
                bad_code = bad.close_code
            # The other connection is unaffected: a stream without audio still completes.
            await healthy.send(json.dumps({"mode": "offline", "wav_name": "ok"}))
            await healthy.send(json.dumps({"is_speaking": False}))
            final = json.loads(await healthy.recv())
        return error, bad_code, final

    error, bad_code, final = run_with_server(scenario, certificate, tmp_path)
    assert error["code"] == "audio_before_config" and bad_code == 1008
    assert final == {"mode": "offline", "text": "", "wav_name": "ok", "is_final": True, "is_end": True}


def test_a_shutdown_stuck_after_the_drain_still_ends_the_process():
    """A thread that never ends keeps a Python process from exiting, as grpc.aio's poller can;
    end_process_after ends it anyway, with status 0 and the stuck thread's stack in its output."""
    program = textwrap.dedent("""
        import logging, threading
        from frontend.server import end_process_after
        logging.basicConfig(level=logging.INFO)
        def stuck_forever():
            threading.Event().wait()
        threading.Thread(target=stuck_forever).start()
        end_process_after(0.5)
    """)
    ended = subprocess.run([sys.executable, "-c", program], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=60)
    assert ended.returncode == 0, ended.stderr
    assert "the shutdown did not finish within 0.5 s of the drain" in ended.stderr
    assert "stuck_forever" in ended.stderr
