// The chat page. It talks to the same OpenAI-compatible API as any client: /v1/models, streamed
// /v1/chat/completions, or for an image generator /v1/images/generations. Conversations are kept in
// this browser (store.js); answers are shown as sanitised Markdown (markdown.js).
import { renderMarkdown } from "./markdown.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
// the server takes request bodies up to 8 MB, and later turns resend every image in the history
const MAX_IMAGE_BYTES = 4_000_000;
const NARROW = matchMedia("(max-width: 700px)");

let models = [];        // the /v1/models entries that write text or draw images (not the embedder)
let conversation;       // the open conversation (store.js); kept once it has a message
let attached = [];      // data: URIs of the images to send with the next message
let inFlight = null;    // the AbortController of the request being answered, if any

const keyInput = $("api-key");
keyInput.value = localStorage.getItem("plinth-api-key") || "";

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

// ---- the served models ------------------------------------------------------------------------
const chosen = () => models.find((m) => m.id === $("model").value);
const readsImages = () => (chosen()?.input_modalities || []).includes("image");
const drawsImages = () => (chosen()?.output_modalities || []).includes("image");

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) {
    models = [];
    $("model").replaceChildren(new Option("(enter the API key)", ""));
    return;
  }
  models = (await r.json()).data.filter((m) => !(m.output_modalities || []).includes("embeddings"));
  $("model").replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  pickModel();
}

function pickModel() {  // the open conversation's model while it is served; else the one selected
  if (models.some((m) => m.id === conversation.model)) $("model").value = conversation.model;
  conversation.model = $("model").value;
  const draws = drawsImages();
  $("attach").hidden = !readsImages();
  for (const element of document.querySelectorAll(".text-only")) element.hidden = draws;
  for (const element of document.querySelectorAll(".images-only")) element.hidden = !draws;
  $("prompt").placeholder = draws ? "Describe the images… (Enter draws; an empty prompt draws anything)"
                                  : "Ask something… (Enter sends, Shift+Enter for a new line)";
}

// ---- messages ---------------------------------------------------------------------------------
function thumbnail(url, className = "", alt = "attached image") {
  const img = document.createElement("img");
  img.src = url;
  img.alt = alt;
  img.className = className;
  return img;
}

function addMessage(message) {  // a stored message, or an error ({ role: "error", content })
  const div = document.createElement("div");
  div.className = "msg " + message.role;
  if (message.images) {  // an image generator's answer
    div.append(...message.images.map((url) => thumbnail(url, "drawn", "generated image")));
  } else if (message.role === "assistant") {
    renderMarkdown(div, message.content);
  } else if (typeof message.content === "string") {
    div.textContent = message.content || "(no prompt)";  // an image generator draws without one
  } else {  // OpenAI's content parts: images, then the text about them
    for (const part of message.content) {
      div.append(part.type === "image_url" ? thumbnail(part.image_url.url) : document.createTextNode(part.text));
    }
  }
  following(() => $("messages").appendChild(div));
  return div;
}

function following(change) {  // keeps the newest text in view, unless the reader has scrolled up
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  change();
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function fail(reply, err) {
  reply.className = "msg error";
  reply.textContent = "Error: " + err.message;
}

// ---- conversations ----------------------------------------------------------------------------
function keep(chat) {
  if (!chat.messages.length || chat.deleted) return;  // an empty conversation is not listed
  try {
    store.saveConversation(chat);
  } catch (err) {
    $("status").textContent = `not kept in this browser (${err.name}): its storage is full; ` +
                              "delete old conversations, or ones with many images";
  }
  showConversations();
}

function showConversations() {
  $("conversations").replaceChildren(...store.listConversations().map((c) => {
    const item = document.createElement("li");
    item.className = "conversation" + (c.id === conversation.id ? " current" : "");
    item.append(button(store.titleOf(c), "open", "Open this conversation", () => openConversation(c.id)),
                button("✎", "rename", "Rename", () => renameConversation(c)),
                button("×", "delete", "Delete", () => deleteConversation(c)));
    return item;
  }));
}

function button(text, className, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function show(chat) {  // an answer still streaming belongs to the conversation left: it stops
  if (inFlight) {
    inFlight.abort();
    end(inFlight);  // at once: the new conversation may ask before the stopped request has wound up
  }
  conversation = chat;
  store.setCurrentId(chat.id);
  $("messages").replaceChildren();
  $("status").textContent = "";
  for (const message of chat.messages) addMessage(message);
  $("system").value = chat.system;
  if (models.length) pickModel();
  showConversations();
  if (NARROW.matches) document.body.classList.add("no-sidebar");
}

const openConversation = (id) => show(store.loadConversation(id) || store.newConversation($("model").value));

function renameConversation(c) {
  const title = prompt("Rename the conversation", store.titleOf(c));
  if (title === null) return;
  const chat = c.id === conversation.id ? conversation : c;  // the open one is the object that is kept
  chat.title = title.trim() || null;
  keep(chat);
}

function deleteConversation(c) {
  if (!confirm(`Delete “${store.titleOf(c)}”?`)) return;
  store.deleteConversation(c.id);
  if (c.id !== conversation.id) return showConversations();
  conversation.deleted = true;  // not kept again when its stopped answer winds up
  const next = store.listConversations()[0];
  show(next || store.newConversation($("model").value, conversation.system));
}

// ---- asking -----------------------------------------------------------------------------------
function begin() {  // one request at a time; the stop button aborts it
  inFlight = new AbortController();
  $("send").disabled = true;
  $("stop").hidden = false;
  return inFlight;
}

function end(request) {
  if (inFlight !== request) return;  // a request already stopped when its conversation was left
  inFlight = null;
  $("send").disabled = false;
  $("stop").hidden = true;
}

function requestMessages(chat) {  // the system prompt, then the turns (an image generator's answers are not text)
  return [...(chat.system ? [{ role: "system", content: chat.system }] : []),
          ...chat.messages.filter((m) => !m.images)];
}

async function send(text) {
  const images = attached;
  attached = [];
  showAttached();
  // OpenAI's content parts: the images first, then the question about them
  const content = images.length ? [...images.map((url) => ({ type: "image_url", image_url: { url, detail: "auto" } })),
                                   ...(text ? [{ type: "text", text }] : [])] : text;
  const chat = conversation;  // the turn's, even if another conversation is opened meanwhile
  chat.messages.push({ role: "user", content });
  addMessage(chat.messages.at(-1));
  const reply = addMessage({ role: "assistant", content: "" });
  const request = begin();
  const started = performance.now();
  let tokens = 0, firstAt = null, answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: request.signal,
      body: JSON.stringify({ model: chat.model, messages: requestMessages(chat), stream: true,
                             temperature: parseFloat($("temperature").value),
                             max_tokens: parseInt($("max-tokens").value, 10) }),
    });
    if (!r.ok) throw new Error((await r.json()).error.message);
    for await (const chunk of events(r)) {
      const piece = chunk.choices.length ? chunk.choices[0].delta.content || "" : "";
      if (!piece) continue;
      tokens += 1;
      firstAt = firstAt || performance.now();
      answer += piece;
      following(() => renderMarkdown(reply, answer));
      const seconds = (performance.now() - firstAt) / 1000;
      $("status").textContent = `${tokens} tokens · ${seconds > 0 ? (tokens / seconds).toFixed(1) : "…"} tokens/s · ` +
                                `first token after ${((firstAt - started) / 1000).toFixed(2)} s`;
    }
    chat.messages.push({ role: "assistant", content: answer });
  } catch (err) {
    if (err.name === "AbortError") {  // stopped: the answer so far is kept, and the server frees the slot
      chat.messages.push({ role: "assistant", content: answer });
      if (chat === conversation) $("status").textContent = `stopped after ${tokens} tokens`;
    } else {
      fail(reply, err);
      chat.messages.pop();  // a failed turn is not kept: the next question goes without it
    }
  } finally {
    end(request);
    keep(chat);
  }
}

async function* events(response) {  // the JSON chunks of a server-sent event stream
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const parts = buffer.split("\n\n");
    buffer = parts.pop();
    for (const event of parts) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      yield chunk;
    }
  }
}

async function draw(text) {  // an image generator: each prompt gets its own images; earlier ones are not sent
  const chat = conversation;
  chat.messages.push({ role: "user", content: text });
  addMessage(chat.messages.at(-1));
  const reply = addMessage({ role: "assistant", images: [] });
  const request = begin();
  const started = performance.now();
  try {
    const r = await fetch("/v1/images/generations", {
      method: "POST", headers: headers(), signal: request.signal,
      body: JSON.stringify({ model: chat.model, prompt: text, n: parseInt($("n-images").value, 10),
                             response_format: "b64_json" }),
    });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error.message);
    const images = body.data.map((image) => "data:image/png;base64," + image.b64_json);
    chat.messages.push({ role: "assistant", images });
    following(() => reply.append(...images.map((url) => thumbnail(url, "drawn", "generated image"))));
    const seconds = (performance.now() - started) / 1000;
    $("status").textContent = `${images.length} images (${body.size}) in ${seconds.toFixed(2)} s`;
  } catch (err) {
    if (err.name !== "AbortError") fail(reply, err);
    else if (chat === conversation) $("status").textContent = "stopped";
    chat.messages.pop();
  } finally {
    end(request);
    keep(chat);
  }
}

// ---- attached images --------------------------------------------------------------------------
function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    const url = await readAsDataURL(file);
    if (url.length > MAX_IMAGE_BYTES) {
      addMessage({ role: "error", content: `Error: ${file.name} is ${(url.length / 1e6).toFixed(1)} MB once read; ` +
                                           `images up to ${MAX_IMAGE_BYTES / 1e6} MB can be sent: shrink it first` });
      continue;
    }
    attached.push(url);
  }
  showAttached();
}

function showAttached() {  // the images waiting to be sent, each with a button that removes it
  $("attachments").replaceChildren(...attached.map((url, i) => {
    const item = document.createElement("span");
    item.className = "thumb";
    item.append(thumbnail(url), button("×", "", "Remove this image", () => { attached.splice(i, 1); showAttached(); }));
    return item;
  }));
}

// ---- wiring -----------------------------------------------------------------------------------
$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  if (inFlight) return;
  const text = $("prompt").value.trim();
  if (drawsImages()) {  // an empty prompt is allowed: the generator draws without one
    $("prompt").value = "";
    draw(text);
    return;
  }
  if (!text && !attached.length) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("prompt").addEventListener("paste", (e) => {
  const images = [...e.clipboardData.files].filter((f) => f.type.startsWith("image/"));
  if (!readsImages() || !images.length) return;  // a text-only model: the paste goes on as usual
  e.preventDefault();
  attach(images);
});
$("attach").addEventListener("click", () => $("image-file").click());
$("image-file").addEventListener("change", (e) => {
  attach([...e.target.files]);
  e.target.value = "";  // so the same file can be picked again
});
$("stop").addEventListener("click", () => inFlight?.abort());
$("model").addEventListener("change", () => { conversation.model = $("model").value; pickModel(); keep(conversation); });
$("system").addEventListener("input", () => { conversation.system = $("system").value; keep(conversation); });
keyInput.addEventListener("change", () => { localStorage.setItem("plinth-api-key", keyInput.value); loadModels(); });
// a new conversation starts with the open one's system prompt, which it may then change
$("new-chat").addEventListener("click", () => show(store.newConversation($("model").value, conversation.system)));
$("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("no-sidebar"));

show(store.loadConversation(store.currentId()) || store.newConversation(null));
loadModels();
