"""/v1/files: dataset uploads, owned by the caller's tenant.

The same routes serve native clients and the OpenAI SDK (files.create, list, retrieve, content, delete): a file
is OpenAI's FileObject plus ftjobs' fields, and an error here is problem+json that also carries OpenAI's
`error` member (service/openai_compat.py `openai_error`), so the SDK's exceptions show its message."""

from __future__ import annotations

from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import Response

from domain.spec import DatasetFormat
from service import files
from service.api.deps import AuthenticatedDbDep, CallerDbDep, SettingsDep
from service.api.downloads import stored_file_response
from service.api.problems import problems
from service.dataset_refs import upload_key
from service.errors import FileNotFound, InvalidSpec
from service.schemas import FileDeleted, FileOut, FilePage
from service.storage import job_storage

router = APIRouter(prefix="/v1/files", tags=["files"])
FileId = Annotated[str, Path(max_length=64)]


FORM_FIELDS = {"file", "format", "purpose"}


async def _strict_form(request: Request) -> None:
    """Unknown fields are errors, as in a job spec; and FastAPI reads an empty field as absent, while an empty
    `format` is a wrong value, not a missing one."""
    form = await request.form()
    unknown = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown:
        raise InvalidSpec(f"unknown form fields: {', '.join(repr(name) for name in unknown)}")
    if form.get("format") == "":
        raise InvalidSpec("format: must be one of " + ", ".join(f.value for f in DatasetFormat))


@router.post(
    "",
    status_code=201,
    response_model=FileOut,
    operation_id="upload_file",
    responses=problems(413, 415),
    dependencies=[Depends(_strict_form)],
)
async def upload_file(
    file: Annotated[UploadFile, File(description="A JSONL dataset")],
    db: AuthenticatedDbDep,
    settings: SettingsDep,
    format: Annotated[DatasetFormat | None, Form(description="Validate rows as this format")] = None,
    purpose: Annotated[Literal["fine-tune"], Form(description="OpenAI's purpose; only fine-tune")] = files.FILE_PURPOSE,
) -> FileOut:
    stored = await anyio.to_thread.run_sync(
        files.store_upload, settings, file.file, file.filename or "dataset.jsonl", format
    )
    return await db.write(files.record_upload, stored, then=FileOut.of)


@router.get("", response_model=FilePage, operation_id="list_files", responses=problems(400))
async def list_files(
    db: CallerDbDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: Annotated[str | None, Query(max_length=64)] = None,
    order: Literal["asc", "desc"] = "desc",
    purpose: Annotated[str | None, Query(max_length=64)] = None,
) -> FilePage:
    return await db.read(files.list_files, limit, after, order == "desc", purpose, then=_file_page)


def _file_page(result: tuple[list, bool]) -> FilePage:
    page, more = result
    return FilePage(
        data=[FileOut.of(uploaded) for uploaded in page], has_more=more, next_cursor=page[-1].id if more else None
    )


@router.get("/{file_id}", response_model=FileOut, operation_id="get_file", responses=problems(404))
async def get_file(file_id: FileId, db: CallerDbDep) -> FileOut:
    return await db.read(files.load_file, file_id, then=FileOut.of)


@router.get(
    "/{file_id}/content",
    response_class=Response,
    operation_id="download_file",
    responses={200: {"description": "the file's bytes", "content": {"application/octet-stream": {}}}, **problems(404)},
)
async def download_file(file_id: FileId, db: CallerDbDep, settings: SettingsDep) -> Response:
    uploaded = await db.read(files.load_file, file_id, then=lambda f: (f.id, f.filename))
    return await anyio.to_thread.run_sync(_content, settings, *uploaded)


def _content(settings, file_id: FileId, filename: str) -> Response:
    return stored_file_response(
        job_storage(settings),
        upload_key(file_id),
        filename,
        "application/octet-stream",
        FileNotFound(f"file {file_id} is gone from storage"),
    )


@router.delete("/{file_id}", response_model=FileDeleted, operation_id="delete_file", responses=problems(404, 409))
async def delete_file(file_id: FileId, db: AuthenticatedDbDep, settings: SettingsDep) -> FileDeleted:
    deleted = await db.write(files.delete_file, settings, file_id)
    await anyio.to_thread.run_sync(files.remove_stored, settings, deleted)
    return FileDeleted(id=deleted, deleted=True)
