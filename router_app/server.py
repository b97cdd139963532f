"""`llm-router serve`: hypercorn in-process (one worker), graceful shutdown, SIGHUP reloads the config."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from router_app.app import create_app
from router_app.config import ConfigError, RouterConfig, load_config
from router_app.service import RouterService

log = logging.getLogger("llm_router")


def hypercorn_config(config: RouterConfig) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [f"{config.listen_host}:{config.listen_port}"]
    # In-process, one worker: one switcher owns engine state, and SIGTERM reaches our own loop (notes/streaming.md).
    hc.workers = 0
    hc.graceful_timeout = config.shutdown_grace
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    # Streams may run for many minutes: no read timeout (it would also cut responses that are still streaming).
    hc.read_timeout = None
    return hc


def serve(config_dir: Path) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s", force=True)
    # One line per engine health poll would drown the switch log; the switcher logs what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        config = load_config(config_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("%s", problem)
        return 1
    asyncio.run(_serve(config_dir, config))
    return 0


async def _serve(config_dir: Path, config: RouterConfig) -> None:
    service = RouterService(config, config_dir)
    app = create_app(service)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload)
    log.info(
        "llm-router listening on %s:%d with %d model(s)", config.listen_host, config.listen_port, len(config.models)
    )
    await hypercorn_serve(app, hypercorn_config(config), shutdown_trigger=stop.wait)
    log.info("llm-router stopped")
