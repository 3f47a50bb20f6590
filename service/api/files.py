"""/v1/files: dataset uploads, owned by the caller's tenant: upload, list, read and delete."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, Response, UploadFile

from planner.spec import DatasetFormat
from service import files as service
from service.api.deps import AuthenticatedDbDep, CallerDbDep, SettingsDep
from service.api.problems import problems
from service.errors import InvalidSpec
from service.files import record_upload, store_upload
from service.models import UploadedFile
from service.schemas import FileOut, FilePage
from service.storage import job_storage

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


@router.get("", response_model=FilePage, operation_id="list_files", responses=problems(400))
async def list_files(db: CallerDbDep, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                     after: Annotated[str | None, Query(max_length=64)] = None) -> FilePage:
    return await db.read(service.list_files, limit, after, then=_file_page)


def _file_page(result: tuple[list[UploadedFile], bool]) -> FilePage:
    page, more = result
    return FilePage(data=[FileOut.of(uploaded) for uploaded in page], next_cursor=page[-1].id if more else None)


@router.get("/{file_id}", response_model=FileOut, operation_id="get_file", responses=problems(404))
async def get_file(file_id: Annotated[str, Path(max_length=64)], db: CallerDbDep) -> FileOut:
    return await db.read(service.get_file, file_id, then=FileOut.of)


@router.delete("/{file_id}", status_code=204, response_class=Response, operation_id="delete_file",
               responses={204: {"description": "the file is gone"}, **problems(404, 409)})
async def delete_file(file_id: Annotated[str, Path(max_length=64)], db: AuthenticatedDbDep,
                      settings: SettingsDep) -> Response:
    key = await db.write(service.delete_file, settings, file_id)
    await anyio.to_thread.run_sync(job_storage(settings).delete_tree, key)
    return Response(status_code=204)
