"""/v1/files: dataset uploads."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from planner.spec import DatasetFormat
from service.api.deps import SessionDep, SettingsDep
from service.files import store_upload
from service.schemas import FileOut

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", status_code=201, response_model=FileOut)
def upload_file(file: Annotated[UploadFile, File(description="A JSONL dataset")],
                session: SessionDep, settings: SettingsDep,
                format: Annotated[DatasetFormat | None, Form(description="Validate rows as this format")] = None,
                ) -> FileOut:
    uploaded, rows = store_upload(session, settings, file.file, file.filename or "dataset.jsonl", format)
    return FileOut.of(uploaded, rows)
