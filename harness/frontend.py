"""A stand-in for Cloud Run's front end: Debian nginx speaking HTTP/2 to
callers (TLS, or h2c) and h2c to one or more upstream servers (grpc_pass),
spreading calls over them one call at a time, as Cloud Run's front end
spreads requests over instances. An upstream that refuses connections is
skipped (grpc_next_upstream) and retried after a second.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from harness.net import free_port, wait_for_port

_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    upstream taskservice {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} {listen};
{tls}
        client_max_body_size 0;
        http2_max_concurrent_streams 1024;
        location / {{
            grpc_pass grpc://taskservice;
            grpc_next_upstream error timeout;
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None
    )


class NginxFrontEnd:
    """nginx on 127.0.0.1:port in front of upstream_ports (tls=True: with a
    self-signed certificate for localhost, in `certificate`)."""

    def __init__(self, upstream_ports: Sequence[int], workdir: Path, *, tls: bool = False) -> None:
        nginx = nginx_binary()
        if nginx is None:
            raise FileNotFoundError("nginx is not installed (apt-get install nginx)")
        d = workdir / "nginx"
        (d / "tmp").mkdir(parents=True)
        d.chmod(0o755)
        (d / "tmp").chmod(0o777)
        self.port = free_port()
        self.certificate = b""
        tls_lines = ""
        if tls:
            _self_signed(d)
            self.certificate = (d / "cert.pem").read_bytes()
            tls_lines = (
                f"        ssl_certificate {d}/cert.pem;\n        ssl_certificate_key {d}/key.pem;"
            )
        servers = "\n".join(
            f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=1s;" for p in upstream_ports
        )
        (d / "nginx.conf").write_text(
            _CONF.format(
                dir=d,
                port=self.port,
                listen="ssl http2" if tls else "http2",
                tls=tls_lines,
                servers=servers,
            )
        )
        self.log = d / "error.log"
        self.process = subprocess.Popen(
            [
                nginx,
                "-p",
                str(d),
                "-e",
                str(d / "error.log"),
                "-c",
                str(d / "nginx.conf"),
                "-g",
                "daemon off;",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if not wait_for_port("127.0.0.1", self.port, 10):
            self.stop()
            raise RuntimeError(f"nginx did not start: {(d / 'error.log').read_text()[-2000:]}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def error_log(self) -> str:
        """What nginx logged (its error log: upstream failures, resets)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        self.process.send_signal(signal.SIGQUIT)  # graceful
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _self_signed(d: Path) -> None:
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(d / "key.pem"),
            "-out",
            str(d / "cert.pem"),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
