// The inspector page: the next unlabelled part of the station's review queue, labelled by keyboard.
// It uses only the station's HTTP API (GET /review, GET /review/{id}/image, POST /labels, GET /stats) with the
// bearer token the inspector typed in, kept in this tab's sessionStorage and sent as the Authorization header,
// never in a URL (pictures are fetched with the header and shown as blob: URLs).
"use strict";

(() => {
  const TOKEN = "inspector.token";
  const NAME = "inspector.labeller";
  const $ = (id) => document.getElementById(id);

  let current = null;  // the item shown (GET /review's item), or null
  let busy = false;  // a label is being sent
  let pictureUrl = null;  // the blob: URL shown
  let pictureRequest = 0;  // the newest picture request (older answers are dropped)
  const skipped = new Set();  // inspection ids skipped in this tab

  class ApiError extends Error {
    constructor(status, detail) {
      super(`${status}: ${detail}`);
      this.status = status;
      this.detail = detail;
    }
  }

  async function api(path, options = {}) {
    const token = sessionStorage.getItem(TOKEN) || "";
    const headers = Object.assign({}, options.headers || {}, {Authorization: `Bearer ${token}`});
    const response = await fetch(path, Object.assign({}, options, {headers, cache: "no-store", credentials: "omit"}));
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = (await response.json()).detail || detail;
      } catch (_) { /* not JSON */ }
      if (response.status === 401) {
        logout(`The station did not accept the token (${detail}). Log in again.`);
      }
      throw new ApiError(response.status, detail);
    }
    return response;
  }

  const getJson = async (path) => (await api(path)).json();

  function showError(error) {
    $("error").textContent = error ? (error instanceof ApiError ? `Error ${error.message}` : String(error)) : "";
  }

  const when = (seconds) => new Date(seconds * 1000).toLocaleString();

  function randomId() {  // crypto.randomUUID needs a secure context; the station is plain HTTP on the line
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // --- log in / out -------------------------------------------------------------------------------------------
  async function login(event) {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN, token);
    sessionStorage.setItem(NAME, $("labeller").value.trim());
    $("token").value = "";
    $("login-error").textContent = "";
    await start();
  }

  function logout(message) {
    sessionStorage.removeItem(TOKEN);
    current = null;
    setPicture(null);
    $("review").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token").focus();
  }

  async function start() {
    if (!sessionStorage.getItem(TOKEN)) {
      logout("");
      return;
    }
    $("labeller").value = sessionStorage.getItem(NAME) || "";
    try {
      await refreshCounts();
    } catch (error) {
      if (error.status === 403) logout("This token's role may not review parts (it needs inspector or admin).");
      else if (error.status !== 401) logout(`The station cannot be reached: ${error.message}`);
      return;
    }
    $("login").hidden = true;
    $("review").hidden = false;
    $("logout").hidden = false;
    await showNext();
  }

  // --- counts -------------------------------------------------------------------------------------------------
  async function refreshCounts() {
    const [page, stats] = await Promise.all([getJson("/review?limit=1"), getJson("/stats")]);
    $("count-queued").textContent = page.queued;
    $("count-unlabelled").textContent = page.unlabelled;
    $("count-labelled").textContent = stats.labelled;
    const a = stats.agreement;
    $("count-agreement").textContent = a
      ? `${(100 * a.value).toFixed(1)} % (${a.successes}/${a.n}, ${(100 * a.low).toFixed(0)}–${(100 * a.high).toFixed(0)} %)`
      : "–";
  }

  // --- the part shown -----------------------------------------------------------------------------------------
  async function showNext() {
    const limit = Math.min(500, skipped.size + 1);
    const page = await getJson(`/review?labelled=false&limit=${limit}`);
    const item = page.items.find((i) => !skipped.has(i.inspection_id)) || null;
    show(item);
  }

  function show(item) {
    current = item;
    $("part").hidden = item === null;
    $("empty").hidden = item !== null;
    if (item === null) {
      setPicture(null);
      $("skipped-note").textContent = skipped.size ? ` (${skipped.size} skipped)` : "";
      $("unskip").hidden = skipped.size === 0;
      return;
    }
    $("part").dataset.inspectionId = item.inspection_id;
    $("part-id").textContent = item.part_id;
    $("inspection-id").textContent = item.inspection_id;
    setVerdict($("ai-verdict"), item.ai_verdict || "none (no model verdict)");
    $("score").textContent = item.score === null ? "–" : item.score.toFixed(3);
    setVerdict($("verdict"), item.verdict);
    $("mode").textContent = item.mode;
    $("queue-reason").textContent = item.queue_reason;
    $("model-id").textContent = item.model_id;
    $("decided-at").textContent = when(item.decided_at);
    $("history").textContent = item.labels.length
      ? item.labels.map((l) => `${l.verdict}${l.defect_type ? " " + l.defect_type : ""} by ${l.labeller} ${when(l.labelled_at)}`).join("; ")
      : "none";
    $("overlay").disabled = !item.has_defect_map;
    $("overlay-note").textContent = item.has_defect_map ? "" : "(this part has no defect map)";
    $("defect-type").value = "";
    loadPicture();
  }

  function setVerdict(element, verdict) {
    element.textContent = verdict;
    element.className = verdict === "fail" ? "verdict-fail" : verdict === "pass" ? "verdict-pass" : "";
  }

  function setPicture(url) {
    if (pictureUrl) URL.revokeObjectURL(pictureUrl);
    pictureUrl = url;
    if (url) $("picture").src = url;
    else $("picture").removeAttribute("src");
  }

  async function loadPicture() {
    const item = current;
    if (!item) return;
    const request = ++pictureRequest;
    if (!item.has_image) {
      setPicture(null);
      $("picture").alt = "no picture kept for this part";
      return;
    }
    const overlay = $("overlay").checked && item.has_defect_map;
    try {
      const response = await api(`/review/${encodeURIComponent(item.inspection_id)}/image${overlay ? "?overlay=1" : ""}`);
      const blob = await response.blob();
      if (request !== pictureRequest) return;  // another part or the toggle came meanwhile
      setPicture(URL.createObjectURL(blob));
      $("picture").dataset.overlay = response.headers.get("X-Overlay") || "none";
      $("picture").alt = `part ${item.part_id}${overlay ? " with its defect map" : ""}`;
    } catch (error) {
      showError(error);
    }
  }

  // --- labelling ----------------------------------------------------------------------------------------------
  async function label(verdict) {
    if (busy || !current) return;
    busy = true;
    setButtons(false);
    const item = current;
    const body = {inspection_id: item.inspection_id, verdict, message_id: randomId()};
    const defectType = $("defect-type").value;
    if (verdict === "fail" && defectType) body.defect_type = defectType;
    const name = sessionStorage.getItem(NAME);
    if (name) body.labeller = name;
    try {
      const answer = await (await api("/labels", {
        method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
      })).json();
      const l = answer.label;
      const last = $("last-label");
      last.textContent = `part ${item.part_id}: ${l.verdict}${l.defect_type ? " (" + l.defect_type + ")" : ""} ` +
        `by ${l.labeller} at ${when(l.labelled_at)} (AI said ${item.ai_verdict || "nothing"})`;
      last.dataset.inspectionId = l.inspection_id;
      showError(null);
      await Promise.all([refreshCounts(), showNext()]);
    } catch (error) {
      showError(error);
      if (error.status === 404) await showNext().catch(showError);  // gone from the queue meanwhile
    } finally {
      busy = false;
      setButtons(true);
    }
  }

  async function skip() {
    if (busy || !current) return;
    skipped.add(current.inspection_id);
    await showNext().catch(showError);
  }

  function setButtons(enabled) {
    for (const id of ["pass", "fail", "skip"]) $(id).disabled = !enabled;
  }

  function onKey(event) {
    if ($("review").hidden || event.ctrlKey || event.metaKey || event.altKey) return;
    const tag = event.target && event.target.tagName;
    if (tag === "INPUT" && event.target.type !== "checkbox") return;
    if (tag === "TEXTAREA") return;
    const key = event.key.toLowerCase();
    const select = $("defect-type");
    if (key === "p") label("pass");
    else if (key === "f") label("fail");
    else if (key === "s") skip();
    else if (key === "h" && !$("overlay").disabled) {
      $("overlay").checked = !$("overlay").checked;
      loadPicture();
    } else if (/^[0-9]$/.test(key) && Number(key) < select.options.length) select.selectedIndex = Number(key);
    else return;
    event.preventDefault();
  }

  // --- wiring -------------------------------------------------------------------------------------------------
  $("login-form").addEventListener("submit", (event) => { login(event).catch(showError); });
  $("logout").addEventListener("click", () => logout("Logged out."));
  $("pass").addEventListener("click", () => label("pass"));
  $("fail").addEventListener("click", () => label("fail"));
  $("skip").addEventListener("click", () => skip());
  $("overlay").addEventListener("change", () => loadPicture());
  $("defect-type").addEventListener("change", (event) => event.target.blur());  // keys label again at once
  $("unskip").addEventListener("click", () => { skipped.clear(); showNext().catch(showError); });
  document.addEventListener("keydown", onKey, true);  // capture: before a focused select's type-ahead
  start().catch(showError);
})();
