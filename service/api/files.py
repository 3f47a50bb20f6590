"""/v1/files: dataset uploads, owned by the caller's tenant."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from planner.spec import DatasetFormat
from service.api.deps import AuthenticatedDbDep, SettingsDep
from service.api.problems import problems
from service.errors import InvalidSpec
from service.files import record_upload, store_upload
from service.schemas import FileOut

router = APIRouter(prefix="/v1/files", tags=["files"])


FORM_FIELDS = {"file", "format"}


async def _strict_form(request: Request) -> None:
    """Unknown fields are errors, as in a job spec; and FastAPI reads an empty field as absent, while an empty
    `format` is a wrong value, not a missing one."""
    form = await request.form()
    unknown = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown:
        raise InvalidSpec(f"unknown form fields: {', '.join(repr(name) for name in unknown)}")
    if form.get("format") == "":
        raise InvalidSpec("format: must be one of " + ", ".join(f.value for f in DatasetFormat))


@router.post("", status_code=201, response_model=FileOut, operation_id="upload_file", responses=problems(413, 415),
             dependencies=[Depends(_strict_form)])
async def upload_file(file: Annotated[UploadFile, File(description="A JSONL dataset")],
                      db: AuthenticatedDbDep, settings: SettingsDep,
                      format: Annotated[DatasetFormat | None, Form(description="Validate rows as this format")] = None,
                      ) -> FileOut:
    stored = await anyio.to_thread.run_sync(store_upload, settings, file.file, file.filename or "dataset.jsonl",
                                            format)
    return await db.write(record_upload, stored, then=FileOut.of)
