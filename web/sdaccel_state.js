// SD Accel status model for the ComfyUI frontend: what each of our nodes shows.
//
// Pure logic, no DOM and no ComfyUI imports, so node's test runner covers it
// (tests/js/). web/sdaccel.js feeds it the server's `sdaccel.*` events and draws the result.
// Event payloads come from accel_core/hosts/comfy/events.py: every event carries `nodes`
// ({kind: node id} of the SD Accel nodes that built the sampled model) and `executing`
// (the node ComfyUI runs, e.g. the KSampler).

export const PREFIX = "sdaccel.";
export const EVENTS = ["node_applied", "compile_start", "compile_progress", "compile_end", "fallback", "lora_swap", "run_stats", "deepcache_stats"];

// node type -> the kind its Python side records (comfy/tracking.py, track)
export const NODE_KINDS = {
  SDAccelCompileUNet: "compile",
  SDAccelFP16Cast: "cast",
  SDAccelDeepCache: "deepcache",
  SDAccelLoRAHotSwap: "lora",
  SDAccelLCMLoRASampler: "lcm",
};

// events about one node kind (the others are about the whole run)
const EVENT_KIND = { compile_start: "compile", compile_progress: "compile", compile_end: "compile", fallback: "compile", lora_swap: "lora" };
const RUN_EVENTS = new Set(["run_stats", "deepcache_stats"]);
const TOAST_REPEAT_MS = 30000;

export function kindOf(type) {
  return NODE_KINDS[type] ?? (typeof type === "string" && type.startsWith("SDAccel") ? "other" : null);
}

export function isOurNodeType(type) {
  return kindOf(type) !== null;
}

/** Ids of the graph nodes an event is about. `graphNodes`: [{id, type}] of the open graph. */
export function targetsFor(event, detail, graphNodes) {
  const ours = graphNodes.filter((n) => isOurNodeType(n.type));
  const present = new Set(ours.map((n) => String(n.id)));
  const nodes = detail?.nodes ?? {};
  if (event === "node_applied") {
    return present.has(String(detail?.node)) ? [String(detail.node)] : [];
  }
  const kind = EVENT_KIND[event];
  if (kind) {
    const id = nodes[kind] != null ? String(nodes[kind]) : null;
    if (id !== null) return present.has(id) ? [id] : [];
    // A model built outside our node mapping: every node of that kind is the best guess.
    return ours.filter((n) => kindOf(n.type) === kind).map((n) => String(n.id));
  }
  if (RUN_EVENTS.has(event)) {
    const ids = Object.values(nodes).map(String);
    if (detail?.executing != null) ids.push(String(detail.executing)); // a sampler node of ours (LCM)
    return [...new Set(ids)].filter((id) => present.has(id));
  }
  return [];
}

export function formatSeconds(s) {
  if (s == null || !Number.isFinite(s)) return "";
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 120) return `${Math.round(s)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

export function formatRate(its) {
  if (its == null || !Number.isFinite(its)) return "";
  if (its >= 1) return `${its.toFixed(2)} it/s`;
  return its > 0 ? `${(1 / its).toFixed(2)} s/it` : "";
}

function blankState(id, kind) {
  return { id, kind, applied: false, compiles: {}, run: null, deepcache: null, lora: null, updatedAt: 0 };
}

function fromReport(report, prev = {}) {
  return { ...prev, status: report.status, backend: report.backend, requested: report.requested, mode: report.mode, report };
}

/** Where a node's compile(s) stand: idle | compiling | ready | fallback | eager. */
export function phaseOf(state) {
  const entries = Object.values(state?.compiles ?? {});
  if (!entries.length) return state?.applied ? "armed" : "idle";
  if (entries.some((c) => c.status === "compiling")) return "compiling";
  if (entries.some((c) => c.status === "eager")) return "eager";
  if (entries.some((c) => c.status === "partial")) return "fallback";
  return "ready";
}

export class StatusStore {
  constructor(now = () => Date.now()) {
    this.now = now;
    this.states = new Map();
    this._toasted = new Map();
  }

  clear() {
    this.states.clear();
  }

  get(id) {
    return this.states.get(String(id));
  }

  anyCompiling() {
    return [...this.states.values()].some((s) => phaseOf(s) === "compiling");
  }

  /** Apply one server event; returns {targets, toast} (toast is null when there is nothing to say). */
  apply(event, detail, graphNodes) {
    const targets = targetsFor(event, detail, graphNodes);
    const typeOf = new Map(graphNodes.map((n) => [String(n.id), n.type]));
    for (const id of targets) {
      const state = this.states.get(id) ?? blankState(id, kindOf(typeOf.get(id)));
      this._update(state, event, detail ?? {});
      state.updatedAt = this.now();
      this.states.set(id, state);
    }
    return { targets, toast: this._toast(event, detail ?? {}) };
  }

  _update(state, event, d) {
    const now = this.now();
    const target = d.target ?? d.report?.target ?? "UNet";
    const prev = state.compiles[target] ?? {};
    switch (event) {
      case "node_applied":
        state.applied = true;
        break;
      case "compile_start":
        state.compiles[target] = { status: "compiling", backend: d.backend, mode: d.mode, startedAt: now, done: 0, total: 0 };
        break;
      case "compile_progress":
        state.compiles[target] = { ...prev, status: "compiling", startedAt: prev.startedAt ?? now, done: d.done ?? 0, total: d.total ?? 0, wholeError: d.whole_error ?? null };
        break;
      case "compile_end":
      case "fallback":
        if (d.report) state.compiles[target] = fromReport(d.report, prev);
        break;
      case "run_stats":
        state.run = { its: d.its, steps: d.steps, seconds: d.seconds, compileSeconds: d.compile_seconds_in_run ?? 0 };
        // A reloaded tab learns the compile state here; a compile still in flight is not overwritten.
        if (d.report && d.report.status !== "pending" && prev.status !== "compiling" && (state.kind === "compile" || state.compiles[target])) {
          state.compiles[target] = fromReport(d.report, prev);
        }
        break;
      case "lora_swap":
        state.lora = { seconds: d.seconds, layers: d.layers_changed, loras: d.loras ?? [] };
        break;
      case "deepcache_stats":
        state.deepcache = { hits: d.hits ?? 0, full: d.full ?? 0, ratio: d.ratio ?? 0, disabled: d.disabled ?? null };
        break;
    }
  }

  _toast(event, d) {
    const t = toastFor(event, d);
    if (!t) return null;
    const key = `${t.summary}|${t.detail}`;
    const last = this._toasted.get(key);
    if (last !== undefined && this.now() - last < TOAST_REPEAT_MS) return null;
    this._toasted.set(key, this.now());
    return t;
  }
}

function fallbackEntries(report) {
  return Object.entries(report?.fallbacks ?? {});
}

// accel_core/compiling.py marks a unit whose own code stays eager while its children get their
// own compile with this suffix; only the units without it run entirely eager.
const SPLIT = / \[its \d+ submodules compiled separately\]$/;

function eagerEntries(report) {
  return fallbackEntries(report).filter(([, why]) => !SPLIT.test(why));
}

function splitCount(report) {
  return fallbackEntries(report).length - eagerEntries(report).length;
}

function backendLabel(c) {
  const missing = c.requested && c.requested !== "auto" && c.backend && c.requested !== c.backend;
  return missing ? `${c.backend} (${c.requested} not available)` : c.backend ?? "";
}

/** Dynamo's graph breaks of a compiled UNet, most frequent first: [[reason, count], ...]. */
function breakEntries(report) {
  return Object.entries(report?.graph_breaks ?? {}).sort((a, b) => b[1] - a[1]);
}

/** The toast for an event, or null. */
export function toastFor(event, d) {
  const r = d.report ?? {};
  switch (event) {
    case "compile_start":
      return { severity: "info", summary: "SD Accel: compiling the UNet", life: 5000,
        detail: `${d.backend} (${d.mode}) on ${d.target}. The first run is slower while it compiles.` };
    case "compile_end": {
      const breaks = breakEntries(r);
      const detail = `${backendLabel(r)} (${r.mode}) in ${formatSeconds(r.compile_seconds)}.`;
      if (!breaks.length) return { severity: "success", summary: "SD Accel: UNet compiled", life: 5000, detail };
      const n = breaks.reduce((sum, [, count]) => sum + count, 0);
      return { severity: "warn", summary: `SD Accel: UNet compiled with ${n} graph break${n === 1 ? "" : "s"}`, life: 12000,
        detail: [detail, "The code between the graphs runs eager (slower):", ...breaks.slice(0, 3).map(([why, c]) => `${why} (x${c})`)].join("\n") };
    }
    case "fallback": {
      const kept = eagerEntries(r);
      const summary = r.status === "eager" ? "SD Accel: UNet not compiled, it runs eager"
        : `SD Accel: ${r.units_compiled} blocks compiled, ${kept.length} kept eager`;
      const lines = [];
      if (r.whole_error) lines.push(`Whole UNet: ${r.whole_error}`);
      for (const [unit, why] of kept.slice(0, 5)) lines.push(`${unit}: ${why}`);
      if (kept.length > 5) lines.push(`... and ${kept.length - 5} more (see the ComfyUI console)`);
      const split = splitCount(r);
      if (split) lines.push(`${split} block${split === 1 ? " was" : "s were"} split: their parts compiled separately`);
      return { severity: "warn", summary, detail: lines.join("\n"), life: 12000 };
    }
    case "deepcache_stats":
      return d.disabled ? { severity: "warn", summary: "SD Accel DeepCache: caching was off for this run", detail: String(d.disabled), life: 8000 } : null;
    default:
      return null;
  }
}

function compileText(state, now) {
  const entries = Object.values(state.compiles);
  const phase = phaseOf(state);
  const first = entries[0] ?? {};
  if (phase === "compiling") {
    const c = entries.find((e) => e.status === "compiling");
    const elapsed = c.startedAt != null ? formatSeconds((now - c.startedAt) / 1000) : "";
    const blocks = c.total ? ` · block ${Math.min(c.done, c.total)}/${c.total}` : "";
    return `◔ compiling ${c.backend ?? ""} ${elapsed}${blocks}`.replace(/\s+/g, " ").trim();
  }
  if (phase === "ready") return `✓ compiled ${backendLabel(first)}`.trim();
  if (phase === "fallback") {
    const eager = entries.reduce((acc, e) => acc + eagerEntries(e.report).length, 0);
    const compiled = entries.reduce((acc, e) => acc + (e.report?.units_compiled ?? 0), 0);
    return `⚠ partial: ${compiled} compiled, ${eager} eager`;
  }
  if (phase === "eager") return "✗ not compiled (eager)";
  return phase === "armed" ? "compiles on first run" : "";
}

/** The one-line badge drawn above the node's title. */
export function badgeText(state, now = Date.now()) {
  if (!state) return "";
  const parts = [];
  if (state.kind === "compile" || Object.keys(state.compiles).length) {
    const t = compileText(state, now);
    if (t) parts.push(t);
  } else if (state.lora) {
    parts.push(`✓ LoRA swapped in ${formatSeconds(state.lora.seconds)}`);
  } else if (state.applied && !state.run) {
    parts.push("✓ applied");
  }
  if (state.run && phaseOf(state) !== "compiling") {
    const rate = formatRate(state.run.its);
    if (rate) parts.push(rate);
  }
  if (state.deepcache && (state.kind === "deepcache" || state.run)) {
    parts.push(`DeepCache ${Math.round(100 * state.deepcache.ratio)}%`);
  }
  return parts.join(" · ");
}

export function badgeColors(state) {
  const phase = phaseOf(state);
  if (phase === "compiling") return { fg: "#1b1b1b", bg: "#f5c542" };
  if (phase === "fallback") return { fg: "#1b1b1b", bg: "#f59e42" };
  if (phase === "eager") return { fg: "#ffffff", bg: "#c0392b" };
  return { fg: "#ffffff", bg: "#2e7d32" };
}

/** Lines drawn under the node: why something fell back, what the last run cost. */
export function detailLines(state, max = 4) {
  if (!state) return [];
  const lines = [];
  for (const c of Object.values(state.compiles)) {
    if (c.status === "compiling" && c.wholeError) lines.push(`whole UNet failed (${c.wholeError}); compiling block by block`);
    const breaks = breakEntries(c.report);
    if (breaks.length) lines.push(`${breaks.reduce((sum, [, n]) => sum + n, 0)} graph break(s): ${breaks[0][0]}`);
    if (c.status !== "partial" && c.status !== "eager") continue;
    if (c.report?.whole_error) lines.push(`whole UNet: ${c.report.whole_error}`);
    for (const [unit, why] of eagerEntries(c.report)) lines.push(`eager ${unit}: ${why}`);
  }
  const first = Object.values(state.compiles)[0];
  if (first && first.requested && first.requested !== "auto" && first.backend && first.requested !== first.backend) {
    lines.unshift(`${first.requested} is not installed here; using ${first.backend}`);
  }
  if (state.kind === "compile" && state.run?.compileSeconds > 0) lines.push(`last run included ${formatSeconds(state.run.compileSeconds)} of compiling`);
  if (state.deepcache?.disabled) lines.push(`DeepCache off: ${state.deepcache.disabled}`);
  if (lines.length > max) return [...lines.slice(0, max - 1), `... ${lines.length - max + 1} more in the console`];
  return lines;
}

/** The reasons as a toast (a click on the badge): Nodes 2.0 draws no lines under the node. */
export function detailToast(state) {
  const lines = detailLines(state, 12);
  if (!lines.length) return null;
  const severity = phaseOf(state) === "eager" || phaseOf(state) === "fallback" ? "warn" : "info";
  return { severity, summary: `SD Accel: ${badgeText(state) || "status"}`, detail: lines.join("\n"), life: 12000 };
}

/** [{id, type, node}] of a graph's nodes, with nodes inside subgraphs under the ids the
 * server uses for them ("<subgraph node id>:<inner id>"). */
export function flattenGraph(graph, prefix = "", depth = 0) {
  const out = [];
  for (const node of graph?._nodes ?? graph?.nodes ?? []) {
    const id = `${prefix}${node.id}`;
    out.push({ id, type: node.comfyClass ?? node.type, node });
    if (node.subgraph && depth < 8) out.push(...flattenGraph(node.subgraph, `${id}:`, depth + 1));
  }
  return out;
}
