"use strict";
// The diffusekit serve page: plain JavaScript against the job API (no build step, nothing fetched elsewhere).
const $ = (id) => document.getElementById(id);
let models = {};
let apiKey = localStorage.getItem("diffusekit-api-key") || "";

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey) headers.Authorization = "Bearer " + apiKey;
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    apiKey = prompt("This server needs an API key") || "";
    localStorage.setItem("diffusekit-api-key", apiKey);
    if (apiKey) return api(path, options);
  }
  return response;
}

async function json(path, options) {
  const response = await api(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

function option(select, value, text) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = text;
  select.appendChild(element);
}

async function loadPickers() {
  for (const model of (await json("/v1/models")).models) {
    models[model.name] = model;
    option($("model"), model.name, model.name + " (" + model.pipeline + ")");
  }
  for (const scheduler of (await json("/v1/schedulers")).schedulers) {
    option($("scheduler"), scheduler.name, scheduler.name);
  }
  showModelFields();
}

function showModelFields() {
  const model = models[$("model").value];
  if (!model) return;
  $("prompt-row").hidden = !model.takes_prompt;
  $("negative-row").hidden = !model.takes_prompt;
  $("class-row").hidden = !model.classes;
  $("class_label").innerHTML = "";
  (model.classes || []).forEach((name, i) => option($("class_label"), i, name));
  for (const side of ["width", "height"]) {
    $(side).value = model[side] || 512;
    $(side).disabled = Boolean(model[side]);
  }
  if (model.default_guidance_scale != null) $("guidance_scale").value = model.default_guidance_scale;
}

function formParams() {
  const model = models[$("model").value];
  const params = { model: model.name, n: Number($("n").value) || 1 };
  const numbers = { steps: "steps", guidance_scale: "guidance_scale", seed: "seed" };
  for (const [field, id] of Object.entries(numbers)) if ($(id).value !== "") params[field] = Number($(id).value);
  if ($("scheduler").value) params.scheduler = $("scheduler").value;
  if (model.classes) params.class_label = Number($("class_label").value);
  if (model.takes_prompt) {
    params.prompt = $("prompt").value;
    if ($("negative_prompt").value) params.negative_prompt = $("negative_prompt").value;
  }
  if (!model.width) { params.width = Number($("width").value); params.height = Number($("height").value); }
  return params;
}

async function submit(params) {
  $("form-error").textContent = "";
  try {
    const job = await json("/v1/jobs", { method: "POST", body: JSON.stringify(params) });
    follow(job.id);
  } catch (error) {
    $("form-error").textContent = error.message;
  }
}

function setProgress(step, total, text) {
  $("progress").max = total || 1;
  $("progress").value = step;
  $("progress-text").textContent = text;
  window.progressLog = (window.progressLog || []).concat([[step, total]]);  // read by the browser test
}

// Follow one job's events: a fetch stream, so the Authorization header goes along (EventSource cannot send it).
async function follow(jobId) {
  $("images").innerHTML = "";
  setProgress(0, 1, "queued");
  const response = await api("/v1/jobs/" + jobId + "/events");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      handleEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
    }
  }
  refreshHistory();
}

function handleEvent(block) {
  let name = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) name = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  if (!data) return;
  const payload = JSON.parse(data);
  if (name === "started") setProgress(0, payload.progress.total, "running");
  else if (name === "progress") setProgress(payload.step, payload.total, "step " + payload.step + " / " + payload.total);
  else if (name === "succeeded") { setProgress(1, 1, "done"); showImages(payload); }
  else if (name === "failed") setProgress(0, 1, "failed: " + payload.error.message);
  else if (name === "cancelled") setProgress(0, 1, "cancelled");
  else if (name === "queued") refreshHistory();
}

async function showImages(job) {
  for (const image of job.images) {
    const blob = await (await api(image.url)).blob();
    const url = URL.createObjectURL(blob);
    const figure = document.createElement("figure");
    const picture = document.createElement("img");
    picture.src = url;
    picture.alt = "image with seed " + image.seed;
    const caption = document.createElement("figcaption");
    const params = Object.entries(job.params).map(([k, v]) => k + ": " + v).join(", ");
    caption.textContent = "seed " + image.seed + " · " + params + " ";
    const link = document.createElement("a");
    link.href = url;
    link.download = job.id + "-" + image.seed + ".png";
    link.textContent = "download";
    caption.appendChild(link);
    figure.append(picture, caption);
    $("images").appendChild(figure);
  }
}

function button(text, action) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = "small";
  element.textContent = text;
  element.addEventListener("click", action);
  return element;
}

async function refreshHistory() {
  let jobs;
  try { jobs = (await json("/v1/jobs?limit=20")).jobs; } catch (error) { return; }
  const list = $("history");
  list.innerHTML = "";
  for (const job of jobs) {
    const item = document.createElement("li");
    const status = document.createElement("span");
    status.className = "status";
    status.textContent = job.status;
    const summary = document.createElement("span");
    summary.textContent = Object.entries(job.params).map(([k, v]) => k + "=" + v).join(" ");
    item.append(status, summary);
    if (["queued", "running", "interrupted"].includes(job.status)) {
      item.appendChild(button("cancel", () => api("/v1/jobs/" + job.id + "/cancel", { method: "POST" }).then(refreshHistory)));
    }
    if (job.status === "succeeded") item.appendChild(button("show", () => showJob(job)));
    item.appendChild(button("run again", () => submit(job.params)));
    list.appendChild(item);
  }
}

function showJob(job) {
  $("images").innerHTML = "";
  showImages(job);
}

$("model").addEventListener("change", showModelFields);
$("job-form").addEventListener("submit", (event) => { event.preventDefault(); submit(formParams()); });
json("/health").then((health) => { $("status").textContent = "ready"; });
loadPickers().then(refreshHistory).catch((error) => { $("form-error").textContent = error.message; });
