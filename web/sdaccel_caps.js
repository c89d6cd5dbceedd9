// What the running ComfyUI frontend offers an extension, probed from the objects it hands
// over, never from its version number (frontends 1.27 to 1.49 differ in these places).
// Import-free, like sdaccel_state.js: tests/js runs it against fakes shaped like each frontend.

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

/** Tell the frontend that a node's badges changed. The canvas renderer repaints on
 * setDirty; the Nodes 2.0 renderer copies the badges into its own node data and re-reads
 * them on this graph trigger (the one the frontend sends for its own price badges).
 * Frontends without that listener ignore it. Returns whether a trigger was sent. */
export function announceBadges(node) {
  const graph = node?.graph;
  if (typeof graph?.trigger !== "function") return false;
  graph.trigger("node:property:changed", {
    type: "node:property:changed", nodeId: node.id, property: "badges", oldValue: node.badges, newValue: node.badges,
  });
  return true;
}
