// The ftjobs console: every page's behaviour, picked by <body data-page>. It talks only to this server's /v1 API,
// with the API key kept in sessionStorage (this tab, until it closes). No framework; charts are plotly.js.
"use strict";

const KEY = "ftjobs.apiKey";
const ROOT = document.body.dataset.root || "";
const GIB = 2 ** 30;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

// ---- the API ---------------------------------------------------------------------------------------------
async function api(path, { json, body, headers = {}, method = "GET", signal } = {}) {
  const request = { method, signal, headers: { ...headers, Authorization: `Bearer ${sessionStorage.getItem(KEY)}` } };
  if (json !== undefined) {
    request.headers["Content-Type"] = "application/json";
    request.body = JSON.stringify(json);
  } else if (body !== undefined) {
    request.body = body;
  }
  const response = await fetch(ROOT + path, request);
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    location.href = `${ROOT}/ui?next=${encodeURIComponent(location.pathname)}`;
    throw new Error("signed out");
  }
  return response;
}

async function problemText(response) {
  try {
    const problem = await response.json();
    return `${problem.code || response.status}: ${problem.detail || problem.title || ""}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// ---- formatting ------------------------------------------------------------------------------------------
const gib = (bytes) => (bytes == null ? "–" : `${(bytes / GIB).toFixed(2)} GiB`);
function size(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}
function age(iso) {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return seconds < 172800 ? `${Math.round(seconds / 3600)} h` : `${Math.round(seconds / 86400)} d`;
}
function duration(seconds) {
  if (seconds == null) return "";
  const s = Math.round(seconds);
  return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${s % 60} s`;
}
function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}
function progressText(job) {
  const p = job.progress;
  if (!p) return job.status === "queued" ? "waiting for a worker" : "";
  const percent = Math.round((100 * p.step) / p.total_steps);
  const eta = !TERMINAL.has(job.status) && p.eta_seconds != null ? ` · ETA ${duration(p.eta_seconds)}` : "";
  return `step ${p.step} / ${p.total_steps} (${percent}%) · loss ${p.loss.toFixed(4)}${eta}`;
}

// ---- sign in ---------------------------------------------------------------------------------------------
function signInPage() {
  const form = document.getElementById("signin");
  const error = document.getElementById("signin-error");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, document.getElementById("api-key").value.trim());
    const response = await fetch(`${ROOT}/v1/jobs?limit=1`, {
      headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY)}` },
    });
    if (!response.ok) {
      sessionStorage.removeItem(KEY);
      error.textContent = `That key was refused (${await problemText(response)})`;
      error.hidden = false;
      return;
    }
    const next = new URLSearchParams(location.search).get("next");
    // Only back to a console page of this server: "//host/..." would leave it.
    location.href = next && next.startsWith(`${ROOT}/ui/`) && !next.startsWith("//") ? next : `${ROOT}/ui/jobs`;
  });
}

// ---- the jobs list ---------------------------------------------------------------------------------------
function jobsPage() {
  const filter = document.getElementById("status-filter");
  const body = document.querySelector("#jobs tbody");
  let busy = false;
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const query = new URLSearchParams({ limit: "50" });
      if (filter.value) query.set("status", filter.value);
      const response = await api(`/v1/jobs?${query}`);
      if (response.ok) render((await response.json()).data);
    } finally {
      busy = false;
    }
  }
  function render(jobs) {
    body.replaceChildren(...jobs.map(jobRow));
    document.getElementById("jobs-empty").hidden = jobs.length > 0;
    document.getElementById("jobs-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }
  function jobRow(job) {
    const p = job.progress;
    const bar = p ? element("progress", { max: p.total_steps, value: p.step }) : "";
    return element(
      "tr",
      { "data-job-id": job.id },
      element("td", {}, element("a", { href: `${ROOT}/ui/jobs/${job.id}`, text: job.id })),
      element("td", { class: `status ${job.status}`, text: job.status }),
      element("td", { text: job.spec.base_model }),
      element("td", { text: job.spec.method }),
      element("td", {}, bar, " ", p ? `${p.step}/${p.total_steps}` : ""),
      element("td", { text: `${gib(job.predicted_peak_bytes)} / ${gib(job.measured_peak_bytes)}` }),
      element("td", { text: age(job.created_at), title: job.created_at }),
    );
  }
  filter.addEventListener("change", refresh);
  refresh();
  setInterval(refresh, 2000); // the list has no event stream: it polls
}

// ---- one job ---------------------------------------------------------------------------------------------
function jobPage() {
  const jobId = document.getElementById("job").dataset.jobId;
  const series = { steps: [], loss: [], evalSteps: [], evalLoss: [], memory: {} };
  const shown = new Set(); // event seqs already drawn
  let job = null;

  async function refreshJob() {
    const response = await api(`/v1/jobs/${jobId}`);
    if (!response.ok) {
      showError(await problemText(response));
      return;
    }
    job = await response.json();
    renderHeader();
    renderPlan(document.getElementById("plan-chart"), job.plan);
    document.getElementById("plan-summary").textContent =
      `planned peak ${gib(job.plan.peak_vram_bytes)} (${job.plan.peak_phase})` +
      (job.plan.gpu_memory_bytes ? ` on a ${gib(job.plan.gpu_memory_bytes)} GPU` : "") +
      (job.plan.num_gpus > 1 ? `, per rank of ${job.plan.num_gpus} (${job.plan.sharding})` : "");
    renderAttempts();
    renderArtifacts();
    await renderCheckpoints();
    drawMemory();
  }
  function showError(text) {
    const error = document.getElementById("job-error");
    error.textContent = text;
    error.hidden = !text;
  }
  function renderHeader() {
    const status = document.getElementById("job-status");
    status.textContent = job.status;
    status.className = `status ${job.status}`;
    document.getElementById("job-progress").textContent = progressText(job);
    document.getElementById("cancel").hidden = TERMINAL.has(job.status) || job.status === "cancelling";
    showError(job.error ? `${job.error.code}: ${job.error.message}` : "");
  }
  function renderAttempts() {
    document.querySelector("#attempts tbody").replaceChildren(
      ...job.attempts.map((a) =>
        element(
          "tr",
          {},
          element("td", { text: a.number }),
          element("td", { text: a.worker }),
          element("td", { text: a.started_at }),
          element("td", { text: a.outcome || "running" }),
          element("td", { text: a.resumed_from_step ?? "–" }),
        ),
      ),
    );
  }
  function downloadButton(label, path, filename) {
    return element("button", {
      type: "button",
      class: "secondary",
      text: label,
      onclick: () => download(path, filename),
    });
  }
  function renderArtifacts() {
    document.getElementById("artifacts").replaceChildren(
      ...job.artifacts.map((a) =>
        element("li", {}, downloadButton(a.name, a.url, a.name.split("/").pop()), ` ${size(a.size_bytes)}`),
      ),
    );
  }
  async function renderCheckpoints() {
    const response = await api(`/v1/jobs/${jobId}/checkpoints`);
    if (!response.ok) return;
    const checkpoints = (await response.json()).data;
    if (!checkpoints.length) {
      document.getElementById("checkpoints").replaceChildren(element("li", { class: "muted", text: "none kept" }));
      return;
    }
    document.getElementById("checkpoints").replaceChildren(
      ...checkpoints.map((c) =>
        element(
          "li",
          {},
          downloadButton(`step ${c.step}`, c.url, `step-${c.step}.tar`),
          c.metrics && c.metrics.train_loss != null ? ` loss ${c.metrics.train_loss.toFixed(4)}` : "",
        ),
      ),
    );
  }

  // Events: the SSE stream (fetch, so the key goes as a header), replayed from the first event; polling if
  // the server refuses a stream (too many open).
  async function followEvents() {
    try {
      const response = await api(`/v1/jobs/${jobId}/events?after=0`, { headers: { Accept: "text/event-stream" } });
      if (response.ok && response.body) {
        await readStream(response.body.getReader());
        await refreshJob(); // the stream ends when the job has
        return;
      }
    } catch (error) {
      if (error.message === "signed out") return;
    }
    await pollEvents();
  }
  async function readStream(reader) {
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n"); // sse-starlette: CRLF
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (data) onEvent(JSON.parse(data));
      }
    }
  }
  async function pollEvents() {
    let after = 0;
    while (!job || !TERMINAL.has(job.status)) {
      const response = await api(`/v1/jobs/${jobId}/events?after=${after}&limit=500`);
      if (response.ok) {
        for (const event of (await response.json()).data) {
          onEvent(event);
          after = event.seq;
        }
      }
      await new Promise((done) => setTimeout(done, 2000));
      await refreshJob();
    }
  }
  function onEvent(event) {
    if (shown.has(event.seq)) return;
    shown.add(event.seq);
    const data = event.data;
    const text = event.kind === "progress" ? `step ${data.step}/${data.total_steps} loss ${data.loss.toFixed(4)}`
      : event.kind === "state" ? `${data.status}${data.attempt ? ` (attempt ${data.attempt})` : ""}`
      : event.kind === "checkpoint" ? `checkpoint at step ${data.step}` : data.message || JSON.stringify(data);
    const list = document.getElementById("events");
    list.append(element("li", { "data-kind": event.kind }, `${event.created_at.slice(11, 19)} ${event.kind}: ${text}`));
    list.scrollTop = list.scrollHeight;
    if (event.kind === "progress") addProgress(data);
    if (event.kind === "state" || event.kind === "checkpoint") refreshJob();
    else if (job) {
      job.progress = event.kind === "progress" ? data : job.progress;
      renderHeader();
    }
  }
  function addProgress(p) {
    series.steps.push(p.step);
    series.loss.push(p.loss);
    if (p.eval_loss != null) {
      series.evalSteps.push(p.step);
      series.evalLoss.push(p.eval_loss);
    }
    const memory = {
      "GPU allocated": p.memory_allocated_bytes,
      "GPU reserved": p.memory_reserved_bytes,
      "GPU peak reserved": p.memory_peak_bytes,
      "host resident (CPU job)": p.process_resident_bytes,
      "host peak resident (CPU job)": p.process_peak_resident_bytes,
    };
    for (const [name, value] of Object.entries(memory)) {
      if (value == null) continue;
      (series.memory[name] ||= { x: [], y: [] }).x.push(p.step);
      series.memory[name].y.push(value / GIB);
    }
    scheduleDraw();
  }
  let drawPending = false;
  function scheduleDraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      drawLoss();
      drawMemory();
    });
  }
  function drawLoss() {
    // Copies: Plotly.react skips a trace whose arrays are the same objects as last time, even if they grew.
    const traces = [{ name: "train loss", x: [...series.steps], y: [...series.loss], mode: "lines+markers" }];
    if (series.evalSteps.length) {
      traces.push({ name: "eval loss", x: [...series.evalSteps], y: [...series.evalLoss], mode: "lines+markers" });
    }
    Plotly.react("loss-chart", traces, chartLayout("step", "loss"), { displaylogo: false, responsive: true });
  }
  function drawMemory() {
    if (!job) return;
    const total = job.progress ? job.progress.total_steps : Math.max(1, ...series.steps, 1);
    const traces = Object.entries(series.memory).map(([name, s]) => ({ name, x: [...s.x], y: [...s.y], mode: "lines+markers" }));
    const flat = (name, bytes, dash) => ({ name, x: [0, total], y: [bytes / GIB, bytes / GIB], mode: "lines", line: { dash } });
    traces.push(flat("planned peak (GPU)", job.plan.peak_vram_bytes, "dash"));
    if (job.plan.gpu_memory_bytes) traces.push(flat("GPU capacity", job.plan.gpu_memory_bytes, "dot"));
    Plotly.react("memory-chart", traces, chartLayout("step", "GiB"), { displaylogo: false, responsive: true });
  }

  document.getElementById("cancel").addEventListener("click", async () => {
    if (!window.confirm(`Cancel job ${jobId}? Its training stops and cannot be resumed.`)) return;
    const response = await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" });
    if (!response.ok) showError(await problemText(response));
    await refreshJob();
  });
  refreshJob().then(followEvents);
}

async function download(path, filename) {
  const response = await api(path);
  if (!response.ok) {
    window.alert(await problemText(response));
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  const link = element("a", { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ---- charts shared by the job page and the planner ----------------------------------------------------------
function chartLayout(xTitle, yTitle, extra = {}) {
  return {
    margin: { l: 56, r: 12, t: 8, b: 44 },
    xaxis: { title: { text: xTitle } },
    yaxis: { title: { text: yTitle }, rangemode: "tozero" },
    legend: { orientation: "h", y: -0.25 },
    paper_bgcolor: "rgba(0,0,0,0)",
    ...extra,
  };
}
function renderPlan(target, plan) {
  // A stacked bar per phase of a step: each memory term of the plan is one trace.
  const phases = Object.keys(plan.phases || {}).length ? plan.phases : { [plan.peak_phase]: plan.breakdown };
  const names = Object.keys(phases);
  const terms = [...new Set(names.flatMap((phase) => Object.keys(phases[phase])))];
  const traces = terms.map((term) => ({
    type: "bar",
    name: term,
    x: names,
    y: names.map((phase) => (phases[phase][term] || 0) / GIB),
  }));
  const layout = chartLayout("", "GiB", { barmode: "stack", showlegend: true, margin: { l: 56, r: 12, t: 8, b: 30 } });
  layout.legend = { orientation: "v", x: 1.02, y: 1, font: { size: 11 } };
  Plotly.react(target, traces, layout, {
    displaylogo: false,
    responsive: true,
  });
}

// ---- the planner playground ------------------------------------------------------------------------------
function planPage() {
  const form = document.getElementById("plan-form");
  const field = (name) => form.elements[name];
  let spec = specFromForm({});
  let asked = 0;
  let timer = null;

  function specFromForm(base) {
    const next = structuredClone(base);
    next.base_model = field("base_model").value.trim();
    next.method = field("method").value;
    next.training = { ...(next.training || {}), micro_batch_size: Number(field("micro_batch_size").value),
      max_seq_length: Number(field("max_seq_length").value) };
    next.memory = { ...(next.memory || {}), precision: field("precision").value,
      gradient_checkpointing: field("gradient_checkpointing").checked };
    if (field("optimizer").value) next.memory.optimizer = field("optimizer").value;
    else delete next.memory.optimizer;
    next.resources = { ...(next.resources || {}), gpu_memory_gib: Number(field("gpu_memory_gib").value),
      num_gpus: Number(field("num_gpus").value) };
    if (["lora", "qlora"].includes(next.method)) next.lora = { ...(next.lora || {}), r: Number(field("lora_r").value) };
    else delete next.lora;
    return next;
  }
  function formFromSpec() {
    field("base_model").value = spec.base_model;
    field("method").value = spec.method;
    field("micro_batch_size").value = spec.training.micro_batch_size;
    field("max_seq_length").value = spec.training.max_seq_length;
    field("precision").value = spec.memory.precision;
    field("optimizer").value = spec.memory.optimizer || "";
    field("gradient_checkpointing").checked = spec.memory.gradient_checkpointing !== false;
    field("gpu_memory_gib").value = spec.resources.gpu_memory_gib;
    field("num_gpus").value = spec.resources.num_gpus || 1;
    if (spec.lora && spec.lora.r) field("lora_r").value = spec.lora.r;
    field("lora_r").disabled = !["lora", "qlora"].includes(spec.method);
  }
  function replanSoon() {
    clearTimeout(timer);
    timer = setTimeout(replan, 250);
  }
  async function replan() {
    const ticket = ++asked;
    document.getElementById("spec-json").textContent = JSON.stringify(spec, null, 2);
    const response = await api("/v1/plans", { method: "POST", json: spec });
    if (ticket !== asked) return; // a newer question is on its way
    const error = document.getElementById("plan-error");
    if (!response.ok) {
      error.textContent = await problemText(response);
      error.hidden = false;
      return;
    }
    error.hidden = true;
    renderResult(await response.json());
  }
  function renderResult(plan) {
    document.getElementById("peak").textContent = `peak ${gib(plan.peak_vram_bytes)}`;
    const fits = document.getElementById("fits");
    fits.textContent = plan.fits === null ? "(no GPU size given)" : plan.fits ? "fits" : "does not fit";
    fits.className = `status ${plan.fits === false ? "does-not-fit" : plan.fits ? "fits" : ""}`;
    document.getElementById("reasons").replaceChildren(...plan.reasons.map((r) => element("li", { text: r })));
    renderPlan(document.getElementById("plan-chart"), plan);
    document.getElementById("suggestions").replaceChildren(
      ...plan.suggestions.map((s, index) =>
        element(
          "li",
          { "data-index": index },
          `${s.description}: peak ${gib(s.peak_vram_bytes)} `,
          element("button", { type: "button", class: "secondary", text: "Apply", onclick: () => apply(s.patch) }),
        ),
      ),
    );
  }
  function apply(patch) {
    spec = mergePatch(spec, patch);
    formFromSpec();
    replan();
  }
  form.addEventListener("input", () => {
    spec = specFromForm(spec);
    field("lora_r").disabled = !["lora", "qlora"].includes(spec.method);
    replanSoon();
  });
  form.addEventListener("submit", (event) => event.preventDefault());
  document.getElementById("submit-form").addEventListener("submit", submitJob);

  async function submitJob(event) {
    event.preventDefault();
    const result = document.getElementById("submit-result");
    const upload = document.getElementById("f-dataset-file").files[0];
    let dataset = { path: document.getElementById("f-dataset").value.trim() };
    if (upload) {
      const body = new FormData();
      body.append("file", upload);
      const stored = await api("/v1/files", { method: "POST", body });
      if (!stored.ok) {
        result.textContent = await problemText(stored);
        return;
      }
      dataset = { file_id: (await stored.json()).id };
    } else if (!dataset.path) {
      result.textContent = "Give a dataset: a path or a file.";
      return;
    }
    const response = await api("/v1/jobs", { method: "POST", json: { ...spec, dataset } });
    if (!response.ok) {
      result.textContent = await problemText(response);
      return;
    }
    const job = await response.json();
    result.replaceChildren("Submitted: ", element("a", { href: `${ROOT}/ui/jobs/${job.id}`, text: job.id }));
  }
  formFromSpec();
  replan();
}

function mergePatch(target, patch) {
  // RFC 7396, as the planner's suggestions are written
  if (patch === null || typeof patch !== "object" || Array.isArray(patch)) return patch;
  const out = target && typeof target === "object" && !Array.isArray(target) ? { ...target } : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete out[key];
    else out[key] = mergePatch(out[key], value);
  }
  return out;
}

// ---- start -----------------------------------------------------------------------------------------------
const PAGES = { signin: signInPage, jobs: jobsPage, job: jobPage, plan: planPage };
document.getElementById("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  location.href = `${ROOT}/ui`;
});
if (document.body.dataset.page !== "signin" && !sessionStorage.getItem(KEY)) {
  location.href = `${ROOT}/ui?next=${encodeURIComponent(location.pathname)}`;
} else {
  PAGES[document.body.dataset.page]();
}
