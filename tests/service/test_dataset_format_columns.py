"""Every dataset format's name fits the columns that store it (openai_preference once did not: a 500 on upload)."""

from domain.spec import DatasetFormat
from service.models import DatasetValidation, UploadedFile


def test_every_dataset_format_fits_its_columns():
    for column in (UploadedFile.__table__.c.validated_format, DatasetValidation.__table__.c.dataset_format):
        assert max(len(fmt.value) for fmt in DatasetFormat) <= column.type.length, column
