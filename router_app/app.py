"""The HTTP layer: parse, authorise, pick the response type. Everything else lives in service/proxy/switcher."""

from __future__ import annotations

import logging
from typing import Any

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from router_app import errors, lifecycle
from router_app.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from router_app.proxy import SSE_HEADERS, ProxyRequest, RequestKind, handle_model_request
from router_app.service import RouterService
from router_app.units import UnitError

log = logging.getLogger("llm_router.http")

MODEL_ENDPOINTS: dict[str, RequestKind] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}


def error_response(error: errors.OpenAIError) -> Response:
    return Response(error.body(), status=error.status, headers={"Content-Type": "application/json", **error.headers})


def create_app(service: RouterService) -> Quart:
    app = Quart("llm_router")
    # Streams are long: Quart's 60 s response timeout would cut them silently (notes/streaming.md).
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 120
    app.config["MAX_CONTENT_LENGTH"] = service.config.max_body_bytes  # larger bodies: 413 in OpenAI's envelope

    @app.before_serving
    async def startup() -> None:
        await service.startup()

    @app.after_serving
    async def shutdown() -> None:
        await service.shutdown()

    @app.errorhandler(errors.OpenAIError)
    async def openai_error(error: errors.OpenAIError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        message = {
            404: f"no route {request.method} {request.path}",
            405: f"method {request.method} not allowed",
            413: f"The request body is larger than the router's limit of {app.config['MAX_CONTENT_LENGTH']} bytes "
            "(max_body_bytes).",
        }
        return error_response(
            errors.OpenAIError(
                status, message.get(status, error.description or error.name), errors.type_for_status(status)
            )
        )

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(errors.server_error(f"internal error: {type(error).__name__}"))

    def require_key() -> None:
        if not service.authorised(request.headers.get("Authorization")):
            raise errors.authentication_failed()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        switcher = service.switcher
        engines = {
            model_id: {"unit": model.unit, "backend": model.backend, "status": switcher.model_status(model_id).value}
            for model_id, model in service.config.models.items()
        }
        return {"status": "ok", **switcher.snapshot(), "models": engines}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    # Open-WebUI's llama.cpp connection type calls these at the connection URL without /v1: serve both.
    @app.get("/v1/models")
    @app.get("/models")
    async def list_models() -> dict[str, Any]:
        require_key()
        return service.models_listing()

    @app.post("/models/load")
    @app.post("/v1/models/load")
    async def load_model() -> dict[str, Any]:
        require_key()
        model = lifecycle.requested_model(await request.get_data(as_text=False), service.switcher)
        service.switcher.load(model)
        return {"success": True}

    @app.post("/models/unload")
    @app.post("/v1/models/unload")
    async def unload_model() -> dict[str, Any]:
        require_key()
        model = lifecycle.requested_model(await request.get_data(as_text=False), service.switcher)
        try:
            await service.switcher.unload(model)
        except UnitError as exc:  # systemd refused to stop a unit the router had not started
            raise errors.bad_gateway(f"could not unload model {model!r}: {exc}", code="unit_error") from exc
        return {"success": True}

    @app.delete("/models")
    @app.delete("/v1/models")
    async def delete_model() -> Response:
        require_key()
        # Open-WebUI's llama.cpp connection type offers "Delete" (llama.cpp's router mode deletes the file).
        raise errors.OpenAIError(
            405,
            "llm-router never deletes model files: remove the model from llm_router_models in the inventory and "
            "re-run the playbook",
            errors.type_for_status(405),
            code="method_not_supported",
        )

    @app.get("/models/sse")
    @app.get("/v1/models/sse")
    async def model_events() -> Response:
        require_key()
        stream = lifecycle.status_stream(service.switcher, service.config.keepalive_interval)
        response = Response(stream, headers=dict(SSE_HEADERS))
        response.timeout = None
        return response

    @app.get("/v1/models/<path:model_id>")
    async def get_model(model_id: str) -> dict[str, Any]:
        require_key()
        for entry in service.models_listing()["data"]:
            if entry["id"] == model_id:
                return dict(entry)
        raise errors.model_not_found(model_id)

    async def model_request() -> Response:
        require_key()
        raw = await request.get_data(cache=False, as_text=False)
        assert isinstance(raw, bytes)
        proxy_request = ProxyRequest(
            path=request.path,
            kind=MODEL_ENDPOINTS[request.path],
            raw_body=raw,
            headers=dict(request.headers),
        )
        result = await handle_model_request(service, proxy_request)
        response = Response(result.body, status=result.status, headers=result.headers)
        if result.streaming:
            response.timeout = None
        return response

    for path in MODEL_ENDPOINTS:
        app.add_url_rule(path, f"model_request_{path}", model_request, methods=["POST"])

    return app
