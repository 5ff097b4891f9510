"""Throw-away certificates and Mosquitto password files for the authentication and TLS tests.

For tests only: a plant's certificates come from its own PKI and its password file from its own
`mosquitto_passwd` (provisioning/README.md). The broker that uses them is tools.broker.MosquittoBroker
(`password_file=`, `tls=TlsFiles(...)`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def write_password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file made by mosquitto_passwd (hashed, as the broker expects)."""
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    path.unlink(missing_ok=True)
    for i, (user, password) in enumerate(users.items()):
        args = [tool, "-b"] + (["-c"] if i == 0 else []) + [str(path), user, password]
        subprocess.run(args, check=True, capture_output=True)
    path.chmod(0o600)
    return path


def make_test_pki(folder: Path, days: int = 2) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl CLI).

    Returns the files by name: ca.crt, server.crt, server.key, client.crt, client.key, and other-ca.crt (a
    second CA the server does not use: a station trusting only it must fail the handshake).
    """
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", str(days),
        "-subj", "/CN=test-ca")
    exts = {"server": "subjectAltName=IP:127.0.0.1,DNS:localhost", "client": "extendedKeyUsage=clientAuth"}
    for name, ext in exts.items():
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        (folder / f"{name}.ext").write_text(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", str(days), "-extfile", f"{name}.ext")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other-ca.key", "-out", "other-ca.crt",
        "-days", str(days), "-subj", "/CN=other-ca")
    return {name: folder / name for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key",
                                             "other-ca.crt")}
