// The ssf-serve console: plain DOM code over the public HTTP API (no build step, nothing loaded from
// elsewhere). The admin token stays in this page's memory; it is sent only as a bearer header.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null; // the task shown in the classify panel

function showError(message) {
  $("error").textContent = message || "";
  if (message) $("status").textContent = "";
}

function showStatus(message) {
  $("status").textContent = message;
  $("error").textContent = "";
}

async function call(method, path, options = {}) {
  const response = await fetch(path, { method, ...options });
  if (response.status === 204) return null;
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = body.error || {};
    throw new Error(`${response.status} ${error.code || ""}: ${error.message || response.statusText}`);
  }
  return body;
}

function authHeaders() {
  const token = $("token").value.trim();
  if (!token) throw new Error("paste the admin token first");
  return { Authorization: `Bearer ${token}` };
}

function accuracy(metrics) {
  for (const key of ["test_acc", "val_acc", "accuracy"]) {
    if (typeof metrics[key] === "number") return `${(metrics[key] * 100).toFixed(1)}% (${key})`;
  }
  return "n/a";
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

// images answered per task on this replica, from the engine's Prometheus counter
async function traffic() {
  const counts = {};
  const response = await fetch("/metrics");
  if (!response.ok) return counts;
  const pattern = /^ssf_engine_task_images_total\{task="([^"]+)"\} (\S+)$/;
  for (const line of (await response.text()).split("\n")) {
    const match = pattern.exec(line);
    if (match) counts[match[1]] = Number(match[2]);
  }
  return counts;
}

async function loadTasks() {
  const { tasks } = await call("GET", "/tasks");
  const counts = await traffic().catch(() => ({}));
  const body = $("tasks").querySelector("tbody");
  body.replaceChildren();
  $("no-tasks").hidden = tasks.length > 0;
  for (const task of tasks) {
    const row = document.createElement("tr");
    row.dataset.task = task.name;
    cell(row, task.name);
    cell(row, String(task.version));
    const labels = task.labels.slice(0, 6).join(", ") + (task.labels.length > 6 ? ", ..." : "");
    cell(row, `${task.num_classes}: ${labels}`);
    cell(row, accuracy(task.metrics || {}));
    cell(row, task.method);
    cell(row, String(counts[task.name] || 0));
    const actions = cell(row, "");
    actions.appendChild(button(`Classify with ${task.name}`, () => openTask(task.name)));
    actions.appendChild(document.createTextNode(" "));
    actions.appendChild(button(`Delete ${task.name}`, () => deleteTask(task.name)));
    body.appendChild(row);
  }
}

function openTask(name) {
  current = name;
  $("task-name").textContent = name;
  $("classify").hidden = false;
  $("answer").textContent = "";
  $("bars").replaceChildren();
  $("image-file").focus();
}

async function classify(file) {
  if (!current || !file) return;
  showError("");
  $("answer").textContent = `Classifying ${file.name}...`;
  $("bars").replaceChildren();
  try {
    const kind = file.type || "application/octet-stream";
    const result = await call("POST", `/tasks/${encodeURIComponent(current)}/predict?top_k=5`, {
      headers: { "Content-Type": kind }, body: file,
    });
    $("answer").textContent = `${result.task}, version ${result.version} answered for ${file.name}`;
    for (const scored of result.predictions[0]) {
      const item = document.createElement("li");
      const name = document.createElement("span");
      name.textContent = scored.label;
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${Math.max(scored.score * 100, 0.5)}%`;
      bar.setAttribute("role", "img");
      bar.setAttribute("aria-label", `${scored.label}: ${(scored.score * 100).toFixed(1)} percent`);
      const value = document.createElement("span");
      value.className = "score";
      value.textContent = scored.score.toFixed(4);
      item.append(name, bar, value);
      $("bars").appendChild(item);
    }
  } catch (e) {
    $("answer").textContent = "";
    showError(`Could not classify ${file.name}: ${e.message}`);
  }
}

async function upload(event) {
  event.preventDefault();
  try {
    const form = new FormData();
    form.append("delta", $("delta-file").files[0]);
    if ($("delta-name").value.trim()) form.append("name", $("delta-name").value.trim());
    const query = $("replace").checked ? "?replace=true" : "";
    const info = await call("POST", `/tasks${query}`, { headers: authHeaders(), body: form });
    showStatus(`Uploaded ${info.name}, version ${info.version}`);
    await loadTasks();
  } catch (e) {
    showError(`Upload failed: ${e.message}`);
  }
}

async function deleteTask(name) {
  try {
    await call("DELETE", `/tasks/${encodeURIComponent(name)}`, { headers: authHeaders() });
    showStatus(`Deleted ${name}`);
    if (current === name) $("classify").hidden = true;
    await loadTasks();
  } catch (e) {
    showError(`Delete failed: ${e.message}`);
  }
}

function wireDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    classify(e.dataTransfer.files[0]);
  });
  $("image-file").addEventListener("change", (e) => classify(e.target.files[0]));
}

async function start() {
  wireDrop();
  $("upload").addEventListener("submit", upload);
  try {
    const backbone = await call("GET", "/backbone");
    $("backbone").textContent =
      `Backbone ${backbone.model} (${backbone.backend}, ${backbone.device}, ${backbone.dtype}), ` +
      `input ${backbone.input_size.join("x")}`;
  } catch (e) {
    $("backbone").textContent = `Backbone not ready: ${e.message}`;
  }
  try {
    await loadTasks();
  } catch (e) {
    showError(`Could not list tasks: ${e.message}`);
  }
}

start();
