// The Limenex approval inbox. Every value from the server is shown with textContent, never
// parsed as HTML: a request's params are whatever the agent sent.
"use strict";

(function () {
  const TOKEN = "limenex.token";
  const NAME = "limenex.approver";
  const POLL_MS = 10000;

  const $ = (id) => document.getElementById(id);
  const signin = $("signin");
  const inbox = $("inbox");
  const list = $("requests");
  const empty = $("empty");
  const status = $("status");
  let timer = null;

  function say(text, isError) {
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  function token() {
    return sessionStorage.getItem(TOKEN) || "";
  }

  function approver() {
    return sessionStorage.getItem(NAME) || "";
  }

  async function api(path, options) {
    const init = Object.assign({ cache: "no-store", credentials: "omit" }, options || {});
    init.headers = Object.assign({ Authorization: "Bearer " + token() }, init.headers || {});
    const response = await fetch(path, init);
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (response.status === 401) {
      signOut("The token was refused. Sign in again.");
      throw new Error("unauthorized");
    }
    return { ok: response.ok, status: response.status, body: body };
  }

  function when(epochSeconds) {
    if (typeof epochSeconds !== "number") return "—";
    return new Date(epochSeconds * 1000).toLocaleString();
  }

  function untilText(epochSeconds) {
    const minutes = Math.round((epochSeconds * 1000 - Date.now()) / 60000);
    if (minutes <= 0) return "expiring now";
    if (minutes < 120) return "in " + minutes + " min";
    return "in " + Math.round(minutes / 60) + " h";
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function row(dl, label, value) {
    dl.append(element("dt", "", label));
    const dd = element("dd");
    if (value instanceof Node) dd.append(value);
    else dd.textContent = value;
    dl.append(dd);
  }

  function card(request) {
    const item = element("li", "request");
    item.dataset.requestId = request.id;
    const headingId = "req-" + Math.random().toString(36).slice(2);
    const article = element("article");
    article.setAttribute("aria-labelledby", headingId);
    const shown = request.display;
    const heading = element("h3", "", shown.skill_id + " — " + shown.agent_id);
    heading.id = headingId;
    article.append(heading);

    const dl = element("dl");
    row(dl, "Skill", shown.skill_id);
    row(dl, "Agent", shown.agent_id);
    row(dl, "Reason", shown.reason);
    row(dl, "Params", element("pre", "", shown.params));
    row(dl, "Exact decimals", shown.decimals);
    row(dl, "Runs", shown.action);
    row(dl, "Policy", element("pre", "", shown.policy));
    row(dl, "Requested", when(request.created_at));
    row(dl, "Expires", when(request.expires_at) + " (" + untilText(request.expires_at) + ")");
    row(dl, "Request id", request.id);
    article.append(dl);

    const noteId = headingId + "-note";
    const noteLabel = element("label", "", "Note (optional)");
    noteLabel.htmlFor = noteId;
    const note = element("textarea");
    note.id = noteId;
    note.rows = 2;
    note.maxLength = 4000;
    article.append(noteLabel, note);

    const actions = element("div", "actions");
    const approve = element("button", "approve", "Approve");
    const deny = element("button", "deny", "Deny");
    for (const button of [approve, deny]) {
      button.type = "button";
      button.setAttribute("aria-describedby", headingId);
    }
    approve.addEventListener("click", () => decide(request, "approve", note.value, item));
    deny.addEventListener("click", () => decide(request, "deny", note.value, item));
    actions.append(approve, deny);
    article.append(actions);
    item.append(article);
    return item;
  }

  // Keep the cards already shown (and the notes typed in them); add new ones, drop gone ones.
  function render(requests) {
    const shown = new Map();
    for (const item of Array.from(list.children)) shown.set(item.dataset.requestId, item);
    const wanted = new Set(requests.map((r) => r.id));
    for (const [id, item] of shown) {
      if (!wanted.has(id)) item.remove();
    }
    for (const request of requests) {
      if (!shown.has(request.id)) list.append(card(request));
    }
    empty.hidden = requests.length > 0;
  }

  async function refresh() {
    if (!token()) return;
    try {
      const result = await api("/api/requests");
      if (result.ok && Array.isArray(result.body)) {
        render(result.body);
      } else {
        say("Could not load the requests: " + errorText(result), true);
      }
    } catch (e) {
      if (e.message !== "unauthorized") say("Could not reach the server.", true);
    }
  }

  function errorText(result) {
    if (result.body && typeof result.body.error === "string") return result.body.error;
    return "HTTP " + result.status;
  }

  async function decide(request, action, note, item) {
    const buttons = item.querySelectorAll("button");
    buttons.forEach((b) => (b.disabled = true));
    const what = request.display.skill_id + " for " + request.display.agent_id;
    try {
      const result = await api(
        "/api/requests/" + encodeURIComponent(request.id) + "/" + action,
        {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ by: approver(), note: note }),
        },
      );
      if (result.ok) {
        say((action === "approve" ? "Approved: " : "Denied: ") + what + " (request " +
          request.id + ").", false);
      } else {
        say("Not done: " + errorText(result), true);
      }
    } catch (e) {
      if (e.message !== "unauthorized") say("Could not reach the server.", true);
    } finally {
      buttons.forEach((b) => (b.disabled = false));
    }
    await refresh();
  }

  function showInbox() {
    signin.hidden = true;
    inbox.hidden = false;
    $("who").textContent = approver();
    refresh();
    if (timer === null) timer = setInterval(refresh, POLL_MS);
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN);
    if (timer !== null) clearInterval(timer);
    timer = null;
    list.replaceChildren();
    inbox.hidden = true;
    signin.hidden = false;
    $("approver").value = approver();
    say(message || "", Boolean(message));
    $("token").focus();
  }

  signin.addEventListener("submit", (event) => {
    event.preventDefault();
    const tokenValue = $("token").value.trim();
    const name = $("approver").value.trim();
    if (!tokenValue || !name) {
      say("Enter the token and your name.", true);
      return;
    }
    sessionStorage.setItem(TOKEN, tokenValue);
    sessionStorage.setItem(NAME, name);
    $("token").value = "";
    say("", false);
    showInbox();
  });
  $("refresh").addEventListener("click", refresh);
  $("signout").addEventListener("click", () => signOut(""));

  if (token() && approver()) showInbox();
  else signOut("");
})();
