// The web page of `monkey serve`: drop a document, see its pages, ask, watch the answers stream in.
// It talks to the same API as any client: POST /v1/documents/preview for the pages, POST /v1/documents
// with stream=true for the answers (server-sent events over the response body), and offers the final
// document as JSON and Markdown, exactly what `monkey ask|caption|read --format json|md` prints. Text from
// documents and answers is only ever set as text (textContent), never as HTML. Stop aborts the request: the
// server sees the connection close and drops its work (its decode slots go to the next request).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  file: null, usable: false, pageCount: 0, preview: 0, thumbnails: new Map(), cards: new Map(), questions: [],
  json: "", markdown: "", running: false, ready: false, controller: null, expected: 0, done: 0,
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

function askForKey(refused) {
  $("key-label").hidden = false;
  $("api-key").focus();
  setStatus(refused ? "The API key was not accepted: check it and try again." : "This server needs an API key: enter it below.");
}

function needKey(response) {
  if (response.status !== 401) return false;
  askForKey(Boolean(authHeaders().Authorization));
  state.ready = false;
  updateButtons();
  return true;
}

function plural(count, noun) {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

function taskVerb(task) {
  return task === "ask" ? "ask about" : task === "caption" ? "caption" : "read";
}

// --- the server ------------------------------------------------------------------------------------------

function deviceWords(device) {
  if (!device) return "";
  if (device === "cpu") return "the CPU";
  const gpu = /^cuda:(\d+)$/.exec(device);
  return gpu ? `GPU ${gpu[1]}` : device;
}

async function watchHealth() {
  let response;
  try {
    response = await fetch("/health", { headers: authHeaders() });
  } catch (_) {
    setStatus("The server cannot be reached; trying again…");
    setTimeout(watchHealth, 3000);
    return;
  }
  let health;
  try {
    health = await response.json();
  } catch (_) {
    setStatus(`The server answered ${response.status} ${response.statusText}; trying again…`);
    setTimeout(watchHealth, 3000);
    return;
  }
  if (health.key_required) { // liveness only: the details need the key
    state.ready = false;
    askForKey(Boolean(authHeaders().Authorization));
    updateButtons();
    return;
  }
  $("model").textContent = health.model ? `${health.model} on ${deviceWords(health.device)}` : "";
  state.ready = health.status === "ready";
  if (health.status === "ready") {
    if (!state.running) idleStatus();
  } else if (health.status === "failed") {
    setStatus("The model failed to load; the server's log says why.");
  } else {
    setStatus("The model is loading…");
    setTimeout(watchHealth, 1000);
  }
  updateButtons();
}

function idleStatus() {
  if (!state.ready) return;
  if (!state.file) {
    setStatus("Ready: drop a PDF or an image to begin.");
  } else if (state.usable) {
    setStatus(`Ready to ${taskVerb(chosenTask())} ${state.file.name} (${plural(state.pageCount, "page")}).`);
  }
}

function updateButtons() {
  $("run").disabled = !(state.ready && state.file && state.usable && !state.running);
  $("stop").hidden = !state.running;
  $("file").disabled = state.running;
}

// --- the document ------------------------------------------------------------------------------------------

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  state.usable = false;
  $("document").textContent = `${file.name} · ${(file.size / 1024).toFixed(0)} KiB`;
  showPreview();
}

async function showPreview() {
  const pages = $("pages");
  pages.replaceChildren();
  state.thumbnails.clear();
  state.usable = false;
  updateButtons();
  if (!state.file) return;
  const file = state.file;
  const ticket = ++state.preview; // a later choice wins over an earlier preview still on its way
  setStatus(`Opening ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  const range = $("page-range").value.trim();
  if (range) form.append("pages", range);
  let response;
  try {
    response = await fetch("/v1/documents/preview", { method: "POST", body: form, headers: authHeaders() });
  } catch (error) {
    if (ticket === state.preview) setStatus(`The server cannot be reached: ${error.message}`);
    return;
  }
  if (ticket !== state.preview) return;
  if (!response.ok) {
    if (needKey(response)) return;
    const message = await errorMessage(response);
    showError(message);
    setStatus(`${file.name} cannot be used: ${message}`);
    return;
  }
  showError("");
  const preview = await response.json();
  if (ticket !== state.preview) return;
  for (const page of preview.pages) {
    state.thumbnails.set(page.page, page.image);
    pages.append(figureFor(page.page, page.image));
  }
  state.pageCount = preview.pages.length;
  state.usable = state.pageCount > 0;
  if (preview.errors.length) showError(preview.errors.join("\n"));
  if (state.usable) {
    idleStatus();
  } else {
    setStatus(`${file.name} cannot be used: none of its pages could be read.`);
  }
  updateButtons();
}

function figureFor(number, source) {
  const figure = document.createElement("figure");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "thumb";
  button.title = `Enlarge page ${number}`;
  const image = document.createElement("img");
  image.alt = `page ${number}`;
  if (source) image.src = source;
  button.append(image);
  button.addEventListener("click", () => openViewer(number));
  const caption = document.createElement("figcaption");
  caption.textContent = `p. ${number}`;
  figure.append(button, caption);
  return figure;
}

// --- the page viewer ---------------------------------------------------------------------------------------

function openViewer(number) {
  const source = state.thumbnails.get(number);
  if (!source) return;
  $("viewer-image").src = source;
  $("viewer-image").alt = `page ${number}`;
  $("viewer-caption").textContent = `${state.file ? state.file.name : ""} · page ${number} of ${state.pageCount}`;
  $("viewer").showModal();
}

function closeViewer() {
  $("viewer").close();
}

// --- asking ------------------------------------------------------------------------------------------------

function chosenTask() {
  return document.querySelector('input[name="task"]:checked').value;
}

function questions() {
  const lines = $("questions").value.split("\n").map((line) => line.trim()).filter(Boolean);
  return [...new Set(lines)];
}

function progressStatus() {
  setStatus(`Answering: ${state.done} of ${plural(state.expected, "answer")} done…`);
}

async function run(event) {
  event.preventDefault();
  if (state.running) return;
  const task = chosenTask();
  const asked = questions();
  if (task === "ask" && !asked.length) {
    showError("Write a question first.");
    return;
  }
  showError("");
  state.running = true;
  state.controller = new AbortController();
  state.cards.clear();
  state.questions = asked;
  state.expected = state.pageCount * (task === "ask" ? asked.length : 1);
  state.done = 0;
  updateButtons();
  $("answers").replaceChildren();
  $("json-box").hidden = true;
  const form = new FormData();
  form.append("file", state.file, state.file.name);
  form.append("task", task);
  for (const question of task === "ask" ? asked : []) form.append("question", question);
  const range = $("page-range").value.trim();
  if (range) form.append("pages", range);
  form.append("stream", "true");
  const started = performance.now();
  progressStatus();
  try {
    const response = await fetch("/v1/documents", {
      method: "POST", body: form, headers: authHeaders(), signal: state.controller.signal,
    });
    if (!response.ok) {
      if (!needKey(response)) {
        const message = await errorMessage(response);
        showError(message);
        setStatus(`The request was refused: ${message}`);
      }
      return;
    }
    const finished = await readEvents(response, onEvent);
    if (finished) {
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      const failed = [...state.cards.values()].filter((card) => card.box.classList.contains("failed")).length;
      setStatus(`Done: ${plural(state.done, "answer")}${failed ? `, ${failed} failed` : ""}, in ${seconds} s.`);
    }
  } catch (error) {
    if (error.name === "AbortError") {
      stopped();
    } else {
      showError(`The connection failed: ${error.message}`);
      setStatus("The connection to the server failed.");
    }
  } finally {
    state.running = false;
    state.controller = null;
    updateButtons();
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

function stopped() {
  for (const card of state.cards.values()) {
    if (!card.box.classList.contains("done") && !card.box.classList.contains("failed")) {
      card.box.classList.add("stopped");
      card.meta.textContent = "stopped";
    }
  }
  setStatus(`Stopped after ${state.done} of ${plural(state.expected, "answer")}; the server dropped the rest.`);
}

// Server-sent events from a fetch body: blocks separated by a blank line, each "data: <json>". True once
// the stream says it is complete ([DONE]); false when it ended early (an error event said why).
async function readEvents(response, handle) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data: ")).map((line) => line.slice(6)).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return true;
      handle(JSON.parse(data));
    }
  }
}

function onEvent(event) {
  if (event.type === "delta") {
    cardFor(event.page, event.prompt).text.append(event.text);
  } else if (event.type === "record") {
    finishCard(event.record);
    state.done += 1;
    progressStatus();
  } else if (event.type === "done") {
    state.json = event.json;
    state.markdown = event.markdown;
    $("json").textContent = state.json;
    $("json-box").hidden = false;
  } else if (event.type === "error") {
    showError(event.error.message);
    setStatus(`The request failed: ${event.error.message}`);
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

// --- the results -------------------------------------------------------------------------------------------

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

// Named as `monkey ... --out DIR` names its files: report.pdf -> report.pdf.json, report.pdf.md.
function download(text, extension, type) {
  const name = `${state.file ? state.file.name : "document"}${extension}`;
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  $("copied").textContent = `saved as ${name}`;
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
    if (!state.running) chooseFile(event.dataTransfer.files[0]);
  });
  $("page-range").addEventListener("change", showPreview);
  for (const radio of document.querySelectorAll('input[name="task"]')) {
    radio.addEventListener("change", () => {
      $("questions-label").hidden = chosenTask() !== "ask";
      $("run").textContent = chosenTask() === "ask" ? "Ask" : chosenTask() === "caption" ? "Caption" : "Read";
      if (!state.running) idleStatus();
    });
  }
  $("api-key").addEventListener("change", () => {
    watchHealth();
    if (state.file) showPreview();
  });
  $("ask").addEventListener("submit", run);
  $("stop").addEventListener("click", stop);
  $("copy").addEventListener("click", copyJson);
  $("download-json").addEventListener("click", () => download(state.json, ".json", "application/json"));
  $("download-md").addEventListener("click", () => download(state.markdown, ".md", "text/markdown"));
  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer").addEventListener("click", (event) => {
    if (event.target === $("viewer")) closeViewer(); // a click on the backdrop
  });
  watchHealth();
}

wire();
