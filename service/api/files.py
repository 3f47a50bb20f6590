"""/v1/files: dataset uploads, owned by the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from planner.spec import DatasetFormat
from service.api.deps import CallerDep, SessionDep, SettingsDep
from service.api.problems import problems
from service.files import store_upload
from service.schemas import FileOut

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", status_code=201, response_model=FileOut, operation_id="upload_file", responses=problems(413, 415))
def upload_file(file: Annotated[UploadFile, File(description="A JSONL dataset")],
                session: SessionDep, settings: SettingsDep, caller: CallerDep,
                format: Annotated[DatasetFormat | None, Form(description="Validate rows as this format")] = None,
                ) -> FileOut:
    uploaded = store_upload(session, settings, file.file, file.filename or "dataset.jsonl", format, caller.tenant_id)
    return FileOut.of(uploaded)
