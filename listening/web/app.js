/*
 * The listening-test page, for both kinds of test that `listening_test.py build` writes.
 *
 * test.js sets window.LISTENING_TEST (the pages, stimuli and texts); each audio/<id>.js sets
 * window.LISTENING_AUDIO[id] to a base64 FLAC file. Audio arrives through <script> tags because
 * browsers refuse fetch() on file:// pages, so the same folder works from a disk and from any
 * static web server. Playback uses the Web Audio API: a loop repeats without a gap, and the
 * stimuli of a mixing page run in sync, so switching between them keeps the playback position.
 *
 * Progress and answers live in localStorage under one key per test, so a reload resumes where
 * the participant stopped. Everything rated is presented in an order drawn from a seed (random
 * per participant, or ?seed=N in the address), which is stored with the answers.
 */
(function () {
  "use strict";

  const TEST = window.LISTENING_TEST;
  const app = document.getElementById("app");
  const params = new URLSearchParams(window.location.search);
  const STORAGE_KEY = TEST ? "loopmix-listening-test:" + TEST.id : null;
  /** Result columns: the first eight are the analysis's; the rest say where each answer came from. */
  const COLUMNS = ["participant", "session", "page", "stimulus", "system", "attribute", "score", "time",
                   "test", "kind", "song", "position", "seed", "seconds_on_page"];
  const SWITCH_SECONDS = 0.005;  // gain ramp when switching stimuli: no click and no gap
  const START_DELAY = 0.05;      // lets every synced source be scheduled before the first sample

  // ---- seeded order -------------------------------------------------------------------------

  /** mulberry32: a small 32-bit generator; one seed gives the same sequence in every browser. */
  function randomStream(seed) {
    let a = seed >>> 0;
    return function () {
      a = (a + 0x6D2B79F5) >>> 0;
      let t = a;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }

  /** A Fisher-Yates shuffled copy of items. */
  function shuffled(items, random) {
    const out = items.slice();
    for (let i = out.length - 1; i > 0; i--) {
      const j = Math.floor(random() * (i + 1));
      [out[i], out[j]] = [out[j], out[i]];
    }
    return out;
  }

  function indices(n) { return Array.from({length: n}, (_, i) => i); }
  function randomUint32() { return crypto.getRandomValues(new Uint32Array(1))[0]; }
  function randomHex(bytes) {
    return Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) => b.toString(16).padStart(2, "0")).join("");
  }

  /**
   * The pages one participant sees, in order. Loops: one page per stimulus, all stimuli shuffled
   * together. Mixing: the songs shuffled, each song's attributes on consecutive pages in the test's
   * order (its audio is decoded once for them), the stimuli shuffled anew on every page.
   */
  function planPages(seed) {
    const random = randomStream(seed);
    if (TEST.kind === "loops") {
      return shuffled(indices(TEST.stimuli.length), random).map((stimulus) => ({stimuli: [stimulus]}));
    }
    const pages = [];
    for (const song of shuffled(indices(TEST.songs.length), random)) {
      TEST.attributes.forEach((_, attribute) => {
        pages.push({song, attribute, stimuli: shuffled(indices(TEST.songs[song].stimuli.length), random)});
      });
    }
    return pages;
  }

  // ---- saved state --------------------------------------------------------------------------

  let state = readState();

  function readState() {
    try {
      return JSON.parse(localStorage.getItem(STORAGE_KEY));
    } catch (err) {
      return null;
    }
  }

  function saveState() { localStorage.setItem(STORAGE_KEY, JSON.stringify(state)); }

  function startSession(participant) {
    const given = params.get("seed");
    const seed = given !== null && /^\d+$/.test(given) ? Number(given) >>> 0 : randomUint32();
    state = {
      participant, seed, session: randomHex(8), started: new Date().toISOString(), finished: null,
      stage: TEST.kind === "loops" && TEST.familiarisation.length ? "familiarise" : "rate",
      pages: planPages(seed), position: 0, draft: null, ratings: [], posted: false,
    };
    saveState();
  }

  /** The answers in progress on the current page (restored after a reload). */
  function currentDraft() {
    if (!state.draft || state.draft.position !== state.position) {
      state.draft = {position: state.position, opened: Date.now(), scores: {}, played: [], unlocked: false};
    }
    return state.draft;
  }

  function record(pageId, song, attribute, stimuli, scores) {
    const time = new Date().toISOString();
    const seconds = Math.round((Date.now() - state.draft.opened) / 100) / 10;
    for (const stimulus of stimuli) {
      state.ratings.push({
        participant: state.participant, session: state.session, page: pageId, stimulus: stimulus.id,
        system: stimulus.system, attribute, score: scores[stimulus.id], time, test: TEST.id, kind: TEST.kind, song,
        position: state.position + 1, seed: state.seed, seconds_on_page: seconds,
      });
    }
    state.position += 1;
    state.draft = null;
    if (state.position >= state.pages.length) {
      state.stage = "done";
      state.finished = time;
    }
    saveState();
    route();
  }

  // ---- audio --------------------------------------------------------------------------------

  let context = null;
  const decodedClips = new Map();  // clip id -> Promise<AudioBuffer>

  /** The playback context, made (or resumed) on a click: browsers only start audio after one. */
  function audioContext() {
    if (!context) context = new AudioContext();
    if (context.state === "suspended") context.resume();
    return context;
  }

  /** Whether the page has been clicked since it loaded, which lets it start audio on its own. */
  function hadClick() {
    return navigator.userActivation ? navigator.userActivation.hasBeenActive : context !== null;
  }

  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = src;
      script.onload = () => { script.remove(); resolve(); };
      script.onerror = () => { script.remove(); reject(new Error("cannot load " + src)); };
      document.head.append(script);
    });
  }

  async function decodeClip(clip) {
    await loadScript(clip.audio);
    const text = window.LISTENING_AUDIO[clip.id];
    delete window.LISTENING_AUDIO[clip.id];
    const binary = atob(text);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    // An offline context at the clip's own rate decodes without resampling and needs no click.
    return new OfflineAudioContext(1, 1, TEST.sample_rate).decodeAudioData(bytes.buffer);
  }

  /** The decoded clip; decoded clips not named in keep are released first. */
  function decoded(clip, keep) {
    for (const id of decodedClips.keys()) {
      if (!keep.includes(id)) decodedClips.delete(id);
    }
    if (!decodedClips.has(clip.id)) decodedClips.set(clip.id, decodeClip(clip));
    return decodedClips.get(clip.id);
  }

  /** One clip played on a loop; remembers how long it has been heard. */
  class LoopPlayer {
    constructor(buffer) {
      this.buffer = buffer;
      this.source = null;
      this.heard = 0;
      this.since = 0;
    }

    get playing() { return this.source !== null; }

    listened() { return this.heard + (this.source ? Math.max(0, context.currentTime - this.since) : 0); }

    start() {
      const ctx = audioContext();
      this.source = ctx.createBufferSource();
      this.source.buffer = this.buffer;
      this.source.loop = true;
      this.source.connect(ctx.destination);
      this.since = ctx.currentTime + START_DELAY;
      this.source.start(this.since);
    }

    stop() {
      if (!this.source) return;
      this.heard = this.listened();
      this.source.stop();
      this.source.disconnect();
      this.source = null;
    }
  }

  /**
   * Several clips of equal length looping in sync, one audible at a time: switching ramps the
   * gains over a few milliseconds, so the new clip continues at the same position without a gap.
   */
  class SyncedPlayer {
    constructor(buffers) {
      this.buffers = buffers;  // Map id -> AudioBuffer
      this.duration = Math.min(...Array.from(buffers.values(), (b) => b.duration));
      this.offset = 0;
      this.voices = null;
      this.current = null;
      this.startedAt = 0;
    }

    get playing() { return this.voices !== null; }

    position() {
      if (!this.voices) return this.offset;
      const elapsed = Math.max(0, context.currentTime - this.startedAt);
      return (this.offset + elapsed) % this.duration;
    }

    play(id) {
      const ctx = audioContext();
      if (!this.voices) {
        this.voices = new Map();
        this.startedAt = ctx.currentTime + START_DELAY;
        for (const [key, buffer] of this.buffers) {
          const source = ctx.createBufferSource();
          source.buffer = buffer;
          source.loop = true;
          source.loopEnd = this.duration;
          const gain = ctx.createGain();
          gain.gain.value = key === id ? 1 : 0;
          source.connect(gain).connect(ctx.destination);
          source.start(this.startedAt, this.offset);
          this.voices.set(key, {source, gain});
        }
      } else {
        const now = ctx.currentTime;
        for (const [key, voice] of this.voices) {
          const level = voice.gain.gain;
          level.cancelScheduledValues(now);
          level.setValueAtTime(level.value, now);
          level.linearRampToValueAtTime(key === id ? 1 : 0, now + SWITCH_SECONDS);
        }
      }
      this.current = id;
    }

    stop() {
      if (!this.voices) return;
      this.offset = this.position();
      for (const voice of this.voices.values()) {
        voice.source.stop();
        voice.source.disconnect();
        voice.gain.disconnect();
      }
      this.voices = null;
      this.current = null;
    }

    seek(seconds) {
      const current = this.current;
      this.stop();
      this.offset = Math.min(Math.max(0, seconds), this.duration);
      if (current) this.play(current);
    }
  }

  // ---- page building ------------------------------------------------------------------------

  let player = null;  // what is playing now; stopped whenever the view changes
  let ticker = null;  // the current view's clock

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "class") node.className = value;
      else if (value === true) node.setAttribute(key, "");
      else if (value !== false && value !== null && value !== undefined) node.setAttribute(key, value);
    }
    node.append(...children.flat(Infinity).filter((child) => child !== null && child !== undefined));
    return node;
  }

  function show(...nodes) {
    if (player) player.stop();
    player = null;
    clearInterval(ticker);
    app.replaceChildren(...nodes.flat(Infinity));
  }

  function clock(seconds) {
    const whole = Math.floor(seconds);
    return Math.floor(whole / 60) + ":" + String(whole % 60).padStart(2, "0");
  }

  function progress(done, total, label) {
    return [
      el("p", {class: "muted", id: "progress-label"}, label),
      el("div", {class: "progress"}, el("div", {style: `width: ${(100 * done / total).toFixed(1)}%`})),
    ];
  }

  function showError(message) {
    app.prepend(el("p", {class: "error", role: "alert"}, message));
  }

  // ---- views --------------------------------------------------------------------------------

  function route() {
    if (!state) welcomeView();
    else if (state.stage === "familiarise") familiariseView();
    else if (state.stage === "rate" && TEST.kind === "loops") loopPageView();
    else if (state.stage === "rate") mixingPageView();
    else finishView();
  }

  function welcomeView() {
    const input = el("input", {type: "text", id: "participant", value: params.get("participant") || "",
                               autocomplete: "off"});
    const start = el("button", {class: "primary", id: "start"}, "Start");
    start.addEventListener("click", () => {
      audioContext();
      startSession(input.value.trim() || "anonymous-" + randomHex(3));
      route();
    });
    show(
      el("h1", {}, TEST.title),
      TEST.instructions.map((paragraph) => el("p", {}, paragraph)),
      el("p", {class: "muted"}, "Please use headphones in a quiet room and set a comfortable volume before you start."),
      el("div", {class: "row"}, el("label", {for: "participant"}, "Your name or participant code:"), input),
      el("div", {class: "actions"}, start),
    );
  }

  async function familiariseView() {
    const clips = TEST.familiarisation;
    const heard = new Set();
    const next = el("button", {class: "primary", id: "next", disabled: true}, "Start the test");
    next.addEventListener("click", () => { state.stage = "rate"; saveState(); route(); });
    const buttons = clips.map((clip, i) => el("button", {class: "play", "data-clip": clip.id, disabled: true},
                                               `Play example ${i + 1}`));
    show(
      el("h2", {}, "Familiarisation"),
      el("p", {}, `Listen to these ${clips.length} examples first; they are not rated. Each plays on a loop ` +
                  "until you stop it."),
      buttons.map((button) => el("div", {class: "row"}, button)),
      el("div", {class: "actions"}, next),
    );
    const buffers = await Promise.all(clips.map((clip) => decoded(clip, clips.map((c) => c.id))));
    let playingIndex = null;
    buttons.forEach((button, i) => {
      button.disabled = false;
      button.dataset.seconds = buffers[i].duration.toFixed(3);
      button.addEventListener("click", () => {
        if (player) player.stop();
        buttons.forEach((b) => b.classList.remove("active"));
        player = null;
        playingIndex = playingIndex === i ? null : i;
        if (playingIndex === null) return;
        player = new LoopPlayer(buffers[i]);
        player.start();
        button.classList.add("active");
        heard.add(i);
        next.disabled = heard.size < clips.length;
      });
    });
  }

  async function loopPageView() {
    const draft = currentDraft();
    const page = state.pages[state.position];
    const stimulus = TEST.stimuli[page.stimuli[0]];
    const pageId = "loop-" + String(state.position + 1).padStart(2, "0");
    const total = state.pages.length;
    const play = el("button", {class: "play", id: "play", "data-stimulus": stimulus.id, disabled: true}, "Play");
    const status = el("span", {class: "muted", id: "status"}, "Loading the audio…");
    const next = el("button", {class: "primary", id: "next", disabled: true},
                    state.position + 1 < total ? "Next" : "Finish");
    const radios = TEST.scale.map(([value]) => el("input", {type: "radio", name: "rating", value: String(value),
                                                            disabled: true}));
    const labels = TEST.scale.map(([value, label], i) => el("label", {class: "disabled"}, radios[i],
                                                            el("strong", {}, String(value)), el("span", {}, label)));
    const canGoOn = () => draft.unlocked && draft.scores[stimulus.id] !== undefined;
    radios.forEach((radio) => {
      radio.checked = String(draft.scores[stimulus.id]) === radio.value;
      radio.addEventListener("change", () => {
        draft.scores[stimulus.id] = Number(radio.value);
        saveState();
        next.disabled = !canGoOn();
      });
    });
    next.addEventListener("click", () => record(pageId, "", TEST.attribute, [stimulus], draft.scores));
    show(
      progress(state.position, total, `Loop ${state.position + 1} of ${total}`),
      el("p", {class: "question"}, TEST.question),
      el("div", {class: "row"}, play, status),
      el("div", {class: "likert", role: "radiogroup"}, labels),
      el("p", {class: "muted", id: "hint"}, draft.unlocked || TEST.min_listen_seconds <= 0 ? "" :
        `The scale unlocks after ${Math.ceil(TEST.min_listen_seconds)} s of listening.`),
      el("div", {class: "actions"}, next),
    );
    const upcoming = state.pages[state.position + 1];
    const keep = [stimulus.id, ...(upcoming ? [TEST.stimuli[upcoming.stimuli[0]].id] : [])];
    const buffer = await decoded(stimulus, keep);
    if (upcoming) decoded(TEST.stimuli[upcoming.stimuli[0]], keep);  // ready before the participant is
    play.dataset.seconds = buffer.duration.toFixed(3);
    const loop = new LoopPlayer(buffer);
    const unlock = () => {
      draft.unlocked = true;
      saveState();
      radios.forEach((radio) => { radio.disabled = false; });
      labels.forEach((label) => label.classList.remove("disabled"));
      document.getElementById("hint").textContent = "";
      next.disabled = !canGoOn();
    };
    const toggle = () => {
      if (loop.playing) loop.stop(); else loop.start();
      play.textContent = loop.playing ? "Stop" : "Play";
      play.classList.toggle("active", loop.playing);
    };
    play.disabled = false;
    play.addEventListener("click", toggle);
    player = loop;
    ticker = setInterval(() => {
      status.textContent = `${loop.playing ? "Playing" : "Stopped"}; heard for ${clock(loop.listened())} ` +
                           `(the loop lasts ${clock(buffer.duration)})`;
      if (!draft.unlocked && loop.listened() >= TEST.min_listen_seconds) unlock();
    }, 200);
    if (draft.unlocked || TEST.min_listen_seconds <= 0) unlock();
    if (hadClick()) toggle();  // autoplay, unless no click has allowed audio yet (after a reload)
  }

  async function mixingPageView() {
    const draft = currentDraft();
    const page = state.pages[state.position];
    const song = TEST.songs[page.song];
    const attribute = TEST.attributes[page.attribute];
    const stimuli = page.stimuli.map((i) => song.stimuli[i]);
    const total = state.pages.length;
    const letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    const next = el("button", {class: "primary", id: "next", disabled: true},
                    state.position + 1 < total ? "Next page" : "Finish");
    const hint = el("p", {class: "muted", id: "hint"}, "");
    const canGoOn = () => stimuli.every((s) => draft.played.includes(s.id) && draft.scores[s.id] !== undefined);
    const refresh = () => {
      const missing = stimuli.filter((s) => !draft.played.includes(s.id) || draft.scores[s.id] === undefined).length;
      hint.textContent = missing ? `Play and rate every mix to go on (${missing} left).` : "";
      next.disabled = !canGoOn();
    };
    const playButtons = [];
    const playButton = (id, label) => {
      const button = el("button", {class: "play", "data-clip": id, disabled: true}, label);
      playButtons.push(button);
      return button;
    };
    const rows = stimuli.map((stimulus, i) => {
      const value = draft.scores[stimulus.id];
      const slider = el("input", {type: "range", min: "0", max: "100", step: "1", "data-stimulus": stimulus.id,
                                  value: String(value === undefined ? 50 : value),
                                  "aria-label": `${attribute.name} of mix ${letters[i]}`});
      const shown = el("output", {}, value === undefined ? "–" : String(value));
      slider.addEventListener("input", () => {
        draft.scores[stimulus.id] = Number(slider.value);
        shown.textContent = slider.value;
        saveState();
        refresh();
      });
      return el("div", {class: "stimulus"}, playButton(stimulus.id, `Mix ${letters[i]}`), slider, shown);
    });
    const stop = el("button", {id: "stop", disabled: true}, "Stop");
    const seek = el("input", {type: "range", id: "seek", min: "0", max: "1", step: "0.1", value: "0", disabled: true,
                              "aria-label": "Playback position"});
    const time = el("span", {class: "muted", id: "time"}, "Loading the audio…");
    next.addEventListener("click", () => record(song.name + "/" + attribute.name, song.name, attribute.name,
                                                stimuli, draft.scores));
    show(
      progress(state.position, total, `Page ${state.position + 1} of ${total}`),
      el("h2", {}, attribute.name),
      el("p", {class: "question"}, attribute.question),
      el("div", {class: "reference"},
         el("span", {}, "Reference, the unmixed stems: "),
         song.stems.map((stem) => playButton(stem.id, stem.name))),
      el("div", {class: "scale-labels"}, el("span"), TEST.scale_labels.map((label) => el("span", {}, label)), el("span")),
      rows,
      el("div", {class: "transport"}, stop, seek, time),
      hint,
      el("div", {class: "actions"}, next),
    );
    refresh();
    const clips = [...song.stimuli, ...song.stems];
    const keep = clips.map((clip) => clip.id);
    const buffers = new Map();
    for (const clip of clips) buffers.set(clip.id, await decoded(clip, keep));
    const synced = new SyncedPlayer(buffers);
    player = synced;
    seek.max = synced.duration.toFixed(2);
    const mark = () => playButtons.forEach((b) => b.classList.toggle("active", b.dataset.clip === synced.current));
    for (const button of playButtons) {
      button.disabled = false;
      button.dataset.seconds = buffers.get(button.dataset.clip).duration.toFixed(3);
      button.addEventListener("click", () => {
        synced.play(button.dataset.clip);
        if (!draft.played.includes(button.dataset.clip)) draft.played.push(button.dataset.clip);
        saveState();
        mark();
        refresh();
      });
    }
    stop.disabled = false;
    seek.disabled = false;
    stop.addEventListener("click", () => { synced.stop(); synced.offset = 0; mark(); });
    seek.addEventListener("change", () => synced.seek(Number(seek.value)));
    ticker = setInterval(() => {
      const position = synced.position();
      if (document.activeElement !== seek) seek.value = position.toFixed(1);
      time.textContent = `${clock(position)} / ${clock(synced.duration)}`;
    }, 200);
  }

  function resultsDocument() {
    return {
      format: "loopmix-listening-test", version: 1,
      test: {id: TEST.id, kind: TEST.kind, title: TEST.title},
      participant: state.participant, session: state.session, seed: state.seed,
      started: state.started, finished: state.finished, user_agent: navigator.userAgent,
      columns: COLUMNS, ratings: state.ratings,
    };
  }

  function csvText() {
    const cell = (value) => {
      const text = value === null || value === undefined ? "" : String(value);
      return /[",\r\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
    };
    const lines = [COLUMNS.join(","), ...state.ratings.map((row) => COLUMNS.map((column) => cell(row[column])).join(","))];
    return lines.join("\r\n") + "\r\n";
  }

  function download(name, text, type) {
    const url = URL.createObjectURL(new Blob([text], {type}));
    const link = el("a", {href: url, download: name});
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  /** POST the answers as a CORS "simple request" (a text/plain body holding the JSON): no preflight. */
  async function postResults(status, retry) {
    status.textContent = "Sending your answers…";
    retry.hidden = true;
    try {
      const response = await fetch(TEST.post_url, {
        method: "POST", headers: {"Content-Type": "text/plain;charset=UTF-8"}, body: JSON.stringify(resultsDocument()),
      });
      if (!response.ok) throw new Error("the server answered " + response.status);
      state.posted = true;
      saveState();
      status.textContent = "Your answers have been sent.";
    } catch (err) {
      status.textContent = `Your answers could not be sent (${err.message}). Please download them and send the file.`;
      retry.hidden = false;
    }
  }

  function finishView() {
    const base = `${TEST.id}_${state.participant.replace(/[^\w.-]+/g, "_")}_${state.session}`;
    const json = el("button", {class: "primary", id: "download-json"}, "Download answers (JSON)");
    const csv = el("button", {id: "download-csv"}, "Download answers (CSV)");
    json.addEventListener("click", () => download(base + ".json", JSON.stringify(resultsDocument(), null, 1), "application/json"));
    csv.addEventListener("click", () => download(base + ".csv", csvText(), "text/csv"));
    const status = el("p", {id: "post-status"}, "");
    const retry = el("button", {id: "retry-post", hidden: true}, "Try sending again");
    const restart = el("button", {id: "new-participant"}, "Start a new participant");
    restart.addEventListener("click", () => {
      if (restart.dataset.armed) {
        localStorage.removeItem(STORAGE_KEY);
        state = null;
        route();
      } else {
        restart.dataset.armed = "yes";
        restart.textContent = "Clear these answers from this browser and start again";
      }
    });
    show(
      el("h1", {}, "Thank you!"),
      el("p", {}, `You gave ${state.ratings.length} ratings. They stay saved in this browser until you start a ` +
                  "new participant; download them and send the file to the experimenter."),
      el("div", {class: "actions"}, json, csv),
      TEST.post_url ? [status, retry] : [],
      el("div", {class: "actions"}, restart),
    );
    if (TEST.post_url) {
      retry.addEventListener("click", () => postResults(status, retry));
      if (state.posted) status.textContent = "Your answers have been sent.";
      else postResults(status, retry);
    }
  }

  window.addEventListener("error", (event) => showError("Error: " + event.message));
  window.addEventListener("unhandledrejection", (event) => showError("Error: " + (event.reason && event.reason.message || event.reason)));
  if (!TEST) {
    app.replaceChildren(el("p", {class: "error"}, "test.js is missing: rebuild the test with listening_test.py build."));
    return;
  }
  document.title = TEST.title;
  route();
})();
