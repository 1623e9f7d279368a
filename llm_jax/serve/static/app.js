// The llm_jax page: a streaming chat and a blind two-model arena over the server's own API.
// Plain JS, no dependencies. Text is inserted as textContent (never as HTML).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const keyInput = $("#api-key");
keyInput.value = localStorage.getItem("llm_jax_api_key") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("llm_jax_api_key", keyInput.value.trim());
  init();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = keyInput.value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function notice(text) {
  const n = $("#notice");
  n.textContent = text || "";
  n.hidden = !text;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body.error) return `${resp.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `HTTP ${resp.status}`;
}

async function api(path, body) {
  const resp = await fetch(path, body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (resp.status === 503 && resp.headers.get("Retry-After")) {  // still compiling: try again then
    const text = await errorText(resp);
    notice("The server is starting (" + text + "); this page retries by itself.");
    setTimeout(init, 1000 * Math.min(10, Number(resp.headers.get("Retry-After")) || 5));
    throw new Error(text);
  }
  if (resp.status === 401) {
    notice("This server needs an API key: enter it at the top right.");
    keyInput.focus();
  }
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp.json();
}

// POSTs a streaming chat request; calls onDelta(text) per content delta. Returns the finish reason.
async function streamChat(path, body, onDelta, signal) {
  const resp = await fetch(path, { method: "POST", headers: headers(), signal,
    body: JSON.stringify({ ...body, stream: true }) });
  if (!resp.ok) {
    if (resp.status === 401) notice("This server needs an API key: enter it at the top right.");
    throw new Error(await errorText(resp));
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder("utf-8");  // {stream: true} below keeps split multi-byte characters whole
  let buffer = "", finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const c of chunk.choices || []) {
          if (c.delta && c.delta.content) onDelta(c.delta.content);
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
  }
  return finish;
}

// ---- tabs ---------------------------------------------------------------------------------------

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const t of document.querySelectorAll(".tab")) {
      t.classList.toggle("active", t === tab);
      $("#" + t.dataset.panel).hidden = t !== tab;
    }
    if (tab.id !== "tab-chat") refreshBoard();
  });
}

// ---- chat ---------------------------------------------------------------------------------------

const turns = [];  // [{role, content}] of the current conversation (without the system prompt)
let controller = null;

function sampling() {
  const num = (id) => { const v = $("#" + id).value.trim(); return v === "" ? undefined : Number(v); };
  const body = {
    temperature: num("temperature"), top_p: num("top_p"), top_k: num("top_k"), min_p: num("min_p"),
    max_tokens: num("max_tokens"), repetition_penalty: num("repetition_penalty"),
    presence_penalty: num("presence_penalty"), frequency_penalty: num("frequency_penalty"), seed: num("seed"),
  };
  const stop = $("#stop").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (stop.length) body.stop = stop;
  return body;
}

function addMessage(role, text) {
  const box = $("#messages");
  const empty = $(".empty", box);
  if (empty) empty.remove();
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  box.appendChild(div);
  box.scrollTop = box.scrollHeight;
  return div;
}

function setBusy(busy) {
  $("#chat-send").disabled = busy;
  $("#chat-stop").disabled = !busy;
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("#chat-input");
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  turns.push({ role: "user", content: text });
  addMessage("user", text);
  const system = $("#system-prompt").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(turns);
  const div = addMessage("assistant streaming", "");
  let answer = "";
  controller = new AbortController();
  setBusy(true);
  let note = "";
  try {
    const finish = await streamChat("/v1/chat/completions", { model: $("#model-select").value, messages, ...sampling() },
      (delta) => { answer += delta; div.textContent = answer; $("#messages").scrollTop = 1e9; }, controller.signal);
    if (finish === "length") note = "[max tokens reached]";
  } catch (e) {
    note = e.name === "AbortError" ? "[stopped]" : "[error: " + e.message + "]";
  } finally {
    controller = null;
    setBusy(false);
    div.classList.remove("streaming");
    stats();
  }
  turns.push({ role: "assistant", content: answer });
  if (note) {
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = note;
    div.appendChild(meta);
  }
}

// The settings fold away (a phone shows the conversation first; a wide screen shows them open).
function showSettings(open) {
  $("#settings").hidden = !open;
  $("#settings-toggle").setAttribute("aria-expanded", String(open));
  $("#settings-toggle").textContent = open ? "Hide settings" : "Settings";
}
showSettings(!window.matchMedia("(max-width: 720px)").matches);
$("#settings-toggle").addEventListener("click", () => showSettings($("#settings").hidden));

$("#chat-form").addEventListener("submit", sendChat);
$("#chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) sendChat(e);  // isComposing: Chinese IMEs
});
$("#chat-stop").addEventListener("click", () => controller && controller.abort());
$("#chat-clear").addEventListener("click", () => {
  if (controller) controller.abort();
  turns.length = 0;
  $("#messages").replaceChildren();
  addMessage("system", "New conversation");
});

// ---- arena --------------------------------------------------------------------------------------

let battle = null;

function voteButtons(enabled) {
  for (const id of ["vote-a", "vote-b", "vote-tie", "vote-bad"]) $("#" + id).disabled = !enabled;
}

async function startBattle(event) {
  event.preventDefault();
  const prompt = $("#arena-prompt").value.trim();
  if (!prompt) return;
  voteButtons(false);
  $("#arena-start").disabled = true;
  $("#arena-result").textContent = "";
  for (const side of ["a", "b"]) {
    $(`#arena-${side} .name`).textContent = "";
    $(`#arena-${side} .answer`).textContent = "";
  }
  try {
    const { battle_id } = await api("/arena/battle", {});
    battle = { id: battle_id, prompt };
    const params = sampling();
    delete params.seed;
    await Promise.all(["a", "b"].map(async (side) => {
      const box = $(`#arena-${side} .answer`);
      box.classList.add("streaming");
      let text = "";
      try {
        await streamChat("/arena/chat", { battle_id, side, messages: [{ role: "user", content: prompt }], ...params },
          (delta) => { text += delta; box.textContent = text; });
      } finally {
        box.classList.remove("streaming");
      }
    }));
    voteButtons(true);
  } catch (e) {
    $("#arena-result").textContent = "Error: " + e.message;
  } finally {
    $("#arena-start").disabled = false;
  }
}

async function vote(winner) {
  if (!battle) return;
  voteButtons(false);
  try {
    const res = await api("/arena/vote", { battle_id: battle.id, winner, prompt: battle.prompt });
    $("#arena-a .name").textContent = "— " + res.model_a;
    $("#arena-b .name").textContent = "— " + res.model_b;
    const said = { a: "You preferred A", b: "You preferred B", tie: "You called it a tie", both_bad: "You found both bad" }[winner];
    $("#arena-result").textContent = `${said}: A was ${res.model_a}, B was ${res.model_b}.`;
    renderBoard(res.leaderboard);
    battle = null;
  } catch (e) {
    $("#arena-result").textContent = "Error: " + e.message;
  }
}

$("#arena-form").addEventListener("submit", startBattle);
for (const id of ["vote-a", "vote-b", "vote-tie", "vote-bad"]) {
  $("#" + id).addEventListener("click", (e) => vote(e.currentTarget.dataset.winner));
}

function renderBoard(rows) {
  for (const slot of document.querySelectorAll(".board-slot")) {
    const table = $("#board-template").content.firstElementChild.cloneNode(true);
    const body = $("tbody", table);
    rows.forEach((r, i) => {
      const tr = document.createElement("tr");
      for (const v of [i + 1, r.model, Math.round(r.rating), r.battles, r.wins, r.ties, r.both_bad, r.losses]) {
        const td = document.createElement("td");
        td.textContent = v;
        tr.appendChild(td);
      }
      body.appendChild(tr);
    });
    slot.replaceChildren(table);
  }
}

async function refreshBoard() {
  try {
    renderBoard((await api("/arena/leaderboard")).leaderboard);
  } catch (e) { /* shown by api() when it is the key */ }
}

// ---- start --------------------------------------------------------------------------------------

async function init() {
  notice("");
  try {
    const models = (await api("/v1/models")).data;
    const select = $("#model-select");
    const current = select.value;
    select.replaceChildren(...models.map((m) => {
      const o = document.createElement("option");
      o.value = o.textContent = m.id;
      return o;
    }));
    if (current) select.value = current;
    $("#tab-arena").title = models.length < 2 ? "the arena needs two models (two --workdir flags)" : "";
    refreshBoard();
  } catch (e) {
    if (!$("#notice").textContent) notice("Could not list the models: " + e.message);
  }
}


async function stats() {
  try {
    const resp = await fetch("/metrics?format=json", { headers: headers() });  // behind the key, if any
    if (!resp.ok) return;
    const m = await resp.json();
    const parts = Object.entries(m.models).map(([name, s]) =>
      `${name}: ${s.slots_used}/${s.slots} slots, ${s.tokens_per_s.toFixed(1)} tok/s`);
    $("#stats").textContent = parts.join(" · ");
  } catch (e) { /* server gone */ }
}

init();
stats();
setInterval(stats, 3000);
