"""FastAPI dependencies: settings, Redis clients, the caller's identity (API key) and the jobs it may see."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any

import redis
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.settings import Settings
from workers import jobs

_bearer = HTTPBearer(auto_error=False, description="An API key from SANA_API_KEYS (when auth is on).")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]


def owner_of_key(key: str) -> str:
    """Jobs are tagged with a digest of their key, never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def authenticate(settings: Settings, token: str | None) -> str | None:
    """The owner id for ``token``; "" when auth is off; None when the token is missing or wrong."""
    if not settings.api_keys:
        return ""
    if not token:
        return None
    for key in settings.api_keys:
        if hmac.compare_digest(token.encode(), key.encode()):
            return owner_of_key(key)
    return None


def _unauthorized() -> HTTPException:
    return HTTPException(401, detail="missing or invalid API key: send 'Authorization: Bearer <key>'",
                         headers={"WWW-Authenticate": "Bearer"})


def get_owner(settings: SettingsDep,
              credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    owner = authenticate(settings, credentials.credentials if credentials else None)
    if owner is None:
        raise _unauthorized()
    return owner


def get_owner_or_query_token(request: Request, settings: SettingsDep,
                             credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """Like ``get_owner``, also accepting ``?access_token=`` (a browser <video> or WebSocket sets no headers)."""
    token = credentials.credentials if credentials else request.query_params.get("access_token")
    owner = authenticate(settings, token)
    if owner is None:
        raise _unauthorized()
    return owner


OwnerDep = Annotated[str, Depends(get_owner)]
MediaOwnerDep = Annotated[str, Depends(get_owner_or_query_token)]


def owned_record(r: redis.Redis, job_id: str, owner: str) -> dict[str, Any]:
    """The job's record if it exists and belongs to ``owner``; 404 otherwise (others' jobs do not exist)."""
    record = jobs.read_job(r, job_id) if jobs.is_job_id(job_id) else None
    if record is None or record.get("owner", "") != owner:
        raise HTTPException(404, detail=f"no job {job_id}")
    return record
