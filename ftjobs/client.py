"""A small HTTP client for the CLI: submit, poll and download, with problem+json errors surfaced as such."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "cancelled"}


class ApiError(Exception):
    def __init__(self, problem: dict[str, Any]) -> None:
        super().__init__(f"{problem.get('code')}: {problem.get('detail')}")
        self.problem = problem


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_seconds: float = 30) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, timeout=timeout_seconds, headers=headers)

    def _json(self, response: httpx.Response) -> Any:
        if response.is_error:
            try:
                problem = response.json()
            except ValueError:
                problem = {"code": f"http_{response.status_code}", "detail": response.text}
            raise ApiError(problem)
        return response.json()

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._json(self.http.post("/v1/jobs", json=spec))

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def download(self, job_id: str, name: str, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
            if response.is_error:
                response.read()
                self._json(response)
            with open(target, "wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        return target

    def watch(self, job_id: str, poll_seconds: float = 1.0, out=sys.stdout) -> dict[str, Any]:
        """Poll until the job ends, drawing a progress bar; returns the final job."""
        last_line = None
        while True:
            job = self.job(job_id)
            if (line := progress_line(job)) != last_line:
                draw_progress(job, out)
                last_line = line
            if job["status"] in TERMINAL:
                if out.isatty():
                    out.write("\n")
                return job
            time.sleep(poll_seconds)


def draw_progress(job: dict[str, Any], out=sys.stdout) -> None:
    line = progress_line(job)
    if out.isatty():
        out.write("\r" + line.ljust(110))
    else:
        out.write(line + "\n")
    out.flush()


def progress_line(job: dict[str, Any], width: int = 30) -> str:
    progress = job.get("progress") or {}
    step, total = progress.get("step", 0), progress.get("total_steps") or 0
    filled = int(width * step / total) if total else 0
    bar = "#" * filled + "." * (width - filled)
    parts = [f"{job['id']} {job['status']:<10} [{bar}] {step}/{total or '?'}"]
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("tokens_per_second"):
        parts.append(f"{progress['tokens_per_second']:.0f} tok/s")
    if progress.get("eta_seconds") is not None and job["status"] == "running":
        parts.append(f"ETA {progress['eta_seconds']:.0f}s")
    return "  ".join(parts)
