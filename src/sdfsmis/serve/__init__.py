"""``sdfsmis serve``: a local web app to annotate a slice, segment the volume, correct and reuse.

Safe by default: it binds 127.0.0.1 and answers only requests addressed to a loopback host name;
binding another address prints a warning and, with ``--token``, every request must carry the token
(the printed address sets it as a cookie). Uploads are limited in size and checked as NIfTI before
anything is kept; no file outside the workspace is read or written (``..``, absolute paths and
symlinks leading out are refused); jobs never leave partial files.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

from .app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app", "serve", "is_loopback"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(host: str = "127.0.0.1", port: int = 8000, workspace: str | Path = "sdfsmis-workspace",
          token: str | None = None, max_upload_mb: float = 512.0, checkpoint: str | None = None,
          device: str = "cpu", batch_size: int = 16) -> None:
    """Run the app with uvicorn until Ctrl-C."""
    import uvicorn

    loopback = is_loopback(host)
    cfg = ServeConfig(workspace=Path(workspace), token=token, max_upload_mb=max_upload_mb, checkpoint=checkpoint,
                      device=device, batch_size=batch_size,
                      allowed_hosts=ServeConfig.allowed_hosts if loopback else None)
    app = create_app(cfg)
    if not loopback:
        print(f"warning: serving on {host}, reachable from other machines"
              + ("" if token else "; anyone who can reach it can read and write the workspace (use --token)"),
              file=sys.stderr)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    address = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"sdfsmis serve: workspace {app.state.workspace.root}\nopen {address}  (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
