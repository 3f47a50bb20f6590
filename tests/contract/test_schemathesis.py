"""schemathesis 4 against the running API (uvicorn, the real PostgreSQL and Redis) with a valid tenant key.

Every check (all are on by default in schemathesis 4), positive and negative data (`--mode all`), every phase
including the stateful one, which follows the OpenAPI links from a submitted job to its routes, and at least 100
examples per operation. It must find no server error, no undocumented status, content type or header. Two settings
differ from the defaults, in tests/contract/schemathesis.toml: positive_data_acceptance also accepts the declared
semantic refusals (a model or dataset that does not exist is a 422 even in a schema-valid spec), and
negative_data_rejection is off for the upload alone (multipart cannot carry a JSON type; see the file).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES_PER_OPERATION = 100
# /healthz and /readyz take no input, so hypothesis runs out of distinct examples for them long before 100.
OPERATIONS_WITH_INPUT = 8


def test_schemathesis_finds_nothing(uvicorn_api, make_key, settings, tiny_model, data_root):
    from domain.spec import JobSpec
    from service.db import transaction
    from service.jobs.service import submit_job

    key = make_key("schemathesis", max_active_jobs=1000)
    # Jobs of its own (stored without a queue message), so the stateful phase follows list -> job -> cancel.
    (data_root / "schemathesis.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 4)
    spec = JobSpec.model_validate(
        {
            "base_model": str(tiny_model),
            "dataset": {"path": "schemathesis.jsonl"},
            "training": {"max_steps": 1, "micro_batch_size": 1, "max_seq_length": 32},
        }
    )
    for _ in range(3):
        with transaction() as session:
            submit_job(session, settings, spec, key.caller)
    # The fuzzer sends thousands of requests with one key: a limit for clients would stop it, not test it.
    with uvicorn_api(FTJOBS_RATE_LIMIT_REQUESTS=str(10**9)) as (url, _pid):
        result = subprocess.run(
            [
                str(Path(sys.executable).with_name("st")),
                "--config-file",
                str(CONFIG),
                "run",
                f"{url}/openapi.json",
                # No --checks: every check is on by default, and naming them on the command line would override
                # the one per-operation exception in the config file.
                "--mode",
                "all",
                "--phases",
                "examples,coverage,fuzzing,stateful",
                "--max-examples",
                str(EXAMPLES_PER_OPERATION),
                "--seed",
                "10",
                "--workers",
                "1",
                "-H",
                f"Authorization: Bearer {key.secret}",
                "--request-timeout",
                "30",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", result.stdout).groups())
    assert generated == passed and generated >= EXAMPLES_PER_OPERATION * OPERATIONS_WITH_INPUT
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in result.stdout
