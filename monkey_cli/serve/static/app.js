// The web page of `monkey serve`: drop a document, see its pages, ask, watch the answers stream in.
// It talks to the same API as any client: POST /v1/documents/preview for the pages, POST /v1/documents
// with stream=true for the answers (server-sent events over the response body), and shows the final JSON,
// which is exactly what `monkey ask|caption|read --format json` prints. Text from documents and answers is
// only ever set as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  file: null, thumbnails: new Map(), cards: new Map(), questions: [], json: "", running: false, ready: false,
};

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) {
    // not JSON: fall through to the status line
  }
  return `${response.status} ${response.statusText}`;
}

function needKey(response) {
  if (response.status !== 401) return false;
  $("key-label").hidden = false;
  $("api-key").focus();
  return true;
}

// --- the server ------------------------------------------------------------------------------------------

async function watchHealth() {
  let response;
  try {
    response = await fetch("/health", { headers: authHeaders() });
  } catch (_) {
    setStatus("the server cannot be reached");
    setTimeout(watchHealth, 3000);
    return;
  }
  if (needKey(response)) {
    setStatus("this server needs an API key");
    return;
  }
  const health = await response.json();
  $("model").textContent = health.model || "";
  state.ready = health.status === "ready";
  if (health.status === "ready") {
    setStatus(`ready · ${health.quant} on ${health.device} · ${health.slots} slots`);
  } else if (health.status === "failed") {
    setStatus("the model failed to load (see the server's log)");
  } else {
    setStatus("loading the model…");
    setTimeout(watchHealth, 1000);
  }
  updateButton();
}

function updateButton() {
  $("run").disabled = !(state.ready && state.file && !state.running);
}

// --- the document ------------------------------------------------------------------------------------------

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  $("document").textContent = `${file.name} · ${(file.size / 1024).toFixed(0)} KiB`;
  showPreview();
  updateButton();
}

async function showPreview() {
  const pages = $("pages");
  pages.replaceChildren();
  state.thumbnails.clear();
  if (!state.file) return;
  const form = new FormData();
  form.append("file", state.file, state.file.name);
  const range = $("page-range").value.trim();
  if (range) form.append("pages", range);
  const response = await fetch("/v1/documents/preview", { method: "POST", body: form, headers: authHeaders() });
  if (!response.ok) {
    if (!needKey(response)) showError(await errorMessage(response));
    return;
  }
  showError("");
  const preview = await response.json();
  for (const page of preview.pages) {
    state.thumbnails.set(page.page, page.image);
    pages.append(figureFor(page.page, page.image));
  }
  if (preview.errors.length) showError(preview.errors.join("\n"));
}

function figureFor(number, source) {
  const figure = document.createElement("figure");
  const image = document.createElement("img");
  image.alt = `page ${number}`;
  if (source) image.src = source;
  const caption = document.createElement("figcaption");
  caption.textContent = `p. ${number}`;
  figure.append(image, caption);
  return figure;
}

// --- asking ------------------------------------------------------------------------------------------------

function chosenTask() {
  return document.querySelector('input[name="task"]:checked').value;
}

function questions() {
  const lines = $("questions").value.split("\n").map((line) => line.trim()).filter(Boolean);
  return [...new Set(lines)];
}

async function run(event) {
  event.preventDefault();
  const task = chosenTask();
  const asked = questions();
  if (task === "ask" && !asked.length) {
    showError("write a question first");
    return;
  }
  showError("");
  state.running = true;
  updateButton();
  state.cards.clear();
  state.questions = asked;
  $("answers").replaceChildren();
  $("json-box").hidden = true;
  const form = new FormData();
  form.append("file", state.file, state.file.name);
  form.append("task", task);
  for (const question of task === "ask" ? asked : []) form.append("question", question);
  const range = $("page-range").value.trim();
  if (range) form.append("pages", range);
  form.append("stream", "true");
  setStatus("answering…");
  try {
    const response = await fetch("/v1/documents", { method: "POST", body: form, headers: authHeaders() });
    if (!response.ok) {
      if (!needKey(response)) showError(await errorMessage(response));
      return;
    }
    await readEvents(response, onEvent);
  } catch (error) {
    showError(`the connection failed: ${error.message}`);
  } finally {
    state.running = false;
    updateButton();
    watchHealth();
  }
}

// Server-sent events from a fetch body: blocks separated by a blank line, each "data: <json>".
async function readEvents(response, handle) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data: ")).map((line) => line.slice(6)).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      handle(JSON.parse(data));
    }
  }
}

function onEvent(event) {
  if (event.type === "delta") {
    cardFor(event.page, event.prompt).text.append(event.text);
  } else if (event.type === "record") {
    finishCard(event.record);
  } else if (event.type === "done") {
    state.json = JSON.stringify(event.document, null, 2);
    $("json").textContent = state.json;
    $("json-box").hidden = false;
    const failed = event.document.records.filter((record) => record.error !== null).length;
    setStatus(`${event.document.records.length} answers${failed ? `, ${failed} failed` : ""}`);
  } else if (event.type === "error") {
    showError(event.error.message);
  }
}

function cardFor(page, prompt) {
  const key = `${page} ${prompt}`;
  let card = state.cards.get(key);
  if (card) return card;
  const box = document.createElement("article");
  box.className = "answer";
  box.dataset.page = page === null ? "" : String(page);
  const question = document.createElement("p");
  question.className = "prompt";
  question.textContent = prompt;
  const text = document.createElement("p");
  text.className = "text";
  const meta = document.createElement("p");
  meta.className = "meta muted";
  const body = document.createElement("div");
  body.append(question, text, meta);
  box.append(page === null ? document.createElement("div") : figureFor(page, state.thumbnails.get(page)), body);
  // Answers arrive in the order they finish decoding; cards stay in page order, questions in the asked order.
  const order = (page === null ? 0 : page) * 1e6 + Math.max(state.questions.indexOf(prompt), 0);
  box.dataset.order = String(order);
  const after = [...$("answers").children].find((other) => Number(other.dataset.order) > order);
  $("answers").insertBefore(box, after || null);
  card = { box, text, meta };
  state.cards.set(key, card);
  return card;
}

function finishCard(record) {
  const card = cardFor(record.page, record.prompt);
  if (record.error !== null) {
    card.box.classList.add("failed");
    card.text.textContent = record.error;
    return;
  }
  card.text.textContent = record.answer || "(empty answer)";
  const source = record.answer_source === "text_layer" ? "from the PDF's text" : `${record.seconds.toFixed(2)} s`;
  card.meta.textContent = `${record.source}${record.page ? ` p. ${record.page}` : ""} · ${source}`;
  card.box.classList.add("done");
}

async function copyJson() {
  try {
    await navigator.clipboard.writeText(state.json);
    $("copied").textContent = "copied";
  } catch (_) {
    // no clipboard access (an insecure origin, a refused permission): select the text for Ctrl+C instead
    const range = document.createRange();
    range.selectNodeContents($("json"));
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    $("copied").textContent = "selected: press Ctrl+C to copy";
  }
}

// --- wiring ------------------------------------------------------------------------------------------------

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => chooseFile(event.target.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    chooseFile(event.dataTransfer.files[0]);
  });
  $("page-range").addEventListener("change", showPreview);
  for (const radio of document.querySelectorAll('input[name="task"]')) {
    radio.addEventListener("change", () => {
      $("questions-label").hidden = chosenTask() !== "ask";
      $("run").textContent = chosenTask() === "ask" ? "Ask" : chosenTask() === "caption" ? "Caption" : "Read";
    });
  }
  $("api-key").addEventListener("change", () => {
    watchHealth();
    showPreview();
  });
  $("ask").addEventListener("submit", run);
  $("copy").addEventListener("click", copyJson);
  watchHealth();
}

wire();
