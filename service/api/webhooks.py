"""/v1/jobs/{id}/webhook_deliveries: the job's webhook delivery log, within the caller's tenant."""

from __future__ import annotations

import functools
from typing import Annotated

from fastapi import APIRouter, Query

from service.api.deps import CallerDbDep
from service.api.problems import problems
from service.schemas import WebhookDeliveryOut, WebhookDeliveryPage
from service.webhooks import service

router = APIRouter(prefix="/v1/jobs", tags=["webhooks"])


@router.get(
    "/{job_id}/webhook_deliveries",
    response_model=WebhookDeliveryPage,
    operation_id="list_webhook_deliveries",
    responses=problems(404),
)
async def list_webhook_deliveries(
    job_id: str,
    db: CallerDbDep,
    after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> WebhookDeliveryPage:
    return await db.read_rows(service.list_deliveries, job_id, after, limit, then=functools.partial(_page, after))


def _page(after: int, deliveries: list) -> WebhookDeliveryPage:
    data = [WebhookDeliveryOut.of(delivery, attempts) for delivery, attempts in deliveries]
    return WebhookDeliveryPage(data=data, next_cursor=data[-1].event_seq if data else after)
