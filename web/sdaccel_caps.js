// What the running ComfyUI frontend offers an extension, probed from the objects it hands
// over, never from its version number (frontends 1.27 to 1.49 differ in these places).
// Import-free, like sdaccel_state.js: tests/js runs it against fakes shaped like each frontend.

/** The workflow's root graph: `app.rootGraph` where the frontend has it (1.35 on; `app.graph`
 * is its deprecated alias there), else `app.graph`. Subgraphs hang below it. */
export function rootGraphOf(app) {
  return app && "rootGraph" in app ? app.rootGraph : app?.graph;
}

/** A setting reader: the extension manager's setting store, else the legacy settings dialog. */
export function settingReader(app) {
  return (id) => {
    const store = app?.extensionManager?.setting;
    if (typeof store?.get === "function") return store.get(id);
    const legacy = app?.ui?.settings;
    return typeof legacy?.getSettingValue === "function" ? legacy.getSettingValue(id) : undefined;
  };
}

/** A toast function: the frontend's toast store, else one console line. Looked up per call,
 * since the extension manager is filled in after extensions register. */
export function toaster(app, con = console) {
  return (t) => {
    const toast = app?.extensionManager?.toast;
    if (typeof toast?.add === "function") return toast.add(t);
    (t.severity === "warn" ? con.warn : con.info)(`${t.summary}: ${t.detail}`);
  };
}

/** "badges" where the node has a badge list and the frontend exports LGraphBadge (both the
 * canvas and the Nodes 2.0 renderer read it), else "draw" (we paint the text ourselves). */
export function badgeMode(node, g = globalThis) {
  return Array.isArray(node?.badges) && typeof g?.LGraphBadge === "function" ? "badges" : "draw";
}

/** A cell whose changes the Nodes 2.0 renderer notices. That renderer reads a badge getter
 * inside a Vue computed that runs again only when something reactive it read has changed, and
 * it has no signal for "an extension badge changed" (1.49 re-reads only its own price badges).
 * Vue hands back any object stored into a reactive one as a reactive proxy; the extension
 * manager is a Pinia store, so a plain object passed through it once comes back reactive. A
 * getter that reads `cell.n` is then re-run whenever `cell.n` changes. Without such a store,
 * a plain object: nothing to notify, nothing lost (the canvas repaints on setDirty). */
export function reactiveCell(store, key = "__sdaccelCell") {
  const cell = { n: 0 };
  if (!store || typeof store !== "object") return cell;
  try {
    store[key] = cell;
    const back = store[key];
    delete store[key];
    return back && typeof back === "object" ? back : cell;
  } catch {
    return cell;
  }
}
